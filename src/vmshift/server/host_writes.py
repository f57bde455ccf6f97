"""What a host's stream (or poll) writes to the database: one transaction per batch of messages.

These functions are synchronous and run in the heartbeat's small thread pool, never on the event
loop: a burst of stream messages from many hosts then costs the API nothing but the GIL. Each batch is
applied in arrival order, so every power change a host reports is adopted (and recorded) once.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from vmshift.model.api import EventKind
from vmshift.model.enums import ConnectionState, EventSeverity, PowerState
from vmshift.model.host import HostFacts
from vmshift.model.host_stream import FactsChanged, Snapshot, StatsReport, VmChanged
from vmshift.model.vm import VmRuntime
from vmshift.server.db.schema import DatastoreRow, HostRow, VmRow, utcnow
from vmshift.server.events import record_event
from vmshift.server.host_report import Applied, with_free_space
from vmshift.server.inventory import apply_facts, host_facts
from vmshift.server.tasks import TaskEngine
from vmshift.server.withheld_datastores import WithheldDatastores


@dataclass
class Batch:
    """What one host said since the last write; ``arrived`` is loop time (the tasks' busy rule)."""

    host: str
    items: list[tuple[float, Applied]] = field(default_factory=list)
    connected: bool = False  # the host must be shown connected (it spoke after a silence)
    resynced: str | None = None  # why the server had to take a snapshot instead of resuming

    def __bool__(self) -> bool:
        return bool(self.items) or self.connected or self.resynced is not None


def write_batch(
    sessions: sessionmaker[Session],
    tasks: TaskEngine,
    batch: Batch,
    withheld: WithheldDatastores | None = None,
) -> set[str]:
    """Apply a batch; the VMs whose reported state was left alone because a task works on them (to be
    looked at again once the task is over: a stream reports a change once)."""
    deferred: set[str] = set()
    with sessions.begin() as s:
        host = s.scalar(select(HostRow).where(HostRow.name == batch.host))
        if host is None:
            return deferred  # removed meanwhile
        if batch.connected or any(isinstance(m, Snapshot) for _, m in batch.items):
            host.last_heartbeat = utcnow()  # else the heartbeat's round refreshes it (touch_heartbeats)
        if batch.connected and host.connection_state is not ConnectionState.CONNECTED:
            host.connection_state = ConnectionState.CONNECTED
            record_event(s, EventKind.HOST_CONNECTED, host.name, f"Host {host.name} is connected again.")
        if batch.resynced is not None:
            record_event(s, EventKind.HOST_STREAM_RESYNCED, host.name,
                         f"Host {host.name} sent a full report: {batch.resynced}.")  # fmt: skip
        stats: StatsReport | None = None
        for arrived, m in batch.items:
            frozen = withheld.frozen_for(host.name, arrived) if withheld is not None else set()
            if isinstance(m, Snapshot):
                _facts(s, host, m.facts, frozen)
                deferred |= adopt(s, tasks, host, m.vms, arrived)
            elif isinstance(m, FactsChanged):
                _facts(s, host, m.facts, frozen)
            elif isinstance(m, VmChanged):
                deferred |= adopt(s, tasks, host, [m.vm], arrived, only={m.vm.name})
            elif isinstance(m, StatsReport):
                stats = m
        if stats is not None:  # only the latest numbers matter
            _stats(s, host, stats)
    return deferred


def write_disconnected(sessions: sessionmaker[Session], name: str, why: str) -> None:
    with sessions.begin() as s:
        host = s.scalar(select(HostRow).where(HostRow.name == name))
        if host is not None and host.connection_state is ConnectionState.CONNECTED:
            host.connection_state = ConnectionState.DISCONNECTED
            record_event(s, EventKind.HOST_DISCONNECTED, name, f"Host {name} is disconnected: {why}",
                         EventSeverity.WARNING)  # fmt: skip


def write_polled(sessions: sessionmaker[Session], name: str, why: str) -> None:
    with sessions.begin() as s:
        record_event(s, EventKind.HOST_POLLED, name,
                     f"Host {name} is polled every heartbeat instead of streaming its changes: "
                     f"{why}")  # fmt: skip


def touch_heartbeats(sessions: sessionmaker[Session], names: Collection[str]) -> None:
    """``last_heartbeat`` of the hosts whose streams are alive, in one statement (no row is loaded:
    96 hosts' facts would be parsed every heartbeat for one timestamp)."""
    if not names:
        return
    with sessions.begin() as s:
        s.execute(update(HostRow).where(HostRow.name.in_(names)).values(last_heartbeat=utcnow()))


def _facts(s: Session, host: HostRow, facts: HostFacts, frozen: set[str]) -> None:
    if facts.name == host.name:  # an agent answering under another name is not this host
        apply_facts(s, host, facts, frozen=frozen)


def adopt(
    s: Session,
    tasks: TaskEngine,
    host: HostRow,
    runtimes: Sequence[VmRuntime],
    arrived: float,
    only: Collection[str] | None = None,
) -> set[str]:
    """Adopt the agent's view of power state (and the stats as of a change) for VMs no task is working
    on (returned: the VMs left alone for that reason); ``arrived``: the loop time the report is known
    to be current at.

    A receiving QEMU is not the VM, and a VM marked missing is left to the cluster-wide reconcile."""
    by_name = {rt.name: rt for rt in runtimes if rt.is_the_vm}
    busy: set[str] = set()
    # one streamed change reads its VM's row, not the host's hundred
    vms = host.vms if only is None else s.scalars(
        select(VmRow).where(VmRow.host_id == host.id, VmRow.name.in_(only))).all()
    for vm in vms:
        rt = by_name.get(vm.name)
        if rt is None or rt.uuid != vm.uuid:
            continue
        if tasks.busy_since(vm.name, arrived):
            busy.add(vm.name)
            continue
        if vm.power_state is PowerState.MISSING:
            continue
        new_state = PowerState.POWERED_OFF if rt.died else rt.power_state
        if new_state is vm.power_state:
            continue
        vm.stats = {"cpu_seconds": rt.cpu_seconds, "rss_mib": rt.rss_mib}  # as of the change
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
    return busy


def _stats(s: Session, host: HostRow, report: StatsReport) -> None:
    """The host's free memory and datastore space. The VMs' numbers are not written: they change in
    every report, and writing 10,000 rows every ``stats_interval_s`` would cost more than everything
    else the server does at steady state; the API shows them from the host's report in memory
    (``Heartbeat.live_stats``), a VM's row keeps the numbers of its last power change."""
    host.facts = with_free_space(host_facts(host), report).model_dump(mode="json")
    if report.datastore_free_mib:
        for ds in s.scalars(select(DatastoreRow).where(DatastoreRow.uuid.in_(report.datastore_free_mib))):
            ds.free_mib = report.datastore_free_mib[ds.uuid]
