"""The block nodes, image files and LUNs a Storage vMotion (agent/moves/storage.py) makes for its
targets and removes when it is done with them, named as vmshift names them (qemu/cmdline.py for a
VM's own disks, ``file_node`` for a move's targets).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

from vmshift.agent.vmfiles import VmFiles
from vmshift.errors import ConflictError, NotFoundError, QemuError
from vmshift.model.enums import DiskFormat
from vmshift.model.images import MIB
from vmshift.model.iscsi import IscsiLun
from vmshift.model.vm import VmSpec
from vmshift.qemu import block_qmp as bq
from vmshift.qemu.cmdline import SERIAL_CHARDEV, disk_node_name
from vmshift.qemu.qmp import QmpSession


def file_node(node: str) -> str:
    return f"{node}-file"


def protocol_node(format_node: str, index: int) -> str:
    """The protocol node under a disk's format node, by the names vmshift gives them: the VM's own
    (qemu/cmdline.py) or a move's target (``file_node``)."""
    return f"file-disk{index}" if format_node == disk_node_name(index) else file_node(format_node)


def uses(dev: bq.BlockDevice, node: str, path: str) -> bool:
    """Whether a guest device runs on ``node`` (a mirror's target replaces its source in the graph),
    or on the file ``path`` (a VM started before the node had that name)."""
    return dev.node_name == node or dev.filename == path


async def del_nodes(qmp: QmpSession, format_node: str, path: Path, protocol_node: str | None = None) -> None:
    """Delete a format node and the protocol nodes under it: ``protocol_node`` (a LUN's), else the
    file nodes that have ``path`` open (absent ones are fine)."""
    with contextlib.suppress(QemuError):
        await bq.blockdev_del(qmp, format_node)
    if protocol_node is not None:
        with contextlib.suppress(QemuError):
            await bq.blockdev_del(qmp, protocol_node)
        return
    for node in await bq.file_nodes_of(qmp, path):
        with contextlib.suppress(QemuError):
            await bq.blockdev_del(qmp, node)


async def move_serial_log(qmp: QmpSession, old: Path, new: Path) -> None:
    """For a QEMU that writes its serial log itself (started by an agent before the capped log):
    copy the log, point the chardev at the copy (appending), then append what QEMU wrote to the old
    file in between (a few milliseconds of output at most)."""
    copied = 0
    if old.exists():
        await asyncio.to_thread(shutil.copyfile, old, new)
        copied = new.stat().st_size
    await bq.chardev_to_file(qmp, SERIAL_CHARDEV, new)
    if old.exists() and old.stat().st_size > copied:
        with old.open("rb") as src, new.open("ab") as dst:
            src.seek(copied)
            dst.write(src.read())


async def qemu_img_create(qemu_img: str, path: Path, fmt: DiskFormat, size_bytes: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        qemu_img, "create", "-q", "-f", fmt.value, str(path), str(size_bytes),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise QemuError(f"qemu-img could not create {path}: {out.decode(errors='replace').strip()[:300]}.",
                        hint="Check the target datastore's free space and permissions.")


async def make_lun(files: VmFiles, spec: VmSpec, index: int, size_bytes: int, note: Path) -> IscsiLun:
    """The LUN of ``spec``'s disk ``index`` made on its iSCSI datastore (at least ``size_bytes``), its
    note written at ``note``, and attached read-write to this host."""
    disk = spec.disks[index]
    ds = files.datastores.get(disk.datastore)
    size_mib = max(disk.size_mib, -(-size_bytes // MIB))
    lun = await files.iscsi.ensure(ds, spec, disk.model_copy(update={"size_mib": size_mib}), note)
    await files.iscsi.attach(ds, spec, disk, None)
    return lun


async def add_lun_node(qmp: QmpSession, fmt: DiskFormat, node: str, lun: IscsiLun) -> None:
    """Open a LUN in QEMU as format node ``node`` over the initiator (protocol node ``file_node``)."""
    await qmp.execute("blockdev-add",
                      {"driver": fmt.value, "node-name": node, "file": lun.blockdev(file_node(node))})


async def drop_lun(files: VmFiles, spec: VmSpec, index: int) -> None:
    """Detach and remove the LUN of ``spec``'s disk ``index`` (gone already: fine)."""
    disk = spec.disks[index]
    ds = files.datastores.get(disk.datastore)
    with contextlib.suppress(NotFoundError, ConflictError):  # held by another host: remove says so
        await files.iscsi.detach(ds, spec, disk)
    with contextlib.suppress(NotFoundError):
        await files.iscsi.remove(ds, spec, disk)
