"""Typed helpers for QEMU's migration QMP commands (qapi/migration.json, checked on QEMU 10.0.2).

Every helper takes a connected :class:`QmpSession` and raises ``QemuError`` on failure.

Throttling: QEMU has no "set the vCPU throttle now" command. With the ``auto-converge``
capability QEMU throttles at a dirty-bitmap sync once its trigger fires (dirtied > 50 % of what was
sent in the period, two syncs in a row), to ``cpu-throttle-initial`` the first time and then
``+cpu-throttle-increment``, capped by ``max-cpu-throttle``. :func:`throttle_parameters` pins
all three to the percent wanted (increment 99, max = initial = percent), so QEMU jumps straight to
that percent at its next trigger and never adds its own +10 % steps; :data:`NO_THROTTLE` keeps
QEMU's own auto-converge at 1 % until the policy asks for more.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from vmshift.errors import QemuError
from vmshift.qemu.qmp import QmpSession

MIB = 1 << 20
#: ``max-bandwidth`` meaning "unlimited" (1 TiB/s; QEMU caps at SIZE_MAX, 0 is not "unlimited").
UNLIMITED_BANDWIDTH = 1 << 40
#: What auto-converge may do before the policy asks for a throttle (QEMU's minimum is 1 %).
NO_THROTTLE: dict[str, Any] = {"cpu-throttle-initial": 1, "max-cpu-throttle": 1, "cpu-throttle-increment": 99}


def throttle_parameters(percent: int) -> dict[str, Any]:
    """migrate-set-parameters arguments that make QEMU's next throttle step land on ``percent``."""
    p = max(1, min(99, int(percent)))
    return {"cpu-throttle-initial": p, "max-cpu-throttle": p, "cpu-throttle-increment": 99}


async def set_capabilities(qmp: QmpSession, caps: dict[str, bool]) -> None:
    """``migrate-set-capabilities``; only allowed while no migration runs."""
    if caps:
        await qmp.execute("migrate-set-capabilities", {
            "capabilities": [{"capability": k, "state": v} for k, v in caps.items()]})


async def query_capabilities(qmp: QmpSession) -> dict[str, bool]:
    reply = await qmp.execute("query-migrate-capabilities")
    items = reply.get("return", [])
    return {str(c["capability"]): bool(c["state"]) for c in items if isinstance(c, dict)}


async def set_parameters(qmp: QmpSession, params: dict[str, Any]) -> None:
    """``migrate-set-parameters`` (most of them may change while a migration runs)."""
    if params:
        await qmp.execute("migrate-set-parameters", params)


async def query_parameters(qmp: QmpSession) -> dict[str, Any]:
    return await qmp.execute("query-migrate-parameters")


async def migrate(qmp: QmpSession, uri: str) -> None:
    await qmp.execute("migrate", {"uri": uri})


async def migrate_incoming(qmp: QmpSession, uri: str) -> None:
    """Start listening on ``uri`` in a QEMU started with ``-incoming defer``.

    ``exit-on-error`` off: a stream that fails to load leaves QEMU alive in state ``failed`` (and
    run state ``inmigrate``), which proves the VM never ran here; QEMU's default would just exit.
    """
    await qmp.execute("migrate-incoming", {"uri": uri, "exit-on-error": False})


async def query_migrate(qmp: QmpSession, timeout_s: float = 5.0) -> dict[str, Any]:
    try:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that lands
        # in the same step as the answer, and the control loop would not stop at agent exit
        async with asyncio.timeout(timeout_s):
            return await qmp.execute("query-migrate")
    except TimeoutError as exc:
        raise QemuError(f"QEMU did not answer query-migrate within {timeout_s:g} s.",
                        hint="QEMU may be stuck; look at the VM's QEMU log.") from exc


async def listening_port(qmp: QmpSession) -> int:
    """The TCP port an incoming migration listens on (QEMU reports it as ``socket-address``)."""
    reply = await query_migrate(qmp)
    for addr in reply.get("socket-address", []) or []:
        if isinstance(addr, dict) and str(addr.get("port", "")).isdigit():
            return int(addr["port"])
    raise QemuError("QEMU listens for the incoming migration but reports no TCP port.",
                    hint="Check the QEMU version (socket-address needs QEMU >= 4.0).")


async def migrate_cancel(qmp: QmpSession) -> None:
    await qmp.execute("migrate_cancel")


async def start_postcopy(qmp: QmpSession) -> None:
    await qmp.execute("migrate-start-postcopy")


async def announce_self(qmp: QmpSession, *, initial_ms: int = 50, max_ms: int = 550, rounds: int = 5,
                        step_ms: int = 100) -> None:
    """Send RARP/GARP announcements of every NIC's MAC (QEMU's defaults: 50 ms, +100 ms, 5 rounds)."""
    await qmp.execute("announce-self", {"initial": initial_ms, "max": max_ms, "rounds": rounds,
                                        "step": step_ms})


async def measure_dirty_rate(qmp: QmpSession, seconds: int = 1, sample_pages: int = 512) -> float:
    """Guest dirty rate in bytes/s: ``calc-dirty-rate`` (page sampling), then ``query-dirty-rate``.

    QEMU reports ``dirty-rate`` in MiB/s (its "MB/s" is 2^20 bytes).
    """
    await qmp.execute("calc-dirty-rate", {"calc-time": int(seconds), "sample-pages": sample_pages,
                                          "mode": "page-sampling"})
    deadline = time.monotonic() + seconds + 10.0
    while True:
        await asyncio.sleep(0.2)
        reply = await qmp.execute("query-dirty-rate")
        status = str(reply.get("status", ""))
        if status == "measured":
            return float(reply.get("dirty-rate", 0)) * MIB
        if time.monotonic() > deadline:
            raise QemuError(f"QEMU did not finish measuring the dirty rate (status {status!r}).",
                            hint="Is the VM running? calc-dirty-rate needs a running guest.")
