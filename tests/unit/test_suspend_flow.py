"""The agent's suspend and resume flows (agent/suspend.py) against a fake QEMU: what is left on disk
and whether the vCPUs run after every way a save, a load or an agent restart can end."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import pytest

from vmshift.agent.suspend import (
    MARK_FILE,
    SuspendSettings,
    loaded_path,
    partial_path,
    recover,
    refuse_hardware_change,
    restore_state,
    save_state,
    saved_and_stopped,
)
from vmshift.errors import ConflictError, QemuError
from vmshift.model.enums import BootKind
from vmshift.model.suspend import SuspendPhase, SuspendProgress
from vmshift.model.vm import BootSpec, VmSpec
from vmshift.qemu.cmdline import VmPaths
from vmshift.qemu.qmp import QmpSession, QmpStatus
from vmshift.qemu.savevm import StateFileSettings

SPEC = VmSpec(name="web", uuid="6c1f0d2e-0000-4000-8000-000000000003", cpus=1, memory_mib=64,
              cpu_model="qemu64", machine_type="pc-q35-10.0", datastore="ds",
              boot=BootSpec(kind=BootKind.KERNEL, image="img"))  # fmt: skip
SETTINGS = SuspendSettings(StateFileSettings(poll_interval_s=0.0))


class FakeQemu:
    """The QMP commands the flows send, answered like QEMU 10.0.2 does; ``outcome`` is how the
    save or load ends (``completed``, ``failed``, or ``refused``: the QMP command itself errors)."""

    def __init__(self, status: str = "running", outcome: str = "completed") -> None:
        self.status = status
        self.outcome = outcome
        self.migration = "none"
        self.commands: list[str] = []
        self.caps: dict[str, bool] = {"postcopy-ram": True, "events": True, "multifd": False}
        self.params: dict[str, Any] = {}
        self.cont_fails = False

    async def query_status(self) -> QmpStatus:
        return QmpStatus(status=self.status, running=self.status == "running")

    async def stop(self) -> None:
        self.commands.append("stop")
        self.status = "paused"

    async def cont(self) -> None:
        self.commands.append("cont")
        if self.cont_fails:
            raise QemuError("cont failed.")
        self.status = "running"

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        self.commands.append(cmd)
        args = args or {}
        if cmd == "query-migrate-capabilities":
            return {"return": [{"capability": k, "state": v} for k, v in self.caps.items()]}
        if cmd == "migrate-set-capabilities":
            self.caps |= {c["capability"]: c["state"] for c in args["capabilities"]}
        elif cmd == "migrate-set-parameters":
            self.params |= args
        elif cmd in ("migrate", "migrate-incoming"):
            if self.outcome == "refused":
                raise QemuError(f"QEMU refused the QMP command {cmd!r}: Permission denied")
            if cmd == "migrate":
                Path(args["uri"].removeprefix("file:")).write_bytes(b"RAM")  # a partial file exists now
            self.migration = self.outcome
            if self.outcome == "completed":
                self.status = "postmigrate" if cmd == "migrate" else "paused"
        elif cmd == "query-migrate":
            answer: dict[str, Any] = {"status": self.migration,
                                      "ram": {"total": 3, "remaining": 0, "normal-bytes": 3}}
            if self.migration == "failed":
                answer["error-desc"] = "No space left on device"
            return answer
        elif cmd == "migrate_cancel":
            self.migration = "cancelled"
        return {}

    @property
    def qmp(self) -> QmpSession:
        return cast(QmpSession, self)


@pytest.fixture
def paths(tmp_path: Path) -> VmPaths:
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "vm").mkdir()
    return VmPaths(vm_dir=tmp_path / "vm", run_dir=run)


def files(paths: VmPaths) -> list[str]:
    return sorted(p.name for p in paths.vm_dir.iterdir())


def test_a_save_publishes_the_file_and_leaves_qemu_to_exit(paths: VmPaths) -> None:
    qemu, seen = FakeQemu(), list[SuspendProgress]()
    outcome = asyncio.run(save_state(qemu.qmp, paths, SPEC, SETTINGS, seen.append))
    assert files(paths) == ["suspended.state"] and qemu.status == "postmigrate"
    assert "cont" not in qemu.commands and qemu.commands.index("stop") < qemu.commands.index("migrate")
    assert qemu.caps == {"postcopy-ram": False, "events": True, "multifd": True, "mapped-ram": True}
    assert qemu.params["max-bandwidth"] >= 1 << 40 and qemu.params["multifd-channels"] == 2
    assert (paths.run_dir / MARK_FILE).exists(), "the mark stays until QEMU has exited"
    saved_and_stopped(paths, SPEC, seen.append, outcome)
    assert not (paths.run_dir / MARK_FILE).exists()
    assert seen[0].phase is SuspendPhase.STOPPING and seen[-1].phase is SuspendPhase.DONE


@pytest.mark.parametrize("outcome", ["failed", "refused"])
def test_a_failed_save_runs_the_vm_again_and_leaves_no_file(paths: VmPaths, outcome: str) -> None:
    qemu, seen = FakeQemu(outcome=outcome), list[SuspendProgress]()
    with pytest.raises(QemuError, match="runs on as before"):
        asyncio.run(save_state(qemu.qmp, paths, SPEC, SETTINGS, seen.append))
    assert files(paths) == [] and qemu.status == "running" and qemu.commands[-1] == "cont"
    assert not (paths.run_dir / MARK_FILE).exists() and seen[-1].phase is SuspendPhase.FAILED
    # a later live migration over TCP finds the capabilities as they were (no mapped-ram)
    assert qemu.caps == {"postcopy-ram": True, "events": True, "multifd": False, "mapped-ram": False}


def test_a_failed_save_of_a_paused_vm_leaves_it_paused(paths: VmPaths) -> None:
    qemu = FakeQemu(status="paused", outcome="failed")
    with pytest.raises(QemuError):
        asyncio.run(save_state(qemu.qmp, paths, SPEC, SETTINGS, lambda _p: None))
    assert "cont" not in qemu.commands and files(paths) == []


def test_a_vm_in_a_live_migration_is_not_suspended(paths: VmPaths) -> None:
    qemu = FakeQemu(status="inmigrate")
    with pytest.raises(Exception, match="live migration"):
        asyncio.run(save_state(qemu.qmp, paths, SPEC, SETTINGS, lambda _p: None))
    assert qemu.commands == [] and files(paths) == []


def test_a_resume_runs_the_guest_then_removes_the_file(paths: VmPaths) -> None:
    paths.suspend_state.write_bytes(b"RAM")
    qemu = FakeQemu(status="inmigrate")
    asyncio.run(restore_state(qemu.qmp, paths, SPEC, SETTINGS))
    assert qemu.status == "running" and files(paths) == []
    assert qemu.commands.index("migrate-incoming") < qemu.commands.index("cont")
    assert not qemu.caps["mapped-ram"] and not qemu.caps["multifd"], "a resumed VM must live-migrate"


def test_a_failed_load_keeps_the_file_and_never_runs_the_guest(paths: VmPaths) -> None:
    paths.suspend_state.write_bytes(b"RAM")
    qemu = FakeQemu(status="inmigrate", outcome="failed")
    with pytest.raises(QemuError, match="stays suspended"):
        asyncio.run(restore_state(qemu.qmp, paths, SPEC, SETTINGS))
    assert "cont" not in qemu.commands and files(paths) == ["suspended.state"]


def test_a_failed_cont_puts_the_file_back(paths: VmPaths) -> None:
    paths.suspend_state.write_bytes(b"RAM")
    qemu = FakeQemu(status="inmigrate")
    qemu.cont_fails = True
    with pytest.raises(QemuError):
        asyncio.run(restore_state(qemu.qmp, paths, SPEC, SETTINGS))
    assert files(paths) == ["suspended.state"] and not loaded_path(paths).exists()


def test_restart_after_a_complete_save_finishes_the_suspend(paths: VmPaths) -> None:
    (paths.run_dir / MARK_FILE).write_text(json.dumps({"was_running": True}))
    paths.suspend_state.write_bytes(b"RAM")
    assert asyncio.run(recover(FakeQemu(status="postmigrate").qmp, paths, SPEC)) is True


def test_restart_in_the_middle_of_a_save_undoes_it(paths: VmPaths) -> None:
    (paths.run_dir / MARK_FILE).write_text(json.dumps({"was_running": True}))
    partial_path(paths).write_bytes(b"RA")
    qemu = FakeQemu(status="paused")
    qemu.migration = "active"
    assert asyncio.run(recover(qemu.qmp, paths, SPEC)) is False
    assert "migrate_cancel" in qemu.commands and qemu.status == "running" and files(paths) == []
    assert not (paths.run_dir / MARK_FILE).exists()


def test_restart_in_the_middle_of_a_load_stops_qemu_and_keeps_the_file(paths: VmPaths) -> None:
    paths.suspend_state.write_bytes(b"RAM")
    assert asyncio.run(recover(FakeQemu(status="inmigrate").qmp, paths, SPEC)) is True
    assert files(paths) == ["suspended.state"]


def test_restart_with_nothing_in_progress_changes_nothing(paths: VmPaths) -> None:
    qemu = FakeQemu()
    assert asyncio.run(recover(qemu.qmp, paths, SPEC)) is False and qemu.commands == []


def test_a_suspended_vm_keeps_its_hardware() -> None:
    refuse_hardware_change(SPEC, SPEC.model_copy(update={"datastore": "other"}))  # files may move
    with pytest.raises(ConflictError, match="memory_mib cannot change"):
        refuse_hardware_change(SPEC, SPEC.model_copy(update={"memory_mib": 128}))
