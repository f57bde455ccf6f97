"""Heartbeat + reconcile: poll every host's agent, track its connection, adopt its runtime truth,
then compare all hosts' reports with the inventory (server/reconcile.py) and act on the findings."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from vmshift.client.agent import AgentPool
from vmshift.errors import VmshiftError
from vmshift.model.api import EventKind
from vmshift.model.enums import ConnectionState, EventSeverity, PowerAction, PowerState
from vmshift.model.host import HostFacts
from vmshift.model.vm import VmRuntime
from vmshift.server.db.schema import HostRow, MigrationRow, VmRow, utcnow
from vmshift.server.events import record_event
from vmshift.server.inventory import apply_facts
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


class Heartbeat:
    """Owns one background task; ``start`` and ``stop`` bracket it."""

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
        self._missed: dict[str, int] = {}
        self._findings: dict[FindingKey, Finding] = {}  # what reconcile found last round (no repeats)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="vmshift-heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            started = asyncio.get_running_loop().time()
            try:
                await self.poll_all()
            except Exception:  # a bug in one round must not stop the heartbeat
                log.exception("heartbeat round failed")
            elapsed = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(0.05, self._interval_s - elapsed))

    async def poll_all(self) -> None:
        with self._sessions() as s:
            hosts = {h.name: h.address for h in s.scalars(select(HostRow))}
        started = asyncio.get_running_loop().time()
        polled = await asyncio.gather(*(self._poll(name, address) for name, address in hosts.items()))
        reports = {name: rts for name, rts in zip(hosts, polled, strict=True) if rts is not None}
        await self._reconcile_all(hosts, reports, started)

    async def _poll(self, name: str, address: str) -> list[VmRuntime] | None:
        """One host's beat; its VM reports, or None if it did not answer."""
        client = self._agents.get(address)
        polled_at = asyncio.get_running_loop().time()
        timeout = max(0.5, self._interval_s * 0.9)
        try:
            await client.health(timeout_s=timeout)
            runtimes = await client.list_vms(timeout_s=timeout)
            facts = await client.facts()
        except VmshiftError as e:
            self._missed_beat(name, e)
            return None
        return runtimes if self._good_beat(name, facts, runtimes, polled_at) else None

    def _missed_beat(self, name: str, err: VmshiftError) -> None:
        missed = self._missed[name] = self._missed.get(name, 0) + 1
        if missed < self._missed_limit:
            return
        with self._sessions.begin() as s:
            host = s.scalar(select(HostRow).where(HostRow.name == name))
            if host is not None and host.connection_state is ConnectionState.CONNECTED:
                host.connection_state = ConnectionState.DISCONNECTED
                record_event(
                    s,
                    EventKind.HOST_DISCONNECTED,
                    name,
                    f"Host {name} is disconnected: {missed} heartbeats missed ({err.message})",
                    EventSeverity.WARNING,
                )

    def _good_beat(self, name: str, facts: HostFacts, runtimes: list[VmRuntime], polled_at: float) -> bool:
        self._missed[name] = 0
        with self._sessions.begin() as s:
            host = s.scalar(select(HostRow).where(HostRow.name == name))
            if host is None:
                return False
            host.last_heartbeat = utcnow()
            if host.connection_state is not ConnectionState.CONNECTED:
                host.connection_state = ConnectionState.CONNECTED
                record_event(s, EventKind.HOST_CONNECTED, name, f"Host {name} is connected again.")
            if facts.name == name:
                apply_facts(s, host, facts)
            self._reconcile(s, host, runtimes, polled_at)
        return True

    def _reconcile(self, s: Session, host: HostRow, runtimes: list[VmRuntime], polled_at: float) -> None:
        """Adopt the agent's view of power state and stats for VMs no task is working on.

        A receiving QEMU is not the VM, and a VM marked missing is left to ``_reconcile_all``."""
        by_name = {rt.name: rt for rt in runtimes if rt.is_the_vm}
        for vm in host.vms:
            rt = by_name.get(vm.name)
            if rt is None or rt.uuid != vm.uuid or self._tasks.busy_since(vm.name, polled_at):
                continue
            if vm.power_state is PowerState.MISSING:
                continue
            vm.stats = {"cpu_seconds": rt.cpu_seconds, "rss_mib": rt.rss_mib}
            new_state = PowerState.POWERED_OFF if rt.died else rt.power_state
            if new_state is vm.power_state:
                continue
            if rt.died and vm.power_state is PowerState.POWERED_ON:
                record_event(
                    s,
                    EventKind.VM_DIED,
                    vm.name,
                    f"VM {vm.name} on {host.name} stopped unexpectedly"
                    f" ({rt.exit_reason or 'QEMU process exited'}).",
                    EventSeverity.WARNING,
                )
            else:
                record_event(
                    s,
                    EventKind.VM_POWER_CHANGED,
                    vm.name,
                    f"VM {vm.name} is now {new_state.value} (was {vm.power_state.value}), as host "
                    f"{host.name} reports.",
                )
            vm.power_state = new_state

    # ----- cluster-wide reconcile -------------------------------------------------------------
    def _snapshot(self, reports: dict[str, list[VmRuntime]], since: float) -> Snapshot:
        with self._sessions() as s:
            inventory = [
                InventoryVm(v.name, v.uuid, v.host.name, v.power_state) for v in s.scalars(select(VmRow))
            ]
            migrations = [
                OpenMigration(m.id, m.vm, m.source_host, m.target_host)
                for m in s.scalars(select(MigrationRow).where(MigrationRow.status.in_(UNFINISHED)))
            ]
        names = {v.name for v in inventory} | {rt.name for rts in reports.values() for rt in rts}
        busy = {n for n in names if self._tasks.busy_since(n, since)}
        return Snapshot(inventory, reports, migrations, busy)

    async def _reconcile_all(
        self, addresses: dict[str, str], reports: dict[str, list[VmRuntime]], since: float
    ) -> None:
        """Compare every answering host's report with the inventory; pause duplicates at once and
        record each finding once when it appears (critical) and once when it clears (info)."""
        outcome = reconcile(self._snapshot(reports, since), self._findings)
        errors = await asyncio.gather(*(self._pause(addresses[f.host], f) for f in outcome.pauses))
        pause_errors = {f.key: e for f, e in zip(outcome.pauses, errors, strict=True)}
        with self._sessions.begin() as s:
            self._apply(s, outcome, pause_errors, since)
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
