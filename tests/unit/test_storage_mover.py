"""Storage vMotion's mover and the move registry against a real QEMU (no guest, no lab, no network).

Each test boots a diskless-firmware QEMU (SeaBIOS finds nothing to boot and idles) with two qcow2
disks holding a known pattern, moves them between two directory datastores and reads the pattern
back from the files QEMU uses afterwards. Agent restarts are a new registry over the same state
directory while QEMU runs on. Skipped where qemu-system-x86_64 is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmshift.agent.config import AgentConfig
from vmshift.agent.datastores import MARKER_FILE, Datastores
from vmshift.agent.moves import storage
from vmshift.agent.moves.jobs import MoveContext, MoveJobs
from vmshift.agent.moves.store import MoveStore
from vmshift.agent.supervisor import Supervisor
from vmshift.agent.vmfiles import VmFiles
from vmshift.migration.disk_plan import relocated_spec
from vmshift.model.enums import Accelerator, BootKind, MigrationKind, PowerAction
from vmshift.model.migration import MigrationPhase
from vmshift.model.moves import DiskMoveRequest, MoveProgress, MoveState
from vmshift.model.vm import BootSpec, DiskSpec, VmSpec
from vmshift.qemu import block_qmp as bq
from vmshift.qemu.cmdline import disk_device_id

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")
MIB = 1 << 20
VM = "sv-1"
PATTERN_MIB = 8


@dataclass
class Host:
    root: Path
    supervisor: Supervisor
    moves: MoveJobs
    ctx: MoveContext

    def ds(self, name: str) -> Path:
        return self.root / name


def make_datastore(path: Path, name: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER_FILE).write_text(json.dumps({"uuid": str(uuid.uuid4()), "name": name}))


async def open_host(root: Path, *, speed_bps: int = 0, extra: list[Path] | None = None) -> Host:
    """An agent's worth of objects over ``root`` (a restart is another call on the same root)."""
    config = AgentConfig(name="h", listen="127.0.0.1:0", state_dir=root / "state", ca_file=root / "ca.pem",
                         qemu_user="",
                         datastores=[root / "a", root / "b", *(extra or [])])
    datastores = Datastores(config.datastores)
    files = VmFiles(datastores, config.state_dir)
    supervisor = Supervisor(config, files, Accelerator.TCG)
    await supervisor.attach_all()
    ctx = MoveContext(supervisor, files, datastores, sample_interval_s=0.1, mirror_speed_bps=speed_bps)
    moves = MoveJobs(ctx, MoveStore(config.state_dir))
    await moves.resume_all()
    return Host(root, supervisor, moves, ctx)


async def close_host(host: Host) -> None:
    await host.moves.close()
    await host.supervisor.close()


def spec_on(ds: str) -> VmSpec:
    return VmSpec(name=VM, uuid="5f0c2a1e-0000-4000-8000-00000000a001", cpus=1, memory_mib=32,
                  cpu_model="qemu64", machine_type="pc", datastore=ds,
                  disks=[DiskSpec(datastore=ds, file=f"disk{i}.qcow2", size_mib=64) for i in range(2)],
                  boot=BootSpec(kind=BootKind.DISK))


def write_pattern(path: Path, index: int) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {0x40 + index} 0 {PATTERN_MIB}M", str(path)],
                   check=True, capture_output=True)


def pattern_intact(path: Path, index: int) -> bool:
    read = f"read -P {0x40 + index} 0 {PATTERN_MIB}M"
    out = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", read, str(path)],
                         capture_output=True, text=True)
    return out.returncode == 0 and "Pattern verification failed" not in out.stdout


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    make_datastore(tmp_path / "a", "a")
    make_datastore(tmp_path / "b", "b")
    h = await open_host(tmp_path)
    await h.supervisor.define(spec_on("a"))
    for i in range(2):
        write_pattern(tmp_path / "a" / VM / f"disk{i}.qcow2", i)
    await h.supervisor.power(VM, PowerAction.START)
    yield h
    await close_host(h)
    running = tmp_path / "state" / "vms" / VM / "running.json"
    if running.exists():  # the tests' last host may have closed: stop this test's QEMU by its pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(json.loads(running.read_text())["pid"]), signal.SIGKILL)


def request(move_id: int, target: str, source: str = "a", speed_bps: float | None = None) -> DiskMoveRequest:
    return DiskMoveRequest(move_id=move_id, nonce=f"n{move_id}", vm=VM, kind=MigrationKind.STORAGE,
                           target_spec=relocated_spec(spec_on(source), target), speed_bps=speed_bps)


async def wait_phase(host: Host, move_id: int, *phases: MigrationPhase,
                     timeout_s: float = 30) -> MoveProgress:
    async with asyncio.timeout(timeout_s):
        while (p := host.moves.get(move_id)).phase not in phases and not p.state.finished:
            await asyncio.sleep(0.05)
    return p


async def files_in_use(host: Host) -> list[str]:
    qmp = host.supervisor.qmp_session(VM)
    return [(await bq.device_of(qmp, disk_device_id(i))).filename for i in range(2)]


