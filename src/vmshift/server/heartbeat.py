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
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from vmshift.client.agent import AgentPool
from vmshift.errors import VmshiftError
from vmshift.model.api import EventKind, HostStream, StreamMode, VmStats
from vmshift.model.enums import EventSeverity, PowerAction, PowerState
from vmshift.model.host_stream import KEEPALIVE_INTERVAL_S
from vmshift.model.vm import VmRuntime
from vmshift.server.db.change_feed import ChangeFeed
from vmshift.server.db.schema import HostRow, MigrationRow, VmRow
from vmshift.server.events import record_event
from vmshift.server.host_listener import HostListener, ListenerContext
from vmshift.server.host_writes import touch_heartbeats
from vmshift.server.load_history import HostSample, host_sample
from vmshift.server.migration_store import UNFINISHED
from vmshift.server.reconcile import (
    EVENT_KINDS,
    EXPECTS_QEMU,
    Finding,
    FindingKey,
    FindingKind,
    InventoryVm,
    OpenMigration,
    Outcome,
    Snapshot,
    appeared_message,
    cleared_message,
    reconcile,
    reconcile_scoped,
)
from vmshift.server.tasks import TaskEngine
from vmshift.server.withheld_datastores import WithheldDatastores

log = logging.getLogger("vmshift.server.heartbeat")
PAUSE_TIMEOUT_S = 10.0
WATCHDOG_S = 0.25  # how often silent streams are looked for (a host is disconnected within this late)
RECONCILE_DEBOUNCE_S = 0.2  # a burst of streamed changes is reconciled once
# ... and streamed changes start a round at most this often (a polled host's change at once): the
# cost of reconcile then follows the heartbeat, not the rate of change across 10,000 VMs
RECONCILE_MIN_GAP_S = 1.0
# A round reads only the VMs that changed; this often it reads everything, as a safety net against
# a change no one reported (a write to the database behind the server's back)
FULL_RECONCILE_S = 30.0
DB_THREADS = 2  # the heartbeat's database threads (one host's writes stay in order: see HostListener)
_T = TypeVar("_T")


