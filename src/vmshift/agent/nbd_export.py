"""Target role of a disk move to another host: create the VM's disks here and export them over NBD.

``POST /disk-exports`` creates each disk of the VM's target spec on its datastore (empty, so it
reads as zeros), plus the state file of a suspended VM, and serves them writable on the host's
migration address: one ``qemu-storage-daemon`` with one NBD server and one export per image when
it is installed, else one ``qemu-nbd`` per image. The source copies into them (``qemu-img convert``
for a stopped VM, ``blockdev-mirror`` for a running one). ``DELETE /disk-exports/ID`` stops the
exporters, and either keeps the files (the move succeeded: the server registers the VM here) or
removes them (rollback).

Exporters run in their own session and outlive the agent (a restarted target agent must not break
a copy in flight); ``state_dir/disk-exports/ID.json`` records their pids and every file and folder
created, written before anything is created, so a later ``DELETE`` cleans up after any crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

import psutil
from pydantic import BaseModel, Field, ValidationError

from vmshift.agent.disk_copy import create_image
from vmshift.agent.vmfiles import VmFiles
from vmshift.errors import ConflictError, InvalidInputError, QemuError
from vmshift.model.enums import DiskFormat
from vmshift.model.moves import DiskExportRequest, DiskExports, NbdTarget

log = logging.getLogger(__name__)

EXPORTS_DIR = "disk-exports"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
PORT_ATTEMPTS = 3
STATE_EXPORT = "state"


class ExportBackend(StrEnum):
    STORAGE_DAEMON = "qemu-storage-daemon"  # one process, one NBD server, one export per image
    QEMU_NBD = "qemu-nbd"  # one process and one port per image


class ExportedImage(BaseModel):
    """One image served over NBD."""

    name: str = Field(description="NBD export name")
    path: str
    fmt: DiskFormat


class ExporterProcess(BaseModel):
    pid: int
    pidfile: str = Field(description="its pid file; its command line names it, which identifies it later")


class ExportRecord(BaseModel):
    """``state_dir/disk-exports/ID.json``."""

    move_id: int
    nonce: str
    vm: str
    backend: ExportBackend
    created_at: float = Field(default_factory=time.time)
    files: list[str] = Field(default_factory=list, description="files this move creates here")
    dirs: list[str] = Field(default_factory=list, description="folders this move creates here")
    state_file: str | None = None
    state_size_bytes: int | None = None
    processes: list[ExporterProcess] = Field(default_factory=list)
    exports: DiskExports | None = None


# ----- pure: command lines --------------------------------------------------------------------
def disk_export_name(move_id: int, index: int) -> str:
    return f"move{move_id}-disk{index}"


def state_export_name(move_id: int) -> str:
    return f"move{move_id}-{STATE_EXPORT}"


def nbd_uri(address: str, port: int, name: str) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"nbd://{host}:{port}/{name}"


def storage_daemon_argv(binary: str, address: str, port: int, pidfile: Path,
                        images: list[ExportedImage]) -> list[str]:
    """One ``qemu-storage-daemon``: per image a file node (+ a qcow2 node) and one writable NBD export
    (exports follow the NBD server on the command line); ``--daemonize`` returns once it listens."""
    nodes: list[str] = []
    exports: list[str] = []
    for i, img in enumerate(images):
        nodes += ["--blockdev", f"driver=file,node-name=file{i},filename={_opt(img.path)}"]
        node = f"file{i}"
        if img.fmt is DiskFormat.QCOW2:
            nodes += ["--blockdev", f"driver=qcow2,node-name=fmt{i},file=file{i}"]
            node = f"fmt{i}"
        exports += ["--export", f"type=nbd,id=exp{i},node-name={node},name={img.name},writable=on"]
    server = ["--nbd-server", f"addr.type=inet,addr.host={address},addr.port={port}"]
    return [binary, *nodes, *server, *exports, "--pidfile", str(pidfile), "--daemonize"]


def qemu_nbd_argv(binary: str, address: str, port: int, pidfile: Path, img: ExportedImage) -> list[str]:
    """One ``qemu-nbd`` for one image; ``--fork`` returns once it listens; ``--persistent`` and
    ``--shared`` let the copy and then the compare connect in turn."""
    return [binary, "--fork", f"--pid-file={pidfile}", "--persistent", "--shared=4", "--cache=writeback",
            f"--format={img.fmt.value}", f"--bind={address}", f"--port={port}",
            f"--export-name={img.name}", img.path]


def _opt(value: str) -> str:
    return value.replace(",", ",,")


# ----- I/O ----------------------------------------------------------------------------------------
def free_port(address: str) -> int:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _exporter(proc: ExporterProcess) -> psutil.Process | None:
    """The live exporter a record names, recognised by its pid file in its command line."""
    try:
        p = psutil.Process(proc.pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p if any(proc.pidfile in arg for arg in p.cmdline()) else None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _stop_exporter(proc: ExporterProcess) -> None:
    """SIGTERM (both exporters flush and close their images), SIGKILL after STOP_TIMEOUT_S."""
    if proc.pid == 0:  # the agent stopped between starting it and reading its pid file
        proc = ExporterProcess(pid=_read_pid(Path(proc.pidfile)) or 0, pidfile=proc.pidfile)
    p = _exporter(proc) if proc.pid else None
    if p is None:
        Path(proc.pidfile).unlink(missing_ok=True)
        return
    with contextlib.suppress(psutil.NoSuchProcess):
        p.terminate()
        try:
            p.wait(STOP_TIMEOUT_S)
        except psutil.TimeoutExpired:
            log.warning("exporter pid %d ignored SIGTERM for %.0f s: killing it", proc.pid, STOP_TIMEOUT_S)
            p.kill()
            p.wait(STOP_TIMEOUT_S)
    Path(proc.pidfile).unlink(missing_ok=True)


class TargetExports:
    """The NBD exports of disk moves into this host."""

    def __init__(self, files: VmFiles, state_dir: Path, migration_address: str, *, qemu_img: str = "qemu-img",
                 backend: ExportBackend | None = None) -> None:
        self.files = files
        self.dir = state_dir / EXPORTS_DIR
        self.address = migration_address
        self.qemu_img = qemu_img
        if backend is None:
            found = shutil.which(ExportBackend.STORAGE_DAEMON.value)
            backend = ExportBackend.STORAGE_DAEMON if found else ExportBackend.QEMU_NBD
        self.backend = backend
        self._lock = asyncio.Lock()

    # -- records
    def _path(self, move_id: int) -> Path:
        return self.dir / f"{move_id}.json"

    def _save(self, rec: ExportRecord) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(rec.move_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(rec.model_dump_json(indent=1))
        tmp.replace(path)

    def load(self, move_id: int) -> ExportRecord | None:
        path = self._path(move_id)
        try:
            return ExportRecord.model_validate_json(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            log.warning("ignoring unreadable disk-export record %s: %s", path, exc)
            return None

    def all(self) -> list[ExportRecord]:
        if not self.dir.is_dir():
            return []
        recs = [self.load(int(p.stem)) for p in sorted(self.dir.glob("*.json")) if p.stem.isdigit()]
        return [r for r in recs if r is not None]

    def alive(self, rec: ExportRecord) -> bool:
        return bool(rec.processes) and all(_exporter(p) is not None for p in rec.processes)

    def log_orphans(self) -> None:
        """At agent start: say which exports are still served (they outlived the agent on purpose)."""
        for rec in self.all():
            state = "served" if self.alive(rec) else "no longer served"
            log.info("disk exports of move %d (VM %s) are %s; DELETE /api/v1/disk-exports/%d ends them",
                     rec.move_id, rec.vm, state, rec.move_id)

    # -- create
    async def create(self, req: DiskExportRequest) -> DiskExports:
        if not self.address:
            raise InvalidInputError("This host has no migration address, so it cannot export disks.",
                                    hint="Set 'migration_address' in the agent config.")
        spec = req.spec
        if len(req.sizes_bytes) != len(spec.disks):
            raise InvalidInputError(f"The request gives {len(req.sizes_bytes)} disk sizes for the "
                                    f"{len(spec.disks)} disks of VM {spec.name!r}.",
                                    hint="Send one virtual size per disk of the spec, in order.")
        async with self._lock:
            old = self.load(req.move_id)
            if old is not None:
                if old.nonce != req.nonce:
                    raise ConflictError(f"Move {req.move_id} of another server or an older database "
                                        f"still exports disks of VM {old.vm!r} on this host.",
                                        hint=f"End it first (DELETE /api/v1/disk-exports/{req.move_id}).")
                if old.exports is not None and self.alive(old):
                    return old.exports  # the same request again: idempotent
                await self._remove(old, keep_files=False)
            if spec.name in self.files.registered_names():
                raise ConflictError(f"VM {spec.name!r} is already defined on this host.",
                                    hint="Move it to a host that does not have it.")
            rec = self._plan(req)
            self._save(rec)  # before any file exists: a crash from here on is cleaned up by DELETE
            try:
                return await self._build(req, rec)
            except BaseException:
                await self._remove(rec, keep_files=False)
                raise

    def _plan(self, req: DiskExportRequest) -> ExportRecord:
        """What the move will create here; refuses if any of those files exists already."""
        paths = self.files.paths(req.spec)
        self.files.require_file_disks(req.spec, "A move to another host")
        files = [str(p) for p in paths.disks]
        state_file = None
        if req.state_size_bytes is not None:
            state_file = str(paths.suspend_state)
            files.append(state_file)
        taken = [f for f in files if os.path.lexists(f)]
        if taken:
            raise ConflictError(f"The target file {taken[0]} exists already, so VM {req.spec.name!r} cannot "
                                "be copied there.",
                                hint="Remove the old VM's files from that datastore or pick another one.")
        dirs = sorted({str(Path(f).parent) for f in files} | {str(paths.vm_dir)})
        return ExportRecord(move_id=req.move_id, nonce=req.nonce, vm=req.spec.name, backend=self.backend,
                            files=files, dirs=[d for d in dirs if not Path(d).exists()],
                            state_file=state_file, state_size_bytes=req.state_size_bytes)

    async def _build(self, req: DiskExportRequest, rec: ExportRecord) -> DiskExports:
        for d in rec.dirs:
            Path(d).mkdir(parents=True, exist_ok=True)
        images: list[ExportedImage] = []
        for i, (disk, size) in enumerate(zip(req.spec.disks, req.sizes_bytes, strict=True)):
            path = Path(rec.files[i])
            # the spec's format is what QEMU will open the disk with here (req.disk_format is the server's
            # request for the whole move; the server writes it into the spec)
            await create_image(self.qemu_img, path, disk.format, size)
            name = disk_export_name(req.move_id, i)
            images.append(ExportedImage(name=name, path=str(path), fmt=disk.format))
        if rec.state_file is not None and req.state_size_bytes is not None:
            with open(rec.state_file, "xb") as f:
                f.truncate(req.state_size_bytes)
            images.append(ExportedImage(name=state_export_name(req.move_id), path=rec.state_file,
                                        fmt=DiskFormat.RAW))
        ports = await self._start(rec, images)
        targets = [NbdTarget(index=i, uri=nbd_uri(self.address, ports[i], images[i].name), size_bytes=size)
                   for i, size in enumerate(req.sizes_bytes)]
        state_uri = None
        if rec.state_file is not None:
            state_uri = nbd_uri(self.address, ports[-1], images[-1].name)
        rec.exports = DiskExports(move_id=req.move_id, targets=targets, state_uri=state_uri)
        self._save(rec)
        log.info("exporting %d image(s) of VM %s for move %d (%s)", len(images), req.spec.name,
                 req.move_id, self.backend.value)
        return rec.exports

    async def _start(self, rec: ExportRecord, images: list[ExportedImage]) -> list[int]:
        """Start the exporter(s); the port of each image, in order."""
        if self.backend is ExportBackend.STORAGE_DAEMON:
            pidfile = self.dir / f"{rec.move_id}.qsd.pid"
            port = await self._spawn(rec, pidfile, lambda p: storage_daemon_argv(
                ExportBackend.STORAGE_DAEMON.value, self.address, p, pidfile, images))
            return [port] * len(images)
        ports = []
        for i, img in enumerate(images):
            pidfile = self.dir / f"{rec.move_id}.nbd{i}.pid"
            ports.append(await self._spawn(rec, pidfile, _nbd_argv_for(self.address, pidfile, img)))
        return ports

    async def _spawn(self, rec: ExportRecord, pidfile: Path, argv_for: Callable[[int], list[str]]) -> int:
        """Run a forking exporter on a free port (another try on a port taken meanwhile); record its pid."""
        last = ""
        for _ in range(PORT_ATTEMPTS):
            port = free_port(self.address)
            argv = argv_for(port)
            rec.processes.append(ExporterProcess(pid=0, pidfile=str(pidfile)))
            self._save(rec)
            code, err = await _run_forking(argv)
            pid = _read_pid(pidfile)
            if code == 0 and pid is not None:
                rec.processes[-1] = ExporterProcess(pid=pid, pidfile=str(pidfile))
                self._save(rec)
                return port
            if pid is not None:  # it forked but did not report ready (timeout): do not leave it behind
                await asyncio.to_thread(_stop_exporter, ExporterProcess(pid=pid, pidfile=str(pidfile)))
            rec.processes.pop()
            last = err.strip().splitlines()[-1] if err.strip() else f"exit status {code}"
            if "in use" not in last:
                break
        raise QemuError(f"{argv[0]} could not export the disks on {self.address}: {last}.",
                        hint="Check the migration address and the target datastore, then try again.")

    # -- delete
    async def delete(self, move_id: int, *, keep_files: bool) -> bool:
        """Stop the exporters of a move; ``keep_files`` false also removes its files. False if unknown."""
        async with self._lock:
            rec = self.load(move_id)
            if rec is None:
                return False
            await self._remove(rec, keep_files=keep_files)
            return True

    async def _remove(self, rec: ExportRecord, *, keep_files: bool) -> None:
        for proc in rec.processes:
            await asyncio.to_thread(_stop_exporter, proc)
        if keep_files:
            if rec.state_file is not None and rec.state_size_bytes is not None:
                # NBD offers whole 512-byte sectors, so the copy may have grown the state file to the next one
                with contextlib.suppress(FileNotFoundError):
                    os.truncate(rec.state_file, rec.state_size_bytes)
        else:
            for f in rec.files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f)
            for d in sorted(rec.dirs, key=len, reverse=True):
                with contextlib.suppress(OSError):  # not empty: something else lives there now
                    os.rmdir(d)
        self._path(rec.move_id).unlink(missing_ok=True)
        log.info("disk exports of move %d ended (%s)", rec.move_id,
                 "files kept" if keep_files else "files removed")

    async def close(self) -> None:
        """Agent shutdown: exporters keep running (a copy in flight must not break)."""


async def _run_forking(argv: list[str]) -> tuple[int, str]:
    """Run an exporter that forks once it listens; its parent's exit status and stderr."""
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        raise QemuError(f"{argv[0]} cannot be run ({exc.strerror}).",
                        hint="Install qemu-utils (qemu-nbd) or qemu-storage-daemon.") from exc
    try:
        _, err = await asyncio.wait_for(proc.communicate(), READY_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return -1, f"{argv[0]} did not start listening in {READY_TIMEOUT_S:.0f} s"
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace")


def _nbd_argv_for(address: str, pidfile: Path, img: ExportedImage) -> Callable[[int], list[str]]:
    return lambda port: qemu_nbd_argv(ExportBackend.QEMU_NBD.value, address, port, pidfile, img)


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
