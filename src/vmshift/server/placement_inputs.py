"""What the placement engine is fed: a ``ClusterSnapshot`` of one cluster, built from the inventory.

Configuration (hosts' facts and limits, VMs' specs and SLAs, rules, migrations in flight) comes from
the database session; use comes from the agents. The load history is an argument (``loads``: VM
name -> samples, oldest first) because it is kept elsewhere (the DRS load store); a VM without one
gets a single assumed sample (``_assumed``: from its host's latest report, ``Heartbeat.live_stats``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vmshift.model.api import TaskKind, VmStats
from vmshift.model.enums import PowerState, TaskState
from vmshift.model.migration import MigrationStatus
from vmshift.model.vm import VmSpec
from vmshift.placement.snapshot import ClusterSnapshot, HostState, LoadSample, Rule, VmState
from vmshift.server.db.schema import ClusterRow, HostRow, MigrationRow, RuleRow, TaskRow, VmRow
from vmshift.server.inventory import host_facts

#: ``Heartbeat.live_stats``: (host, vm, uuid) -> the VM's latest numbers, None when unknown.
LiveStats = Callable[[str, str, str], VmStats | None]


def _no_stats(host: str, vm: str, uuid: str) -> VmStats | None:
    return None


def host_state(h: HostRow, running: int, *, entering: bool = False) -> HostState:
    """``entering``: the host is being evacuated for maintenance: nothing may be placed there."""
    facts = host_facts(h)
    rate = h.migration_link_rate_bps or h.migration_bandwidth_limit_bps
    return HostState(
        name=h.name, cpus=max(1, facts.cpus), memory_mib=max(1, facts.memory_total_mib),
        connection=h.connection_state, maintenance=h.maintenance or entering,
        cpu_models=tuple(facts.cpu_models), accelerator=facts.accelerator,
        machine_types=frozenset(facts.machine_types),
        datastores=frozenset(d.datastore.name for d in h.datastores),
        networks=frozenset(n.network.name for n in h.networks),
        migration_limit=h.migration_limit, migrations_running=running,
        **({"bandwidth_bps": rate} if rate else {}),
    )  # fmt: skip


def vm_state(
    vm: VmRow, host: HostState, history: Sequence[LoadSample], *, migrating_to: str | None = None,
    last_moved_s: float | None = None, dirty_rate_bps: float = 0.0,
) -> VmState:
    spec = VmSpec.model_validate(vm.spec)
    return VmState(
        name=vm.name, host=host.name, cpus=spec.cpus, memory_mib=spec.memory_mib,
        datastores=frozenset([spec.datastore, *(d.datastore for d in spec.disks)]),
        networks=frozenset(n.network for n in spec.nics), cpu_model=spec.cpu_model,
        machine_type=spec.machine_type, accelerator=host.accelerator, power_state=vm.power_state,
        history=tuple(history), drs=vm.drs, last_moved_s=last_moved_s, dirty_rate_bps=dirty_rate_bps,
        max_downtime_ms=vm.max_downtime_ms, migrating_to=migrating_to,
    )  # fmt: skip


def rule_of(row: RuleRow) -> Rule:
    return Rule(row.name, row.kind, row.strength, frozenset(row.vms), frozenset(row.hosts))


def _assumed(vm: VmRow, live: LiveStats) -> tuple[LoadSample, ...]:
    """A VM without a load history: its resident memory from its host's report, else (a running VM
    its host has not reported yet) all the memory it commits; CPU use unknown, so 0. A VM that is
    not running uses nothing."""
    if vm.power_state is not PowerState.POWERED_ON:
        return ()
    stats = live(vm.host.name, vm.name, vm.uuid)
    if stats is not None and stats.rss_mib > 0:
        return (LoadSample(0.0, stats.rss_mib),)
    return (LoadSample(0.0, float(VmSpec.model_validate(vm.spec).memory_mib)),)


def cluster_rules(cluster: ClusterRow) -> tuple[Rule, ...]:
    return tuple(rule_of(r) for r in cluster.rules)


def cluster_snapshot(
    s: Session,
    cluster: ClusterRow,
    *,
    loads: Mapping[str, Sequence[LoadSample]] | None = None,
    live: LiveStats = _no_stats,
    dirty_rates_bps: Mapping[str, float] | None = None,
    now_s: float | None = None,
    history_step_s: float = 20.0,
) -> ClusterSnapshot:
    """The cluster as placement sees it now. ``now_s`` and ``last_moved_s`` are Unix seconds."""
    loads = loads or {}
    dirty_rates_bps = dirty_rates_bps or {}
    running: dict[str, int] = {}
    in_flight: dict[str, str] = {}
    for vm_name, src, dst in s.execute(
        select(MigrationRow.vm, MigrationRow.source_host, MigrationRow.target_host)
        .where(MigrationRow.status.in_((MigrationStatus.QUEUED, MigrationStatus.RUNNING)))
    ):
        running[src] = running.get(src, 0) + 1
        running[dst] = running.get(dst, 0) + 1
        in_flight[vm_name] = dst
    rows = sorted(cluster.hosts, key=lambda h: h.name)
    entering = set(s.scalars(select(TaskRow.target).where(
        TaskRow.kind == TaskKind.HOST_MAINTENANCE_ENTER.value,
        TaskRow.state.in_([TaskState.QUEUED, TaskState.RUNNING]))))
    hosts = {h.name: host_state(h, running.get(h.name, 0), entering=h.name in entering) for h in rows}
    vm_rows = s.scalars(select(VmRow).join(HostRow).where(HostRow.cluster_id == cluster.id)
                        .order_by(VmRow.name)).all()
    names = [v.name for v in vm_rows]
    moved = dict(s.execute(
        select(MigrationRow.vm, func.max(MigrationRow.finished_at))
        .where(MigrationRow.vm.in_(names), MigrationRow.status == MigrationStatus.COMPLETED)
        .group_by(MigrationRow.vm)
    ).all()) if names else {}
    vms = []
    for v in vm_rows:
        history = loads.get(v.name) or _assumed(v, live)
        ended = moved.get(v.name)
        vms.append(vm_state(v, hosts[v.host.name], history, migrating_to=in_flight.get(v.name),
                            last_moved_s=ended.timestamp() if ended is not None else None,
                            dirty_rate_bps=dirty_rates_bps.get(v.name, 0.0)))
    return ClusterSnapshot(hosts=tuple(hosts.values()), vms=tuple(vms), rules=cluster_rules(cluster),
                           now_s=time.time() if now_s is None else now_s, history_step_s=history_step_s)
