"""A round over a few VMs (``reconcile_scoped``) decides them exactly as a round over everything does,
and leaves every other VM's earlier findings as they were: the heartbeat relies on this to look only
at what changed (server/heartbeat.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vmshift.model.enums import PowerState
from vmshift.model.vm import VmRuntime
from vmshift.server.reconcile import (
    Finding,
    FindingKey,
    InventoryVm,
    OpenMigration,
    Snapshot,
    reconcile,
    reconcile_scoped,
)

HOSTS = ["A", "B", "C"]
UUIDS = [f"00000000-0000-4000-8000-{i:012d}" for i in range(6)]
STATES = [PowerState.POWERED_ON, PowerState.PAUSED, PowerState.POWERED_OFF, PowerState.MISSING,
          PowerState.SUSPENDED]  # fmt: skip
QEMU_STATES = [PowerState.POWERED_ON, PowerState.PAUSED, PowerState.POWERED_OFF]


def name_of(uuid: str) -> str:
    return f"vm-{UUIDS.index(uuid)}"


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    known = draw(st.lists(st.sampled_from(UUIDS), unique=True))
    inventory = [InventoryVm(name_of(u), u, draw(st.sampled_from(HOSTS)), draw(st.sampled_from(STATES)))
                 for u in known]  # fmt: skip
    answered = draw(st.lists(st.sampled_from(HOSTS), unique=True))
    reports: dict[str, list[VmRuntime]] = {}
    for h in answered:
        reports[h] = []
        for u in draw(st.lists(st.sampled_from(UUIDS), unique=True, max_size=4)):
            incoming = draw(st.sampled_from([None, None, 1, 2]))
            state = draw(st.sampled_from(QEMU_STATES))
            died = draw(st.booleans()) and state is PowerState.POWERED_OFF
            reports[h].append(VmRuntime(name=name_of(u), uuid=u, power_state=state,
                                        incoming_migration=incoming, died=died))  # fmt: skip
    migrations = [OpenMigration(i, name_of(draw(st.sampled_from(UUIDS))), draw(st.sampled_from(HOSTS)),
                                draw(st.sampled_from(HOSTS))) for i in draw(st.sets(st.sampled_from([1, 2])))]
    busy = draw(st.sets(st.sampled_from([name_of(u) for u in UUIDS]), max_size=2))
    return Snapshot(inventory, reports, migrations, frozenset(busy))


def inside(findings: dict[FindingKey, Finding] | list[Finding], scope: set[str]) -> list[Finding]:
    items = findings.values() if isinstance(findings, dict) else findings
    return sorted((f for f in items if f.uuid in scope), key=lambda f: (f.key, f.kind))


@settings(max_examples=400, deadline=None)
@given(snapshots(), snapshots(), st.sets(st.sampled_from(UUIDS)))
def test_a_scoped_round_decides_its_vms_as_a_full_round_and_keeps_the_others(
    earlier: Snapshot, snap: Snapshot, scope: set[str]
) -> None:
    previous = reconcile(earlier, {}).active  # findings a real earlier round could have left
    full = reconcile(snap, previous)
    part = reconcile_scoped(snap, previous, scope)
    assert inside(part.findings, scope) == inside(full.findings, scope)
    assert all(f.uuid in scope for f in part.findings + part.appeared + part.cleared + part.pauses)
    assert inside(part.appeared, scope) == inside(full.appeared, scope)
    assert inside(part.cleared, scope) == inside(full.cleared, scope)
    assert inside(part.pauses, scope) == inside(full.pauses, scope)
    in_scope_names = {v.name for v in snap.inventory if v.uuid in scope}
    assert part.power_states == {n: s for n, s in full.power_states.items() if n in in_scope_names}
    assert inside(part.active, scope) == inside(full.active, scope)
    assert {k: f for k, f in part.active.items() if f.uuid not in scope} == {
        k: f for k, f in previous.items() if f.uuid not in scope
    }
