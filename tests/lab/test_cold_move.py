"""Cold moves between hosts (issue 8, item 4): NBD exports on the target, qemu-img on the source.

The session lab (tests/lab/conftest.py) and one VM for the module, deleted at its end: booted with
the disk log so its first disk holds durable records, then stopped; its second disk is 4 GiB holding
256 MiB of data (a sparse disk). The agent pieces are driven through ``AgentClient`` (exports on
host-2, the copy job on host-1) for the failures — cancel, the export killed, qemu-img killed, the
source agent killed, the target datastore full — each of which must leave the VM's files as they
were and nothing on the target once the exports are deleted. Then the whole move through the CLI
(``vmshift vm migrate --host --datastore``), and the VM boots on host-2 with every durable disk-log
record intact.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import pytest

from tests.lab.helpers import LabHandle, vmshift, wait_for
from vmshift.client.agent import AgentClient
from vmshift.errors import ApiError
from vmshift.lab import lab as labmod
from vmshift.lab import processes
from vmshift.lab.layout import LabRecord, load_record
from vmshift.lab.probe import verify_ok
from vmshift.lab.topology import set_migration_link_rate
from vmshift.migration.disk_plan import disk_sizes_bytes, relocated_spec
from vmshift.model.enums import MigrationKind, PowerAction
from vmshift.model.moves import DiskExportRequest, DiskExports, DiskMoveRequest, MoveProgress, MoveState
from vmshift.model.vm import VmSpec

pytestmark = pytest.mark.lab
T = TypeVar("T")
VM = "coldmove-1"  # not a name another test of the session lab uses: migrations outlive their VM
MIB = 1 << 20
DATA_MIB = 256  # written into the 4 GiB disk
SLOW_LINK = "200mbit"  # long enough a copy to act on it mid-way
TARGET_DS = "local-host-2"


class Lab:
    def __init__(self, rec: LabRecord, env: dict[str, str]) -> None:
        self.rec = rec
        self.env = env

    def agent(self, k: int, fn: Callable[[AgentClient], Awaitable[T]]) -> T:
        async def go() -> T:
            lay = self.rec.layout
            client = AgentClient(lay.agent_address(k), processes.agent_credentials(lay), timeout_s=60)
            try:
                return await fn(client)
            finally:
                await client.aclose()
        return asyncio.run(go())

    def server(self) -> httpx.Client:
        return httpx.Client(base_url=f"{self.rec.server_url}/api/v1", trust_env=False, timeout=60,
                            headers={"Authorization": f"Bearer {self.rec.token}"},
                            verify=self.rec.server_tls())

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(Path(sys.executable).parent / "vmshift"), *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"vmshift {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def datastore(self, name: str) -> Path:
        return self.rec.layout.datastores_dir / name

    def state_dir(self, k: int) -> Path:
        return self.rec.layout.agent_state_dir(k)

    def check(self, vm: str) -> dict[str, Any]:
        return labmod.check(self.rec.name, vm)


@pytest.fixture(scope="module")
def clab(lab: LabHandle) -> Iterator[Lab]:
    rec = load_record(lab.name)
    assert rec is not None and rec.server_url and rec.token
    try:
        yield Lab(rec, lab.env)
    finally:  # leave the session lab as this module found it
        vmshift(lab, "vm", "stop", VM, check=False)
        vmshift(lab, "vm", "delete", VM, check=False)


def _healthy(lab: Lab, vm: str) -> dict[str, Any] | None:
    c = lab.check(vm)
    return c if c.get("echo") and c.get("memtest") and c.get("disklog") else None


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


class StoppedVm:
    def __init__(self, spec: VmSpec, durable_seq: int, files: list[Path]) -> None:
        self.spec = spec
        self.durable_seq = durable_seq
        self.files = files
        self.sha = {p: _sha(p) for p in files}

    def untouched(self) -> None:
        for p in self.files:
            assert p.is_file(), f"{p} is gone"
            assert _sha(p) == self.sha[p], f"{p} changed"


@pytest.fixture(scope="module")
def vm(clab: Lab) -> StoppedVm:
    body = {"name": VM, "host": "host-1", "cpus": 1, "memory_mib": 192, "datastore": "shared-1",
            "disks_mib": [64, 4096], "kernel_args": "vmshift.memtest=16,10 vmshift.disklog=1", "start": True}
    with clab.server() as s:
        r = s.post("/vms", json=body)
        assert r.status_code < 300, r.text
    wait_for(f"{VM} to answer", lambda: _healthy(clab, VM), timeout=180, interval=1)
    status = wait_for("durable disk-log records",
                      lambda: (d := clab.check(VM)["disklog"]) and d["durable_seq"] >= 40 and d, timeout=60)
    with clab.server() as s:
        r = s.post(f"/vms/{VM}/power", json={"action": "stop"})
        assert r.status_code < 300, r.text

        def off() -> bool:
            return bool(s.get(f"/vms/{VM}").json().get("power_state") == "poweredOff")
        wait_for(f"{VM} to be powered off in the inventory", off, timeout=60)
    durable = int(status["durable_seq"])  # only grows until the stop: a lower bound of what is on disk
    spec = VmSpec.model_validate_json((clab.datastore("shared-1") / VM / "vm.json").read_text())
    folder = clab.datastore("shared-1") / VM
    disks = [folder / d.file for d in spec.disks]
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 1G {DATA_MIB}M", str(disks[1])],
                   check=True, capture_output=True)
    return StoppedVm(spec, durable, [*disks, folder / "vm.json"])


# ----- the agent pieces -----------------------------------------------------------------------
def _target_spec(vm: StoppedVm) -> VmSpec:
    return relocated_spec(vm.spec, TARGET_DS)


def _exports(lab: Lab, vm: StoppedVm, mid: int, seen_from: Path = Path("/")) -> DiskExports:
    target = _target_spec(vm)
    req = DiskExportRequest(move_id=mid, nonce=f"n{mid}", spec=target, sizes_bytes=disk_sizes_bytes(vm.spec))
    exports = lab.agent(2, lambda a: a.disk_exports_create(req))
    mig = lab.rec.layout.host_mig_address(2)
    assert [t.index for t in exports.targets] == [0, 1]
    assert all(t.uri.startswith(f"nbd://{mig}:") for t in exports.targets), exports
    for d in target.disks:
        assert _under(seen_from, lab.datastore(TARGET_DS) / VM / d.file).is_file()
    return exports


def _under(root: Path, path: Path) -> Path:
    return root / path.relative_to("/")


def _start(lab: Lab, vm: StoppedVm, mid: int, exports: DiskExports) -> MoveProgress:
    req = DiskMoveRequest(move_id=mid, nonce=f"n{mid}", vm=VM, kind=MigrationKind.COLD,
                          target_spec=_target_spec(vm), targets=exports.targets)
    return lab.agent(1, lambda a: a.move_start(req))


def _progress(lab: Lab, mid: int, host: int = 1) -> MoveProgress:
    return lab.agent(host, lambda a: a.move_progress(mid))


def _copying(lab: Lab, mid: int) -> MoveProgress:
    def moving() -> MoveProgress | None:
        p = _progress(lab, mid)
        assert p.state is MoveState.RUNNING, p
        return p if p.phase.value == "copy" and p.done_bytes > 32 * MIB else None
    return wait_for(f"move {mid} to copy", moving, timeout=60, interval=0.2)


def _ended(lab: Lab, mid: int, timeout: float = 120) -> MoveProgress:
    def ended() -> MoveProgress | None:
        p = _progress(lab, mid)
        return p if p.state.finished else None
    return wait_for(f"move {mid} to end", ended, timeout=timeout, interval=0.3)


def _copy_processes(target: str) -> list[int]:
    """Live qemu-img converts into ``target``."""
    return [p.pid for p in psutil.process_iter(["cmdline", "status"])
            if (cmd := p.info.get("cmdline") or []) and "convert" in cmd and target in cmd
            and p.info.get("status") != psutil.STATUS_ZOMBIE]


def _exporters(lab: Lab, mid: int) -> list[int]:
    marker = str(lab.state_dir(2) / "disk-exports" / f"{mid}.")
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any(marker in a for a in (p.info.get("cmdline") or []))]


def _nothing_left(lab: Lab, vm: StoppedVm, mid: int, exports: DiskExports,
                  seen_from: Path = Path("/")) -> None:
    """After DELETE keep_files=false: no exporter, no copy, no file of the move, the source as it was."""
    assert lab.agent(1, lambda a: a.move_progress(mid)).state.finished
    lab.agent(2, lambda a: a.disk_exports_delete(mid, keep_files=False))
    assert _exporters(lab, mid) == []
    assert all(_copy_processes(t.uri) == [] for t in exports.targets)
    folder = _under(seen_from, lab.datastore(TARGET_DS) / VM)
    assert not folder.exists() or list(folder.iterdir()) == [], list(folder.iterdir())
    assert not (lab.state_dir(2) / "disk-exports" / f"{mid}.json").exists()
    vm.untouched()


@pytest.fixture
def slow_link(clab: Lab) -> Iterator[None]:
    set_migration_link_rate(clab.rec.layout, 1, SLOW_LINK)
    try:
        yield
    finally:
        set_migration_link_rate(clab.rec.layout, 1, None)


def test_cancel_mid_copy_refuses_start_and_leaves_nothing(clab: Lab, vm: StoppedVm, slow_link: None) -> None:
    mid = 9001
    exports = _exports(clab, vm, mid)
    _start(clab, vm, mid, exports)
    p = _copying(clab, mid)
    assert p.total_bytes == sum(disk_sizes_bytes(vm.spec)) and p.rate_bps > 0 and p.eta_s is not None, p
    with pytest.raises(ApiError) as refused:
        clab.agent(1, lambda a: a.power(VM, PowerAction.START))
    assert refused.value.status == 409 and "copying its files" in refused.value.message
    p = clab.agent(1, lambda a: a.move_cancel(mid))
    assert p.state is MoveState.CANCELLED, p
    _nothing_left(clab, vm, mid, exports)


def test_killed_export_fails_the_move(clab: Lab, vm: StoppedVm, slow_link: None) -> None:
    mid = 9002
    exports = _exports(clab, vm, mid)
    _start(clab, vm, mid, exports)
    _copying(clab, mid)
    (pid,) = _exporters(clab, mid)
    os.kill(pid, signal.SIGKILL)
    p = _ended(clab, mid)
    assert p.state is MoveState.FAILED and p.error is not None, p
    assert "went away" in p.error.message, p.error
    _nothing_left(clab, vm, mid, exports)


def test_killed_copy_fails_the_move(clab: Lab, vm: StoppedVm, slow_link: None) -> None:
    mid = 9003
    exports = _exports(clab, vm, mid)
    _start(clab, vm, mid, exports)
    _copying(clab, mid)
    for pid in _copy_processes(exports.targets[1].uri) or _copy_processes(exports.targets[0].uri):
        os.kill(pid, signal.SIGKILL)
    p = _ended(clab, mid)
    assert p.state is MoveState.FAILED and p.error is not None and "SIGKILL" in p.error.message, p
    _nothing_left(clab, vm, mid, exports)


def test_source_agent_killed_mid_copy_rolls_back(clab: Lab, vm: StoppedVm, slow_link: None) -> None:
    mid = 9004
    exports = _exports(clab, vm, mid)
    _start(clab, vm, mid, exports)
    _copying(clab, mid)
    processes.kill_agent(clab.rec.name, 1)
    processes.start_agent(clab.rec.name, 1)  # a qemu-img that outlived its agent is stopped at its start
    p = _ended(clab, mid)
    assert p.state is MoveState.FAILED and p.error is not None and "restarted" in p.error.message, p
    _nothing_left(clab, vm, mid, exports)


def test_target_agent_restart_mid_copy_does_not_disturb_it(clab: Lab, vm: StoppedVm, slow_link: None) -> None:
    """The exporter outlives the target's agent; the restarted agent still ends the exports."""
    mid = 9006
    exports = _exports(clab, vm, mid)
    _start(clab, vm, mid, exports)
    _copying(clab, mid)
    processes.kill_agent(clab.rec.name, 2)
    processes.start_agent(clab.rec.name, 2)
    set_migration_link_rate(clab.rec.layout, 1, None)  # the restart happened mid-copy: finish it unshaped
    p = _ended(clab, mid)
    assert p.state is MoveState.COMPLETED and [d.identical for d in p.disks] == [True, True], p
    _nothing_left(clab, vm, mid, exports)


