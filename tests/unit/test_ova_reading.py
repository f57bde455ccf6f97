"""Reading an OVA's tar in place (agent/image_import.py): its descriptor, its members' offsets, and the
refusals of a truncated archive, a file that is no tar, and a tar without a descriptor."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from vmshift.agent.image_import import member_source, ova_members, read_ova
from vmshift.errors import InvalidInputError


def ova(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_descriptor_and_members_are_read_in_place(tmp_path: Path) -> None:
    disk = bytes(range(256)) * 40
    path = ova(tmp_path / "vm.ova", {"vm.ovf": b"<Envelope/>", "vm-disk1.vmdk": disk})
    contents = read_ova(path)
    assert (contents.descriptor, contents.descriptor_name) == ("<Envelope/>", "vm.ovf")
    assert contents.files == ["vm-disk1.vmdk", "vm.ovf"]
    offset, size = ova_members(path)["vm-disk1.vmdk"]
    assert path.read_bytes()[offset:offset + size] == disk
    node = json.loads(member_source(path, "vm-disk1.vmdk").removeprefix("json:"))
    assert node == {"file": {"driver": "raw", "offset": offset, "size": size,
                             "file": {"driver": "file", "filename": str(path)}}}


def test_truncated_archive_names_the_cut_file(tmp_path: Path) -> None:
    path = ova(tmp_path / "vm.ova", {"vm.ovf": b"<Envelope/>", "vm-disk1.vmdk": b"x" * 100_000})
    path.write_bytes(path.read_bytes()[:50_000])
    with pytest.raises(InvalidInputError, match=r"is truncated: it ends inside vm-disk1\.vmdk"):
        read_ova(path)


def test_no_tar_and_no_descriptor_and_no_member(tmp_path: Path) -> None:
    junk = tmp_path / "junk.ova"
    junk.write_bytes(b"\x01" * 4096)
    with pytest.raises(InvalidInputError, match="is not an OVA"):
        read_ova(junk)
    bare = ova(tmp_path / "bare.ova", {"disk.vmdk": b"x" * 1024})
    with pytest.raises(InvalidInputError, match="holds no OVF descriptor"):
        read_ova(bare)
    with pytest.raises(InvalidInputError, match=r"has no file 'other\.vmdk'"):
        member_source(bare, "other.vmdk")
