"""`vmshift image build`"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from vmshift.cli import context
from vmshift.cli.hosts import JsonOpt
from vmshift.cli.output import emit_json, err_console, wait_with_progress
from vmshift.errors import InvalidInputError
from vmshift.model.images import ImportFormat
from vmshift.model.inputs import NAME_MAX

DEFAULT_IMAGES = Path("/var/lib/vmshift/images")
image_app = typer.Typer(help="Guest images.", no_args_is_help=True)


class BuildKind(StrEnum):
    LAB = "lab"  # lab-guest and lab-disk: seconds to build and to boot
    DEBIAN = "debian"  # debian-12: Debian 12 with systemd and cloud-init (minutes)


@image_app.command("build")
def image_build(
    images_dir: Annotated[Path, typer.Option(help="Where images are kept.")] = DEFAULT_IMAGES,
    kind: Annotated[BuildKind, typer.Option(
        help="lab: lab-guest and lab-disk; debian: debian-12.")] = BuildKind.LAB,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if up to date.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Build the lab guest images: 'lab-guest' (Debian cloud kernel + busybox + vmshift-guestd, booted
    as a kernel) and 'lab-disk' (the same guest on a SYSLINUX disk, booted by the BIOS); with --kind
    debian 'debian-12' (Debian 12 from its packages with cloud-init, on a BIOS-booted disk)."""
    from vmshift.lab.disk_image import build_disk_image
    from vmshift.lab.image import build_image

    def progress(msg: str) -> None:
        if not json_:
            err_console.print(f"[dim]image:[/] {msg}")

    if kind is BuildKind.DEBIAN:
        from vmshift.lab.debian_image import DEBIAN_IMAGE_NAME, build_debian_image

        folder = build_debian_image(images_dir, force=force, progress=progress)
        if json_:
            emit_json({"image": DEBIAN_IMAGE_NAME, "path": str(folder),
                       "images": {DEBIAN_IMAGE_NAME: str(folder)}})
        else:
            typer.echo(f"Image {DEBIAN_IMAGE_NAME} ready in {folder}")
        return

    path = build_image(images_dir, force=force, progress=progress)
    disk = build_disk_image(images_dir, force=force, progress=progress)
    if json_:
        emit_json({"image": "lab-guest", "path": str(path), "images": {"lab-guest": str(path),
                                                                        "lab-disk": str(disk)}})
    else:
        typer.echo(f"Image lab-guest ready in {path}")
        typer.echo(f"Image lab-disk ready in {disk}")


def default_image_name(path: Path) -> str:
    """``debian-12-genericcloud-amd64.qcow2`` -> ``debian-12-genericcloud-amd64``: the file name without
    its disk suffix, other characters than the name rule allows replaced by '-'."""
    stem = path.name
    for suffix in (".qcow2", ".img", ".raw", ".vmdk", ".vhdx", ".vdi"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).lstrip("._-")[:NAME_MAX]
    if not name:
        raise InvalidInputError(f"No image name can be made from the file name {path.name!r}.",
                                hint="Give one with --name.")
    return name


@image_app.command("import")
def image_import(
    file: Annotated[Path, typer.Argument(help="The image file (qcow2, raw, vmdk, vhdx or vdi), a path the "
                                         "importing host can read.")],
    datastore: Annotated[str, typer.Option(help="Datastore to record the image on.")],
    name: Annotated[str | None, typer.Option(help="Image name (default: the file name, no suffix).")] = None,
    host: Annotated[str | None, typer.Option(help="Host that converts it (default: one that sees the "
                                             "datastore).")] = None,
    format_: Annotated[ImportFormat | None, typer.Option(
        "--format", help="The file's format (default: as qemu-img detects it; a raw file must say raw).",
    )] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return the task id at once.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Import a disk image onto a datastore (checked with qemu-img, converted to qcow2), so
    'vmshift vm create --disk-image NAME' boots from it."""
    path = file.expanduser().resolve()
    if not path.is_file():
        raise InvalidInputError(f"The file {file} does not exist.", hint="Give the path of an image file.")
    body = {"file": str(path), "name": name or default_image_name(path), "datastore": datastore,
            "host": host, "format": format_.value if format_ is not None else None}
    with context.client() as c:
        task = c.import_image(body)
        if no_wait:
            if json_:
                emit_json(task)
            else:
                typer.echo(f"Task {task['id']} queued; follow it with 'vmshift task watch {task['id']}'.")
            return
        final = wait_with_progress(c, task, quiet=json_)
    if json_:
        emit_json(final)
    else:
        result = final.get("result") or {}
        typer.echo(f"Image {body['name']} imported onto {datastore} ({result.get('format')}, "
                   f"{result.get('virtual_size_mib')} MiB).")
