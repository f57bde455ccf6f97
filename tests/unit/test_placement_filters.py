"""Placement filters, initial placement and the maintenance evacuation plan on hand-made clusters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from tests.unit.placement_cluster import cluster, host, vm
from vmshift.errors import CapacityError, InvalidInputError, NotFoundError
from vmshift.model.enums import Accelerator, ConnectionState, PowerState
from vmshift.model.host import CpuModelInfo
from vmshift.model.migration import CheckId, CheckSeverity
from vmshift.placement.evacuation import plan_evacuation
from vmshift.placement.filters import Filters
from vmshift.placement.initial import place, place_or_raise
from vmshift.placement.rules import violations
from vmshift.placement.settings import DrsSettings
from vmshift.placement.snapshot import HostState, Rule, RuleKind, RuleStrength
from vmshift.placement.state import ClusterState


def failing(h: HostState) -> dict[CheckId, str]:
    """The ERROR checks of a default VM on host ``h``; ``fits`` must agree with them."""
    snap = cluster([h], [vm("web", "elsewhere")])
    f = Filters(ClusterState(snap, DrsSettings()))
    web = snap.vm("web")
    out = {r.check: r.message for r in f.checks(web, h.name) if r.severity is CheckSeverity.ERROR}
    assert f.fits(web, h.name) is (not out)
    return out


def test_a_compatible_host_passes_every_filter() -> None:
    assert failing(host("host-1")) == {}


@pytest.mark.parametrize(
    ("over", "check", "says"),
    [
        (dict(connection=ConnectionState.DISCONNECTED), CheckId.TARGET_CONNECTED, "is disconnected"),
        (dict(maintenance=True), CheckId.TARGET_MAINTENANCE, "in maintenance mode"),
        (dict(cpu_models=(CpuModelInfo(name="qemu64", unavailable_features=["avx2"]),)), CheckId.CPU_MODEL,
         "lacks avx2"),
        (dict(accelerator=Accelerator.TCG), CheckId.ACCELERATOR, "uses tcg"),
        (dict(machine_types=frozenset({"pc-i440fx-9.0"})), CheckId.MACHINE_TYPE, "lacks machine type"),
        (dict(memory_mib=1000), CheckId.MEMORY, "needs 1088 MiB"),
        (dict(datastores=frozenset({"local-host-1"})), CheckId.DATASTORES, "'shared-1'"),
        (dict(networks=frozenset()), CheckId.NETWORKS, "'VM Network'"),
    ],
)
def test_each_filter_refuses_its_own_case(over: dict[str, object], check: CheckId, says: str) -> None:
    found = failing(host("host-1", **over))  # type: ignore[arg-type]
    assert list(found) == [check]
    assert says in found[check]


def test_memory_counts_what_is_committed_including_incoming_migrations() -> None:
    h1, h2 = host("host-1", memory_mib=4096), host("host-2", memory_mib=4096)
    snap = cluster([h1, h2], [vm("a", "host-1", memory_mib=2048), vm("b", "host-2", memory_mib=1500,
                                                                       migrating_to="host-1"),
                              vm("new", "host-2", memory_mib=512)])
    f = Filters(ClusterState(snap, DrsSettings()))
    msg = next(r.message for r in f.checks(snap.vm("new"), "host-1") if r.check is CheckId.MEMORY)
    assert "has 420 MiB free" in msg  # 4096 - (2048 + 64) - (1500 + 64)


def test_initial_placement_takes_the_least_loaded_host_that_fits() -> None:
    snap = cluster([host("host-1"), host("host-2"), host("host-3", memory_mib=512)],
                   [vm("a", "host-1", cpu=1.5), vm("b", "host-2", cpu=0.2)])
    choice = place(snap, vm("new", "", cpu=1.0))
    assert choice.host == "host-2" and choice.refused is None and choice.warning is None
    assert all(r.severity is CheckSeverity.OK for r in choice.checks)


def test_initial_placement_refuses_with_every_hosts_reason() -> None:
    snap = cluster([host("host-1", memory_mib=1024), host("host-2", maintenance=True)], [])
    choice = place(snap, vm("new", "", memory_mib=2048))
    assert choice.host is None
    assert choice.refused is not None and "No host can run VM 'new'" in choice.refused
    assert "host-1 has 1024 MiB free" in choice.refused
    with pytest.raises(CapacityError, match="No host can run VM 'new'"):
        place_or_raise(snap, vm("new", "", memory_mib=2048))


def test_initial_placement_breaks_a_should_rule_only_when_nothing_else_fits() -> None:
    rule = Rule("apart", RuleKind.VM_ANTI_AFFINITY, RuleStrength.SHOULD, frozenset({"a", "new"}))
    roomy = cluster([host("host-1"), host("host-2")], [vm("a", "host-1", cpu=0.0)], [rule])
    assert place(roomy, vm("new", "", cpu=0.0)).host == "host-2"
    tight = cluster([host("host-1"), host("host-2", memory_mib=512)], [vm("a", "host-1")], [rule])
    choice = place(tight, vm("new", ""))
    assert choice.host == "host-1"
    assert choice.warning is not None and "breaks should rule apart" in choice.warning


def test_a_must_rule_is_never_broken_by_initial_placement() -> None:
    rule = Rule("apart", RuleKind.VM_ANTI_AFFINITY, RuleStrength.MUST, frozenset({"a", "new"}))
    tight = cluster([host("host-1"), host("host-2", memory_mib=512)], [vm("a", "host-1")], [rule])
    choice = place(tight, vm("new", ""))
    assert choice.host is None and choice.refused is not None
    assert "Must rule apart keeps VM 'new' off host-1" in choice.refused


def test_evacuation_plans_every_vm_with_its_target_and_time() -> None:
    vms = [vm("a", "host-1", cpu=1.0), vm("b", "host-1", cpu=1.0), vm("c", "host-1", cpu=1.0),
           vm("off", "host-1", power_state=PowerState.POWERED_OFF), vm("x", "host-2", cpu=1.5)]
    snap = cluster([host("host-1"), host("host-2"), host("host-3")], vms)
    plan = plan_evacuation(snap, "host-1")
    assert plan.refused is None
    assert {s.vm for s in plan.steps} == {"a", "b", "c", "off"}
    assert all(s.target in {"host-2", "host-3"} for s in plan.steps)
    assert [s.target for s in plan.steps].count("host-3") >= 2  # host-2 is busier
    assert {s.vm: s.live for s in plan.steps} == {"a": True, "b": True, "c": True, "off": False}
    assert all(s.predicted_s > 0 for s in plan.steps)
    assert plan.predicted_total_s == max(s.ends_at_s for s in plan.steps)


def test_evacuation_is_refused_before_anything_moves_when_a_vm_must_stay() -> None:
    rule = Rule("pinned", RuleKind.VM_HOST_AFFINITY, RuleStrength.MUST, frozenset({"b"}),
                frozenset({"host-1"}))
    snap = cluster([host("host-1"), host("host-2")], [vm("a", "host-1"), vm("b", "host-1")], [rule])
    plan = plan_evacuation(snap, "host-1")
    assert plan.steps == ()
    assert plan.refused is not None
    assert plan.refused.startswith("Host host-1 cannot enter maintenance mode: No host can run VM 'b'")
    assert "Must rule pinned keeps VM 'b' off host-2" in plan.refused
    with pytest.raises(CapacityError, match="cannot enter maintenance mode"):
        plan.raise_if_refused()


def test_evacuation_keeps_a_must_affinity_group_together_and_a_must_anti_affinity_pair_apart() -> None:
    rules = [Rule("together", RuleKind.VM_AFFINITY, RuleStrength.MUST, frozenset({"a", "b"})),
             Rule("apart", RuleKind.VM_ANTI_AFFINITY, RuleStrength.MUST, frozenset({"c", "d"}))]
    vms = [vm(n, "host-1") for n in "abcd"]
    snap = cluster([host("host-1"), host("host-2"), host("host-3")], vms, rules)
    plan = plan_evacuation(snap, "host-1")
    after = {s.vm: s.target for s in plan.steps}
    assert after["a"] == after["b"] and after["c"] != after["d"]
    assert all(violations(r, after) == 0 for r in rules)


def test_evacuation_refuses_when_memory_runs_out_and_names_an_unknown_host() -> None:
    snap = cluster([host("host-1"), host("host-2", memory_mib=1500)],
                   [vm("a", "host-1"), vm("b", "host-1")])
    plan = plan_evacuation(snap, "host-1")
    assert plan.refused is not None and "MiB free" in plan.refused
    with pytest.raises(NotFoundError, match="Host 'nope' is not in the cluster"):
        plan_evacuation(snap, "nope")
    replace(plan, refused=None).raise_if_refused()  # a plan that is not refused raises nothing


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: Rule("r", RuleKind.VM_AFFINITY, RuleStrength.MUST, frozenset()), "names no VM"),
        (lambda: Rule("r", RuleKind.VM_HOST_AFFINITY, RuleStrength.MUST, frozenset({"a"})), "names no host"),
        (lambda: Rule("r", RuleKind.VM_ANTI_AFFINITY, RuleStrength.MUST, frozenset({"a"}), frozenset({"h"})),
         "takes no hosts"),
        (lambda: cluster([host("host-1"), host("host-1")], []), "names host 'host-1' twice"),
        (lambda: cluster([host("host-1")], [vm("a", "host-1"), vm("a", "host-1")]), "names VM 'a' twice"),
        (lambda: cluster([host("host-1", cpus=0)], []), "has 0 CPUs"),
        (lambda: cluster([host("host-1")], [vm("a", "host-1", memory_mib=0)]), "has 2 vCPUs and 0 MiB"),
    ],
)
def test_a_bad_snapshot_or_rule_is_refused_with_one_sentence_and_a_hint(make: Callable[[], object],
                                                                        says: str) -> None:
    with pytest.raises(InvalidInputError, match=says) as e:
        make()
    assert e.value.hint
