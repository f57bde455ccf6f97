"""The load history's pure parts: CPU load from CPU time (model/load.py) and the window of samples
read back per VM (server/load_history.py ``histories``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from vmshift.model.host_stream import StatsReport, VmStats
from vmshift.model.load import CpuMeter, cores_busy
from vmshift.placement.snapshot import LoadSample
from vmshift.server.load_history import LoadHistorySettings, histories, host_sample

NOW = datetime(2026, 12, 2, 5, 0, tzinfo=UTC)


def test_cores_busy_from_cpu_time() -> None:
    assert cores_busy(10.0, 100.0, 40.0, 120.0) == 1.5
    assert cores_busy(10.0, 100.0, 5.0, 120.0) == 0.0  # a restarted process: no load yet
    assert cores_busy(10.0, 100.0, 12.0, 100.0) == 0.0  # no time passed


def test_meter_starts_again_for_a_new_process() -> None:
    meter = CpuMeter()
    assert meter.read("a", 1, 10.0, 0.0) == 0.0  # a first look
    assert meter.read("a", 1, 30.0, 20.0) == 1.0
    assert meter.read("a", 2, 1.0, 40.0) == 0.0  # a new QEMU of the VM
    assert meter.read("a", 2, 3.0, 42.0) == 1.0
    meter.forget_all_but(set())
    assert meter.read("a", 2, 5.0, 44.0) == 0.0


def test_sample_takes_capacity_from_facts_for_older_agents() -> None:
    report = StatsReport(epoch="e", seq=1, vms=[VmStats(name="v", cpu_seconds=9, rss_mib=100, cpu_cores=0.5)],
                         memory_free_mib=10)
    sample = host_sample(report, facts_cpus=4, facts_memory_mib=8192)
    assert (sample.cpus, sample.memory_total_mib, sample.vms) == (4, 8192, {"v": [0.5, 100.0]})
    sample = host_sample(report.model_copy(update={"cpus": 2, "memory_total_mib": 1024}), 4, 8192)
    assert (sample.cpus, sample.memory_total_mib) == (2, 1024)


def test_histories_one_sample_per_step_aligned() -> None:
    settings = LoadHistorySettings(step_s=20, window_s=60)  # steps ending at -40, -20, 0
    rows = [
        (NOW - timedelta(seconds=70), {"old": [9.0, 9.0]}),  # before the window: not read
        (NOW - timedelta(seconds=50), {"a": [1.0, 100.0]}),
        (NOW - timedelta(seconds=45), {"a": [2.0, 100.0]}),  # the latest of its step wins
        (NOW - timedelta(seconds=5), {"a": [3.0, 110.0], "b": [0.5, 50.0]}),  # a step without a: repeated
    ]
    got = histories(rows, NOW, settings)
    assert got["a"] == (LoadSample(2.0, 100.0), LoadSample(2.0, 100.0), LoadSample(3.0, 110.0))
    assert got["b"] == (LoadSample(0.5, 50.0),)  # appeared last step: the state pads the old end
    assert "old" not in got


def test_a_vm_that_moved_is_read_from_both_hosts() -> None:
    settings = LoadHistorySettings(step_s=20, window_s=40)
    rows = [(NOW - timedelta(seconds=30), {"a": [1.0, 10.0]}),  # on host 1
            (NOW - timedelta(seconds=10), {"a": [1.5, 10.0]})]  # on host 2
    assert histories(rows, NOW, settings)["a"] == (LoadSample(1.0, 10.0), LoadSample(1.5, 10.0))
