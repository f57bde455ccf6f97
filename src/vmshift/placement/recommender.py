"""One DRS pass: snapshot in, recommended moves out, each with its reason (issue 11, item 3).

In order: moves that mend broken must rules (at every threshold), then moves that mend should
rules, then balancing moves. A balancing move is made only when

* its source host has been out of balance (its load more than the threshold's tolerance above the
  cluster's mean) for ``persist_passes`` passes in a row,
* the VM was not moved within its cooldown and DRS may move it,
* every filter passes on the target (a must rule is never broken; a should rule only when mending
  another),
* its benefit (the objective's drop, averaged over the history window) is at least the threshold's
  factor times its cost (from the migration estimator's predicted time and downtime), and
* it can end before the next pass within both hosts' concurrency limits.

Moves are chosen greedily, best benefit net of cost first, each scored on the cluster as the moves
before it left it; so every move lowers the objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vmshift.placement.cost import MoveCost, move_cost
from vmshift.placement.filters import Filters
from vmshift.placement.lanes import Lanes
from vmshift.placement.recommendation import DrsMemory, DrsPass, MoveReason, Recommendation
from vmshift.placement.rules import violations
from vmshift.placement.settings import DrsSettings
from vmshift.placement.snapshot import ClusterSnapshot, DrsAutomation, RuleStrength, VmDrs, VmState
from vmshift.placement.state import ClusterState


@dataclass(slots=True)
class _Candidate:
    vm: VmState
    target: str
    benefit: float
    cost: MoveCost


def automatic(vm: VmState, settings: DrsSettings) -> bool:
    """Whether a balancing move of ``vm`` is applied (fully automated) or only recommended."""
    if vm.drs is VmDrs.FULLY:
        return True
    if vm.drs is VmDrs.MANUAL:
        return False
    return settings.automation is DrsAutomation.FULLY


class _Pass:
    def __init__(self, snapshot: ClusterSnapshot, settings: DrsSettings) -> None:
        self.snap = snapshot
        self.settings = settings
        self.state = ClusterState(snapshot, settings)
        self.filters = Filters(self.state)
        self.lanes = Lanes(snapshot, settings.pass_interval_s)
        self.moved: set[str] = set()
        self.out: list[Recommendation] = []
        self.notes: list[str] = []
        self.on_host: dict[str, list[str]] = {h: [] for h in self.state.balanced}
        for vm in snapshot.vms:
            if vm.host in self.on_host:
                self.on_host[vm.host].append(vm.name)
        self._costs: dict[tuple[str, str], MoveCost] = {}
        self._busiest: dict[str, list[VmState]] = {}  # per host, movable VMs busiest first

    # -- helpers -----------------------------------------------------------------------------------

    def movable(self, vm: VmState) -> bool:
        if vm.name in self.moved or vm.drs is VmDrs.DISABLED or not vm.powered_on:
            return False
        if vm.migrating_to is not None or self.state.host_of[vm.name] not in self.on_host:
            return False
        last = vm.last_moved_s
        return last is None or self.snap.now_s - last >= self.settings.cooldown_s

    def cost(self, vm: VmState, target: str) -> MoveCost:
        src = self.state.host_of[vm.name]
        key = (vm.name, target)
        if key not in self._costs:
            self._costs[key] = move_cost(vm, self.snap.host(src) if src else None, self.snap.host(target),
                                         self.settings)
        return self._costs[key]

    def candidates(self, vm: VmState, *, mend_rules: bool) -> list[_Candidate]:
        """The best few targets for ``vm`` by objective, among those that pass every filter."""
        deltas = self.state.spread_deltas(vm.name)
        out: list[_Candidate] = []
        tried = 0
        for i in np.argsort(deltas, kind="stable"):
            host = self.state.balanced[int(i)]
            d = float(deltas[i])
            if not np.isfinite(d):
                break
            if not mend_rules and d >= 0:
                break
            if tried >= self.settings.max_targets * 3 or len(out) >= self.settings.max_targets:
                break
            tried += 1
            if not self.filters.fits(vm, host):
                continue
            pen = self.state.penalty_delta(vm.name, host)
            if mend_rules and pen >= 0:
                continue
            if not mend_rules and pen > 0:
                continue  # a balancing move never breaks a should rule
            out.append(_Candidate(vm, host, -(d + pen), self.cost(vm, host)))
        return out

    def apply(self, c: _Candidate, reason: MoveReason, why: str) -> None:
        src = self.state.host_of[c.vm.name]
        assert src is not None
        checks = tuple(self.filters.checks(c.vm, c.target))
        self.lanes.take(src, c.target, c.cost.predicted_s)
        self.state.move(c.vm.name, c.target)
        self.on_host[src].remove(c.vm.name)
        self.on_host[c.target].append(c.vm.name)
        self.moved.add(c.vm.name)
        self._busiest.pop(src, None)
        self._busiest.pop(c.target, None)
        self.out.append(Recommendation(
            vm=c.vm.name, source=src, target=c.target, reason=reason, why=why, benefit=c.benefit,
            cost=c.cost.cost, predicted_s=c.cost.predicted_s, downtime_ms=c.cost.downtime_ms,
            automatic=automatic(c.vm, self.settings), checks=checks))

    # -- phases ------------------------------------------------------------------------------------

    def mend_rules(self, strength: RuleStrength) -> None:
        factor = self.settings.level.factor
        if strength is RuleStrength.SHOULD and factor is None:
            return
        for rule in self.snap.rules:
            if rule.strength is not strength:
                continue
            while violations(rule, self.state.host_of) > 0:
                best: _Candidate | None = None
                for name in sorted(rule.vms):
                    if not self.snap.has_vm(name) or not self.movable(vm := self.snap.vm(name)):
                        continue
                    for c in self.candidates(vm, mend_rules=True):
                        if c.benefit <= 0 or not c.cost.converges:
                            continue
                        if factor is not None and strength is RuleStrength.SHOULD \
                                and c.benefit < factor * c.cost.cost:
                            continue
                        if not self.lanes.fits(self.state.host_of[name] or "", c.target, c.cost.predicted_s):
                            continue
                        if best is None or c.benefit - c.cost.cost > best.benefit - best.cost.cost:
                            best = c
                if best is None:
                    self.notes.append(f"{strength.value.capitalize()} rule {rule.name} is broken and no "
                                      "move this pass mends it.")
                    break
                self.apply(best, MoveReason.MUST_RULE if strength is RuleStrength.MUST
                           else MoveReason.SHOULD_RULE, f"Mends {strength.value} rule {rule.name}.")

    def out_of_balance(self, memory: DrsMemory) -> dict[str, int]:
        tol = self.settings.level.tolerance
        load = self.state.host_load()
        mean = float(load.mean()) if len(load) else 0.0
        return {h: (memory.out_of_balance.get(h, 0) + 1 if load[i] - mean > tol else 0)
                for i, h in enumerate(self.state.balanced)}

    def balance(self, counts: dict[str, int]) -> None:
        s = self.settings
        factor, tol = s.level.factor, s.level.tolerance
        if factor is None:
            self.notes.append(f"Threshold {s.threshold} makes no balancing moves.")
            return
        waiting = [h for h, n in counts.items() if 0 < n < s.persist_passes]
        if waiting:
            self.notes.append(f"{len(waiting)} host(s) out of balance for fewer than {s.persist_passes} "
                              f"passes in a row (e.g. {waiting[0]}, {counts[waiting[0]]}): not yet acted on.")
        persisted = {h for h, n in counts.items() if n >= s.persist_passes}
        rejected: _Candidate | None = None
        while True:
            load = self.state.host_load()
            mean = float(load.mean()) if len(load) else 0.0
            hot = sorted((h for h in persisted if load[self.state.index[h]] - mean > tol),
                         key=lambda h: -load[self.state.index[h]])[: s.max_sources]
            if not hot:
                if persisted:
                    self.notes.append(f"Every host is within {tol:g} of the mean load.")
                break
            best: _Candidate | None = None
            for src in hot:
                for vm in self.busiest(src)[: s.max_vms_per_source]:
                    for c in self.candidates(vm, mend_rules=False):
                        if not c.cost.converges or not self.lanes.fits(src, c.target, c.cost.predicted_s):
                            continue
                        if c.benefit < factor * c.cost.cost:
                            if rejected is None or c.benefit > rejected.benefit:
                                rejected = c
                            continue
                        if best is None or c.benefit - factor * c.cost.cost > \
                                best.benefit - factor * best.cost.cost:
                            best = c
            if best is None:
                if rejected is not None:
                    self.notes.append(
                        f"Best move left: {rejected.vm.name} to {rejected.target}, benefit "
                        f"{rejected.benefit:.4g} below {factor:g} x its cost {rejected.cost.cost:.4g} "
                        f"({rejected.cost.predicted_s:.1f} s, {rejected.cost.downtime_ms} ms downtime).")
                else:
                    self.notes.append("No VM on the busiest hosts can move now (cooldown, DRS "
                                      "override, filters or concurrency limits).")
                break
            src_name = self.state.host_of[best.vm.name]
            ratio = (f"{best.benefit / best.cost.cost:.1f} x its cost" if best.cost.cost > 0
                     else "positive and it costs nothing")
            self.apply(best, MoveReason.BALANCE,
                       f"{src_name} runs {load[self.state.index[src_name or '']] - mean:.2f} above the "
                       f"cluster's mean load; the move's benefit is {ratio}.")

    def busiest(self, host: str) -> list[VmState]:
        if host not in self._busiest:
            vms = (self.snap.vm(n) for n in self.on_host[host])
            self._busiest[host] = sorted((v for v in vms if self.movable(v)), key=self._weight, reverse=True)
        return self._busiest[host]

    def _weight(self, vm: VmState) -> float:
        """The VM's share of its host's load: the busiest are tried first."""
        i = self.state.index[self.state.host_of[vm.name] or ""]
        s = self.settings
        cpu, mem = self.state.vm_mean[vm.name]
        return float(s.cpu_weight * cpu / self.state.cpu_cap[i]
                     + s.memory_weight * mem / self.state.mem_cap[i])


def recommend(snapshot: ClusterSnapshot, settings: DrsSettings | None = None,
              memory: DrsMemory | None = None) -> DrsPass:
    """One DRS pass over ``snapshot``; ``memory`` is what the previous pass returned."""
    settings = settings or DrsSettings()
    p = _Pass(snapshot, settings)
    imbalance0, objective0 = p.state.imbalance(), p.state.objective()
    counts = p.out_of_balance(memory or DrsMemory())
    p.mend_rules(RuleStrength.MUST)
    p.mend_rules(RuleStrength.SHOULD)
    p.balance(counts)
    if not p.out:
        p.notes.append(f"No move: imbalance {imbalance0:.3f} (tolerance {settings.level.tolerance:g}).")
    return DrsPass(
        recommendations=tuple(p.out), imbalance_before=imbalance0, imbalance_after=p.state.imbalance(),
        objective_before=objective0, objective_after=p.state.objective(),
        tolerance=settings.level.tolerance, notes=tuple(p.notes), memory=DrsMemory(counts))
