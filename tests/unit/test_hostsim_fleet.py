"""The simulated hosts' state (vmshift.hostsim.fleet): changes numbered like an agent's, plausible numbers."""

from __future__ import annotations

import random

import pytest

from vmshift.hostsim import fleet as fleet_mod
from vmshift.hostsim.fleet import Fleet, SimHost, vm_name, vm_uuid
from vmshift.model.enums import PowerState
from vmshift.model.host_stream import (
    StatsReport,
    StreamCursor,
    Verdict,
    VmChanged,
    VmRemoved,
    contiguous,
    decode,
)


def test_changes_are_numbered_once_in_order_and_resume_from_the_log() -> None:
    host = SimHost("sim-001", 2, random.Random(1))
    cursor = StreamCursor()
    assert cursor.accept(host.snapshot(0.0)) is Verdict.APPLY
    host.set_vm_count(4, 1.0)
    host.toggle_random_vm(2.0)
    host.set_vm_count(3, 3.0)
    host.report_stats(4.0)
    changes = host.log.since(cursor.epoch, cursor.seq)
    assert changes is not None
    assert [type(c) for c in changes] == [VmChanged, VmChanged, VmChanged, VmRemoved, StatsReport]
    assert contiguous([c.seq for c in changes]) and changes[0].seq == 1
    assert [cursor.accept(c) for c in changes] == [Verdict.APPLY] * 5
    removed = changes[3]
    assert isinstance(removed, VmRemoved) and removed.name == vm_name("sim-001", 3)
    assert sorted(host.vms) == [vm_name("sim-001", i) for i in range(3)]


def test_vm_numbers_grow_only_while_running() -> None:
    host = SimHost("sim-001", 1, random.Random(2))
    vm = next(iter(host.vms.values()))
    start = vm.cpu_seconds(vm.since)
    assert vm.cpu_seconds(vm.since + 10) > start
    vm.set_state(PowerState.PAUSED, vm.since + 10)
    paused_at = vm.cpu_seconds(vm.since)
    assert vm.cpu_seconds(vm.since + 100) == paused_at
    rt = vm.runtime(vm.since + 100)
    assert rt.uuid == vm_uuid(vm.name) and rt.qemu_status == "paused"
    assert 0 < rt.rss_mib < vm.memory_mib


def test_a_listener_too_far_behind_is_cut_and_changes_land_on_enrolled_hosts_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fleet_mod, "LISTENER_BACKLOG", 3)
    host, other = SimHost("sim-001", 5, random.Random(3)), SimHost("sim-002", 5, random.Random(4))
    listener = host.listen()
    fleet = Fleet([host, other], changes_per_s=10, stats_interval_s=10, rng=random.Random(5))
    assert fleet.change_some(10, 1.0) == 0  # nobody enrolled these hosts yet
    host.enrolled = True
    assert fleet.change_some(10, 1.0) == 10
    assert other.log.last_seq == 0 and host.log.last_seq == 10
    queued = [listener.queue.get_nowait() for _ in range(listener.queue.qsize())]
    assert queued[-1] is None and listener.cut  # the stream ends; the server resumes from its cursor
    first = queued[0]
    assert first is not None and decode(first[1]).seq == first[0] == 1


def test_powered_off_vms_stay_off_and_report_no_process() -> None:
    host = SimHost("sim-001", 4, random.Random(6))
    host.power_off_from(2, 1.0)
    off = [host.vms[vm_name("sim-001", i)] for i in (2, 3)]
    assert all(vm.power_state is PowerState.POWERED_OFF for vm in off)
    assert all(vm.runtime(5.0).pid is None and vm.runtime(5.0).rss_mib == 0 for vm in off)
    host.enrolled = True
    fleet = Fleet([host], changes_per_s=10, stats_interval_s=10, rng=random.Random(7))
    fleet.change_some(50, 2.0)
    # changes pause or resume running VMs only
    assert all(vm.power_state is PowerState.POWERED_OFF for vm in off)
