"""Reconcile: does every VM run exactly where the inventory says? Pure: plain data in, findings out.

Each heartbeat round hands ``reconcile`` the inventory, the reports of the hosts that answered in
that round, the unfinished migrations and the VMs a task is busy with. It returns what holds now
and what changed since the previous round, so the caller records a critical event once when a
finding appears and an info event when it clears, and pauses a duplicate at once.

A finding is only cleared with proof: when the hosts it is about answered this round and no task or
migration is working on the VM. A host that missed a beat leaves its findings as they were, so a
flapping link does not repeat the same critical event. Likewise a copy of a VM whose own host is
connected but missed a beat waits for that host's report: without it, a duplicate would be called
'running elsewhere' first and 'duplicate' a moment later.

A finding about a VM depends only on that VM's data: its inventory row, the reports that carry its
uuid, the migrations and busy names, and which hosts answered. So a round over a few changed VMs
(``reconcile_scoped``) decides them exactly as a round over everything would, and costs what they do;
the caller runs a full round now and then as a safety net.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from vmshift.model.api import EventKind
from vmshift.model.enums import PowerState
from vmshift.model.vm import VmRuntime

# Inventory power states that promise a QEMU on the VM's host. A suspended VM has none (its state is a
# file in its folder), so, like a powered-off one, it is never missing for want of a QEMU.
EXPECTS_QEMU = frozenset({PowerState.POWERED_ON, PowerState.PAUSED, PowerState.MISSING})


class FindingKind(StrEnum):
    RUNNING_ELSEWHERE = "running_elsewhere"  # a QEMU of the VM on a host the inventory does not name
    MISSING = "missing"  # the inventory's host runs no QEMU for it, and no other host reports one
    DUPLICATE = "duplicate"  # running on the inventory's host and on another one
    ORPHAN = "orphan"  # a receiving QEMU that no unfinished migration explains


EVENT_KINDS = {
    FindingKind.RUNNING_ELSEWHERE: EventKind.VM_RUNNING_ELSEWHERE,
    FindingKind.MISSING: EventKind.VM_MISSING,
    FindingKind.DUPLICATE: EventKind.VM_DUPLICATE,
    FindingKind.ORPHAN: EventKind.VM_ORPHAN_QEMU,
}

# A copy on an unnamed host is one condition whether it runs next to the VM (duplicate, paused by
# the server) or not (running elsewhere): pausing a duplicate turns it into the other kind, which
# must not count as a new finding.
_FAMILY = {
    FindingKind.RUNNING_ELSEWHERE: "copy",
    FindingKind.DUPLICATE: "copy",
    FindingKind.MISSING: "missing",
    FindingKind.ORPHAN: "orphan",
}

FindingKey = tuple[str, str, str]  # (family, VM uuid, host)


@dataclass(frozen=True)
class InventoryVm:
    name: str
    uuid: str
    host: str
    power_state: PowerState


@dataclass(frozen=True)
class OpenMigration:
    """A migration the server has not finished (queued, running, or waiting for finalize)."""

    id: int
    vm: str
    source_host: str
    target_host: str


@dataclass(frozen=True)
class Snapshot:
    inventory: Sequence[InventoryVm]
    reports: Mapping[str, Sequence[VmRuntime]]  # host -> its VMs, only hosts that answered this round
    migrations: Sequence[OpenMigration] = ()
    busy: Collection[str] = frozenset()  # VM names a task works on (their reports may be stale)
    # connected hosts whose reports are not current this round (a missed poll, a stream resyncing): a
    # copy elsewhere of a VM the inventory puts there may be a duplicate or the only QEMU, so it waits
    unsure_hosts: Collection[str] = frozenset()


@dataclass(frozen=True)
class Finding:
    kind: FindingKind
    vm: str  # the inventory's name of the VM, else the name the host uses
    uuid: str
    host: str  # where the QEMU in question is; for MISSING, the inventory's host
    inventory_host: str | None = None  # None: the inventory has no VM with this uuid
    agent_name: str = ""  # the VM's name on ``host`` (what a pause request names)
    power_state: PowerState | None = None  # of the QEMU on ``host``
    qemu_status: str | None = None
    migration_id: int | None = None  # ORPHAN: the migration the QEMU says it receives

    @property
    def key(self) -> FindingKey:
        return (_FAMILY[self.kind], self.uuid, self.host)


@dataclass(frozen=True)
class Outcome:
    findings: list[Finding]  # everything that holds now
    appeared: list[Finding]  # new conditions, and copies that became duplicates: critical events
    cleared: list[Finding]  # earlier findings proven gone: info events
    pauses: list[Finding]  # duplicates to pause now (every round while they run)
    power_states: dict[str, PowerState] = field(default_factory=dict)  # VM name -> new inventory state
    active: dict[FindingKey, Finding] = field(default_factory=dict)  # pass back as ``previous``


def _state_of(rt: VmRuntime) -> PowerState:
    return PowerState.POWERED_OFF if rt.died else rt.power_state


def _copy(kind: FindingKind, name: str, host: str, rt: VmRuntime, v: InventoryVm | None) -> Finding:
    """A finding about the QEMU ``rt`` on ``host`` (made only for the few QEMUs that are one)."""
    return Finding(kind, name, rt.uuid, host, agent_name=rt.name,
                   inventory_host=v.host if v is not None else None, power_state=rt.power_state,
                   qemu_status=rt.qemu_status,
                   migration_id=rt.incoming_migration if kind is FindingKind.ORPHAN else None)  # fmt: skip


class _Round:
    """One round's view of the snapshot."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        self.by_uuid = {v.uuid: v for v in snap.inventory}
        self.migrating = {m.vm for m in snap.migrations}
        # the reports indexed once, so a round is linear in the VMs (10,000 in a vSphere-size cluster)
        self.on_host: dict[tuple[str, str], list[VmRuntime]] = defaultdict(list)  # (host, uuid) -> QEMUs
        self.qemu_hosts: dict[str, set[str]] = defaultdict(set)  # uuid -> hosts with a QEMU of it
        for host, runtimes in snap.reports.items():
            for rt in runtimes:
                self.on_host[host, rt.uuid].append(rt)
                if rt.has_qemu:
                    self.qemu_hosts[rt.uuid].add(host)

    def undecidable(self, vm: str) -> bool:
        """A task or a migration works on the VM: its reports may be stale or legitimately odd."""
        return vm in self.snap.busy or vm in self.migrating

    def unsure_of(self, v: InventoryVm | None) -> bool:
        """The VM's own host is connected but its report is not current: a copy elsewhere waits."""
        return v is not None and v.host in self.snap.unsure_hosts

    def explained(self, vm: str, hosts: set[str]) -> bool:
        return any(m.vm == vm and hosts <= {m.source_host, m.target_host} for m in self.snap.migrations)

    def receives(self, host: str, rt: VmRuntime) -> bool:
        return any(m.id == rt.incoming_migration and m.vm == rt.name and m.target_host == host
                   for m in self.snap.migrations)  # fmt: skip

    def copies(self) -> list[Finding]:
        """QEMUs on hosts the inventory does not name, and receiving QEMUs no migration explains."""
        found = []
        for host, runtimes in self.snap.reports.items():
            for rt in runtimes:
                if not rt.has_qemu:
                    continue
                v = self.by_uuid.get(rt.uuid)
                name = v.name if v is not None else rt.name
                if self.undecidable(name) or self.undecidable(rt.name) or self.unsure_of(v):
                    continue
                if not rt.is_the_vm:
                    if not self.receives(host, rt):
                        found.append(_copy(FindingKind.ORPHAN, name, host, rt, v))
                elif v is None:
                    found.append(_copy(FindingKind.RUNNING_ELSEWHERE, name, host, rt, v))
                elif host != v.host and not self.explained(v.name, {host, v.host}):
                    kind = FindingKind.DUPLICATE if self.both_run(v, rt) else FindingKind.RUNNING_ELSEWHERE
                    found.append(_copy(kind, name, host, rt, v))
        return found

    def both_run(self, v: InventoryVm, rt: VmRuntime) -> bool:
        named = self.on_host.get((v.host, v.uuid), ())
        return rt.power_state is PowerState.POWERED_ON and any(
            r.is_the_vm and r.power_state is PowerState.POWERED_ON for r in named
        )

    def missing(self, power_states: dict[str, PowerState]) -> list[Finding]:
        """VMs whose host should run them but does not, and no other host does either; fills
        ``power_states`` with the inventory changes (missing now, or found again)."""
        found = []
        for v in self.snap.inventory:
            reported = v.host in self.snap.reports
            if v.power_state not in EXPECTS_QEMU or not reported or self.undecidable(v.name):
                continue
            on_host = self.on_host.get((v.host, v.uuid), [])
            elsewhere = bool(self.qemu_hosts.get(v.uuid, set()) - {v.host})
            if on_host or elsewhere:
                if v.power_state is PowerState.MISSING:  # found again: the host's report, else unknown
                    power_states[v.name] = _state_of(on_host[0]) if on_host else PowerState.UNKNOWN
                continue
            found.append(Finding(FindingKind.MISSING, v.name, v.uuid, v.host, inventory_host=v.host))
            if v.power_state is not PowerState.MISSING:
                power_states[v.name] = PowerState.MISSING
        return found

    def proven_gone(self, old: Finding) -> bool:
        """This round can tell whether ``old`` still holds (so it does not, unless found again)."""
        if self.undecidable(old.vm) or self.undecidable(old.agent_name):
            return False
        if old.kind is not FindingKind.MISSING and self.unsure_of(self.by_uuid.get(old.uuid)):
            return False
        if old.kind is FindingKind.MISSING:
            v = self.by_uuid.get(old.uuid)
            if v is None or v.host != old.host or v.power_state not in EXPECTS_QEMU:
                return True  # deleted, moved or powered off in the inventory: nothing is promised
        return old.host in self.snap.reports


