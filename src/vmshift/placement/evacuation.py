"""Maintenance mode's plan: where each VM of a host goes, and how long it takes (issue 11, item 5).

The plan is all or nothing: when one VM cannot go anywhere under the filters and the must rules,
the plan is refused with that VM's reasons, so nothing moves. VMs with must rules are placed first
(they have the fewest choices), then the largest first; each placement sees the ones before it.
Maintenance evacuates every VM, DRS-disabled ones too: the host must end empty.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vmshift.errors import CapacityError, NotFoundError
from vmshift.model.migration import CheckResult
from vmshift.placement.choose import choose_host
from vmshift.placement.cost import move_cost
from vmshift.placement.filters import Filters
from vmshift.placement.lanes import Lanes
from vmshift.placement.settings import DrsSettings
from vmshift.placement.snapshot import ClusterSnapshot, RuleStrength
from vmshift.placement.state import ClusterState


@dataclass(frozen=True, slots=True)
class EvacuationStep:
    vm: str
    target: str
    live: bool  # a live migration; else the powered-off VM is moved cold
    predicted_s: float
    downtime_ms: int
    ends_at_s: float  # from the start of the evacuation, within the concurrency limits
    checks: tuple[CheckResult, ...]
    warning: str | None = None


@dataclass(frozen=True, slots=True)
class EvacuationPlan:
    host: str
    steps: tuple[EvacuationStep, ...]
    predicted_total_s: float
    refused: str | None = None

    def raise_if_refused(self) -> None:
        if self.refused is not None:
            raise CapacityError(self.refused, hint="Add room on the other hosts or change the rules, "
                                                   "then try again; nothing was moved.")


def plan_evacuation(
    snapshot: ClusterSnapshot, host: str, settings: DrsSettings | None = None
) -> EvacuationPlan:
    if not snapshot.has_host(host):
        raise NotFoundError(f"Host '{host}' is not in the cluster.",
                            hint="List the hosts with 'vmshift host list'.")
    settings = settings or DrsSettings()
    draining = replace(snapshot, hosts=tuple(replace(h, maintenance=True) if h.name == host else h
                                             for h in snapshot.hosts))
    state = ClusterState(draining, settings)
    filters = Filters(state)
    lanes = Lanes(draining, None)
    leaving = [v for v in draining.vms if v.host == host and v.migrating_to is None]
    ruled = {v for r in draining.rules if r.strength is RuleStrength.MUST for v in r.vms}
    leaving.sort(key=lambda v: (v.name not in ruled, -v.memory_mib, v.name))
    for v in leaving:
        state.move(v.name, None)
    steps: list[EvacuationStep] = []
    for v in leaving:
        choice = choose_host(filters, v)
        if choice.host is None:
            return EvacuationPlan(host, (), 0.0, f"Host {host} cannot enter maintenance mode: "
                                                 f"{choice.refused}")
        state.move(v.name, choice.host)
        c = move_cost(v, draining.host(host), draining.host(choice.host), settings)
        if not lanes.fits(host, choice.host, c.predicted_s):
            return EvacuationPlan(host, (), 0.0, f"Host {host} cannot enter maintenance mode: it or "
                                                 f"{choice.host} runs no migration slot (concurrency limit).")
        end = lanes.take(host, choice.host, c.predicted_s)
        steps.append(EvacuationStep(v.name, choice.host, v.powered_on, c.predicted_s, c.downtime_ms, end,
                                    choice.checks, choice.warning))
    return EvacuationPlan(host, tuple(steps), max((s.ends_at_s for s in steps), default=0.0))
