"""Target side of a relocate (shared-nothing migration): fresh disks here, exported by the receiving QEMU.

The receiving QEMU (``-incoming defer``) opens the VM's new, empty disks as its own drives; before it
listens for the memory stream it starts an NBD server on the migration address and exports each
drive writable (``nbd-server-start`` + ``block-export-add``), so the source's mirrors write straight
into the images this QEMU will run from. Before ``cont`` the server and its exports are stopped, so
nothing but the guest writes to the disks once it runs here.

A rollback removes exactly the paths this migration created: the target refuses to start when any of
them exists already (a leftover, or the source's own files on a datastore both hosts see), so the
list can never name a file of the source.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

import psutil

from vmshift.agent.vmfiles import VmFiles
from vmshift.errors import ConflictError, QemuError
from vmshift.model.moves import NbdTarget
from vmshift.model.vm import VmSpec
from vmshift.qemu import block_qmp as bq
from vmshift.qemu import tls_qmp
from vmshift.qemu.cmdline import disk_device_id, disk_node_name
from vmshift.qemu.qmp import QmpSession

log = logging.getLogger(__name__)


def export_name(index: int) -> str:
    return f"disk{index}"


def export_id(migration_id: int, index: int) -> str:
    return f"rl{migration_id}-d{index}"


def paths_to_create(files: VmFiles, spec: VmSpec) -> list[str]:
    """Every path a relocate to ``spec`` creates (folders first), refused if one exists already."""
    paths = files.paths(spec)  # NotFoundError: this host does not see the target datastore
    files.require_file_disks(spec, "A migration with storage")
    todo: list[Path] = []
    for path in (paths.vm_dir, *(d.parent for d in paths.disks)):
        if path not in todo:
            todo.append(path)
    taken = [p for p in (*todo, *paths.disks) if p.exists()]
    if taken:
        raise ConflictError(f"{taken[0]} exists already, so VM {spec.name!r} cannot be relocated there.",
                            hint="Remove the leftover, or move the VM's files with Storage vMotion first.")
    return [str(p) for p in (*todo, *paths.disks)]


def remove_created(created: list[str]) -> None:
    """Remove what a relocate created (files, then folders, deepest first); absent paths are fine."""
    for path in map(Path, reversed(created)):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _listening_ports(pid: int) -> set[int]:
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error as exc:
        raise QemuError(f"The listening sockets of QEMU {pid} cannot be read: {exc}.",
                        hint="Check that the receiving QEMU still runs.") from exc
    return {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN and c.laddr}


async def export_disks(qmp: QmpSession, pid: int, address: str, spec: VmSpec,
                       migration_id: int, *, tls: bool = False) -> list[NbdTarget]:
    """Start the NBD server on ``address`` (a free port) and export each drive writable.

    ``tls``: the migration is encrypted, so is the NBD server, with the migration's credentials and
    peer check (agent/migration_tls.py made them): only the source host may write the disks.

    Called before ``migrate-incoming``: the NBD server is then QEMU's only listening TCP socket, which
    is how its port is found (QEMU reports no address of its NBD server).
    """
    before = _listening_ports(pid)
    args: dict[str, object] = {"addr": {"type": "inet", "data": {"host": address, "port": "0"}}}
    if tls:
        args.update({"tls-creds": tls_qmp.CREDS_ID, "tls-authz": tls_qmp.AUTHZ_ID})
    await qmp.execute("nbd-server-start", args)
    ports = _listening_ports(pid) - before
    if len(ports) != 1:
        raise QemuError(f"The NBD server of the receiving QEMU listens on {sorted(ports) or 'no port'}.",
                        hint="Check the migration address in the agent config.")
    port = ports.pop()
    out = []
    for index in range(len(spec.disks)):
        await qmp.execute("block-export-add", {
            "type": "nbd", "id": export_id(migration_id, index), "node-name": disk_node_name(index),
            "name": export_name(index), "writable": True,
        })
        dev = await bq.device_of(qmp, disk_device_id(index))
        out.append(NbdTarget(index=index, uri=f"nbd://{address}:{port}/{export_name(index)}",
                             size_bytes=dev.virtual_size))
    return out


async def stop_exports(qmp: QmpSession, migration_id: int) -> None:
    """Stop the NBD server with its exports (before ``cont``); verified with ``query-block-exports``."""
    with contextlib.suppress(QemuError):  # not running: already stopped (a repeated confirm)
        await qmp.execute("nbd-server-stop")
    reply = await qmp.execute("query-block-exports")
    left = [e for e in reply.get("return", []) if isinstance(e, dict)
            and str(e.get("id", "")).startswith(f"rl{migration_id}-")]
    if left:
        raise QemuError(f"The NBD exports {', '.join(str(e.get('id')) for e in left)} are still open.",
                        hint="Retry the confirm; the VM is not run while its disks are exported.")