def reconcile(snap: Snapshot, previous: Mapping[FindingKey, Finding]) -> Outcome:
    """Compare the agents' reports with the inventory; see the module docstring."""
    r = _Round(snap)
    before = dict(previous)
    for v in snap.inventory:  # a VM already marked missing stays a finding across server restarts
        if v.power_state is PowerState.MISSING:
            f = Finding(FindingKind.MISSING, v.name, v.uuid, v.host, inventory_host=v.host)
            before.setdefault(f.key, f)
    power_states: dict[str, PowerState] = {}
    findings = r.copies() + r.missing(power_states)
    now = {f.key: f for f in findings}
    appeared = [
        f
        for f in findings
        if f.key not in before
        or (f.kind is FindingKind.DUPLICATE and before[f.key].kind is not FindingKind.DUPLICATE)
    ]
    cleared = [old for key, old in before.items() if key not in now and r.proven_gone(old)]
    gone = {f.key for f in cleared}
    active = {key: old for key, old in before.items() if key not in gone} | now
    pauses = [f for f in findings if f.kind is FindingKind.DUPLICATE]
    return Outcome(findings, appeared, cleared, pauses, power_states, active)


def restrict(snap: Snapshot, uuids: Collection[str]) -> Snapshot:
    """The part of ``snap`` about the VMs ``uuids``; every host that answered stays in ``reports``."""
    return Snapshot(
        [v for v in snap.inventory if v.uuid in uuids],
        {h: [rt for rt in rts if rt.uuid in uuids] for h, rts in snap.reports.items()},
        snap.migrations,
        snap.busy,
        snap.unsure_hosts,
    )


