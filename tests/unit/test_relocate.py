"""Relocate (shared-nothing): its checks, its progress, and the target's bookkeeping of created files."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests.unit.test_migration_checks import SRC, VM, facts, report
from vmshift.agent.datastores import MARKER_FILE, Datastores
from vmshift.agent.relocate_target import paths_to_create, remove_created
from vmshift.agent.vmfiles import VmFiles
from vmshift.errors import ConflictError
from vmshift.migration.checks import DiskView, HostView
from vmshift.migration.progress import percent_of, phase_label
from vmshift.migration.relocate_checks import relocate_report
from vmshift.model.agent_migration import MigrationProgress
from vmshift.model.enums import BootKind, MigrationKind
from vmshift.model.host import DatastoreInfo
from vmshift.model.migration import CheckId, CheckSeverity, MigrationPhase, MigrationStatus
from vmshift.model.vm import BootSpec, DiskSpec, VmSpec


def _host2(free_mib: int = 10_000) -> HostView:
    """host-2 sees only its local datastore (not shared-1, where the VM's disk is)."""
    return HostView(facts("host-2", datastores=[
        DatastoreInfo(uuid="u-l2", name="local-host-2", path="/ds/l2", free_mib=free_mib)]))


def test_a_relocate_swaps_the_shared_storage_check_for_the_disk_checks() -> None:
    dst = _host2()
    live = report(VM, SRC, dst)
    assert live.result(CheckId.DATASTORES) is not None and not live.ok  # plain live: refused
    r = relocate_report(live, VM, dst, datastore="local-host-2", need_mib=64)
    assert r.ok, r.errors
    assert r.result(CheckId.DATASTORES) is None
    for check in (CheckId.KIND, CheckId.TARGET_DATASTORE, CheckId.DATASTORE_SPACE, CheckId.DISK_FORMAT):
        found = r.result(check)
        assert found is not None and found.severity is CheckSeverity.OK, check
    assert MigrationKind.RELOCATE.value in (r.result(CheckId.KIND) or r.results[0]).message


def test_a_relocate_is_refused_without_room_or_an_unseen_datastore() -> None:
    small = _host2(free_mib=10)
    r = relocate_report(report(VM, SRC, small), VM, small, datastore="local-host-2", need_mib=64)
    space = r.result(CheckId.DATASTORE_SPACE)
    assert space is not None and space.severity is CheckSeverity.ERROR and "10 MiB free" in space.message
    r = relocate_report(report(VM, SRC, small), VM, small, datastore="local-host-9", need_mib=64)
    seen = r.result(CheckId.TARGET_DATASTORE)
    assert seen is not None and seen.severity is CheckSeverity.ERROR and "local-host-2" in (seen.hint or "")


def test_the_other_live_checks_still_count() -> None:
    dst = HostView(facts("host-2", networks={}, datastores=[
        DatastoreInfo(uuid="u-l2", name="local-host-2", path="/ds/l2", free_mib=1000)]))
    vm = replace(VM, disks=(DiskView("disk0", "shared-1"),))
    r = relocate_report(report(vm, SRC, dst), vm, dst, datastore="local-host-2", need_mib=64)
    nets = r.result(CheckId.NETWORKS)
    assert nets is not None and nets.severity is CheckSeverity.ERROR


def _progress(**kw: object) -> MigrationProgress:
    base: dict[str, object] = {"migration_id": 1, "vm": "web", "status": MigrationStatus.RUNNING}
    return MigrationProgress.model_validate(base | kw)


def test_the_copy_shows_bytes_rate_and_eta_then_precopy_continues_the_bar() -> None:
    copy = _progress(phase=MigrationPhase.COPY, total_bytes=100 << 20, transferred_bytes=25 << 20,
                     remaining_bytes=75 << 20, throughput_bps=50 << 20, eta_s=1.5, write_blocking=True,
                     mirror_bytes=25 << 20)
    assert phase_label(copy) == "copy 25% 50 MiB/s ETA 2 s write-blocking"
    assert percent_of(copy) == 20
    pre = _progress(phase=MigrationPhase.PRECOPY, transferred_bytes=50, remaining_bytes=50,
                    mirror_bytes=100 << 20)
    assert percent_of(pre) == 72  # 50 + half of 45
    plain = _progress(phase=MigrationPhase.PRECOPY, transferred_bytes=50, remaining_bytes=50)
    assert percent_of(plain) == 52  # a live migration's bar is unchanged


def _files(tmp_path: Path) -> tuple[VmFiles, VmSpec]:
    ds = tmp_path / "local-host-2"
    ds.mkdir()
    (ds / MARKER_FILE).write_text('{"uuid": "u-l2", "name": "local-host-2"}')
    datastores = Datastores([ds])
    spec = VmSpec(name="web", uuid="u1", cpus=1, memory_mib=128, cpu_model="qemu64",
                  machine_type="pc-q35-10.0", datastore="local-host-2", boot=BootSpec(kind=BootKind.DISK),
                  disks=[DiskSpec(datastore="local-host-2", file="disk0.qcow2", size_mib=64)])
    return VmFiles(datastores, tmp_path / "state"), spec


def test_the_target_creates_only_fresh_paths_and_removes_exactly_those(tmp_path: Path) -> None:
    files, spec = _files(tmp_path)
    created = paths_to_create(files, spec)
    vm_dir = tmp_path / "local-host-2" / "web"
    assert created == [str(vm_dir), str(vm_dir / "disk0.qcow2")]
    vm_dir.mkdir()
    with pytest.raises(ConflictError, match="exists already"):
        paths_to_create(files, spec)  # a leftover or the source's own folder: never taken over
    (vm_dir / "disk0.qcow2").write_bytes(b"x")
    (vm_dir / "vm.json").write_text("{}")
    other = tmp_path / "local-host-2" / "other"
    other.mkdir()
    remove_created(created)
    assert not vm_dir.exists() and other.exists()
    remove_created(created)  # idempotent
