"""Applying a pass's moves to a snapshot, as if each migration ended at once: for what-if answers
(``vmshift drs simulate``), the benchmark and the tests (the server applies moves by running
migration tasks instead)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from vmshift.placement.evacuation import plan_evacuation
from vmshift.placement.initial import NEW_VM_CPU_SHARE, place
from vmshift.placement.recommendation import DrsPass, Recommendation
from vmshift.placement.recommender import recommend
from vmshift.placement.settings import DrsSettings
from vmshift.placement.snapshot import ClusterSnapshot, LoadSample, VmState


def applied(snapshot: ClusterSnapshot, moves: Iterable[Recommendation]) -> ClusterSnapshot:
    target = {m.vm: m.target for m in moves}
    if not target:
        return snapshot
    vms = tuple(replace(v, host=target[v.name], last_moved_s=snapshot.now_s) if v.name in target else v
                for v in snapshot.vms)
    return replace(snapshot, vms=vms)


@dataclass(frozen=True, slots=True)
class WhatIf:
    """What DRS would do after a change: the change's own moves (a host's evacuation, a new VM's
    host), then the balancing pass over the cluster they leave."""

    placed: tuple[tuple[str, str], ...]  # (VM, host): evacuated or newly placed
    refused: str | None  # the change itself is impossible (nothing fits): why
    after: DrsPass | None


def _settled(settings: DrsSettings) -> DrsSettings:
    """A what-if assumes the load it shows persists: acted on at once."""
    return replace(settings, persist_passes=1)


def without_host(snapshot: ClusterSnapshot, host: str, settings: DrsSettings) -> WhatIf:
    """``drs simulate --remove-host``: where its VMs would go, then how DRS would balance the rest."""
    plan = plan_evacuation(snapshot, host, settings)
    if plan.refused is not None:
        return WhatIf((), plan.refused, None)
    target = {st.vm: st.target for st in plan.steps}
    vms = tuple(replace(v, host=target[v.name]) if v.name in target else v for v in snapshot.vms)
    rest = replace(snapshot, hosts=tuple(h for h in snapshot.hosts if h.name != host), vms=vms)
    return WhatIf(tuple(target.items()), None, recommend(rest, _settled(settings)))


def with_vm(snapshot: ClusterSnapshot, vm: VmState, settings: DrsSettings) -> WhatIf:
    """``drs simulate --add-vm``: where initial placement would put it, then DRS's pass."""
    choice = place(snapshot, vm, settings)
    if choice.host is None:
        return WhatIf((), choice.refused, None)
    history = vm.history or (LoadSample(vm.cpus * NEW_VM_CPU_SHARE, float(vm.memory_mib)),)
    grown = replace(snapshot, vms=(*snapshot.vms, replace(vm, host=choice.host, history=history)))
    return WhatIf(((vm.name, choice.host),), None, recommend(grown, _settled(settings)))
