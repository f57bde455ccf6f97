"""Issue 8, item 5 (in place): suspend a VM to a file in its folder and resume it on the same host,
verified in the guest each time (memtest pattern, disklog records, uptime, TCP, MAC and IP)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.lab.helpers import LabHandle, guest_check, qemu_pids, vmshift, vmshift_json, wait_for
from tests.lab.vmotion import host_of_pid, layout, migrate, verify_guest
from vmshift.client import VmshiftClient
from vmshift.lab.lab import memtest_swept_since
from vmshift.lab.probe import tcp_hold_process

pytestmark = pytest.mark.lab

MEMORY_MIB = 256
RAM = MEMORY_MIB << 20


@pytest.fixture(scope="module")
def sleeper(lab: LabHandle) -> Iterator[dict[str, Any]]:
    vm = dict(vmshift_json(
        lab, "vm", "create", "sleeper", "--host", "host-1", "--cpus", "1", "--memory", str(MEMORY_MIB),
        "--datastore", "shared-1", "--network", "VM Network", "--disk", "64M", "--image", "lab-guest",
        "--kernel-args", "vmshift.memtest=96,20 vmshift.disklog=1", "--start",
    ))
    wait_for("memtest to fill its 96 MiB once",
             lambda: guest_check(lab, "sleeper")["memtest"]["passes"] >= 1, timeout=180)
    yield vm
    vmshift(lab, "vm", "stop", "sleeper", check=False)
    vmshift(lab, "vm", "delete", "sleeper", check=False)


def suspend(lab: LabHandle, api: VmshiftClient, vm: dict[str, Any]) -> dict[str, Any]:
    """`vm suspend --json`, then proof: inventory and a later heartbeat say suspended, no QEMU runs."""
    out = vmshift_json(lab, "vm", "suspend", vm["name"], timeout=300)
    assert out["power_state"] == "suspended", out
    done = time.time()
    assert qemu_pids(vm["uuid"]) == [], "a QEMU of the suspended VM still runs"

    def heartbeat_after_suspend() -> bool:
        beat = api.get_host(out["host"]).get("last_heartbeat")
        return beat is not None and datetime.fromisoformat(beat).timestamp() > done + 1

    wait_for("a heartbeat after the suspend", heartbeat_after_suspend, timeout=60)
    assert api.get_vm(vm["name"])["power_state"] == "suspended", "the agent does not report it suspended"
    result: dict[str, Any] = out["suspend"]
    assert Path(result["state_file"]).is_file()
    return result


def assert_resumed(lab: LabHandle, api: VmshiftClient, vm: dict[str, Any], before: dict[str, Any],
                   state_file: str, host: str = "host-1") -> dict[str, Any]:
    """One QEMU on ``host``, the same MAC and IP, no state file, the guest continued where it stopped."""
    info = api.get_vm(vm["name"])
    assert info["power_state"] == "poweredOn" and info["host"] == host
    assert info["ip"] == vm["ip"] and info["nics"][0]["mac"] == vm["nics"][0]["mac"]
    pids = qemu_pids(vm["uuid"])
    assert len(pids) == 1 and host_of_pid(lab, pids[0]) == host, pids
    assert not Path(state_file).exists(), "the state file outlived the resume"
    assert not Path(state_file + ".loaded").exists()
    start = guest_check(lab, vm["name"])
    assert start["uptime_s"] >= before["uptime_s"], f"the guest rebooted: {before['uptime_s']} -> {start}"
    # memtest verifies a page only when its sweep reaches it: judge after a full sweep from now
    name = vm["name"]
    swept = memtest_swept_since
    after = wait_for("a full memtest sweep",
                     lambda: c if swept(start["memtest"], (c := guest_check(lab, name))["memtest"]) else None,
                     timeout=180)
    assert after["memtest"]["mismatches"] == 0, after
    assert after["disklog"]["durable_seq"] > before["disklog"]["durable_seq"], (before, after)
    assert after["disklog"]["errors"] == 0 and after["disklog"]["corrupt_at_boot"] == 0, after
    assert after["disklog"]["first_seq"] == before["disklog"]["first_seq"], "disklog started over"
    return after


def dd_direct_bps(directory: Path, mib: int) -> float:
    """Write rate of `dd if=/dev/zero bs=1M oflag=direct` in ``directory`` (bytes/s)."""
    target = directory / "dd-direct.test"
    try:
        began = time.monotonic()
        subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", "oflag=direct", f"count={mib}"],
                       check=True, capture_output=True)
        return (mib << 20) / (time.monotonic() - began)
    finally:
        target.unlink(missing_ok=True)


def test_suspend_and_resume_keep_memory_disk_uptime_and_connection(
    lab: LabHandle, api: VmshiftClient, sleeper: dict[str, Any]
) -> None:
    hold = tcp_hold_process(layout(lab).client_ns, sleeper["ip"])
    try:
        before = guest_check(lab, "sleeper")  # the hold connects meanwhile (its report counts echoes)
        result = suspend(lab, api, sleeper)
        resumed = vmshift_json(lab, "vm", "resume", "sleeper", timeout=300)
        assert resumed["power_state"] == "poweredOn", resumed
    finally:
        report = hold.stop()
    assert_resumed(lab, api, sleeper, before, result["state_file"])

    # the file: never more than the guest's RAM blocks; it is sparse, so it occupies what was written
    assert result["memory_bytes"] == RAM
    assert result["allocated_bytes"] <= RAM * 1.01, result
    assert result["file_bytes"] <= RAM * 1.01 + (8 << 20), result  # ~7 MiB of 1 MiB-aligned ROM blocks
    written_mib = max(64, result["written_bytes"] >> 20)
    dd_bps = dd_direct_bps(Path(result["state_file"]).parent, written_mib)
    measured = {
        "suspend_write_mibps": round(result["write_bps"] / 2**20, 1),
        "dd_direct_mibps": round(dd_bps / 2**20, 1),
        "ratio": round(result["write_bps"] / dd_bps, 3),
        "written_mib": result["written_bytes"] >> 20, "file_bytes": result["file_bytes"],
        "allocated_bytes": result["allocated_bytes"], "ram_bytes": RAM,
        "file_over_ram_pct": round(100 * (result["file_bytes"] / RAM - 1), 2),
        "save_s": result["save_s"], "suspend_total_s": result["total_s"], "direct_io": result["direct_io"],
        "tcp_hold": report,
    }
    print("SUSPEND-MEASURED " + json.dumps(measured))
    # TCP: the guest's stack was frozen, not reset; the client's retransmissions reach it after the resume
    assert report["survived"], f"the TCP connection opened before the suspend broke: {report}"


def test_start_resumes_a_suspended_vm_and_stop_discards_its_state(
    lab: LabHandle, api: VmshiftClient, sleeper: dict[str, Any]
) -> None:
    before = guest_check(lab, "sleeper")
    result = suspend(lab, api, sleeper)
    shutdown = vmshift(lab, "vm", "shutdown", "sleeper", check=False)
    assert shutdown.returncode != 0 and "suspended" in shutdown.stderr, shutdown.stderr
    started = vmshift_json(lab, "vm", "start", "sleeper", timeout=300)  # vSphere: power on = resume
    assert started["power_state"] == "poweredOn"
    after = assert_resumed(lab, api, sleeper, before, result["state_file"])

    result = suspend(lab, api, sleeper)
    stopped = vmshift_json(lab, "vm", "stop", "sleeper")  # vSphere: power off discards the state
    assert stopped["power_state"] == "poweredOff" and not Path(result["state_file"]).exists()
    vmshift_json(lab, "vm", "start", "sleeper", timeout=300)
    fresh = guest_check(lab, "sleeper")
    assert fresh["uptime_s"] < after["uptime_s"], "after a discard the guest boots afresh"
    assert fresh["disklog"]["corrupt_at_boot"] == 0
    assert fresh["disklog"]["records_verified_at_boot"] > 0, "the resumed guest's durable records are on disk"


def test_a_failed_save_leaves_the_vm_running_and_no_file(
    lab: LabHandle, api: VmshiftClient, sleeper: dict[str, Any]
) -> None:
    before = guest_check(lab, "sleeper")
    folder = layout(lab).shared_datastore / "sleeper"
    assert (folder / "serial.log").is_file(), f"{folder} is not the VM's folder"
    subprocess.run(["chattr", "+i", str(folder)], check=True)  # no new file can appear in the folder
    try:
        failed = vmshift(lab, "vm", "suspend", "sleeper", check=False, timeout=300)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert failed.returncode != 0 and "runs on as before" in " ".join(failed.stderr.split()), failed.stderr
    assert api.get_vm("sleeper")["power_state"] == "poweredOn"
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("suspended")) == []
    after = guest_check(lab, "sleeper")
    assert after["uptime_s"] >= before["uptime_s"] and after["memtest"]["mismatches"] == 0
    # the failed save put QEMU's migration capabilities back: a live migration over TCP still works
    assert migrate(lab, "sleeper", "host-2")["status"] == "completed"
    verify_guest(lab, api, "sleeper", "host-2", before)


def test_a_state_file_that_does_not_load_keeps_the_vm_suspended(
    lab: LabHandle, api: VmshiftClient, sleeper: dict[str, Any]
) -> None:
    host = api.get_vm("sleeper")["host"]
    before = guest_check(lab, "sleeper")
    result = suspend(lab, api, sleeper)
    state = Path(result["state_file"])
    keep = state.with_name("kept.copy")
    subprocess.run(["cp", "--sparse=always", str(state), str(keep)], check=True)
    try:
        with state.open("r+b") as f:
            f.truncate(4096)  # a cut-off file: QEMU cannot load it
        failed = vmshift(lab, "vm", "resume", "sleeper", check=False, timeout=300)
        assert failed.returncode != 0 and "stays suspended" in " ".join(failed.stderr.split()), failed.stderr
        assert state.is_file(), "a failed load must keep the state file"
        assert api.get_vm("sleeper")["power_state"] == "suspended"
        assert qemu_pids(sleeper["uuid"]) == []
        keep.replace(state)
        vmshift_json(lab, "vm", "resume", "sleeper", timeout=300)
    finally:
        keep.unlink(missing_ok=True)
    assert_resumed(lab, api, sleeper, before, result["state_file"], host)
    # the resumed QEMU has a fresh QEMU's capabilities again: it live-migrates over TCP
    assert migrate(lab, "sleeper", "host-1")["status"] == "completed"
    verify_guest(lab, api, "sleeper", "host-1", before)
