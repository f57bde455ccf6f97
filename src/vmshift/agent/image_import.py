"""Import a disk image file onto a datastore: ``qemu-img info`` and ``check`` first (a corrupt or
truncated file is refused before anything is written), then ``qemu-img convert -p`` to qcow2 in a
hidden folder beside the images, renamed to ``DATASTORE/images/NAME/`` with its ``image.json`` only
when whole. A failed or cancelled import removes its folder: nothing is left behind.

One import per image name at a time; the progress of each (running or ended) is kept in memory
until the agent restarts (the server's task polls it). Routes: docs/images.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import tarfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from vmshift.agent.datastores import IMAGES_DIR, Datastores
from vmshift.agent.disk_copy import ProgressReader, _last_line, _run, _stop
from vmshift.errors import ConflictError, InvalidInputError, NotFoundError, QemuError
from vmshift.model.enums import BootKind
from vmshift.model.images import (
    IMAGE_DISK_FILE,
    MAX_DESCRIPTOR,
    AgentImageImport,
    ImportFormat,
    ImportProgress,
    ImportState,
    OvaContents,
    OvaRequest,
    check_verdict,
    import_format,
    virtual_size_mib,
)
from vmshift.model.inputs import DatastoreName, ImageName

log = logging.getLogger(__name__)


def info_argv(qemu_img: str, source: str) -> list[str]:
    """Probe the format (no ``-f``), and never follow a backing file."""
    return [qemu_img, "info", "--output=json", "-U", source]


def check_argv(qemu_img: str, source: str, fmt: ImportFormat) -> list[str]:
    return [qemu_img, "check", "-U", "--output=json", "-f", fmt.value, source]


def import_convert_argv(qemu_img: str, source: str, fmt: ImportFormat, target: str) -> list[str]:
    """To a new qcow2 (``-p`` progress, ``-t writeback`` so it is flushed at the end)."""
    return [qemu_img, "convert", "-p", "-t", "writeback", "-f", fmt.value, "-O", "qcow2", source, target]


def member_source(ova: Path, member: str) -> str:
    """A qemu-img source that reads tar member ``member`` of ``ova`` in place (a raw node at the
    member's offset under the format driver), so an OVA's disk is converted without unpacking it."""
    found = ova_members(ova).get(member)
    if found is None:
        raise InvalidInputError(f"The OVA {ova} has no file {member!r}.",
                                hint="The OVF descriptor names a disk the archive does not hold: export the "
                                "VM again.")
    offset, size = found
    node = {"file": {"driver": "raw", "offset": offset, "size": size,
                     "file": {"driver": "file", "filename": str(ova)}}}
    return "json:" + json.dumps(node)


def ova_members(ova: Path) -> dict[str, tuple[int, int]]:
    """Regular files of the OVA's tar: name -> (offset of its data, size). A tar cut short is told
    apart from a file that is no tar at all."""
    what = f"The file {ova}"
    members: dict[str, tuple[int, int]] = {}
    broken: str | None = None
    try:
        with tarfile.open(ova, mode="r:") as tar:
            for m in tar:
                if m.isfile():
                    members[m.name] = (m.offset_data, m.size)
    except (tarfile.TarError, EOFError) as e:
        broken = str(e) or type(e).__name__
    end = ova.stat().st_size
    cut = sorted(name for name, (offset, size) in members.items() if offset + size > end)
    if cut or (broken and members):
        where = f"inside {', '.join(cut)}" if cut else f"after {list(members)[-1]}"
        raise InvalidInputError(f"{what} is truncated: it ends {where}.",
                                hint="Copy or download the OVA again.")
    if broken:
        raise InvalidInputError(f"{what} is not an OVA: it is not a tar archive ({broken}).",
                                hint="An OVA is a tar of an .ovf descriptor and its disks.")
    return members


def read_ova(ova: Path) -> OvaContents:
    """The OVF descriptor of an OVA (the first ``*.ovf`` member, as DSP0243 places it) and its files."""
    members = ova_members(ova)
    descriptors = [name for name in members if name.lower().endswith(".ovf")]
    if not descriptors:
        raise InvalidInputError(f"The file {ova} holds no OVF descriptor (no .ovf file in the archive).",
                                hint="An OVA is a tar whose first file is the VM's .ovf descriptor.")
    offset, size = members[descriptors[0]]
    if size > MAX_DESCRIPTOR:
        raise InvalidInputError(f"The OVF descriptor of {ova} is {size} bytes; vmshift reads up to "
                                f"{MAX_DESCRIPTOR}.", hint="Check the file.")
    with ova.open("rb") as f:
        f.seek(offset)
        text = f.read(size).decode("utf-8", errors="replace")
    return OvaContents(descriptor=text, descriptor_name=descriptors[0], files=sorted(members))


#: An image is read by every VM made from it, and QEMU runs unprivileged (agent/qemu_user.py): its
#: folder and files are readable by all, like lab-guest's, though the agent's umask makes them 0600.
IMAGE_DIR_MODE, IMAGE_FILE_MODE = 0o755, 0o644


def make_readable(folder: Path) -> None:
    folder.chmod(IMAGE_DIR_MODE)
    for path in folder.iterdir():
        path.chmod(IMAGE_FILE_MODE)


def staging_dir(datastore: Path, name: str) -> Path:
    return datastore / IMAGES_DIR / f".{name}.importing"


class ImageImports:
    def __init__(self, datastores: Datastores, qemu_img: str) -> None:
        self.datastores = datastores
        self.qemu_img = qemu_img
        self.jobs: dict[str, ImportProgress] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self, req: AgentImageImport) -> ImportProgress:
        """Check the file and start converting it; refusals come before anything is written."""
        ds = self.datastores.get(req.datastore)
        running = self._tasks.get(req.name)
        if running is not None and not running.done():
            raise ConflictError(f"Image {req.name!r} is being imported already.",
                                hint="Wait for that import.")
        final = ds.path / IMAGES_DIR / req.name
        if final.exists():
            raise ConflictError(f"Datastore {ds.name!r} already has an image {req.name!r}.",
                                hint="Pick another --name, or delete that image first.")
        if staging_dir(ds.path, req.name).exists():  # a shared datastore: maybe another host's import
            raise ConflictError(f"An import of image {req.name!r} onto datastore {ds.name!r} is under way "
                                "or was cut short.", hint=f"Remove {staging_dir(ds.path, req.name)} if no "
                                "host is importing it, then try again.")
        path = Path(req.file)
        what = f"The file {path}"
        if not path.is_file():
            raise NotFoundError(f"{what} does not exist on this host.",
                                hint="Give the absolute path of an image file the host can read.")
        source = str(path)
        if req.member is not None:
            what = f"Disk {req.member} of {path}"
            source = await asyncio.to_thread(member_source, path, req.member)
        code, out, err = await _run(info_argv(self.qemu_img, source))
        if code != 0:
            raise _unreadable(what, err)
        info = json.loads(out)
        fmt = import_format(info, req.format, what)
        size_mib = virtual_size_mib(info, what)
        if fmt is not ImportFormat.RAW:
            code, out, err = await _run(check_argv(self.qemu_img, source, fmt))
            check_verdict(code, out, _last_line(err) if err.strip() else "", what)
        origin = str(path) if req.member is None else f"{path}:{req.member}"
        job = ImportProgress(name=req.name, datastore=ds.name, source=origin, format=fmt,
                             virtual_size_mib=size_mib)
        self.jobs[req.name] = job
        staging = staging_dir(ds.path, req.name)
        staging.mkdir(parents=True)
        self._tasks[req.name] = asyncio.create_task(self._convert(job, source, staging, final),
                                                    name=f"image-import-{req.name}")
        return job

    async def _convert(self, job: ImportProgress, source: str, staging: Path, final: Path) -> None:
        target = staging / IMAGE_DISK_FILE
        argv = import_convert_argv(self.qemu_img, source, job.format, str(target))
        log.info("importing image %s: %s", job.name, " ".join(argv))
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
            assert proc.stdout is not None and proc.stderr is not None
            reader = ProgressReader(lambda share: setattr(job, "share", share))
            stdout, stderr = proc.stdout, proc.stderr

            async def pump() -> None:
                while chunk := await stdout.read(4096):
                    reader.feed(chunk.decode(errors="replace"))

            try:
                _, err = await asyncio.gather(pump(), stderr.read())
                await proc.wait()
            except asyncio.CancelledError:
                await _stop(proc)
                raise
            if proc.returncode != 0:
                raise QemuError(f"qemu-img could not convert {job.source}: {_last_line(err.decode())}.",
                                hint="Check the file and the datastore's free space.")
            meta = {"name": job.name, "kind": BootKind.DISK.value, "disk": IMAGE_DISK_FILE,
                    "disk_size_mib": job.virtual_size_mib, "imported_from": job.source,
                    "imported_format": job.format.value}
            (staging / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
            make_readable(staging)
            staging.rename(final)
            job.state, job.share = ImportState.DONE, 1.0
            log.info("image %s imported to %s", job.name, final)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            job.state = ImportState.FAILED
            job.error = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            job.hint = getattr(exc, "hint", None)
            if not isinstance(exc, Exception):
                raise
            log.warning("importing image %s failed: %s", job.name, job.error)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _unreadable(what: str, err: str) -> InvalidInputError:
    return InvalidInputError(f"qemu-img cannot read {what}: {_last_line(err)}.",
                             hint="Check that it is a disk image and was copied whole.")


def _imports(request: Request) -> ImageImports:
    imports: ImageImports = request.app.state.image_imports
    return imports


Imports = Annotated[ImageImports, Depends(_imports)]
router = APIRouter(prefix="/api/v1")


@router.post("/images/import", status_code=202)
async def start_import(body: AgentImageImport, imports: Imports) -> ImportProgress:
    """Check the file (4xx if it is not an importable whole disk) and start converting it."""
    return await imports.start(body)


@router.post("/images/ova")
async def inspect_ova(body: OvaRequest) -> OvaContents:
    """Read an OVA's descriptor and file list (nothing written): the server plans the import from it."""
    path = Path(body.file)
    if not path.is_file():
        raise NotFoundError(f"The file {path} does not exist on this host.",
                            hint="Give the absolute path of an OVA the host can read.")
    return await asyncio.to_thread(read_ova, path)


@router.delete("/images/{datastore}/{name}")
async def delete_image(datastore: DatastoreName, name: ImageName, imports: Imports) -> dict[str, str]:
    """Remove an imported image (the undo of a VM import that could not finish). Only images that
    ``image import`` made are removed: built ones (lab-guest) are not."""
    ds = imports.datastores.get(datastore)
    folder = ds.path / IMAGES_DIR / name
    meta = folder / "image.json"
    if not meta.is_file():
        raise NotFoundError(f"Datastore {datastore!r} has no image {name!r}.", hint="Nothing to remove.")
    if "imported_from" not in json.loads(meta.read_text()):
        raise ConflictError(f"Image {name!r} was not imported; vmshift removes imported images only.",
                            hint="Remove it by hand if it is no longer needed.")
    await asyncio.to_thread(shutil.rmtree, folder)
    return {"removed": name}


@router.get("/images/import/{name}")
async def import_progress(name: ImageName, imports: Imports) -> ImportProgress:
    job = imports.jobs.get(name)
    if job is None:
        raise NotFoundError(f"No import of image {name!r} ran on this host since its agent started.",
                            hint="Start one with POST /api/v1/images/import.")
    return job
