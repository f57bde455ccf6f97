"""The server's view of one host from its stream (server/host_report.py): what changes it, what not."""

from __future__ import annotations

from vmshift.model.enums import Accelerator, PowerState
from vmshift.model.host import DatastoreInfo, HostFacts
from vmshift.model.host_stream import (
    FactsChanged,
    Keepalive,
    Snapshot,
    StatsReport,
    VmChanged,
    VmRemoved,
    VmStats,
)
from vmshift.model.vm import VmRuntime
from vmshift.server.host_report import HostReport

E = "e1"
FACTS = HostFacts(
    name="host-1", cpu_vendor="AuthenticAMD", cpu_model="fake", cpus=2, qemu_version="10.0.2",
    accelerator=Accelerator.TCG, memory_total_mib=4096, memory_free_mib=2048,
    datastores=[DatastoreInfo(uuid="ds-1", name="shared-1", path="/srv/s", capacity_mib=100, free_mib=50)],
)  # fmt: skip


def rt(name: str, state: PowerState = PowerState.POWERED_ON, cpu: float = 1.0) -> VmRuntime:
    return VmRuntime(name=name, uuid=f"uuid-{name}", power_state=state, cpu_seconds=cpu)


def snapshot(*vms: VmRuntime, seq: int = 3) -> Snapshot:
    return Snapshot(epoch=E, seq=seq, facts=FACTS, vms=list(vms))


def test_snapshot_replaces_the_view_and_says_whether_states_changed() -> None:
    report = HostReport()
    assert report.apply(snapshot(rt("a"), rt("b"))) is True
    assert sorted(report.vms) == ["a", "b"] and report.facts == FACTS
    assert report.apply(snapshot(rt("a", cpu=9.0), rt("b"))) is False, "only numbers moved"
    assert report.vms["a"].cpu_seconds == 9.0
    assert report.apply(snapshot(rt("a"))) is True, "b is gone"
    assert list(report.vms) == ["a"]


def test_changes_and_removals() -> None:
    report = HostReport()
    report.apply(snapshot(rt("a")))
    assert report.apply(VmChanged(epoch=E, seq=4, vm=rt("a", PowerState.PAUSED))) is True
    assert report.vms["a"].power_state is PowerState.PAUSED
    assert report.apply(VmChanged(epoch=E, seq=5, vm=rt("a", PowerState.PAUSED, cpu=5.0))) is False
    assert report.apply(VmChanged(epoch=E, seq=6, vm=rt("new"))) is True, "a VM that appeared"
    assert report.apply(VmRemoved(epoch=E, seq=7, name="new")) is True
    assert report.apply(VmRemoved(epoch=E, seq=8, name="never-there")) is False
    assert list(report.vms) == ["a"]


def test_stats_and_facts_move_numbers_only() -> None:
    report = HostReport()
    report.apply(snapshot(rt("a")))
    stats = StatsReport(epoch=E, seq=4, vms=[VmStats(name="a", cpu_seconds=42.0, rss_mib=100.0),
                                            VmStats(name="unknown", cpu_seconds=1.0, rss_mib=1.0)],
                        memory_free_mib=1000, datastore_free_mib={"ds-1": 7})  # fmt: skip
    assert report.apply(stats) is False
    assert (report.vms["a"].cpu_seconds, report.vms["a"].rss_mib) == (42.0, 100.0)
    assert "unknown" not in report.vms
    assert report.facts is not None and report.facts.memory_free_mib == 1000
    assert report.facts.datastores[0].free_mib == 7
    renamed = FACTS.model_copy(update={"networks": {"VM Network": "br1"}})
    assert report.apply(FactsChanged(epoch=E, seq=5, facts=renamed)) is False
    assert report.facts == renamed
    assert report.apply(Keepalive(epoch=E, seq=5, time=0.0)) is False
