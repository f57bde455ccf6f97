"""QMP steps of suspend and resume: QEMU's migration to and from a file in ``mapped-ram`` format.

``mapped-ram`` (QEMU >= 9.0, docs/devel/migration/mapped-ram.rst) gives every guest page a fixed
offset in the file, so pages dirtied twice are written twice to the same place and the file never
grows past the guest's RAM blocks; zero pages are not written at all (the file is sparse). It needs
the ``multifd`` capability on both sides and a seekable ``file:`` URI; ``direct-io`` (QEMU >= 9.1)
opens the file with O_DIRECT, so the state goes to disk, not to the host's page cache.

Measured on QEMU 10.0.2 (TCG, ext4, q35, ``-nodefaults`` plus virtio devices): the file's apparent
size is the RAM plus about 7 MiB whatever the RAM size (each small RAM block -- BIOS, option ROMs,
ACPI tables -- is padded to a 1 MiB boundary): +2.8 % for 256 MiB, +0.7 % for 1 GiB. Its allocated
size is what the guest touched plus well under 1 MiB. The migration must run with the vCPUs stopped
(non-live, the mode the QEMU document recommends) and ``max-bandwidth`` lifted: QEMU's default
128 MiB/s cap applies to files too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmshift.errors import QemuError
from vmshift.migration.samples import QemuMigrationStatus
from vmshift.qemu.migration_qmp import (
    UNLIMITED_BANDWIDTH,
    migrate,
    migrate_cancel,
    migrate_incoming,
    query_capabilities,
    query_migrate,
    set_capabilities,
    set_parameters,
)
from vmshift.qemu.qmp import QmpSession

#: The capabilities a state file is written and read with; both sides must agree.
STATE_FILE_CAPABILITIES = ("multifd", "mapped-ram")
#: Left as they are; every other capability is switched off for a state file.
KEPT_CAPABILITIES = frozenset({*STATE_FILE_CAPABILITIES, "events"})


@dataclass(frozen=True)
class StateFileSettings:
    """How QEMU writes and reads a state file (the same settings on both sides)."""

    multifd_channels: int = 2  # 2 and 4 wrote equally fast on the 2-core machines (QEMU 10.0.2)
    direct_io: bool = True  # O_DIRECT; off where the filesystem refuses it (tmpfs)
    poll_interval_s: float = 0.05


@dataclass(frozen=True)
class StateTransfer:
    """One ``query-migrate`` answer of a save or load, in bytes and seconds."""

    status: QemuMigrationStatus
    total_bytes: int  # every RAM block, zero pages included
    remaining_bytes: int
    written_bytes: int  # pages actually written (or read): zero pages are skipped
    elapsed_s: float
    error: str | None = None

    @property
    def rate_bps(self) -> float:
        return self.written_bytes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def percent(self) -> int:
        if self.status is QemuMigrationStatus.COMPLETED:
            return 100
        if self.total_bytes <= 0:
            return 0
        return max(0, min(99, round(100 * (self.total_bytes - self.remaining_bytes) / self.total_bytes)))


def file_uri(path: Path) -> str:
    return f"file:{path}"


def _transfer(reply: dict[str, Any], elapsed_s: float) -> StateTransfer:
    """``elapsed_s`` is the caller's clock; a finished save has QEMU's own ``total-time``, which
    does not depend on how often the caller asked."""
    ram = reply.get("ram") or {}
    if reply.get("status") == QemuMigrationStatus.COMPLETED and isinstance(reply.get("total-time"), int):
        elapsed_s = reply["total-time"] / 1000
    return StateTransfer(
        status=QemuMigrationStatus.parse(str(reply.get("status", "none"))),
        total_bytes=int(ram.get("total", 0)),
        remaining_bytes=int(ram.get("remaining", 0)),
        written_bytes=int(ram.get("normal-bytes", 0)),
        elapsed_s=elapsed_s,
        error=str(reply["error-desc"]) if reply.get("error-desc") else None,
    )


async def prepare(qmp: QmpSession, settings: StateFileSettings, *, outgoing: bool) -> dict[str, bool]:
    """Set the state-file capabilities and parameters; switch off every other capability a live
    migration may have left on (``postcopy-ram``, ``xbzrle``... are refused beside mapped-ram).
    Returns the capabilities as they were, for :func:`restore_capabilities`."""
    current = await query_capabilities(qmp)
    caps = {name: False for name, on in current.items() if on and name not in KEPT_CAPABILITIES}
    caps |= dict.fromkeys(STATE_FILE_CAPABILITIES, True)
    await set_capabilities(qmp, caps)
    params: dict[str, Any] = {"multifd-channels": settings.multifd_channels,
                              "direct-io": settings.direct_io, "multifd-compression": "none"}
    if outgoing:
        params["max-bandwidth"] = UNLIMITED_BANDWIDTH
    await set_parameters(qmp, params)
    return {name: current.get(name, False) for name in caps}


async def restore_capabilities(qmp: QmpSession, previous: dict[str, bool]) -> None:
    """Best effort, after a save that did not complete or a finished load: the VM runs on, and a
    later live migration over TCP must not find ``mapped-ram`` on (it needs a seekable channel)."""
    with contextlib.suppress(QemuError):
        await set_capabilities(qmp, previous)


async def _wait(qmp: QmpSession, what: str, settings: StateFileSettings, timeout_s: float,
                on_progress: Callable[[StateTransfer], None] | None) -> StateTransfer:
    started = time.monotonic()
    while True:
        # QEMU's main loop may not answer while it reads the device state of a large load (seen
        # for over 5 s with a 1 GiB guest, QEMU 10.0.2): only the overall timeout counts as stuck
        left_s = max(5.0, timeout_s - (time.monotonic() - started))
        t = _transfer(await query_migrate(qmp, timeout_s=left_s), time.monotonic() - started)
        if on_progress is not None:
            on_progress(t)
        if t.status.finished:
            return t
        if t.elapsed_s > timeout_s:
            raise QemuError(f"QEMU did not finish {what} within {timeout_s:g} s "
                            f"({t.written_bytes} bytes so far).",
                            hint="The datastore may be very slow or stuck; look at its filesystem.")
        await asyncio.sleep(settings.poll_interval_s)


async def save_to_file(qmp: QmpSession, path: Path, settings: StateFileSettings, *, timeout_s: float,
                       on_progress: Callable[[StateTransfer], None] | None = None) -> StateTransfer:
    """Write the (already stopped) VM's state to ``path``; return the final answer, which may be
    ``failed`` or ``cancelled``. A timeout cancels the save before it raises. Unless the save
    completed, QEMU's capabilities are back as they were."""
    previous = await prepare(qmp, settings, outgoing=True)
    try:
        await migrate(qmp, file_uri(path))
        transfer = await _wait(qmp, "saving the VM's state", settings, timeout_s, on_progress)
    except BaseException:
        await cancel_quietly(qmp)
        await restore_capabilities(qmp, previous)
        raise
    if transfer.status is not QemuMigrationStatus.COMPLETED:
        await restore_capabilities(qmp, previous)
    return transfer


async def load_from_file(qmp: QmpSession, path: Path, settings: StateFileSettings, *, timeout_s: float,
                         on_progress: Callable[[StateTransfer], None] | None = None) -> StateTransfer:
    """Load ``path`` into a QEMU started with ``-S -incoming defer``; it stays paused afterwards,
    with the capabilities of a fresh QEMU again (a later live migration over TCP needs them)."""
    previous = await prepare(qmp, settings, outgoing=False)
    await migrate_incoming(qmp, file_uri(path))
    transfer = await _wait(qmp, "loading the VM's state", settings, timeout_s, on_progress)
    if transfer.status.finished:
        await restore_capabilities(qmp, previous)
    return transfer


async def cancel_quietly(qmp: QmpSession, timeout_s: float = 10.0) -> None:
    """Cancel a save if one runs and wait until QEMU says it ended (errors ignored: best effort)."""
    deadline = time.monotonic() + timeout_s
    try:
        await migrate_cancel(qmp)
        while time.monotonic() < deadline:
            status = QemuMigrationStatus.parse(str((await query_migrate(qmp)).get("status", "none")))
            if status.finished or status is QemuMigrationStatus.NONE:
                return
            await asyncio.sleep(0.05)
    except QemuError:
        return
