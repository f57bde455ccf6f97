"""What a move costs, from the migration estimator's predicted time and downtime."""

from __future__ import annotations

from dataclasses import dataclass

from vmshift.migration.estimator import estimate
from vmshift.placement.settings import DrsSettings
from vmshift.placement.snapshot import HostState, VmState

MIB = 1024 * 1024
COLD_MOVE_S = 2.0  # a powered-off VM on shared storage is re-registered: no memory to copy


@dataclass(frozen=True, slots=True)
class MoveCost:
    predicted_s: float
    downtime_ms: int
    converges: bool
    cost: float  # objective units


def move_cost(vm: VmState, src: HostState | None, dst: HostState, settings: DrsSettings) -> MoveCost:
    if not vm.powered_on:
        return MoveCost(COLD_MOVE_S, 0, True, settings.cost_per_migration_s * COLD_MOVE_S)
    used = vm.history[-1].memory_mib if vm.history else float(vm.memory_mib)
    zero = max(0.0, min(1.0, 1.0 - used / vm.memory_mib)) if vm.memory_mib > 0 else 0.0
    bandwidth = min(dst.bandwidth_bps, src.bandwidth_bps) if src is not None else dst.bandwidth_bps
    e = estimate(max(vm.memory_mib, 1) * MIB, vm.dirty_rate_bps, bandwidth, vm.max_downtime_ms / 1000,
                 zero_fraction=zero)
    cost = settings.cost_per_migration_s * e.total_s + settings.cost_per_downtime_s * e.downtime_s
    return MoveCost(e.total_s, round(e.downtime_s * 1000), e.converges, cost)
