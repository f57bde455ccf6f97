"""The guest's serial log, capped: QEMU keeps the console in a ring buffer, the agent drains it here.

QEMU's ``file`` chardev appends for as long as the guest writes, so a guest could fill its home
datastore through its console. Instead QEMU holds the console in a ``ringbuf`` chardev (cmdline.py)
and the agent reads it with QMP ``ringbuf-read`` every drain interval into two files on the VM's
home datastore, rotated like virtlogd's: ``serial.log`` (newest) and ``serial.log.1``. Before
``serial.log`` would grow past half the cap it becomes ``serial.log.1``, so the two never hold more
than the cap together.

Why a ring read over QMP rather than a pipe or socket the agent listens on: the ring lives in QEMU,
so the output of a guest whose agent restarts waits there (up to the ring's size) instead of being
dropped; draining costs the agent at most one ring per VM and interval, whatever the guest does; and
nothing has to be re-pointed when the VM's files move (Storage vMotion) or when it arrives on another
host (live migration: the target's agent drains the target's ring into the same folder). The price:
a guest writing more than a ring per interval loses its oldest unread output, and the last fraction
of an interval of output is lost when the guest powers itself off (QEMU exits at once).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vmshift.errors import QemuError
from vmshift.qemu.cmdline import SERIAL_CHARDEV, SERIAL_RING_BYTES, VmPaths
from vmshift.qemu.qmp import QmpSession

log = logging.getLogger(__name__)

DRAIN_INTERVAL_S = 0.5


@dataclass(frozen=True)
class WritePlan:
    """How to add a chunk of ``chunk_bytes`` to a log: rotate first or not, and how many of the
    chunk's last bytes to write (all of them unless the chunk alone is larger than half the cap)."""

    rotate: bool
    keep_bytes: int


def plan_write(current_bytes: int, chunk_bytes: int, cap_bytes: int) -> WritePlan:
    """Pure: each of the two files stays at most half of ``cap_bytes``."""
    half = cap_bytes // 2
    if chunk_bytes >= half:
        return WritePlan(rotate=current_bytes > 0, keep_bytes=half)
    return WritePlan(rotate=current_bytes + chunk_bytes > half, keep_bytes=chunk_bytes)


def split_capped(data: bytes, cap_bytes: int) -> tuple[bytes, bytes]:
    """Pure: the last ``cap_bytes`` of ``data`` as (``serial.log.1``, ``serial.log``) contents."""
    half = cap_bytes // 2
    data = data[-(2 * half):] if len(data) > 2 * half else data
    if len(data) <= half:
        return b"", data
    return data[:-half], data[-half:]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _append_bytes(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as f:
        f.write(data)


def _write_whole(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def append(paths: VmPaths, data: bytes, cap_bytes: int) -> None:
    """Add guest output to the VM's serial log, rotating so the two files stay within the cap."""
    if not data:
        return
    plan = plan_write(_size(paths.serial_log), len(data), cap_bytes)
    if plan.rotate and paths.serial_log.exists():
        paths.serial_log.replace(paths.serial_log_old)
    _append_bytes(paths.serial_log, data[len(data) - plan.keep_bytes:])


def touch(paths: VmPaths) -> None:
    """Create an empty ``serial.log`` (a started VM always has one, even before it printed)."""
    _append_bytes(paths.serial_log, b"")


def tail(paths: VmPaths, tail_bytes: int) -> bytes:
    """The last ``tail_bytes`` of the log, across the rotation (older file first)."""
    out = b""
    for path in (paths.serial_log, paths.serial_log_old):
        want = tail_bytes - len(out)
        if want <= 0:
            break
        with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
            f.seek(max(0, _size(path) - want))
            out = f.read(want) + out
    return out


def _read_all(paths: Iterable[Path]) -> bytes:
    parts = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            parts.append(path.read_bytes())
    return b"".join(parts)


def merge_into(old: VmPaths, new: VmPaths, cap_bytes: int) -> None:
    """The VM's home moved from ``old.vm_dir`` to ``new.vm_dir`` while it ran: the new folder's log
    becomes the old log followed by what was written there since, capped; the old files go away, so
    doing it again changes nothing."""
    if old.vm_dir == new.vm_dir:
        return
    sources = (old.serial_log_old, old.serial_log)
    if not any(p.exists() for p in sources):
        return
    combined = _read_all((*sources, new.serial_log_old, new.serial_log))
    older, newer = split_capped(combined, cap_bytes)
    if older:
        _write_whole(new.serial_log_old, older)
    else:
        new.serial_log_old.unlink(missing_ok=True)
    _write_whole(new.serial_log, newer)
    for path in sources:
        path.unlink(missing_ok=True)


async def ringbuf_read(qmp: QmpSession, size: int = SERIAL_RING_BYTES) -> bytes:
    """What the guest wrote since the last read (QMP ``ringbuf-read``, base64: bytes stay bytes)."""
    reply = await qmp.execute("ringbuf-read", {"device": SERIAL_CHARDEV, "size": size, "format": "base64"})
    return base64.b64decode(str(reply.get("return", "")))


async def is_ring(qmp: QmpSession) -> bool:
    """True if the VM's serial chardev is a ring (False: a QEMU started by an older agent writes its
    log file itself)."""
    reply = await qmp.execute("query-chardev")
    for dev in reply.get("return", []):
        if isinstance(dev, dict) and dev.get("label") == SERIAL_CHARDEV:
            return str(dev.get("filename", "")) == "ringbuf"
    return False


class SerialLogs:
    """One lock per VM so a drain, a tail and a move of the log never interleave."""

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self._locks: dict[str, asyncio.Lock] = {}
        self._not_ring: set[str] = set()  # VMs whose QEMU writes the log file itself (older agent)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def forget(self, name: str) -> None:
        self._not_ring.discard(name)

    async def drain(self, name: str, qmp: QmpSession, paths: VmPaths) -> None:
        """Move what the ring holds into the log; a QEMU that cannot answer now is asked next time."""
        if name in self._not_ring:
            return
        async with self._lock(name):
            try:
                data = await ringbuf_read(qmp)
            except QemuError as exc:
                if qmp.connected and not await _safe_is_ring(qmp):
                    log.info("VM %s writes its serial log itself (started by an older agent)", name)
                    self._not_ring.add(name)
                else:
                    log.debug("draining the serial ring of VM %s failed: %s", name, exc)
                return
            if data:
                await asyncio.to_thread(append, paths, data, self.cap_bytes)

    async def tail(self, name: str, paths: VmPaths, tail_bytes: int) -> bytes:
        async with self._lock(name):
            return await asyncio.to_thread(tail, paths, tail_bytes)

    async def move(self, name: str, qmp: QmpSession, old: VmPaths, new: VmPaths) -> bool:
        """Bring the log over to the VM's new home; False if this QEMU writes its log itself (the
        caller then re-points its chardev)."""
        if name in self._not_ring or not await _safe_is_ring(qmp):
            return False
        await self.drain(name, qmp, new)
        async with self._lock(name):
            await asyncio.to_thread(merge_into, old, new, self.cap_bytes)
        return True


async def _safe_is_ring(qmp: QmpSession) -> bool:
    try:
        return await is_ring(qmp)
    except QemuError:
        return True  # unknown: keep treating it as a ring
