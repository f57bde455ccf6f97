"""Heartbeat + reconcile: one listener per host (its stream, or polls for an agent that cannot
stream: server/host_listener.py) tracks the host's connection and adopts its runtime truth; the
cluster-wide reconcile (pure: server/reconcile.py) compares the connected hosts' reports with the
inventory when something changed, and every heartbeat interval as a safety net.

Database work runs in a small thread pool, never on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from vmshift.client.agent import AgentPool
from vmshift.errors import VmshiftError
from vmshift.model.api import EventKind, HostStream, StreamMode
from vmshift.model.enums import EventSeverity, PowerAction, PowerState
from vmshift.model.host_stream import KEEPALIVE_INTERVAL_S
from vmshift.model.vm import VmRuntime
from vmshift.server.db.schema import HostRow, MigrationRow, VmRow
from vmshift.server.events import record_event
from vmshift.server.host_listener import HostListener, ListenerContext
from vmshift.server.host_writes import touch_heartbeats
from vmshift.server.migration_store import UNFINISHED
from vmshift.server.reconcile import (
    EVENT_KINDS,
    EXPECTS_QEMU,
    Finding,
    FindingKey,
    InventoryVm,
    OpenMigration,
    Outcome,
    Snapshot,
    appeared_message,
    cleared_message,
    reconcile,
)
from vmshift.server.tasks import TaskEngine

log = logging.getLogger("vmshift.server.heartbeat")
PAUSE_TIMEOUT_S = 10.0
WATCHDOG_S = 0.25  # how often silent streams are looked for (a host is disconnected within this late)
RECONCILE_DEBOUNCE_S = 0.2  # a burst of streamed changes is reconciled once
# ... and streamed changes start a round at most this often (a polled host's change at once): the
# cost of reconcile then follows the heartbeat, not the rate of change across 10,000 VMs
RECONCILE_MIN_GAP_S = 1.0
DB_THREADS = 2  # the heartbeat's database threads (one host's writes stay in order: see HostListener)
_T = TypeVar("_T")


class Heartbeat:
    """Owns the listeners and the reconcile; ``start`` and ``stop`` bracket them."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        agents: AgentPool,
        tasks: TaskEngine,
        interval_s: float,
        missed_limit: int,
    ) -> None:
        self._sessions = sessions
        self._agents = agents
        self._tasks = tasks
        self._interval_s = interval_s
        self._missed_limit = missed_limit
        self._findings: dict[FindingKey, Finding] = {}  # what reconcile found last round (no repeats)
        self._listeners: dict[str, HostListener] = {}
        self._changed = asyncio.Event()
        self._urgent = False  # a polled host changed: reconcile without the debounce
        self._pool = ThreadPoolExecutor(DB_THREADS, thread_name_prefix="vmshift-heartbeat-db")
        self._tasks_running: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._ctx = ListenerContext(
            sessions=self._sessions,
            agents=self._agents,
            tasks=self._tasks,
            run_db=self._db,
            poll_interval_s=self._interval_s,
            missed_polls=self._missed_limit,
            silence_s=self._missed_limit * KEEPALIVE_INTERVAL_S,
            changed=self._note_change,
        )
        self._tasks_running = [
            asyncio.create_task(self._supervise(), name="vmshift-heartbeat"),
            asyncio.create_task(self._reconcile_loop(), name="vmshift-reconcile"),
        ]

    async def stop(self) -> None:
        for t in self._tasks_running:
            t.cancel()
        await asyncio.gather(*self._tasks_running, return_exceptions=True)
        self._tasks_running = []
        await asyncio.gather(*(lst.stop() for lst in self._listeners.values()))
        self._listeners.clear()
        self._pool.shutdown(wait=True)

    def stream_state(self, host: str) -> HostStream | None:
        """How the server hears from ``host`` now (None: not yet)."""
        listener = self._listeners.get(host)
        return listener.view() if listener is not None else None

    async def _db(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _note_change(self, urgent: bool) -> None:
        self._urgent = self._urgent or urgent
        self._changed.set()

    # ----- the hosts ------------------------------------------------------------------------------
    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        next_round = loop.time()
        while True:
            try:
                now = loop.time()
                if now >= next_round:
                    next_round = now + self._interval_s
                    await self._refresh_hosts()
                    live = [n for n, lst in self._listeners.items()
                            if lst.mode is StreamMode.STREAM and lst.live]  # fmt: skip
                    await self._db(touch_heartbeats, self._sessions, live)
                    for lst in self._listeners.values():
                        lst.recheck_deferred()
                for lst in list(self._listeners.values()):
                    await lst.check_silence(loop.time())
            except Exception:  # a bug in one round must not stop the heartbeat
                log.exception("heartbeat round failed")
            await asyncio.sleep(WATCHDOG_S)

    async def _refresh_hosts(self) -> None:
        """Start a listener for each host added, stop those of hosts removed (or moved elsewhere)."""
        hosts = await self._db(_host_addresses, self._sessions)
        for name in [n for n, lst in self._listeners.items() if hosts.get(n) != lst.address]:
            await self._listeners.pop(name).stop()
        for name, address in hosts.items():
            if name not in self._listeners:
                self._listeners[name] = listener = HostListener(self._ctx, name, address)
                listener.start()

    # ----- cluster-wide reconcile -------------------------------------------------------------
    async def _reconcile_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time() - RECONCILE_MIN_GAP_S
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self._interval_s)
            if self._changed.is_set() and not self._urgent:
                # a round reads the whole inventory: streamed changes are reconciled in bursts
                await asyncio.sleep(max(RECONCILE_DEBOUNCE_S, last + RECONCILE_MIN_GAP_S - loop.time()))
            last = loop.time()
            self._changed.clear()
            self._urgent = False
            try:
                await self.reconcile_now()
            except Exception:
                log.exception("reconcile round failed")

    async def reconcile_now(self) -> None:
        """Reconcile over the hosts whose reports are current."""
        current = [lst for lst in self._listeners.values() if lst.live and lst.connected]
        reports = {lst.name: lst.report.runtimes() for lst in current}
        addresses = {lst.name: lst.address for lst in self._listeners.values()}
        now = asyncio.get_running_loop().time()
        since = min((lst.current_as_of for lst in current), default=now)
        await self._reconcile_all(addresses, reports, since)

    # ----- cluster-wide reconcile -------------------------------------------------------------
    def _snapshot(self, reports: dict[str, list[VmRuntime]], since: float) -> Snapshot:
        with self._sessions() as s:
            rows = s.execute(select(VmRow.name, VmRow.uuid, HostRow.name, VmRow.power_state).join(VmRow.host))
            inventory = [InventoryVm(name, uuid, host, state) for name, uuid, host, state in rows]
            migrations = [
                OpenMigration(m.id, m.vm, m.source_host, m.target_host)
                for m in s.scalars(select(MigrationRow).where(MigrationRow.status.in_(UNFINISHED)))
            ]
        names = {v.name for v in inventory} | {rt.name for rts in reports.values() for rt in rts}
        busy = {n for n in names if self._tasks.busy_since(n, since)}
        return Snapshot(inventory, reports, migrations, busy)

    def _round(self, reports: dict[str, list[VmRuntime]], since: float) -> Outcome:
        return reconcile(self._snapshot(reports, since), self._findings)

    def _write_outcome(
        self, outcome: Outcome, pause_errors: dict[FindingKey, str | None], since: float
    ) -> None:
        with self._sessions.begin() as s:
            self._apply(s, outcome, pause_errors, since)

    async def _reconcile_all(
        self, addresses: dict[str, str], reports: dict[str, list[VmRuntime]], since: float
    ) -> None:
        """Compare every answering host's report with the inventory; pause duplicates at once and
        record each finding once when it appears (critical) and once when it clears (info)."""
        outcome = await self._db(self._round, reports, since)
        errors = await asyncio.gather(*(self._pause(addresses[f.host], f) for f in outcome.pauses))
        pause_errors = {f.key: e for f, e in zip(outcome.pauses, errors, strict=True)}
        await self._db(self._write_outcome, outcome, pause_errors, since)
        self._findings = outcome.active

    async def _pause(self, address: str, f: Finding) -> str | None:
        """Pause the copy on an unnamed host; why that failed, or None."""
        try:
            await asyncio.wait_for(
                self._agents.get(address).power(f.agent_name, PowerAction.PAUSE), PAUSE_TIMEOUT_S
            )
        except VmshiftError as e:
            error = e.message
        except TimeoutError:
            error = f"no answer within {PAUSE_TIMEOUT_S:g} s"
        else:
            log.warning("paused the duplicate of VM %s on %s", f.vm, f.host)
            return None
        log.warning("pausing the duplicate of VM %s on %s failed: %s", f.vm, f.host, error)
        return error

    def _apply(
        self, s: Session, outcome: Outcome, pause_errors: dict[FindingKey, str | None], since: float
    ) -> None:
        for name, state in outcome.power_states.items():
            vm = s.scalar(select(VmRow).where(VmRow.name == name))
            # a task may have started since the snapshot: then it owns the power state
            if (
                vm is not None
                and not self._tasks.busy_since(name, since)
                and (
                    vm.power_state is PowerState.MISSING
                    if state is not PowerState.MISSING
                    else vm.power_state in EXPECTS_QEMU
                )
            ):
                vm.power_state = state
        for f in outcome.appeared:
            message = appeared_message(f, pause_errors.get(f.key))
            record_event(s, EVENT_KINDS[f.kind], f.vm, message, EventSeverity.CRITICAL)
        for f in outcome.cleared:
            record_event(
                s, EventKind.VM_FINDING_CLEARED, f.vm, cleared_message(f, outcome.power_states.get(f.vm))
            )


def _host_addresses(sessions: sessionmaker[Session]) -> dict[str, str]:
    with sessions() as s:
        return {h.name: h.address for h in s.scalars(select(HostRow))}
