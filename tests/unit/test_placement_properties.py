"""Properties of the DRS recommender over random clusters and load traces (Hypothesis):

* every applied move lowers the objective, measured afresh on the cluster it leaves behind;
* no must rule that held before a pass is broken by it (and no broken one gets worse);
* no VM is moved twice within its cooldown;
* under steady load the passes stop moving VMs, and stay stopped (no oscillation);
* an evacuation plan and an initial placement never break a must rule nor overfill a host.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.placement_cluster import cluster, host, vm
from vmshift.placement.capacity import committed_mib
from vmshift.placement.evacuation import plan_evacuation
from vmshift.placement.initial import place
from vmshift.placement.recommendation import DrsMemory, MoveReason, Recommendation
from vmshift.placement.recommender import recommend
from vmshift.placement.rules import violations
from vmshift.placement.settings import DrsSettings
from vmshift.placement.simulate import applied
from vmshift.placement.snapshot import (
    ClusterSnapshot,
    DrsAutomation,
    LoadSample,
    Rule,
    RuleKind,
    RuleStrength,
)
from vmshift.placement.state import ClusterState

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PASSES = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def clusters(draw: st.DrawFn) -> ClusterSnapshot:
    n_hosts = draw(st.integers(2, 6))
    hosts = [host(f"host-{i}", cpus=draw(st.sampled_from([2, 4, 8])),
                  memory_mib=draw(st.sampled_from([4096, 8192, 16384])),
                  migration_limit=draw(st.integers(1, 4))) for i in range(n_hosts)]
    vms = []
    for i in range(draw(st.integers(1, 18))):
        on = draw(st.sampled_from(hosts))
        trace = tuple(LoadSample(draw(st.floats(0, 2)), draw(st.floats(50, 1000))) for _ in range(3))
        vms.append(vm(f"vm-{i}", on.name, memory_mib=1024, history=trace * 5,
                      dirty_rate_bps=draw(st.sampled_from([1e6, 5e7, 3e8]))))
    rules = []
    names = [v.name for v in vms]
    where = {v.name: v.host for v in vms}
    for j in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(list(RuleKind)))
        strength = draw(st.sampled_from(list(RuleStrength)))
        members = frozenset(draw(st.lists(st.sampled_from(names), min_size=1, max_size=3)))
        hosts_of_rule = frozenset(draw(st.lists(st.sampled_from([h.name for h in hosts]), min_size=1,
                                                max_size=2)))
        vm_host = kind in (RuleKind.VM_HOST_AFFINITY, RuleKind.VM_HOST_ANTI_AFFINITY)
        rule = Rule(f"r{j}", kind, strength, members, hosts_of_rule if vm_host else frozenset())
        if strength is RuleStrength.MUST and violations(rule, where) > 0:
            rule = replace(rule, strength=RuleStrength.SHOULD)  # start from a cluster that keeps its musts
        rules.append(rule)
    return cluster(hosts, vms, rules)


def fresh_objective(snap: ClusterSnapshot, s: DrsSettings) -> float:
    return ClusterState(snap, s).objective()


@SETTINGS
@given(clusters(), st.integers(1, 5))
def test_every_applied_move_lowers_the_objective_and_keeps_every_must_rule(snap: ClusterSnapshot,
                                                                           threshold: int) -> None:
    s = DrsSettings(automation=DrsAutomation.FULLY, threshold=threshold, persist_passes=1)
    p = recommend(snap, s)
    before = fresh_objective(snap, s)
    assert abs(before - p.objective_before) < 1e-9
    for r in p.recommendations:
        snap = applied(snap, [r])
        after = fresh_objective(snap, s)
        assert after < before, r
        before = after
    where = {v.name: v.host for v in snap.vms}
    for rule in snap.rules:
        if rule.strength is RuleStrength.MUST:
            assert violations(rule, where) == 0, rule


@PASSES
@given(clusters(), st.data())
def test_no_vm_moves_twice_within_its_cooldown_under_shifting_load(snap: ClusterSnapshot,
                                                                   data: st.DataObject) -> None:
    s = DrsSettings(automation=DrsAutomation.FULLY, threshold=5, persist_passes=1, cooldown_s=600)
    memory = DrsMemory()
    last: dict[str, float] = {}
    for _ in range(15):
        p = recommend(snap, s, memory)
        memory = p.memory
        for r in p.recommendations:
            assert snap.now_s - last.get(r.vm, -1e9) >= s.cooldown_s, r.vm
            last[r.vm] = snap.now_s
        snap = applied(snap, p.recommendations)
        # the load shifts: every VM's newest sample is drawn afresh
        vms = tuple(replace(v, history=(*v.history[1:], LoadSample(data.draw(st.floats(0, 2)), 500.0)))
                    for v in snap.vms)
        snap = replace(snap, vms=vms, now_s=snap.now_s + 60)


@PASSES
@given(clusters(), st.integers(2, 5))
def test_steady_load_converges_to_no_moves(snap: ClusterSnapshot, threshold: int) -> None:
    # every move lowers the objective, so the passes must run out of moves; a short cooldown lets
    # them get there within the 40 passes
    s = DrsSettings(automation=DrsAutomation.FULLY, threshold=threshold, cooldown_s=120)
    memory = DrsMemory()
    moves = []
    for _ in range(40):
        p = recommend(snap, s, memory)
        memory = p.memory
        moves.append(len(p.recommendations))
        snap = replace(applied(snap, p.recommendations), now_s=snap.now_s + 60)
    assert moves[-10:] == [0] * 10, moves
    assert sum(moves) <= 3 * len(snap.vms), moves


@SETTINGS
@given(clusters(), st.data())
def test_evacuation_and_initial_placement_never_break_a_must_rule_or_overfill_a_host(
        snap: ClusterSnapshot, data: st.DataObject) -> None:
    drained = data.draw(st.sampled_from([h.name for h in snap.hosts]))
    plan = plan_evacuation(snap, drained)
    leaving = {v.name for v in snap.vms if v.host == drained}
    if plan.refused is not None:
        assert plan.steps == () and plan.refused.startswith(f"Host {drained} cannot enter maintenance")
    else:
        assert {s.vm for s in plan.steps} == leaving
        assert all(s.target != drained for s in plan.steps)
        after = applied(snap, [_as_move(snap, s.vm, s.target) for s in plan.steps])
        where = {v.name: v.host for v in after.vms}
        assert all(violations(r, where) == 0 for r in after.rules if r.strength is RuleStrength.MUST)
        for h in after.hosts:
            if h.name != drained:
                used = sum(committed_mib(v.memory_mib) for v in after.vms if v.host == h.name)
                assert used <= max(h.memory_mib, before_mib(snap, h.name))
    new = vm("new", "", memory_mib=data.draw(st.sampled_from([512, 2048, 8192])))
    others = data.draw(st.lists(st.sampled_from([v.name for v in snap.vms]), max_size=3))
    rule = Rule("new-apart", RuleKind.VM_ANTI_AFFINITY, RuleStrength.MUST, frozenset({"new", *others}))
    with_rule = replace(snap, rules=(*snap.rules, rule))
    choice = place(with_rule, new)
    if choice.host is not None:
        before: dict[str, str | None] = {v.name: v.host for v in with_rule.vms}
        where = before | {"new": choice.host}
        # the drawn rule may already be broken among the others: placing the VM must not add to it
        assert all(violations(r, where) == violations(r, before)
                   for r in with_rule.rules if r.strength is RuleStrength.MUST)
        used = sum(committed_mib(v.memory_mib) for v in with_rule.vms if v.host == choice.host)
        assert used + committed_mib(new.memory_mib) <= with_rule.host(choice.host).memory_mib
    else:
        assert choice.refused is not None and "No host can run VM 'new'" in choice.refused


def before_mib(snap: ClusterSnapshot, host_name: str) -> int:
    """A host the random cluster already overfilled may stay so; it must not get fuller."""
    return sum(committed_mib(v.memory_mib) for v in snap.vms if v.host == host_name)


def _as_move(snap: ClusterSnapshot, name: str, target: str) -> Recommendation:
    return Recommendation(name, snap.vm(name).host, target, MoveReason.EVACUATE, "", 0.0, 0.0, 0.0, 0, True)
