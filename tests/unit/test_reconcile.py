"""The pure reconcile comparison: the four findings, the migration exemption, and no repeats."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vmshift.model.enums import PowerState
from vmshift.model.vm import VmRuntime
from vmshift.server.reconcile import (
    Finding,
    FindingKey,
    FindingKind,
    InventoryVm,
    OpenMigration,
    Outcome,
    Snapshot,
    appeared_message,
    cleared_message,
    reconcile,
)

UUID = "6c1f0d2e-0000-4000-8000-000000000001"
ON, OFF, PAUSED = PowerState.POWERED_ON, PowerState.POWERED_OFF, PowerState.PAUSED
MISSING = PowerState.MISSING


def vm(host: str = "A", state: PowerState = ON, name: str = "web", uuid: str = UUID) -> InventoryVm:
    return InventoryVm(name=name, uuid=uuid, host=host, power_state=state)


def rt(state: PowerState = ON, status: str | None = None, *, incoming: int | None = None,
       died: bool = False, name: str = "web", uuid: str = UUID) -> VmRuntime:  # fmt: skip
    status = status or {ON: "running", PAUSED: "paused"}.get(state)
    return VmRuntime(name=name, uuid=uuid, power_state=state, qemu_status=status, died=died,
                     incoming_migration=incoming, pid=None if state is OFF else 100)  # fmt: skip


def run(
    inventory: Sequence[InventoryVm],
    reports: Mapping[str, Sequence[VmRuntime]],
    previous: Mapping[FindingKey, Finding] | None = None,
    migrations: Sequence[OpenMigration] = (),
    busy: frozenset[str] = frozenset(),
    unsure: frozenset[str] = frozenset(),
) -> Outcome:
    return reconcile(Snapshot(inventory, reports, migrations, busy, unsure), previous or {})


def kinds(findings: Sequence[Finding]) -> list[tuple[FindingKind, str]]:
    return [(f.kind, f.host) for f in findings]


def test_all_is_well_when_the_named_host_runs_the_vm() -> None:
    out = run([vm()], {"A": [rt()], "B": []})
    assert out.findings == out.appeared == out.cleared == out.pauses == [] and out.power_states == {}


# ----- (a) running on a host the inventory does not name --------------------------------------
def test_a_qemu_on_an_unnamed_host_is_reported_and_left_alone() -> None:
    out = run([vm(state=OFF)], {"A": [rt(OFF)], "B": [rt()]})
    assert kinds(out.appeared) == [(FindingKind.RUNNING_ELSEWHERE, "B")] and out.pauses == []
    f = out.appeared[0]
    assert f.inventory_host == "A" and f.agent_name == "web" and f.power_state is ON
    assert "B" in appeared_message(f) and "inventory has it on A" in appeared_message(f)


def test_a_qemu_of_a_vm_the_inventory_does_not_know() -> None:
    out = run([], {"B": [rt(name="ghost", uuid="other")]})
    (f,) = out.appeared
    assert f.kind is FindingKind.RUNNING_ELSEWHERE and f.inventory_host is None and f.vm == "ghost"
    assert "no VM with this uuid" in appeared_message(f)


def test_a_defined_but_powered_off_vm_elsewhere_is_no_finding() -> None:
    assert run([vm()], {"A": [rt()], "B": [rt(OFF)]}).findings == []


# ----- (b) missing --------------------------------------------------------------------------------
def test_missing_when_the_named_host_knows_nothing_and_no_one_else_runs_it() -> None:
    out = run([vm()], {"A": [], "B": [rt(OFF)]})
    assert kinds(out.appeared) == [(FindingKind.MISSING, "A")]
    assert out.power_states == {"web": MISSING}
    assert "vmshift vm start web" in appeared_message(out.appeared[0])


def test_a_paused_vm_can_go_missing_too_but_a_powered_off_one_cannot() -> None:
    assert kinds(run([vm(state=PAUSED)], {"A": []}).findings) == [(FindingKind.MISSING, "A")]
    assert run([vm(state=OFF)], {"A": []}).findings == []


def test_a_died_qemu_is_the_hosts_report_not_missing() -> None:
    out = run([vm()], {"A": [rt(OFF, died=True)]})
    assert out.findings == [] and out.power_states == {}


def test_not_missing_when_another_host_runs_it_that_is_running_elsewhere() -> None:
    out = run([vm()], {"A": [], "B": [rt()]})
    assert kinds(out.findings) == [(FindingKind.RUNNING_ELSEWHERE, "B")]


def test_missing_needs_the_named_host_to_answer_and_no_task() -> None:
    assert run([vm()], {"B": []}).findings == []  # A did not answer this round
    assert run([vm()], {"A": []}, busy=frozenset({"web"})).findings == []


def test_missing_is_reported_once_survives_a_restart_and_clears_with_the_hosts_state() -> None:
    first = run([vm()], {"A": []})
    second = run([vm(state=MISSING)], {"A": []}, first.active)
    assert second.appeared == [] and kinds(second.findings) == [(FindingKind.MISSING, "A")]
    assert second.power_states == {}
    restarted = run([vm(state=MISSING)], {"A": []}, previous={})  # memory lost, the row remembers
    assert restarted.appeared == []
    back = run([vm(state=MISSING)], {"A": [rt(OFF, died=True)]}, second.active)
    assert kinds(back.cleared) == [(FindingKind.MISSING, "A")] and back.power_states == {"web": OFF}
    assert "poweredOff" in cleared_message(back.cleared[0], back.power_states["web"])
    assert back.active == {}


def test_a_missing_vm_seen_on_another_host_becomes_unknown() -> None:
    out = run([vm(state=MISSING)], {"A": [], "B": [rt(PAUSED)]})
    assert kinds(out.cleared) == [(FindingKind.MISSING, "A")]
    assert out.power_states == {"web": PowerState.UNKNOWN}
    assert kinds(out.appeared) == [(FindingKind.RUNNING_ELSEWHERE, "B")]


def test_a_missing_vm_deleted_or_powered_off_in_the_inventory_clears() -> None:
    first = run([vm()], {"A": []})
    assert kinds(run([], {"A": []}, first.active).cleared) == [(FindingKind.MISSING, "A")]
    assert kinds(run([vm(state=OFF)], {}, first.active).cleared) == [(FindingKind.MISSING, "A")]


# ----- (c) duplicate ------------------------------------------------------------------------------
def test_duplicate_pauses_the_copy_the_inventory_does_not_name() -> None:
    out = run([vm()], {"A": [rt()], "B": [rt()]})
    assert kinds(out.appeared) == kinds(out.pauses) == [(FindingKind.DUPLICATE, "B")]
    msg = appeared_message(out.appeared[0])
    assert "paused the copy on B" in msg and "Keep the copy on A" in msg
    failed = appeared_message(out.appeared[0], pause_error="no answer")
    assert "FAILED (no answer)" in failed


def test_duplicate_is_reported_once_paused_again_if_resumed_and_cleared_when_gone() -> None:
    first = run([vm()], {"A": [rt()], "B": [rt()]})
    paused = run([vm()], {"A": [rt()], "B": [rt(PAUSED)]}, first.active)
    assert paused.appeared == paused.cleared == paused.pauses == []
    assert kinds(paused.findings) == [(FindingKind.RUNNING_ELSEWHERE, "B")]  # same condition, no event
    again = run([vm()], {"A": [rt()], "B": [rt(PAUSED)]}, paused.active)
    assert again.appeared == []
    resumed = run([vm()], {"A": [rt()], "B": [rt()]}, again.active)
    assert kinds(resumed.appeared) == kinds(resumed.pauses) == [(FindingKind.DUPLICATE, "B")]
    still = run([vm()], {"A": [rt()], "B": [rt()]}, resumed.active)  # the pause failed: retry, quietly
    assert still.appeared == [] and kinds(still.pauses) == [(FindingKind.DUPLICATE, "B")]
    gone = run([vm()], {"A": [rt()], "B": []}, still.active)
    assert kinds(gone.cleared) == [(FindingKind.DUPLICATE, "B")] and gone.active == {}
    assert "is gone" in cleared_message(gone.cleared[0])


def test_a_paused_copy_next_to_the_running_vm_is_not_paused_again() -> None:
    out = run([vm()], {"A": [rt()], "B": [rt(PAUSED)]})
    assert kinds(out.appeared) == [(FindingKind.RUNNING_ELSEWHERE, "B")] and out.pauses == []


def test_without_the_named_hosts_report_a_running_copy_is_not_called_a_duplicate() -> None:
    out = run([vm()], {"B": [rt()]})
    assert kinds(out.findings) == [(FindingKind.RUNNING_ELSEWHERE, "B")] and out.pauses == []


def test_a_copy_waits_while_the_named_host_is_connected_but_its_report_is_not_current() -> None:
    # host A missed a poll: the copy on B may be a duplicate or the only QEMU, so nothing is said yet
    # (CI once saw 'running elsewhere' then 'duplicate' a moment later for one copy)
    waiting = run([vm()], {"B": [rt()]}, unsure=frozenset({"A"}))
    assert waiting.findings == waiting.appeared == waiting.pauses == []
    back = run([vm()], {"A": [rt()], "B": [rt()]}, waiting.active)
    assert kinds(back.appeared) == kinds(back.pauses) == [(FindingKind.DUPLICATE, "B")]
    # a finding made earlier is kept, not cleared, while A is unsure again
    kept = run([vm()], {"B": [rt(PAUSED)]}, back.active, unsure=frozenset({"A"}))
    assert kept.cleared == kept.appeared == [] and kinds(list(kept.active.values())) == [
        (FindingKind.DUPLICATE, "B")
    ]


# ----- (d) orphan receiving QEMU ------------------------------------------------------------------
def test_orphan_receiving_qemu() -> None:
    out = run([vm()], {"A": [rt()], "B": [rt(PAUSED, "inmigrate", incoming=7)]})
    (f,) = out.appeared
    assert f.kind is FindingKind.ORPHAN and f.host == "B" and f.migration_id == 7 and out.pauses == []
    assert "migration 7" in appeared_message(f)
    later = run([vm()], {"A": [rt()], "B": [rt(PAUSED, "inmigrate", incoming=7)]}, out.active)
    assert later.appeared == []
    gone = run([vm()], {"A": [rt()], "B": []}, later.active)
    assert kinds(gone.cleared) == [(FindingKind.ORPHAN, "B")]


def test_only_a_migration_of_the_same_vm_explains_a_receiving_qemu() -> None:
    receiving = {"A": [rt()], "B": [rt(PAUSED, "inmigrate", incoming=7)]}
    unrelated = [OpenMigration(7, "db", "A", "B")]  # another VM's migration 7
    assert kinds(run([vm()], receiving, migrations=unrelated).findings) == [(FindingKind.ORPHAN, "B")]
    # while the VM itself has an unfinished migration, its QEMUs are the migration's business
    elsewhere = [OpenMigration(8, "web", "A", "C")]
    assert run([vm()], receiving, migrations=elsewhere).findings == []


# ----- exemptions -------------------------------------------------------------------------------
def test_an_unfinished_migration_explains_its_two_copies() -> None:
    m = [OpenMigration(7, "web", "A", "B")]
    precopy = {"A": [rt()], "B": [rt(PAUSED, "inmigrate", incoming=7)]}
    switchover = {"A": [rt(PAUSED, "postmigrate")], "B": [rt()]}  # before the server recorded the move
    skewed = {"A": [rt()], "B": [rt()]}  # the two hosts were polled a moment apart
    for reports in (precopy, switchover, skewed):
        out = run([vm()], reports, migrations=m)
        assert out.findings == [] and out.pauses == []
    assert run([vm()], {"A": []}, migrations=m).findings == []  # nor is the VM missing meanwhile


def test_a_finding_is_kept_not_cleared_while_it_cannot_be_judged() -> None:
    first = run([vm()], {"A": [rt()], "B": [rt()]})
    key = first.appeared[0].key
    for out in (
        run([vm()], {"A": [rt()]}, first.active),  # B missed a beat
        run([vm()], {"A": [rt()], "B": []}, first.active, busy=frozenset({"web"})),  # a task works on it
        run([vm()], {"A": [rt()], "B": []}, first.active, migrations=[OpenMigration(9, "web", "A", "B")]),
    ):
        assert out.cleared == [] and key in out.active
