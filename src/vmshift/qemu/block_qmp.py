"""Typed helpers for QEMU's block-job QMP commands (qapi/block-core.json, checked on QEMU 10.0.2).

Every helper takes a connected :class:`QmpSession` and raises ``QemuError`` on failure.

Measured on QEMU 10.0.2: ``query-block-jobs`` lists a mirror with ``len``/``offset`` (bytes; ``len``
grows while the guest dirties what was already copied), ``ready`` and ``actively-synced`` (true
once a write-blocking mirror copies every guest write at once). Mirrors are started with
``auto-dismiss`` off so a job that ended while nobody listened (an agent restart) still shows its
end and error in ``query-jobs`` (status ``concluded``) until :func:`job_dismiss`. After
``job-complete`` the device's root is the target node and the old nodes stay, unused, until
``blockdev-del``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from vmshift.errors import QemuError
from vmshift.model.enums import DiskFormat
from vmshift.qemu.qmp import QmpEvent, QmpSession


class CopyMode(StrEnum):
    BACKGROUND = "background"  # copy dirty areas at the job's pace (may never catch up)
    WRITE_BLOCKING = "write-blocking"  # a guest write completes only once it is on the target too


class JobStatus(StrEnum):
    """QEMU's JobStatus (qapi/job.json); values newer than this list parse as UNKNOWN."""

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, value: str) -> JobStatus:
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN

    @property
    def ended(self) -> bool:
        return self in (JobStatus.CONCLUDED, JobStatus.NULL)


@dataclass(frozen=True)
class BlockJob:
    """One entry of ``query-block-jobs`` merged with its ``query-jobs`` status and error."""

    job_id: str
    status: JobStatus
    len_bytes: int
    offset_bytes: int
    ready: bool
    actively_synced: bool = False
    error: str | None = None


@dataclass(frozen=True)
class BlockDevice:
    """A guest block device and the node at its root (``query-block``)."""

    qdev: str
    node_name: str
    filename: str
    format: str
    virtual_size: int


@dataclass(frozen=True)
class BlockNode:
    node_name: str
    driver: str
    filename: str


async def blockdev_add_file_image(qmp: QmpSession, *, node_name: str, file_node_name: str, path: Path,
                                  fmt: DiskFormat, direct: bool = False) -> None:
    """Open an image file as a format node over a named ``file`` node (so both can be deleted);
    ``direct``: with O_DIRECT (a file on shared storage, as the VM's own disks there)."""
    file: dict[str, object] = {"driver": "file", "node-name": file_node_name, "filename": str(path)}
    node: dict[str, object] = {"driver": fmt.value, "node-name": node_name, "file": file}
    if direct:
        file["cache"] = node["cache"] = {"direct": True}
    await qmp.execute("blockdev-add", node)


async def blockdev_del(qmp: QmpSession, node_name: str) -> None:
    await qmp.execute("blockdev-del", {"node-name": node_name})


async def blockdev_mirror(qmp: QmpSession, *, job_id: str, device: str, target: str,
                          copy_mode: CopyMode = CopyMode.BACKGROUND, speed_bps: int = 0) -> None:
    """Mirror node ``device`` into the already added node ``target`` (``sync=full``, errors reported;
    ``speed_bps`` 0: as fast as the storage goes)."""
    await qmp.execute("blockdev-mirror", {
        "job-id": job_id, "device": device, "target": target, "sync": "full",
        "copy-mode": copy_mode.value, "on-source-error": "report", "on-target-error": "report",
        "auto-finalize": True, "auto-dismiss": False, "speed": max(0, int(speed_bps)),
    })


async def set_copy_mode(qmp: QmpSession, job_id: str, mode: CopyMode) -> None:
    """``block-job-change``: QEMU allows only background -> write-blocking."""
    await qmp.execute("block-job-change", {"id": job_id, "type": "mirror", "copy-mode": mode.value})


async def job_complete(qmp: QmpSession, job_id: str) -> None:
    """Pivot a READY mirror: the device switches to the target once QEMU drained the last writes."""
    await qmp.execute("job-complete", {"id": job_id})