def test_full_target_datastore_fails_with_enospc(clab: Lab, vm: StoppedVm) -> None:
    mid = 9005
    folder = clab.datastore(TARGET_DS) / VM
    folder.mkdir(exist_ok=True)
    # host-2's agent (and the exporter it starts) has its own mount namespace (ip netns exec): mount there
    agent = labmod.get(clab.rec.name).pids["host-2"]
    in_agent = ["nsenter", "-t", str(agent), "-m", "--"]
    subprocess.run([*in_agent, "mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(folder)], check=True)
    seen = Path(f"/proc/{agent}/root")
    try:
        exports = _exports(clab, vm, mid, seen_from=seen)
        _start(clab, vm, mid, exports)
        p = _ended(clab, mid)
        assert p.state is MoveState.FAILED and p.error is not None, p
        assert p.error.code == "insufficient_capacity" and "ran out of space" in p.error.message, p.error
        _nothing_left(clab, vm, mid, exports, seen_from=seen)
    finally:
        subprocess.run([*in_agent, "umount", str(folder)], check=True)
    folder.rmdir()


# ----- the whole move through the server -------------------------------------------------------
def test_cold_move_to_another_host_and_datastore(clab: Lab, vm: StoppedVm) -> None:
    t0 = time.monotonic()
    out = clab.cli("vm", "migrate", VM, "--host", "host-2", "--datastore", TARGET_DS, "--json")
    took = time.monotonic() - t0
    final = json.loads(out.stdout)
    assert final["status"] == "completed", final
    assert final["kind"] == "cold", final
    print(f"\ncold move of {VM} (64 MiB disk with the disk log + 4 GiB disk holding {DATA_MIB} MiB) over an "
          f"unshaped link: {took:.1f} s through the CLI, {final['metrics'].get('total_ms')} ms for the task")
    job = clab.agent(1, lambda a: a.move_progress(int(final["id"])))  # the source keeps its job's record
    assert job.state is MoveState.COMPLETED and [d.identical for d in job.disks] == [True, True], job
    print(f"source job: {job.elapsed_s:.2f} s, {job.done_bytes / MIB:.0f} MiB of virtual size, "
          f"{job.rate_bps / MIB:.0f} MiB/s")
    # the VM lives on host-2 now, on its copies; the source's files are gone and no export is left
    target = clab.datastore(TARGET_DS) / VM
    assert {"disk0.qcow2", "disk1.qcow2", "vm.json"} <= {p.name for p in target.iterdir()}
    assert not (clab.datastore("shared-1") / VM).exists()
    assert clab.agent(2, lambda a: a.get_vm(VM)).power_state.value == "poweredOff"
    assert list((clab.state_dir(2) / "disk-exports").glob("*.json")) == []
    read = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -P 0x5a 1G {DATA_MIB}M",
                           str(target / "disk1.qcow2")], capture_output=True, text=True)
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, read.stdout
    clab.cli("vm", "start", VM)
    answer = wait_for(f"{VM} to answer on host-2", lambda: _healthy(clab, VM), timeout=180, interval=1)
    log = answer["disklog"]
    assert log["corrupt_at_boot"] == 0, log
    assert log["records_verified_at_boot"] >= vm.durable_seq and log["first_seq"] > vm.durable_seq, log
    verified = labmod.run_probe(clab.rec, ["verify", labmod.vm_ip(clab.rec, VM)])
    assert verify_ok(verified), verified
    passes = labmod.wait_memtest_passes(clab.rec.name, VM, 2, timeout_s=120)
    assert passes["memtest"]["mismatches"] == 0, passes
    with clab.server() as s:
        assert s.get(f"/vms/{VM}").json()["host"] == "host-2"


