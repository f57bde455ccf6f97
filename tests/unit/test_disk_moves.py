"""Disk moves: the kind a request asks for, the spec after the move, and the checks before it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit.test_migration_checks import DST, SRC, VM, facts
from vmshift.migration.checks import HostView
from vmshift.migration.disk_checks import run_disk_checks
from vmshift.migration.disk_plan import copy_name, moves_files, relocated_spec, room_needed_mib
from vmshift.migration.kinds import MoveAsked, kind_of
from vmshift.model.enums import BootKind, DiskFormat, MigrationKind, PowerState
from vmshift.model.host import DatastoreInfo
from vmshift.model.migration import CheckId, CheckResult, CheckSeverity
from vmshift.model.vm import BootSpec, DiskSpec, VmSpec

SPEC = VmSpec(
    name="web", uuid="u1", cpus=1, memory_mib=256, cpu_model="Haswell-v4", machine_type="pc-q35-10.0",
    datastore="shared-1", boot=BootSpec(kind=BootKind.KERNEL, image="lab-guest"),
    disks=[DiskSpec(datastore="shared-1", file="disk0.qcow2", size_mib=64, backing_image="base"),
           DiskSpec(datastore="shared-1", file="disk1.qcow2", size_mib=4096)],
)


@pytest.mark.parametrize(("state", "host", "ds", "kind"), [
    (PowerState.POWERED_ON, True, False, MigrationKind.LIVE),
    (PowerState.POWERED_ON, False, True, MigrationKind.STORAGE),
    (PowerState.POWERED_ON, True, True, MigrationKind.RELOCATE),
    (PowerState.POWERED_OFF, True, False, MigrationKind.COLD),
    (PowerState.POWERED_OFF, False, True, MigrationKind.COLD),
    (PowerState.SUSPENDED, True, True, MigrationKind.SUSPENDED),
])
def test_the_kind_follows_the_power_state_and_what_changes(
    state: PowerState, host: bool, ds: bool, kind: MigrationKind
) -> None:
    assert kind_of(MoveAsked(state, host, ds)) is kind


@pytest.mark.parametrize(("state", "host", "ds", "words"), [
    (PowerState.POWERED_ON, False, False, "nothing to move"),
    (PowerState.PAUSED, True, False, "paused"),
    (PowerState.UNKNOWN, True, False, "unknown"),
])
def test_a_request_that_cannot_move_says_why(state: PowerState, host: bool, ds: bool, words: str) -> None:
    result = kind_of(MoveAsked(state, host, ds))
    assert isinstance(result, CheckResult) and result.severity is CheckSeverity.ERROR
    assert words in result.message and result.hint


def test_the_moved_spec_puts_every_file_on_the_target_in_the_asked_format() -> None:
    moved = relocated_spec(SPEC, "local-host-1", DiskFormat.RAW)
    assert moved.datastore == "local-host-1"
    assert [(d.datastore, d.file, d.format, d.backing_image) for d in moved.disks] == [
        ("local-host-1", "disk0.raw", DiskFormat.RAW, None),
        ("local-host-1", "disk1.raw", DiskFormat.RAW, None),
    ]
    kept = relocated_spec(SPEC, "local-host-1")
    assert [d.file for d in kept.disks] == ["disk0.qcow2", "disk1.qcow2"]
    assert SPEC.disks[0].datastore == "shared-1"  # the original is not changed
    assert copy_name(DiskSpec(datastore="x", file="data", size_mib=1), DiskFormat.QCOW2) == "data.qcow2"


def test_room_counts_only_the_disks_that_move_at_full_size() -> None:
    assert moves_files(SPEC, "local-host-1") and not moves_files(SPEC, "shared-1")
    assert not moves_files(SPEC, None)
    assert room_needed_mib(SPEC, "local-host-1", state_mib=300) == 64 + 4096 + 300
    assert room_needed_mib(SPEC, "shared-1") == 0


def test_a_storage_move_on_one_host_passes_its_checks() -> None:
    roomy = HostView(facts("host-1", datastores=[
        DatastoreInfo(uuid="u", name="local-host-1", path="/ds", capacity_mib=100, free_mib=50)]))
    r = run_disk_checks(MigrationKind.STORAGE, VM, roomy, roomy, datastore="local-host-1", need_mib=10)
    assert r.ok, r.errors
    assert [x.check for x in r.results] == [
        CheckId.KIND, CheckId.SOURCE_CONNECTED, CheckId.TARGET_DATASTORE, CheckId.DATASTORE_SPACE,
        CheckId.DISK_FORMAT, CheckId.CONCURRENCY,
    ]


def test_a_datastore_the_target_does_not_see_is_refused() -> None:
    r = run_disk_checks(MigrationKind.COLD, VM, SRC, DST, datastore="local-host-1", need_mib=10)
    bad = r.result(CheckId.TARGET_DATASTORE)
    assert bad is not None and bad.severity is CheckSeverity.ERROR and "local-host-2" in (bad.hint or "")


def test_a_disk_too_large_for_the_target_is_refused_before_any_copy() -> None:
    small = HostView(facts("host-2", datastores=[
        DatastoreInfo(uuid="u", name="local-host-2", path="/ds", capacity_mib=100, free_mib=50)]))
    r = run_disk_checks(MigrationKind.COLD, VM, SRC, small, datastore="local-host-2", need_mib=4160)
    bad = r.result(CheckId.DATASTORE_SPACE)
    assert bad is not None and bad.severity is CheckSeverity.ERROR
    assert "50 MiB free" in bad.message and "4160 MiB" in bad.message


def test_a_move_to_another_host_checks_what_the_vm_needs_there() -> None:
    no_net = HostView(facts("host-2", networks={}))
    r = run_disk_checks(MigrationKind.COLD, replace(VM, power_state=PowerState.POWERED_OFF), SRC, no_net,
                        datastore="shared-1", need_mib=0)
    assert r.result(CheckId.NETWORKS) is not None and not r.ok


def test_relocate_is_a_kind_that_passes_its_kind_check() -> None:
    """Shared-nothing migration is built (tests/unit/test_relocate_checks.py has its live checks)."""
    r = run_disk_checks(MigrationKind.RELOCATE, VM, SRC, DST, datastore="local-host-2", need_mib=0)
    kind = r.result(CheckId.KIND)
    assert kind is not None and kind.severity is CheckSeverity.OK
