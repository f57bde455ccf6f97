"""Heartbeat + reconcile: poll every host's agent, track its connection, adopt its runtime truth."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from vmshift.client.agent import AgentPool
from vmshift.errors import VmshiftError
from vmshift.model.api import EventKind
from vmshift.model.enums import ConnectionState, EventSeverity, PowerState
from vmshift.model.host import HostFacts
from vmshift.model.vm import VmRuntime
from vmshift.server.db.schema import HostRow, utcnow
from vmshift.server.events import record_event
from vmshift.server.inventory import apply_facts
from vmshift.server.tasks import TaskEngine

log = logging.getLogger("vmshift.server.heartbeat")


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
            hosts = [(h.name, h.address) for h in s.scalars(select(HostRow))]
        await asyncio.gather(*(self._poll(name, address) for name, address in hosts))

    async def _poll(self, name: str, address: str) -> None:
        client = self._agents.get(address)
        polled_at = asyncio.get_running_loop().time()
        timeout = max(0.5, self._interval_s * 0.9)
        try:
            await client.health(timeout_s=timeout)
            runtimes = await client.list_vms(timeout_s=timeout)
            facts = await client.facts()
        except VmshiftError as e:
            self._missed_beat(name, e)
            return
        self._good_beat(name, facts, runtimes, polled_at)

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

    def _good_beat(self, name: str, facts: HostFacts, runtimes: list[VmRuntime], polled_at: float) -> None:
        self._missed[name] = 0
        with self._sessions.begin() as s:
            host = s.scalar(select(HostRow).where(HostRow.name == name))
            if host is None:
                return
            host.last_heartbeat = utcnow()
            if host.connection_state is not ConnectionState.CONNECTED:
                host.connection_state = ConnectionState.CONNECTED
                record_event(s, EventKind.HOST_CONNECTED, name, f"Host {name} is connected again.")
            if facts.name == name:
                apply_facts(s, host, facts)
            self._reconcile(s, host, runtimes, polled_at)

    def _reconcile(self, s: Session, host: HostRow, runtimes: list[VmRuntime], polled_at: float) -> None:
        """Adopt the agent's view of power state and stats for VMs no task is working on."""
        by_name = {rt.name: rt for rt in runtimes}
        for vm in host.vms:
            rt = by_name.get(vm.name)
            if rt is None or rt.uuid != vm.uuid or self._tasks.busy_since(vm.name, polled_at):
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