def test_suspended_moves_same_host_then_other_host_and_resume(clab: Lab, vm: StoppedVm) -> None:
    """The VM from the move above runs on host-2: suspend it, move it to shared-1 on host-2 (as raw
    disks), then to local-host-1 on host-1, resume it there: the guest continues where it stopped."""
    before = wait_for(f"{VM} to answer", lambda: _healthy(clab, VM), timeout=60)
    clab.cli("vm", "suspend", VM, "--json")
    state = clab.datastore(TARGET_DS) / VM / "suspended.state"
    assert state.is_file()
    state_bytes = state.stat().st_size
    # (target host, target datastore, options, the datastore it leaves); both start from host-2
    moves = [("host-2", "shared-1", ["--disk-format", "raw"], TARGET_DS),
             ("host-1", "local-host-1", [], "shared-1")]
    for k, (host, datastore, extra, left) in enumerate(moves):
        out = clab.cli("vm", "migrate", VM, "--host", host, "--datastore", datastore, *extra, "--json")
        final = json.loads(out.stdout)
        assert final["status"] == "completed" and final["kind"] == "suspended", final
        job = _progress(clab, int(final["id"]), host=2)
        assert job.state is MoveState.COMPLETED and all(d.identical for d in job.disks), job
        assert job.total_bytes == sum(disk_sizes_bytes(vm.spec)) + state_bytes, job
        folder = clab.datastore(datastore) / VM
        moved = folder / "suspended.state"
        assert moved.is_file() and moved.stat().st_size == state_bytes, moved
        assert not (clab.datastore(left) / VM).exists()
        print(f"\nsuspended move {k + 1} to {host}/{datastore}: {final['metrics'].get('total_ms')} ms, "
              f"state file {state_bytes / MIB:.0f} MiB")
    with clab.server() as s:
        assert s.get(f"/vms/{VM}").json()["power_state"] == "suspended"
    clab.cli("vm", "resume", VM)
    after = wait_for(f"{VM} to answer on host-1", lambda: _healthy(clab, VM), timeout=120, interval=1)
    assert after["uptime_s"] >= before["uptime_s"], (before, after)  # it continued, it did not boot
    assert after["disklog"]["first_seq"] == before["disklog"]["first_seq"], (before, after)
    assert after["memtest"]["pages"] >= before["memtest"]["pages"], (before, after)
    verified = labmod.run_probe(clab.rec, ["verify", labmod.vm_ip(clab.rec, VM)])
    assert verify_ok(verified), verified
    passes = labmod.wait_memtest_passes(clab.rec.name, VM, after["memtest"]["passes"] + 2, timeout_s=120)
    assert passes["memtest"]["mismatches"] == 0, passes
    with clab.server() as s:
        assert s.get(f"/vms/{VM}").json()["host"] == "host-1"
