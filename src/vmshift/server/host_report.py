"""What the server knows of one host from its stream (or its polls): facts and VM runtimes. Pure.

The cluster-wide reconcile compares these reports with the inventory, so each message of the host
stream (model/host_stream.py) is folded in here first; ``apply`` says whether the message changed
anything reconcile looks at (a stats report only moves numbers, so it does not).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from vmshift.model.host import HostFacts
from vmshift.model.host_stream import (
    FactsChanged,
    Keepalive,
    Snapshot,
    StatsReport,
    VmChanged,
    VmRemoved,
    vm_state,
)
from vmshift.model.vm import VmRuntime

Applied = Snapshot | VmChanged | VmRemoved | FactsChanged | StatsReport  # what changes a report


@dataclass
class HostReport:
    facts: HostFacts | None = None
    vms: dict[str, VmRuntime] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)  # uuids whose state changed since ``take_changed``
    stats: StatsReport | None = None  # the latest numbers: the VMs' loads and the host's capacity
    cpu_cores: dict[str, float] = field(default_factory=dict)  # each VM's cores busy, from ``stats``

    def runtimes(self) -> list[VmRuntime]:
        return list(self.vms.values())

    def uuids(self) -> set[str]:
        return {rt.uuid for rt in self.vms.values()}

    def take_changed(self) -> set[str]:
        """The uuids of the VMs whose reported state changed since the last call (reconcile looks at
        those: server/reconcile.py ``reconcile_scoped``)."""
        got, self.changed = self.changed, set()
        return got

    def apply(self, message: Applied | Keepalive) -> bool:
        """Fold one applied message in; True when the VMs' states changed (reconcile must look)."""
        if isinstance(message, Snapshot):
            old = self.vms
            self.facts, self.vms = message.facts, {rt.name: rt for rt in message.vms}
            return self._note(old.values(), self.vms.values())
        if isinstance(message, VmChanged):
            was = self.vms.get(message.vm.name)
            self.vms[message.vm.name] = message.vm
            return self._note([] if was is None else [was], [message.vm])
        if isinstance(message, VmRemoved):
            was = self.vms.pop(message.name, None)
            return was is not None and self._note([was], [])
        if isinstance(message, FactsChanged):
            self.facts = message.facts
            return False
        if isinstance(message, StatsReport):
            self._apply_stats(message)
        return False

    def _note(self, before: Iterable[VmRuntime], after: Iterable[VmRuntime]) -> bool:
        """Record the uuids of every VM whose state differs between the two views; any?"""
        old = {(rt.name, rt.uuid): vm_state(rt) for rt in before}
        new = {(rt.name, rt.uuid): vm_state(rt) for rt in after}
        moved = {key[1] for key in old.keys() | new.keys() if old.get(key) != new.get(key)}
        self.changed |= moved
        return bool(moved)

    def _apply_stats(self, report: StatsReport) -> None:
        self.stats = report
        self.cpu_cores = {v.name: v.cpu_cores for v in report.vms}
        for s in report.vms:
            rt = self.vms.get(s.name)
            if rt is not None:
                self.vms[s.name] = rt.model_copy(update={"cpu_seconds": s.cpu_seconds, "rss_mib": s.rss_mib})
        if self.facts is not None:
            self.facts = with_free_space(self.facts, report)


def with_free_space(facts: HostFacts, report: StatsReport) -> HostFacts:
    """The facts with the free memory and datastore space of a stats report."""
    stores = [
        ds.model_copy(update={"free_mib": report.datastore_free_mib[ds.uuid]})
        if ds.uuid in report.datastore_free_mib else ds
        for ds in facts.datastores
    ]  # fmt: skip
    return facts.model_copy(update={"memory_free_mib": report.memory_free_mib, "datastores": stores})
