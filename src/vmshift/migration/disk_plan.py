"""What a disk move changes in a VM's spec, and how much room its copies need. No I/O."""

from __future__ import annotations

from vmshift.model.enums import DiskFormat
from vmshift.model.vm import DiskSpec, VmSpec

MIB = 1 << 20
_SUFFIX = {DiskFormat.QCOW2: ".qcow2", DiskFormat.RAW: ".raw"}


def copy_name(disk: DiskSpec, fmt: DiskFormat) -> str:
    """The copy's file name: the same stem, the suffix of its format (``disk0.qcow2`` → ``disk0.raw``)."""
    stem = disk.file
    for suffix in _SUFFIX.values():
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem + _SUFFIX[fmt]


def moves_files(spec: VmSpec, datastore: str | None) -> bool:
    """True if some file of the VM is not on ``datastore`` yet (None: the request keeps the files)."""
    if datastore is None:
        return False
    return spec.datastore != datastore or any(d.datastore != datastore for d in spec.disks)


def relocated_spec(spec: VmSpec, datastore: str, disk_format: DiskFormat | None = None) -> VmSpec:
    """The spec after every file of the VM moved to ``datastore`` (disks in ``disk_format``, or kept).

    A copy holds the whole chain of an image-backed disk (qemu-img convert and a full-sync mirror
    read through the backing file), so the copy has no backing image and is no clone of one: the
    target datastore needs no copy of the image. The cloud-init seed is not copied either: the
    agent makes it again from ``spec.seed`` in the new folder.
    """
    disks = []
    for disk in spec.disks:
        fmt = disk_format or disk.format
        disks.append(disk.model_copy(update={
            "datastore": datastore, "file": copy_name(disk, fmt), "format": fmt, "backing_image": None,
            "clone_of": None,
        }))
    return spec.model_copy(update={"datastore": datastore, "disks": disks})


def disk_sizes_bytes(spec: VmSpec) -> list[int]:
    return [d.size_mib * MIB for d in spec.disks]


def room_needed_mib(spec: VmSpec, datastore: str, state_mib: int = 0) -> int:
    """MiB the target datastore must hold: each disk that moves at its full virtual size (a thin copy
    may grow to it while the guest writes), plus a suspended VM's state file."""
    return sum(d.size_mib for d in spec.disks if d.datastore != datastore) + state_mib
