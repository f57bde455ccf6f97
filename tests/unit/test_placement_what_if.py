"""``drs simulate``'s what-ifs (placement/simulate.py) and the bookkeeping of stored
recommendations across passes (server/drs/store.py ``plan_pending``), on hand-made clusters."""

from __future__ import annotations

from tests.unit.placement_cluster import cluster, host, vm
from vmshift.placement.recommendation import MoveReason, Recommendation
from vmshift.placement.settings import DrsSettings
from vmshift.placement.simulate import with_vm, without_host
from vmshift.placement.snapshot import Rule, RuleKind, RuleStrength, VmState
from vmshift.server.drs.store import plan_pending

HOSTS = [host("host-1"), host("host-2"), host("host-3")]


def test_removing_a_host_places_its_vms_then_balances_the_rest() -> None:
    snap = cluster(HOSTS, [vm("a", "host-1", cpu=1.5), vm("b", "host-1", cpu=1.5), vm("c", "host-2")])
    got = without_host(snap, "host-1", DrsSettings())
    assert got.refused is None and got.after is not None
    assert {v for v, _ in got.placed} == {"a", "b"}
    assert {h for _, h in got.placed} <= {"host-2", "host-3"}
    assert {h for _, h in got.placed} == {"host-2", "host-3"}  # the two busy VMs go apart


def test_removing_a_host_a_must_rule_binds_to_is_refused_with_the_reason() -> None:
    rule = Rule("stay", RuleKind.VM_HOST_AFFINITY, RuleStrength.MUST, frozenset({"a"}), frozenset({"host-1"}))
    got = without_host(cluster(HOSTS, [vm("a", "host-1")], [rule]), "host-1", DrsSettings())
    assert got.after is None and got.refused is not None and "stay" in got.refused


def test_adding_a_vm_places_it_on_the_least_loaded_host() -> None:
    snap = cluster(HOSTS, [vm("a", "host-1", cpu=2.0), vm("b", "host-2", cpu=2.0)])
    got = with_vm(snap, VmState("new", "", 2, 1024), DrsSettings())
    assert got.placed == (("new", "host-3"),) and got.after is not None
    assert not got.after.recommendations


def test_adding_a_vm_nothing_has_room_for_is_refused() -> None:
    got = with_vm(cluster(HOSTS, []), VmState("huge", "", 2, 10 ** 6), DrsSettings())
    assert got.placed == () and got.refused is not None


def _rec(vm_name: str, target: str) -> Recommendation:
    return Recommendation(vm=vm_name, source="host-1", target=target, reason=MoveReason.BALANCE, why="w",
                          benefit=1.0, cost=0.1, predicted_s=2.0, downtime_ms=30, automatic=False)


def test_a_pass_keeps_the_pending_it_recommends_again_and_expires_the_rest() -> None:
    plan = plan_pending([(1, "a", "host-2"), (2, "b", "host-3"), (3, "c", "host-2")],
                        [_rec("a", "host-2"), _rec("b", "host-2"), _rec("d", "host-3")])
    assert set(plan.keep) == {1}
    assert plan.expire == [2, 3]  # b goes elsewhere now: a new recommendation
    assert [(m.vm, m.target) for m in plan.add] == [("b", "host-2"), ("d", "host-3")]
