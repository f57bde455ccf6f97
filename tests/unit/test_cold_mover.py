"""The cold mover and the move registry with a real qemu-img (no QEMU guest, no lab, no network).

A VM is defined on directory datastore ``a`` with a sparse disk holding a known pattern and moved,
on the same host, to datastore ``b``; the pattern is read back from the files the VM's definition
names afterwards. Agent restarts are a new registry over the same state directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmshift.agent.config import AgentConfig
from vmshift.agent.datastores import MARKER_FILE, Datastores
from vmshift.agent.moves.jobs import MoveContext, MoveJobs
from vmshift.agent.moves.store import MoveStore
from vmshift.agent.supervisor import Supervisor
from vmshift.agent.vmfiles import VmFiles
from vmshift.errors import ConflictError
from vmshift.migration.disk_plan import relocated_spec
from vmshift.model.enums import Accelerator, BootKind, DiskFormat, MigrationKind, PowerAction
from vmshift.model.migration import MigrationPhase
from vmshift.model.moves import DiskMoveRequest, MoveProgress, MoveState
from vmshift.model.vm import BootSpec, DiskSpec, VmSpec

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
MIB = 1 << 20
VM = "cm-1"
DATA = (512 * MIB, 96 * MIB)  # offset, length of the pattern in disk 0 (a 2 GiB disk)


@dataclass
class Host:
    root: Path
    supervisor: Supervisor
    moves: MoveJobs
    files: VmFiles


def _datastore(path: Path, name: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER_FILE).write_text(json.dumps({"uuid": str(uuid.uuid4()), "name": name}))


async def _open(root: Path) -> Host:
    config = AgentConfig(name="h", listen="127.0.0.1:0", state_dir=root / "state", ca_file=root / "ca.pem",
                         qemu_user="", datastores=[root / "a", root / "b"])
    files = VmFiles(Datastores(config.datastores), config.state_dir)
    supervisor = Supervisor(config, files, Accelerator.TCG)
    await supervisor.attach_all()
    moves = MoveJobs(MoveContext(supervisor, files, files.datastores, sample_interval_s=0.05),
                     MoveStore(config.state_dir))
    await moves.resume_all()
    return Host(root, supervisor, moves, files)


def _qemu_io(path: Path, fmt: DiskFormat, command: str) -> str:
    out = subprocess.run(["qemu-io", "-f", fmt.value, "-c", command, str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert "failed" not in out, out
    return out


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    _datastore(tmp_path / "a", "a")
    _datastore(tmp_path / "b", "b")
    h = await _open(tmp_path)
    spec = VmSpec(name=VM, uuid=str(uuid.uuid4()), cpus=1, memory_mib=64, cpu_model="qemu64",
                  machine_type="q35",
                  datastore="a", disks=[DiskSpec(datastore="a", file="disk0.qcow2", size_mib=2048),
                                        DiskSpec(datastore="a", file="disk1.qcow2", size_mib=16)],
                  boot=BootSpec(kind=BootKind.DISK))
    await h.supervisor.define(spec)
    offset, length = DATA
    _qemu_io(tmp_path / "a" / VM / "disk0.qcow2", DiskFormat.QCOW2, f"write -P 0x6b {offset} {length}")
    (tmp_path / "a" / VM / "serial.log").write_text("booted\n")
    yield h
    await h.moves.close()
    await h.supervisor.close()


def _request(h: Host, mid: int, datastore: str, kind: MigrationKind = MigrationKind.COLD,
             fmt: DiskFormat | None = None) -> DiskMoveRequest:
    return DiskMoveRequest(move_id=mid, nonce=f"n{mid}", vm=VM, kind=kind,
                           target_spec=relocated_spec(h.files.load_spec(VM), datastore, fmt))


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MARKER_FILE)


async def test_same_host_cold_move_to_raw_switches_home_and_removes_the_old_files(host: Host) -> None:
    p = await host.moves.start(_request(host, 1, "b", fmt=DiskFormat.RAW))
    p = await host.moves.wait(1, 60)
    assert p.state is MoveState.COMPLETED and p.phase is MigrationPhase.COMPLETED, p
    assert [d.identical for d in p.disks] == [True, True]
    assert p.total_bytes == p.done_bytes == 2064 * MIB and p.eta_s == 0.0
    spec = host.files.load_spec(VM)
    assert spec.datastore == "b" and [d.format for d in spec.disks] == [DiskFormat.RAW, DiskFormat.RAW]
    new = host.root / "b" / VM
    assert _tree(host.root / "a") == []
    assert {"disk0.raw", "disk1.raw", "vm.json", "serial.log"} <= {f.name for f in new.iterdir()}
    assert (new / "serial.log").read_text() == "booted\n"
    offset, length = DATA
    _qemu_io(new / "disk0.raw", DiskFormat.RAW, f"read -P 0x6b {offset} {length}")
    _qemu_io(new / "disk0.raw", DiskFormat.RAW, f"read -P 0 {offset - MIB} 1M")
    assert os.stat(new / "disk0.raw").st_blocks * 512 < 2 * length  # the zeros stayed holes
    assert host.supervisor.moving == {}


async def test_suspended_move_copies_the_state_file_and_refuses_the_wrong_kind(host: Host) -> None:
    state = host.root / "a" / VM / "suspended.state"
    saved = os.urandom(1_000_001)  # not a whole number of sectors
    state.write_bytes(saved)
    p = await host.moves.start(_request(host, 1, "b"))
    p = await host.moves.wait(1, 30)
    assert p.state is MoveState.FAILED and p.error is not None and "saved state" in p.error.message, p
    p = await host.moves.start(_request(host, 2, "b", kind=MigrationKind.SUSPENDED))
    p = await host.moves.wait(2, 60)
    assert p.state is MoveState.COMPLETED, p
    assert p.total_bytes == 2064 * MIB + 1_000_001
    moved = host.root / "b" / VM / "suspended.state"
    assert moved.read_bytes() == saved
    assert not state.exists()
    moved_back = await host.moves.start(_request(host, 3, "a"))  # a cold move of a suspended VM: refused
    assert (await host.moves.wait(moved_back.move_id, 30)).state is MoveState.FAILED


async def test_cancel_mid_copy_refuses_start_and_removes_the_copies(host: Host) -> None:
    before = _tree(host.root)
    await host.moves.start(_request(host, 1, "b"))
    while VM not in host.supervisor.moving:
        await asyncio.sleep(0)
    with pytest.raises(ConflictError, match="copying its files"):
        await host.supervisor.power(VM, PowerAction.START)
    p = await host.moves.cancel(1)
    assert p.state is MoveState.CANCELLED, p
    assert _tree(host.root / "b") == [] and not (host.root / "b" / VM).exists()
    assert [f for f in _tree(host.root) if not f.startswith("state/moves")] == \
        [f for f in before if not f.startswith("state/moves")]
    assert host.files.load_spec(VM).datastore == "a" and host.supervisor.moving == {}


async def test_agent_restart_mid_copy_rolls_back(tmp_path: Path, host: Host) -> None:
    await host.moves.start(_request(host, 1, "b"))

    def copying() -> MoveProgress | None:
        p = host.moves.get(1)
        return p if p.phase is MigrationPhase.COPY else None
    while copying() is None:
        await asyncio.sleep(0.01)
    await host.moves.close()  # the agent stops: its copy ends with it, the record stays unfinished
    assert host.moves.get(1).state is MoveState.RUNNING
    again = await _open(tmp_path)
    p = await again.moves.wait(1, 30)
    assert p.state is MoveState.FAILED and p.error is not None and "restarted" in p.error.message, p
    assert not (tmp_path / "b" / VM).exists()
    assert again.files.load_spec(VM).datastore == "a"
    await again.moves.close()


async def test_agent_restart_after_the_point_of_no_return_finishes(tmp_path: Path, host: Host) -> None:
    """A record committed but not switched (the agent died between commit and the new definition)."""
    await host.moves.start(_request(host, 1, "b"))
    p = await host.moves.wait(1, 60)
    assert p.state is MoveState.COMPLETED
    store = MoveStore(tmp_path / "state")
    rec = store.load(1)
    assert rec is not None and rec.committed
    # rewind the record to just after the commit, and put the old definition back
    host.files.switch_home(VmSpec.model_validate(rec.detail["source_spec"]))
    old = tmp_path / "a" / VM
    old.mkdir(exist_ok=True)
    (old / "disk0.qcow2").write_bytes(b"stale")
    rec.detail["switched"], rec.detail["old_removed"] = False, False
    rec.progress.state, rec.progress.phase, rec.ended_at = MoveState.RUNNING, MigrationPhase.FINISH, None
    store.save(rec)
    await host.moves.close()
    again = await _open(tmp_path)
    p = await again.moves.wait(1, 30)
    assert p.state is MoveState.COMPLETED, p
    assert again.files.load_spec(VM).datastore == "b"
    assert not (old / "disk0.qcow2").exists()
    await again.moves.close()