class Heartbeat:
    """Owns the listeners and the reconcile; ``start`` and ``stop`` bracket them."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        agents: AgentPool,
        tasks: TaskEngine,
        feed: ChangeFeed,
        interval_s: float,
        missed_limit: int,
    ) -> None:
        self._sessions = sessions
        self._agents = agents
        self._tasks = tasks
        self._interval_s = interval_s
        self._missed_limit = missed_limit
        self._findings: dict[FindingKey, Finding] = {}  # what reconcile found last round (no repeats)
        self._feed = feed  # the VMs this server's transactions changed
        self._last_full: float | None = None  # loop time of the last full round
        self._last_hosts: set[str] = set()  # the hosts whose reports the last round counted
        self._carry: set[str] = set()  # VMs the last round could not decide, or must pause again
        self._paused_at: dict[FindingKey, float] = {}  # loop time each running duplicate was paused
        self._listeners: dict[str, HostListener] = {}
        self._changed = asyncio.Event()
        self._urgent = False  # a polled host changed: reconcile without the debounce
        self._pool = ThreadPoolExecutor(DB_THREADS, thread_name_prefix="vmshift-heartbeat-db")
        self._tasks_running: list[asyncio.Task[None]] = []
        self.withheld = WithheldDatastores()  # shared with the listeners (ListenerContext)

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
            withheld=self.withheld,
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

    def live_stats(self, host: str, vm: str, uuid: str) -> VmStats | None:
        """The VM's latest numbers from its host's report (None: the host is not heard from now). Safe
        from the API's threads: it reads one dict entry the event loop replaces whole."""
        listener = self._listeners.get(host)
        if listener is None or not listener.connected:
            return None
        rt = listener.report.vms.get(vm)
        if rt is None or not rt.is_the_vm or rt.uuid != uuid:
            return None
        return VmStats(cpu_seconds=rt.cpu_seconds, rss_mib=rt.rss_mib,
                       cpu_cores=listener.report.cpu_cores.get(vm, 0.0))

    def load_samples(self) -> dict[str, HostSample]:
        """The latest load of every host heard from now (server/load_history.py samples these)."""
        out: dict[str, HostSample] = {}
        for name, lst in self._listeners.items():
            report = lst.report
            if lst.connected and lst.live and report.stats is not None and report.facts is not None:
                out[name] = host_sample(report.stats, report.facts.cpus, report.facts.memory_total_mib)
        return out

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
                # streamed changes are reconciled in bursts, at most once per RECONCILE_MIN_GAP_S
                await asyncio.sleep(max(RECONCILE_DEBOUNCE_S, last + RECONCILE_MIN_GAP_S - loop.time()))
            last = loop.time()
            self._changed.clear()
            self._urgent = False
            try:
                await self.reconcile_now()
            except Exception:
                log.exception("reconcile round failed")

    async def reconcile_now(self, full: bool = False) -> None:
        """Reconcile over the hosts whose reports are current: the VMs that changed since the last
        round (in a report, in the inventory, or a host joining or leaving the current ones) and those
        it could not decide; everything at the first round, every ``FULL_RECONCILE_S``, after a
        change no one can name, or when asked."""
        current = [lst for lst in self._listeners.values() if lst.live and lst.connected]
        reports = {lst.name: lst.report.runtimes() for lst in current}
        # heard of lately but not current (a missed poll, a stream resyncing): not proven gone either
        unsure = {lst.name for lst in self._listeners.values() if lst.connected is not False} - set(reports)
        addresses = {lst.name: lst.address for lst in self._listeners.values()}
        loop = asyncio.get_running_loop()
        now = loop.time()
        since = min((lst.current_as_of for lst in current), default=now)
        uuids: set[str] = set()
        for lst in self._listeners.values():
            uuids |= lst.report.take_changed()
        written = self._feed.take()
        full = full or written.unknown or self._last_full is None or now - self._last_full >= FULL_RECONCILE_S
        scope: _Scope | None = None
        if full:
            self._last_full = now
        else:
            hosts = set(reports) ^ self._last_hosts  # joined or left the hosts whose reports count
            uuids |= written.uuids | self._carry
            for h in hosts:
                if h in self._listeners:
                    uuids |= self._listeners[h].report.uuids()
            uuids |= {f.uuid for f in self._findings.values() if f.host in hosts}
            if written.names:
                uuids |= {rt.uuid for rts in reports.values() for rt in rts if rt.name in written.names}
            if not (uuids or hosts or written.names):
                return  # nothing changed: a round would decide everything as the last one did
            scope = _Scope(uuids, written.names, hosts)
        self._last_hosts = set(reports)
        await self._reconcile_all(addresses, reports, since, scope, unsure)

    # ----- cluster-wide reconcile -------------------------------------------------------------
    def _snapshot(
        self, reports: dict[str, list[VmRuntime]], since: float, scope: _Scope | None, unsure: set[str]
    ) -> Snapshot:
        """The inventory and migrations from the database: all of it, or the rows of ``scope``."""
        q = select(VmRow.name, VmRow.uuid, HostRow.name, VmRow.power_state).join(VmRow.host)
        if scope is not None:
            q = q.where(or_(VmRow.uuid.in_(scope.uuids), VmRow.name.in_(scope.names),
                            HostRow.name.in_(scope.hosts)))  # fmt: skip
        with self._sessions() as s:
            inventory = [InventoryVm(name, uuid, host, state) for name, uuid, host, state in s.execute(q)]
            migrations = [
                OpenMigration(m.id, m.vm, m.source_host, m.target_host)
                for m in s.scalars(select(MigrationRow).where(MigrationRow.status.in_(UNFINISHED)))
            ]
        if scope is not None:  # the rows found by host or name bring their uuids (and their reports)
            scope.uuids |= {v.uuid for v in inventory}
            reports = {h: [rt for rt in rts if rt.uuid in scope.uuids] for h, rts in reports.items()}
        names = {v.name for v in inventory} | {rt.name for rts in reports.values() for rt in rts}
        busy = {n for n in names if self._tasks.busy_since(n, since)}
        return Snapshot(inventory, reports, migrations, busy, unsure)

    def _round(
        self, reports: dict[str, list[VmRuntime]], since: float, scope: _Scope | None, unsure: set[str]
    ) -> Outcome:
        snap = self._snapshot(reports, since, scope, unsure)
        if scope is None:
            outcome = reconcile(snap, self._findings)
        else:
            outcome = reconcile_scoped(snap, self._findings, scope.uuids)
        # what the next round must look at again: VMs it could not decide, duplicates to pause again
        waiting = set(snap.busy) | {m.vm for m in snap.migrations}
        self._carry = {v.uuid for v in snap.inventory if v.name in waiting}
        self._carry |= {rt.uuid for rts in snap.reports.values() for rt in rts if rt.name in waiting}
        self._carry |= {f.uuid for f in outcome.findings if f.kind is FindingKind.DUPLICATE}
        return outcome

    def _write_outcome(
        self, outcome: Outcome, pause_errors: dict[FindingKey, str | None], since: float
    ) -> None:
        with self._sessions.begin() as s:
            self._apply(s, outcome, pause_errors, since)

    async def _reconcile_all(
        self, addresses: dict[str, str], reports: dict[str, list[VmRuntime]], since: float,
        scope: _Scope | None, unsure: set[str],
    ) -> None:
        """Compare the answering hosts' reports with the inventory; pause duplicates at once and
        record each finding once when it appears (critical) and once when it clears (info)."""
        outcome = await self._db(self._round, reports, since, scope, unsure)
        loop = asyncio.get_running_loop()
        due = [f for f in outcome.pauses if self._pause_due(f)]
        errors = await asyncio.gather(*(self._pause(addresses[f.host], f) for f in due))
        pause_errors = {f.key: e for f, e in zip(due, errors, strict=True)}
        paused_at = loop.time()
        self._paused_at = {k: t for k, t in self._paused_at.items() if k in outcome.active}
        self._paused_at |= {key: paused_at for key, error in pause_errors.items() if error is None}
        await self._db(self._write_outcome, outcome, pause_errors, since)
        self._findings = outcome.active

    def _pause_due(self, f: Finding) -> bool:
        """A duplicate is paused again only once its host's report is newer than the last pause: a
        round that still sees it running in a report from before the pause would ask twice."""
        paused = self._paused_at.get(f.key)
        listener = self._listeners.get(f.host)
        return paused is None or listener is None or listener.current_as_of > paused

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


@dataclass
class _Scope:
    """What a partial round looks at: these VMs, the VMs of migrations that changed, and every VM
    registered on or reported by a host that joined or left the answering ones."""

    uuids: set[str]
    names: set[str] = field(default_factory=set)
    hosts: set[str] = field(default_factory=set)


def _host_addresses(sessions: sessionmaker[Session]) -> dict[str, str]:
    with sessions() as s:  # two columns: the rows' facts are not needed here
        return {name: address for name, address in s.execute(select(HostRow.name, HostRow.address))}