def reconcile_scoped(
    snap: Snapshot, previous: Mapping[FindingKey, Finding], uuids: Collection[str]
) -> Outcome:
    """``reconcile`` over the VMs ``uuids`` only: their findings as a full round finds them; the
    earlier findings of other VMs stay as they were (in ``active``)."""
    inside = {k: f for k, f in previous.items() if f.uuid in uuids}
    outcome = reconcile(restrict(snap, uuids), inside)
    kept = {k: f for k, f in previous.items() if f.uuid not in uuids}
    return replace(outcome, active=kept | outcome.active)


# ----- what the events say ------------------------------------------------------------------------
def _copy_state(f: Finding) -> str:
    return f"{f.power_state.value if f.power_state else 'unknown'}, QEMU state {f.qemu_status or 'unknown'}"


def appeared_message(f: Finding, pause_error: str | None = None) -> str:
    """The critical event's text: what is wrong, and what the operator does about it."""
    if f.kind is FindingKind.DUPLICATE:
        done = (
            f"the server paused the copy on {f.host} so that only one runs"
            if pause_error is None
            else f"pausing the copy on {f.host} FAILED ({pause_error}): pause or stop it by hand at once"
        )
        return (
            f"VM {f.vm} runs on {f.host} as well as on {f.inventory_host}, where the inventory has "
            f"it; {done}. Keep the copy on {f.inventory_host} and stop the one on {f.host} "
            "(docs/server.md, 'Reconcile')."
        )
    if f.kind is FindingKind.RUNNING_ELSEWHERE:
        where = (
            f"the inventory has it on {f.inventory_host}"
            if f.inventory_host is not None
            else "the inventory has no VM with this uuid"
        )
        return (
            f"VM {f.vm} has a QEMU on {f.host} ({_copy_state(f)}), but {where}; the server leaves "
            "it alone. Find out which copy is the VM before you start or stop anything "
            "(docs/server.md, 'Reconcile')."
        )
    if f.kind is FindingKind.MISSING:
        return (
            f"VM {f.vm} should run on {f.host}, but {f.host} runs no QEMU for it and no other "
            f"connected host reports one; it is marked missing. Look for it on disconnected hosts, "
            f"then start it again ('vmshift vm start {f.vm}') or delete it."
        )
    return (
        f"Host {f.host} runs a receiving QEMU for VM {f.vm} (migration {f.migration_id}, "
        f"{_copy_state(f)}) that no unfinished migration of this server explains; it never runs by "
        f"itself. Stop it on {f.host} once you know no migration needs it (docs/server.md, 'Reconcile')."
    )


def cleared_message(f: Finding, power_state: PowerState | None = None) -> str:
    """The info event's text; ``power_state``: what a VM no longer missing is now in the inventory."""
    if f.kind is FindingKind.MISSING:
        now = f"; it is {power_state.value} now" if power_state is not None else ""
        return f"VM {f.vm} is no longer missing: a host reports it again{now}."
    if f.kind is FindingKind.ORPHAN:
        return f"The receiving QEMU of VM {f.vm} on {f.host} (migration {f.migration_id}) is gone."
    return f"The copy of VM {f.vm} on {f.host}, a host the inventory does not name, is gone."
