"""A suspended VM (no QEMU, its state saved in its folder) is neither missing nor a copy, and the
agent's view of it follows from its files alone."""

from __future__ import annotations

from pathlib import Path

from vmshift.agent.suspend import loaded_path, partial_path, saved_state, supports_direct_io
from vmshift.migration.samples import QemuMigrationStatus
from vmshift.model.enums import PowerState
from vmshift.model.suspend import state_timeout_s
from vmshift.model.vm import VmRuntime
from vmshift.qemu.cmdline import VmPaths
from vmshift.qemu.savevm import StateTransfer, _transfer
from vmshift.server.reconcile import InventoryVm, Snapshot, reconcile

UUID = "6c1f0d2e-0000-4000-8000-000000000002"
SUSPENDED = PowerState.SUSPENDED


def suspended_rt() -> VmRuntime:
    return VmRuntime(name="web", uuid=UUID, power_state=SUSPENDED)


def test_a_suspended_vm_has_no_qemu() -> None:
    assert not suspended_rt().has_qemu


def test_a_suspended_vm_on_its_host_is_no_finding() -> None:
    out = reconcile(Snapshot([InventoryVm("web", UUID, "A", SUSPENDED)], {"A": [suspended_rt()]}), {})
    assert out.findings == [] and out.power_states == {}


def test_a_suspended_vm_its_host_forgot_is_not_missing() -> None:
    out = reconcile(Snapshot([InventoryVm("web", UUID, "A", SUSPENDED)], {"A": []}), {})
    assert out.findings == [] and out.power_states == {}


def test_a_suspended_report_elsewhere_is_not_a_running_copy() -> None:
    out = reconcile(Snapshot([InventoryVm("web", UUID, "A", SUSPENDED)],
                             {"A": [suspended_rt()], "B": [suspended_rt()]}), {})
    assert out.findings == []


def test_a_missing_vm_found_suspended_becomes_suspended() -> None:
    inventory = [InventoryVm("web", UUID, "A", PowerState.MISSING)]
    out = reconcile(Snapshot(inventory, {"A": [suspended_rt()]}), {})
    assert out.power_states == {"web": SUSPENDED}


def test_only_the_final_file_makes_a_vm_suspended(tmp_path: Path) -> None:
    paths = VmPaths(vm_dir=tmp_path, run_dir=tmp_path / "run")
    assert saved_state(paths) is None
    partial_path(paths).write_bytes(b"x")
    loaded_path(paths).write_bytes(b"x")
    assert saved_state(paths) is None, "a partial save or a used state file is never resumed"
    paths.suspend_state.write_bytes(b"x")
    assert saved_state(paths) == tmp_path / "suspended.state"


def test_direct_io_probe_leaves_nothing(tmp_path: Path) -> None:
    assert isinstance(supports_direct_io(tmp_path), bool)
    assert list(tmp_path.iterdir()) == []


def test_transfer_from_query_migrate() -> None:
    t = _transfer({"status": "active", "ram": {"total": 1000, "remaining": 250, "normal-bytes": 600}}, 2.0)
    assert t.status is QemuMigrationStatus.ACTIVE and t.percent == 75 and t.rate_bps == 300
    done = StateTransfer(QemuMigrationStatus.COMPLETED, 1000, 0, 600, 2.0)
    assert done.percent == 100
    timed = _transfer({"status": "completed", "total-time": 500, "ram": {"normal-bytes": 600}}, 2.0)
    assert timed.elapsed_s == 0.5 and timed.rate_bps == 1200, "QEMU's own time of a finished save counts"
    failed = _transfer({"status": "failed", "error-desc": "No space left on device"}, 1.0)
    assert failed.status.finished and failed.error == "No space left on device"


def test_timeout_grows_with_memory() -> None:
    assert state_timeout_s(1 << 30) > state_timeout_s(256 << 20) >= 60