async def block_job_cancel(qmp: QmpSession, job_id: str, *, force: bool = True) -> None:
    """Stop a mirror without pivoting (``force``: also when READY, without waiting for a sync)."""
    await qmp.execute("block-job-cancel", {"device": job_id, "force": force})


async def job_dismiss(qmp: QmpSession, job_id: str) -> None:
    await qmp.execute("job-dismiss", {"id": job_id})


async def query_block_jobs(qmp: QmpSession) -> dict[str, BlockJob]:
    """Every block job by id, with ``query-jobs``' status and error (ended jobs included)."""
    jobs = _items(await qmp.execute("query-jobs"))
    errors = {str(j.get("id")): j for j in jobs}
    out: dict[str, BlockJob] = {}
    for j in _items(await qmp.execute("query-block-jobs")):
        job_id = str(j.get("device", ""))
        info = errors.get(job_id, {})
        status = str(info.get("status") or j.get("status") or "unknown")
        error = info.get("error") or j.get("error")
        out[job_id] = BlockJob(
            job_id=job_id, status=JobStatus.parse(status), len_bytes=int(j.get("len", 0)),
            offset_bytes=int(j.get("offset", 0)), ready=bool(j.get("ready", False)),
            actively_synced=bool(j.get("actively-synced", False)),
            error=str(error) if error else None)
    for job_id, info in errors.items():  # a job query-block-jobs no longer shows
        if job_id not in out:
            error = info.get("error")
            out[job_id] = BlockJob(
                job_id=job_id, status=JobStatus.parse(str(info.get("status", "unknown"))),
                len_bytes=int(info.get("total-progress", 0)),
                offset_bytes=int(info.get("current-progress", 0)), ready=False,
                error=str(error) if error else None)
    return out


async def query_devices(qmp: QmpSession) -> list[BlockDevice]:
    out = []
    for b in _items(await qmp.execute("query-block")):
        inserted = b.get("inserted")
        if not isinstance(inserted, dict):
            continue
        image_info = inserted.get("image")
        image: dict[str, Any] = image_info if isinstance(image_info, dict) else {}
        out.append(BlockDevice(qdev=str(b.get("qdev", "")), node_name=str(inserted.get("node-name", "")),
                               filename=str(inserted.get("file", "")), format=str(inserted.get("drv", "")),
                               virtual_size=int(image.get("virtual-size", 0))))
    return out


async def device_of(qmp: QmpSession, device_id: str) -> BlockDevice:
    """The block device of the guest device ``device_id`` (``-device ...,id=device_id``)."""
    for dev in await query_devices(qmp):
        if device_id in dev.qdev.split("/"):
            return dev
    raise QemuError(f"QEMU has no block device with id {device_id!r}.",
                    hint="The VM's QEMU was started from another spec; restart it.")


async def query_nodes(qmp: QmpSession) -> list[BlockNode]:
    return [BlockNode(node_name=str(n.get("node-name", "")), driver=str(n.get("drv", "")),
                      filename=str(n.get("file", "")))
            for n in _items(await qmp.execute("query-named-block-nodes", {"flat": True}))]


async def file_nodes_of(qmp: QmpSession, path: Path) -> list[str]:
    """Names of the protocol (``file``) nodes that have ``path`` open."""
    return [n.node_name for n in await query_nodes(qmp) if n.driver == "file" and n.filename == str(path)]


async def chardev_to_file(qmp: QmpSession, chardev_id: str, path: Path) -> None:
    """Point a chardev at another file, appending (``chardev-change``)."""
    await qmp.execute("chardev-change", {
        "id": chardev_id, "backend": {"type": "file", "data": {"out": str(path), "append": True}},
    })


def job_event(event: QmpEvent, job_id: str) -> bool:
    """True for a BLOCK_JOB_* event of ``job_id``."""
    return event.data.get("device") == job_id


def _items(reply: dict[str, Any]) -> list[dict[str, Any]]:
    items = reply.get("return", [])
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []
