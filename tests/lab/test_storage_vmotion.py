"""Issue 8, item 2: Storage vMotion on one host, the VM running, verified in the guest every time.

One VM for the module, on host-1, home shared-1, with memtest, the disk log on its first disk and
the disk writer flat out on its second (``vmshift.diskwrite=0``: far faster than a background
mirror drains). The moves the inventory must know go through the CLI (``vmshift vm migrate VM
--datastore DS``); those that must change nothing (background-only mirroring as the contrast, then
its cancel; a full target) are driven on host-1's agent directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.helpers import LabHandle, guest_check, qemu_pids, vmshift, vmshift_json, wait_for
from tests.lab.vmotion import layout, verify_guest
from vmshift.client import VmshiftClient
from vmshift.client.agent import AgentClient
from vmshift.lab import processes
from vmshift.lab.lab import run_probe
from vmshift.lab.layout import LabLayout, load_record
from vmshift.lab.probe import tcp_hold_process, verify_ok
from vmshift.migration.disk_plan import relocated_spec
from vmshift.model.enums import MigrationKind
from vmshift.model.migration import MigrationPhase
from vmshift.model.moves import DiskMoveRequest, MoveProgress, MoveState
from vmshift.model.vm import VmSpec

pytestmark = pytest.mark.lab
VM = "svm-1"
COPY_LIMIT_BPS = 32 << 20  # the contrast's cap on each disk's background copy, far below the writer's rate
BUDGET_S = 30.0  # the contrast's time: background-only mirrors must not be READY within it


def ds_dir(lay: LabLayout, ds: str) -> Path:
    return lay.datastores_dir / ds


def agent_spec(lay: LabLayout) -> VmSpec:
    """The VM's definition as host-1's agent has it (home.json -> DATASTORE/VM/vm.json)."""
    home = json.loads((lay.agent_state_dir(1) / "vms" / VM / "home.json").read_text())["datastore"]
    return VmSpec.model_validate_json((ds_dir(lay, home) / VM / "vm.json").read_text())


def open_disks(uuid: str) -> list[str]:
    """The image files the VM's one QEMU process holds open."""
    pids = qemu_pids(uuid)
    assert len(pids) == 1, f"expected one QEMU for {VM}, found {pids}"
    out = set()
    for fd in Path(f"/proc/{pids[0]}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.endswith((".qcow2", ".raw")):
            out.add(target)
    return sorted(out)


def agent_call(lay: LabLayout, fn: str, *args: Any) -> MoveProgress:
    async def call() -> MoveProgress:
        client = AgentClient(lay.agent_address(1), processes.agent_credentials(lay), timeout_s=120)
        try:
            result: MoveProgress = await getattr(client, fn)(*args)
            return result
        finally:
            await client.aclose()

    return asyncio.run(call())


def direct_request(lay: LabLayout, move_id: int, target: str, **extra: Any) -> DiskMoveRequest:
    return DiskMoveRequest(move_id=move_id, nonce=f"lab-{move_id}", vm=VM, kind=MigrationKind.STORAGE,
                           target_spec=relocated_spec(agent_spec(lay), target), **extra)


def assert_on(lay: LabLayout, uuid: str, ds: str) -> None:
    """The VM runs on DS's files only, its definition says so, no other datastore keeps its files."""
    spec = agent_spec(lay)
    assert spec.datastore == ds and all(d.datastore == ds for d in spec.disks), spec
    assert open_disks(uuid) == sorted(str(ds_dir(lay, ds) / VM / d.file) for d in spec.disks)
    for other in ("shared-1", "local-host-1"):
        folder = ds_dir(lay, other) / VM
        if other != ds:
            assert not folder.exists() or not any(folder.iterdir()), f"{folder} left behind"


def rings_intact(lab: LabHandle, ip: str) -> dict[str, Any]:
    """The guest re-reads its disk log and disk writer rings (TCP 7003): every durable record intact."""
    rec = load_record(lab.name)
    assert rec is not None
    answer = run_probe(rec, ["verify", ip], timeout=150)
    assert verify_ok(answer), answer
    assert answer["disklog"]["to_seq"] > 0 and answer["diskwrite"]["to_seq"] > 0, answer
    return answer


def writing(lab: LabHandle, after_seq: int = 0) -> dict[str, Any]:
    return wait_for("the disk writer to make chunks durable",
                    lambda: c if ((c := guest_check(lab, VM))["diskwrite"] or {}).get("durable_seq", 0)
                    > after_seq + 16 else None, timeout=120)


@pytest.fixture(scope="module")
def svm(lab: LabHandle) -> Iterator[dict[str, Any]]:
    vm = dict(vmshift_json(
        lab, "vm", "create", VM, "--host", "host-1", "--cpus", "1", "--memory", "192",
        "--datastore", "shared-1", "--network", "VM Network", "--disk", "64M", "--disk", "256M",
        "--image", "lab-guest", "--start",
        "--kernel-args", "vmshift.memtest=32,20 vmshift.disklog=1 vmshift.diskwrite=0",
    ))
    writing(lab)
    yield vm
    vmshift(lab, "vm", "stop", VM, check=False)
    vmshift(lab, "vm", "delete", VM, check=False)


def storage_vmotion(lab: LabHandle, ds: str) -> dict[str, Any]:
    m = dict(vmshift_json(lab, "vm", "migrate", VM, "--datastore", ds, timeout=600))
    assert m["status"] == "completed", m.get("error")
    assert m["kind"] == "storage" and m["target_datastore"] == ds
    return m


def test_storage_vmotion_there_and_back_under_a_flat_out_writer(
        lab: LabHandle, api: VmshiftClient, svm: dict[str, Any]) -> None:
    lay = layout(lab)
    uuid = svm["uuid"]
    assert_on(lay, uuid, "shared-1")
    hold = tcp_hold_process(lay.client_ns, svm["ip"])
    try:
        wait_for("the TCP hold to connect", lambda: guest_check(lab, VM)["echo"], timeout=30)
        for ds in ("local-host-1", "shared-1"):
            before = writing(lab)
            m = storage_vmotion(lab, ds)
            job = agent_call(lay, "move_progress", m["id"])  # the agent's record of the same move
            assert job.state is MoveState.COMPLETED and job.pivot_ms is not None
            assert job.done_bytes == job.total_bytes > 0
            print(f"\n{ds}: {job.elapsed_s:.1f} s, write-blocking after {job.write_blocking_after_s} s, "
                  f"pivot {job.pivot_ms} ms")
            assert_on(lay, uuid, ds)
            shown = api.get_vm(VM)
            assert shown["datastore"] == ds and all(d["datastore"] == ds for d in shown["disks"]), shown
            assert (ds_dir(lay, ds) / VM / "serial.log").stat().st_size > 0
            after = verify_guest(lab, api, VM, "host-1", before)
            assert after["memtest"]["mismatches"] == 0
            assert after["diskwrite"]["errors"] == 0 and after["diskwrite"]["first_seq"] == before[
                "diskwrite"]["first_seq"], "the guest rebooted or its writes failed"
            rings_intact(lab, svm["ip"])
    finally:
        report = hold.stop()
    assert report["survived"], f"the TCP connection broke: {report}"
    # a fresh QEMU from the definition boots on the files it names, every durable record on them
    durable = guest_check(lab, VM)["disklog"]["durable_seq"]
    vmshift(lab, "vm", "stop", VM)
    vmshift(lab, "vm", "start", VM)
    booted = writing(lab)
    assert booted["disklog"]["corrupt_at_boot"] == 0, booted
    assert booted["disklog"]["records_verified_at_boot"] >= durable, (durable, booted)
    assert booted["diskwrite"]["boot_scan"]["bad"] == 0, booted
    assert_on(lay, uuid, "shared-1")


def run_direct(lay: LabLayout, move_id: int, target: str, timeout_s: float, **extra: Any) -> MoveProgress:
    agent_call(lay, "move_start", direct_request(lay, move_id, target, **extra))
    return wait_for(f"move {move_id} to end",
                    lambda: p if (p := agent_call(lay, "move_progress", move_id)).state.finished else None,
                    timeout=timeout_s, interval=0.2)


def test_a_flat_out_writer_converges_only_with_write_blocking(lab: LabHandle, svm: dict[str, Any]) -> None:
    """The contrast, each disk's background copy capped below the writer's rate (a slow target):
    mirrors kept in background mode are not READY within the budget, and cancelling them mid-copy
    leaves the VM on its files with no copy behind; with write-blocking allowed the same move
    completes within the budget. Driven on the agent (the server's moves never cap the copy); the
    VM ends where the inventory has it."""
    lay = layout(lab)
    uuid = svm["uuid"]
    before = writing(lab)
    move_id = 900_001
    agent_call(lay, "move_start", direct_request(lay, move_id, "local-host-1", allow_write_blocking=False,
                                                 speed_bps=COPY_LIMIT_BPS))
    wait_for("the copy to start", lambda: (p := agent_call(lay, "move_progress", move_id)).phase
             is MigrationPhase.COPY and p.done_bytes > 0, timeout=60, interval=0.2)
    deadline = time.monotonic() + BUDGET_S
    p = agent_call(lay, "move_progress", move_id)
    while time.monotonic() < deadline:
        p = agent_call(lay, "move_progress", move_id)
        assert p.state is MoveState.RUNNING and p.phase is MigrationPhase.COPY, p
        assert not all(d.ready for d in p.disks) and not any(d.write_blocking for d in p.disks), p
        time.sleep(1.0)  # sampling the job at 1 Hz over the budget, not waiting for a state
    print(f"\nbackground only after {BUDGET_S:.0f} s: {p.done_bytes}/{p.total_bytes} B, eta {p.eta_s}")
    p = agent_call(lay, "move_cancel", move_id)
    assert p.state is MoveState.CANCELLED and p.phase is MigrationPhase.CANCELLED, p
    assert_on(lay, uuid, "shared-1")
    assert not (ds_dir(lay, "local-host-1") / VM).exists()
    after = writing(lab, before["diskwrite"]["durable_seq"])
    assert after["memtest"]["mismatches"] == 0 and after["disklog"].get("errors", 0) == 0
    assert after["disklog"]["durable_seq"] > before["disklog"]["durable_seq"]
    rings_intact(lab, svm["ip"])

    p = run_direct(lay, 900_002, "local-host-1", BUDGET_S + 30, speed_bps=COPY_LIMIT_BPS)
    assert p.state is MoveState.COMPLETED, p
    assert p.elapsed_s < BUDGET_S and any(d.write_blocking for d in p.disks), p
    print(f"write-blocking allowed: {p.elapsed_s:.1f} s, write-blocking after {p.write_blocking_after_s} s, "
          f"pivot {p.pivot_ms} ms")
    assert_on(lay, uuid, "local-host-1")
    rings_intact(lab, svm["ip"])
    p = run_direct(lay, 900_003, "shared-1", 120)
    assert p.state is MoveState.COMPLETED, p
    assert_on(lay, uuid, "shared-1")
    rings_intact(lab, svm["ip"])


def in_agent_mounts(uuid: str, *argv: str) -> str:
    """Run ``argv`` in the mount namespace of host-1's agent (``ip netns exec`` gave it its own; its
    QEMU shares it), where a mount made from the test's namespace would not be seen."""
    pid = qemu_pids(uuid)[0]
    return subprocess.run(["nsenter", "-t", str(pid), "-m", "--", *argv], check=True, capture_output=True,
                          text=True).stdout


def test_a_full_target_fails_and_leaves_the_vm_on_its_files(lab: LabHandle, svm: dict[str, Any]) -> None:
    lay = layout(lab)
    uuid = svm["uuid"]
    folder = ds_dir(lay, "local-host-1") / VM
    folder.mkdir()
    in_agent_mounts(uuid, "mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(folder))
    try:
        assert in_agent_mounts(uuid, "stat", "-f", "-c", "%T", str(folder)).strip() == "tmpfs"
        before = writing(lab)
        move_id = 900_004
        agent_call(lay, "move_start", direct_request(lay, move_id, "local-host-1"))
        p = wait_for("the move to end",
                     lambda: p if (p := agent_call(lay, "move_progress", move_id)).state.finished else None,
                     timeout=120)
        assert p.state is MoveState.FAILED and p.error is not None, p
        assert "space" in p.error.message.lower(), p.error
        assert in_agent_mounts(uuid, "ls", "-A", str(folder)) == "", "the partial copy is gone"
        assert_on(lay, uuid, "shared-1")
        after = writing(lab, before["diskwrite"]["durable_seq"])
        assert after["memtest"]["mismatches"] == 0 and after["disklog"].get("errors", 0) == 0
        assert after["disklog"]["durable_seq"] > before["disklog"]["durable_seq"]
        rings_intact(lab, svm["ip"])
    finally:
        in_agent_mounts(uuid, "umount", str(folder))
        folder.rmdir()