async def test_move_there_and_back_keeps_data_and_leaves_no_old_files(host: Host) -> None:
    a, b = host.ds("a") / VM, host.ds("b") / VM
    p = await host.moves.start(request(1, "b"))
    assert p.state is MoveState.RUNNING
    p = await host.moves.wait(1, 60)
    assert p.state is MoveState.COMPLETED, p.error
    assert p.phase is MigrationPhase.COMPLETED and p.pivot_ms is not None
    assert p.done_bytes == p.total_bytes > 0 and all(d.ready for d in p.disks)
    assert await files_in_use(host) == [str(b / "disk0.qcow2"), str(b / "disk1.qcow2")]
    assert not a.exists(), "the old folder is removed"
    assert host.ctx.files.load_spec(VM).datastore == "b"
    assert (b / "serial.log").exists()
    assert all(pattern_intact(b / f"disk{i}.qcow2", i) for i in range(2))
    assert host.supervisor.is_alive(VM)

    p = await host.moves.start(request(2, "a", "b"))
    p = await host.moves.wait(2, 60)
    assert p.state is MoveState.COMPLETED, p.error
    assert await files_in_use(host) == [str(a / "disk0.qcow2"), str(a / "disk1.qcow2")]
    assert not b.exists()
    assert all(pattern_intact(a / f"disk{i}.qcow2", i) for i in range(2))
    # the same request again answers the record; the definition survives a restart of the VM
    assert (await host.moves.start(request(2, "a", "b"))).state is MoveState.COMPLETED
    await host.supervisor.power(VM, PowerAction.STOP)
    await host.supervisor.power(VM, PowerAction.START)
    assert await files_in_use(host) == [str(a / "disk0.qcow2"), str(a / "disk1.qcow2")]


async def test_cancel_mid_copy_leaves_the_vm_on_its_files(tmp_path: Path, host: Host) -> None:
    await close_host(host)
    slow = await open_host(tmp_path)
    try:
        await slow.moves.start(request(3, "b", speed_bps=2 * MIB))  # the request's cap
        p = await wait_phase(slow, 3, MigrationPhase.COPY)
        assert p.phase is MigrationPhase.COPY
        p = await slow.moves.cancel(3)
        assert p.state is MoveState.CANCELLED and p.phase is MigrationPhase.CANCELLED
        assert not (tmp_path / "b" / VM).exists()
        assert await files_in_use(slow) == [str(tmp_path / "a" / VM / f"disk{i}.qcow2") for i in range(2)]
        assert await bq.query_block_jobs(slow.supervisor.qmp_session(VM)) == {}
        names = {n.node_name for n in await bq.query_nodes(slow.supervisor.qmp_session(VM))}
        assert not any(n.startswith("mv3-") for n in names), names
    finally:
        await close_host(slow)


async def test_agent_restart_mid_copy_rolls_back(tmp_path: Path, host: Host) -> None:
    await close_host(host)
    slow = await open_host(tmp_path, speed_bps=2 * MIB)
    await slow.moves.start(request(4, "b"))
    await wait_phase(slow, 4, MigrationPhase.COPY)
    await close_host(slow)  # the agent stops; QEMU keeps mirroring
    again = await open_host(tmp_path)
    try:
        p = await again.moves.wait(4, 60)
        assert p.state is MoveState.FAILED and p.error is not None and "restarted" in p.error.message
        assert not (tmp_path / "b" / VM).exists()
        assert await files_in_use(again) == [str(tmp_path / "a" / VM / f"disk{i}.qcow2") for i in range(2)]
        assert again.ctx.files.load_spec(VM).datastore == "a"
    finally:
        await close_host(again)


async def test_agent_restart_after_the_point_of_no_return_finishes(
        tmp_path: Path, host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    async def die_after_one_complete(self: storage.StorageMover, qmp: object,
                                     detail: storage.StorageDetail) -> None:
        self.job.set_phase(MigrationPhase.PIVOT)
        self.job.commit()
        await bq.job_complete(self.ctx.supervisor.qmp_session(VM), detail.disks[0].job_id)
        raise asyncio.CancelledError  # the agent died here

    monkeypatch.setattr(storage.StorageMover, "_pivot", die_after_one_complete)
    await host.moves.start(request(5, "b"))
    await wait_phase(host, 5, MigrationPhase.PIVOT)
    await asyncio.sleep(0.2)
    await close_host(host)
    monkeypatch.undo()
    again = await open_host(tmp_path)
    try:
        p = await again.moves.wait(5, 60)
        assert p.state is MoveState.COMPLETED, p.error
        assert await files_in_use(again) == [str(tmp_path / "b" / VM / f"disk{i}.qcow2") for i in range(2)]
        assert again.ctx.files.load_spec(VM).datastore == "b"
        assert not (tmp_path / "a" / VM).exists()
    finally:
        await close_host(again)


async def test_a_full_target_fails_the_move_and_rolls_back(tmp_path: Path, host: Host) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tiny)], check=True)
    try:
        make_datastore(tiny, "tiny")
        await close_host(host)
        h = await open_host(tmp_path, extra=[tiny])
        try:
            await h.moves.start(request(6, "tiny"))
            p = await h.moves.wait(6, 60)
            assert p.state is MoveState.FAILED and p.error is not None
            assert "space" in p.error.message.lower(), p.error
            assert not (tiny / VM).exists()
            assert await files_in_use(h) == [str(tmp_path / "a" / VM / f"disk{i}.qcow2") for i in range(2)]
            assert all(pattern_intact(tmp_path / "a" / VM / f"disk{i}.qcow2", i) for i in range(2))
        finally:
            await close_host(h)
    finally:
        subprocess.run(["umount", str(tiny)], check=False)
