"""The DRS recommender on hand-made clusters whose right answer is known."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit.placement_cluster import cluster, host, vm
from vmshift.errors import InvalidInputError
from vmshift.model.migration import CheckId, CheckSeverity
from vmshift.placement.recommendation import DrsMemory, DrsPass, MoveReason
from vmshift.placement.recommender import recommend
from vmshift.placement.rules import violations
from vmshift.placement.settings import DrsSettings
from vmshift.placement.simulate import applied
from vmshift.placement.snapshot import ClusterSnapshot, DrsAutomation, Rule, RuleKind, RuleStrength, VmDrs
from vmshift.placement.state import ClusterState

FULLY = DrsSettings(automation=DrsAutomation.FULLY)
HOSTS = [host("host-1"), host("host-2"), host("host-3")]


def busy_on_host1(**over: object) -> ClusterSnapshot:
    """Three VMs flat out (1.8 of their 2 vCPUs) on host-1, nothing elsewhere."""
    return cluster(HOSTS, [vm(f"busy-{i}", "host-1", cpu=1.8, used_mib=900) for i in range(3)], **over)  # type: ignore[arg-type]


def passes(snap: ClusterSnapshot, settings: DrsSettings, n: int) -> list[DrsPass]:
    """``n`` passes a minute apart, each pass's moves applied before the next."""
    out, memory = [], DrsMemory()
    for _ in range(n):
        p = recommend(snap, settings, memory)
        out.append(p)
        memory = p.memory
        snap = replace(applied(snap, [r for r in p.recommendations if r.automatic]), now_s=snap.now_s + 60)
    return out


def test_three_busy_vms_on_one_host_are_spread_one_per_host_after_the_imbalance_persists() -> None:
    runs = passes(busy_on_host1(), FULLY, 2)
    assert len(runs[0].recommendations) == 0
    assert "not yet acted on" in runs[0].notes[0]
    moves = runs[1].recommendations
    assert sorted(r.target for r in moves) == ["host-2", "host-3"]
    assert {r.source for r in moves} == {"host-1"}
    assert runs[1].imbalance_after < 0.01 < runs[1].imbalance_before
    for r in moves:
        assert r.reason is MoveReason.BALANCE and r.automatic
        assert r.benefit > 2 * r.cost > 0  # threshold 3: benefit at least twice the cost
        assert 0 < r.predicted_s < 60 and r.downtime_ms > 0
        assert all(c.severity is not CheckSeverity.ERROR for c in r.checks)
        assert {c.check for c in r.checks} >= {CheckId.MEMORY, CheckId.RULES, CheckId.CPU_MODEL}
        assert "above the cluster's mean load" in r.why


def test_steady_balanced_load_makes_no_move_and_says_why() -> None:
    snap = cluster(HOSTS, [vm(f"vm-{h.name}", h.name, cpu=1.0) for h in HOSTS])
    runs = passes(snap, FULLY, 10)
    assert all(not p.recommendations for p in runs)
    assert runs[-1].notes[-1].startswith("No move: imbalance 0.000")


def test_after_spreading_ten_more_passes_make_no_move() -> None:
    runs = passes(busy_on_host1(), FULLY, 12)
    assert sum(len(p.recommendations) for p in runs) == 2
    assert all(not p.recommendations for p in runs[2:])


def test_manual_and_partially_only_recommend_and_a_vm_override_wins() -> None:
    snap = busy_on_host1()
    snap = replace(snap, vms=(snap.vms[0], replace(snap.vms[1], drs=VmDrs.FULLY), snap.vms[2]))
    for level in (DrsAutomation.MANUAL, DrsAutomation.PARTIALLY):
        moves = recommend(snap, DrsSettings(automation=level, persist_passes=1)).recommendations
        assert len(moves) == 2
        assert {r.vm: r.automatic for r in moves} == {"busy-0": False, "busy-1": True}


def test_a_drs_disabled_vm_and_a_vm_in_its_cooldown_stay() -> None:
    snap = busy_on_host1()
    vms = (replace(snap.vms[0], drs=VmDrs.DISABLED), replace(snap.vms[1], last_moved_s=snap.now_s - 600),
           snap.vms[2])
    moves = recommend(replace(snap, vms=vms), replace(FULLY, persist_passes=1)).recommendations
    assert [r.vm for r in moves] == ["busy-2"]


def test_a_move_whose_cost_exceeds_its_benefit_is_not_made_and_the_note_says_so() -> None:
    # two VMs on host-1 that dirty memory nearly as fast as the link sends it; host-2 empty
    hot = dict(cpu=0.4, used_mib=2000, memory_mib=2048, dirty_rate_bps=9e8)
    snap = cluster([host("host-1", memory_mib=16384), host("host-2", memory_mib=16384)],
                   [vm("fast-1", "host-1", **hot), vm("fast-2", "host-1", **hot)])  # type: ignore[arg-type]
    p = recommend(snap, DrsSettings(automation=DrsAutomation.FULLY, threshold=4, persist_passes=1))
    assert p.recommendations == ()
    note = next(n for n in p.notes if n.startswith("Best move left: fast-1 to host-2"))
    assert "below 1.5 x its cost" in note
    # at threshold 5 (factor 1) the same move is worth it
    moves = recommend(snap, DrsSettings(automation=DrsAutomation.FULLY, threshold=5, persist_passes=1))
    assert [(m.vm, m.target) for m in moves.recommendations] == [("fast-1", "host-2")]
    assert moves.recommendations[0].benefit < 1.5 * moves.recommendations[0].cost


