"""`vmshift image build`"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vmshift.cli.hosts import JsonOpt
from vmshift.cli.output import emit_json, err_console

DEFAULT_IMAGES = Path("/var/lib/vmshift/images")
image_app = typer.Typer(help="Guest images.", no_args_is_help=True)


@image_app.command("build")
def image_build(
    images_dir: Annotated[Path, typer.Option(help="Where images are kept.")] = DEFAULT_IMAGES,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if up to date.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Build the lab guest images: 'lab-guest' (Debian cloud kernel + busybox + vmshift-guestd, booted
    as a kernel) and 'lab-disk' (the same guest on a SYSLINUX disk, booted by the BIOS)."""
    from vmshift.lab.disk_image import build_disk_image
    from vmshift.lab.image import build_image

    def progress(msg: str) -> None:
        if not json_:
            err_console.print(f"[dim]image:[/] {msg}")

    path = build_image(images_dir, force=force, progress=progress)
    disk = build_disk_image(images_dir, force=force, progress=progress)
    if json_:
        emit_json({"image": "lab-guest", "path": str(path), "images": {"lab-guest": str(path),
                                                                        "lab-disk": str(disk)}})
    else:
        typer.echo(f"Image lab-guest ready in {path}")
        typer.echo(f"Image lab-disk ready in {disk}")
