"""Image import (issue 10): what qemu-img's info and check say decides, and the agent's import with
real qemu-img: a good file becomes DATASTORE/images/NAME/, a bad one is refused with nothing left."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from vmshift.agent.datastores import Datastores
from vmshift.agent.image_import import ImageImports, staging_dir
from vmshift.cli.image import default_image_name
from vmshift.errors import ConflictError, InvalidInputError, NotFoundError
from vmshift.model.enums import BootKind
from vmshift.model.images import AgentImageImport, ImportFormat, ImportState, check_verdict, import_format


def test_probed_formats_are_taken_and_raw_must_be_declared() -> None:
    assert import_format({"format": "vmdk"}, None, "f") is ImportFormat.VMDK
    assert import_format({"format": "raw"}, ImportFormat.RAW, "f") is ImportFormat.RAW
    with pytest.raises(InvalidInputError, match="would be taken as raw"):
        import_format({"format": "raw"}, None, "The file x")
    with pytest.raises(InvalidInputError, match="is qcow2, not vdi"):
        import_format({"format": "qcow2"}, ImportFormat.VDI, "The file x")
    with pytest.raises(InvalidInputError, match="does not import"):
        import_format({"format": "parallels"}, None, "The file x")
    with pytest.raises(InvalidInputError, match=r"overlay of 'base\.qcow2'"):
        import_format({"format": "qcow2", "backing-filename": "base.qcow2"}, None, "The file x")


def test_check_verdicts() -> None:
    check_verdict(0, '{"corruptions": 0, "check-errors": 0}', "", "f")
    check_verdict(3, '{"leaks": 5}', "", "f")  # leaked clusters waste space, lose no data
    with pytest.raises(InvalidInputError, match=r"is corrupt .4 damaged clusters"):
        check_verdict(2, '{"corruptions": 4}', "", "The file x")
    with pytest.raises(InvalidInputError, match=r"cannot be checked to the end .*Check failed"):
        check_verdict(1, "", "Check failed: Invalid argument", "The file x")


def test_default_name_is_the_file_name_without_its_suffix() -> None:
    assert default_image_name(Path("/x/debian-12-genericcloud-amd64.qcow2")) == "debian-12-genericcloud-amd64"
    assert default_image_name(Path("/x/My Disk (1).vmdk")) == "My-Disk--1-"
    with pytest.raises(InvalidInputError, match="--name"):
        default_image_name(Path("/x/....vmdk"))


def _imports(tmp_path: Path) -> tuple[ImageImports, Path]:
    ds = tmp_path / "shared-1"
    ds.mkdir()
    (ds / ".vmshift-datastore.json").write_text(json.dumps({"uuid": "u-1", "name": "shared-1"}))
    return ImageImports(Datastores([ds]), "qemu-img"), ds


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


async def _import(imports: ImageImports, req: AgentImageImport) -> None:
    await imports.start(req)
    await imports._tasks[req.name]


def test_vmdk_is_converted_to_a_qcow2_image(tmp_path: Path) -> None:
    imports, ds = _imports(tmp_path)
    src = tmp_path / "exported.vmdk"
    _qemu_img("create", "-q", "-f", "vmdk", str(src), "24M")
    asyncio.run(_import(imports, AgentImageImport(file=str(src), name="web", datastore="shared-1")))
    assert imports.jobs["web"].state is ImportState.DONE and imports.jobs["web"].share == 1.0
    image = Datastores([ds]).get("shared-1").image("web")
    assert image.kind is BootKind.DISK and image.disk_size_mib == 24
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image.disk_file())],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 24 << 20
    assert not staging_dir(ds, "web").exists()
    with pytest.raises(ConflictError, match="already has an image 'web'"):
        asyncio.run(imports.start(AgentImageImport(file=str(src), name="web", datastore="shared-1")))


@pytest.mark.parametrize(("make", "text"), [
    ("truncated", "is corrupt"),
    ("text", "would be taken as raw"),
    ("missing", "does not exist"),
])
def test_bad_file_is_refused_and_nothing_is_written(tmp_path: Path, make: str, text: str) -> None:
    imports, ds = _imports(tmp_path)
    src = tmp_path / "bad.qcow2"
    if make == "truncated":
        whole = tmp_path / "whole.qcow2"
        _qemu_img("create", "-q", "-f", "qcow2", str(whole), "32M")
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 8M", str(whole)], check=True,
                       capture_output=True)
        src.write_bytes(whole.read_bytes()[: 3 * 65536 + 100])
    elif make == "text":
        src.write_text("this is not a disk\n")
    error = NotFoundError if make == "missing" else InvalidInputError
    with pytest.raises(error, match=text):
        asyncio.run(imports.start(AgentImageImport(file=str(src), name="bad", datastore="shared-1")))
    assert not (ds / "images").exists() or not any((ds / "images").iterdir())
    assert "bad" not in imports.jobs