def test_threshold_1_makes_no_balancing_move_but_mends_a_broken_must_rule() -> None:
    rule = Rule("apart", RuleKind.VM_ANTI_AFFINITY, RuleStrength.MUST, frozenset({"busy-0", "busy-1"}))
    snap = busy_on_host1(rules=[rule])
    p = recommend(snap, DrsSettings(automation=DrsAutomation.FULLY, threshold=1))
    assert [(r.reason, r.source) for r in p.recommendations] == [(MoveReason.MUST_RULE, "host-1")]
    assert violations(rule, {v.name: v.host for v in applied(snap, p.recommendations).vms}) == 0
    assert "Threshold 1 makes no balancing moves." in p.notes


def test_balancing_never_breaks_an_anti_affinity_or_host_rule() -> None:
    # busy-0 may run on host-1 only and busy-1 never beside idle (on host-2): two VMs still move
    rules = [Rule("pin", RuleKind.VM_HOST_AFFINITY, RuleStrength.MUST, frozenset({"busy-0"}),
                  frozenset({"host-1"})),
             Rule("apart", RuleKind.VM_ANTI_AFFINITY, RuleStrength.MUST, frozenset({"busy-1", "idle"}))]
    snap = cluster(HOSTS, [*busy_on_host1().vms, vm("idle", "host-2", cpu=0.0)], rules)
    moves = recommend(snap, replace(FULLY, persist_passes=1)).recommendations
    after = {v.name: v.host for v in applied(snap, moves).vms}
    assert after["busy-0"] == "host-1"
    assert after["busy-1"] != "host-2"
    assert all(violations(r, after) == 0 for r in rules)
    assert len(moves) == 2


def test_moves_per_pass_are_bounded_by_what_ends_before_the_next_pass() -> None:
    hosts = [host("host-1", migration_limit=1), host("host-2", migration_limit=1), host("host-3")]
    snap = cluster(hosts, list(busy_on_host1().vms))
    moves = recommend(snap, replace(FULLY, persist_passes=1)).recommendations
    assert len(moves) == 2  # host-1's one lane carries both moves one after the other
    slow = replace(FULLY, persist_passes=1, pass_interval_s=min(m.predicted_s for m in moves) * 1.5)
    assert len(recommend(snap, slow).recommendations) == 1


def test_a_host_already_running_its_limit_of_migrations_is_left_alone() -> None:
    hosts = [host("host-1", migrations_running=4), host("host-2"), host("host-3")]
    p = recommend(cluster(hosts, list(busy_on_host1().vms)), replace(FULLY, persist_passes=1))
    assert p.recommendations == ()
    assert "concurrency limits" in p.notes[0]


def test_a_should_rule_is_mended_when_it_is_worth_its_cost() -> None:
    rule = Rule("together", RuleKind.VM_AFFINITY, RuleStrength.SHOULD, frozenset({"a", "b"}))
    snap = cluster([host("host-1"), host("host-2")],
                   [vm("a", "host-1", cpu=0.2), vm("b", "host-2", cpu=0.2)], [rule])
    moves = recommend(snap, FULLY).recommendations
    assert [m.reason for m in moves] == [MoveReason.SHOULD_RULE]
    assert violations(rule, {v.name: v.host for v in applied(snap, moves).vms}) == 0


def test_a_bad_threshold_is_refused_with_a_hint() -> None:
    with pytest.raises(InvalidInputError, match="must be 1 to 5, not 7") as e:
        DrsSettings(threshold=7)
    assert e.value.hint


def test_a_moves_scored_change_of_the_objective_is_the_change_measured_afresh() -> None:
    snap = cluster([host("host-1"), host("host-2", cpus=8, memory_mib=16384), host("host-3", cpus=2)],
                   [vm("a", "host-1", cpu=1.3, used_mib=700), vm("b", "host-1", cpu=0.4, used_mib=300),
                    vm("c", "host-2", cpu=2.5, used_mib=3000)])
    state = ClusterState(snap, DrsSettings())
    deltas = state.spread_deltas("a")
    for i, target in enumerate(state.balanced):
        if target == "host-1":
            continue
        moved = ClusterState(replace(snap, vms=(replace(snap.vms[0], host=target), *snap.vms[1:])),
                             DrsSettings())
        assert deltas[i] == pytest.approx(moved.spread() - state.spread(), abs=1e-12)


def test_a_pass_during_moves_counts_each_moving_vm_on_its_target() -> None:
    """busy-0 and busy-1 are on their way to host-2 and host-3: host-1 keeps one VM, no move."""
    snap = busy_on_host1()
    moving = {"busy-0": "host-2", "busy-1": "host-3"}
    snap = replace(snap, vms=tuple(replace(v, migrating_to=moving.get(v.name)) for v in snap.vms))
    runs = passes(snap, FULLY, 3)
    assert all(not p.recommendations for p in runs), [p.recommendations for p in runs]
    assert runs[0].imbalance_before < 0.01
