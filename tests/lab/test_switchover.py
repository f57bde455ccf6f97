"""Issue 6: a safe switchover. The target QEMU waits paused (-S) until the source confirmed its
stream completed; faults right at the switchover end with exactly one running QEMU on the host the
inventory names (memtest clean, disklog intact), or — when nothing can be proven — with the VM
paused on both hosts and a critical event naming the command that finishes the move.

One VM serves every test; each test moves it from wherever it is to the other host. To land a
fault *between* "the source sent its last byte" and "the target was told to run", a test freezes
the source agent (SIGSTOP) during pre-copy: QEMU finishes the stream on its own, the target's
QEMU proves it holds the whole VM, and then the fault is injected before the agent is thawed.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from tests.lab.helpers import LabHandle, guest_check, qemu_pids, vmshift, vmshift_json, wait_for
from tests.lab.vmotion import host_of_pid, layout, start_migration, verify_guest, wait_migration_phase
from vmshift.client import VmshiftClient
from vmshift.errors import VmshiftError
from vmshift.lab import processes
from vmshift.lab.layout import load_record
from vmshift.lab.topology import set_migration_link_rate

pytestmark = pytest.mark.lab

VM = "switch"
LINK = "80mbit"  # pre-copy lasts several seconds: long enough to freeze the source agent in it
ENDED = ("completed", "failed", "cancelled", "lost", "needs_finalize")


@pytest.fixture(scope="module")
def vm(lab: LabHandle) -> Iterator[dict[str, Any]]:
    lay = layout(lab)
    created = dict(vmshift_json(
        lab, "vm", "create", VM, "--host", "host-1", "--cpus", "1", "--memory", "192",
        "--datastore", "shared-1", "--network", "VM Network", "--disk", "64M", "--image", "lab-guest",
        "--kernel-args", "vmshift.memtest=48,4 vmshift.disklog=1", "--start",
    ))
    guest_check(lab, VM)
    try:
        yield created
    finally:
        for k in lay.host_numbers:
            processes.ensure_agent(lab.name, k)
        vmshift(lab, "vm", "stop", VM, check=False)
        vmshift(lab, "vm", "delete", VM, check=False)


@pytest.fixture(autouse=True)
def slow_link(lab: LabHandle) -> Iterator[None]:
    """Each test starts on the slow link (a test may lift it once its fault is in place)."""
    lay = layout(lab)
    for k in lay.host_numbers:
        set_migration_link_rate(lay, k, LINK)
    try:
        yield
    finally:
        lift_slow_link(lab)


def lift_slow_link(lab: LabHandle) -> None:
    """What is left of the stream needs no slow link once the fault is set up: at 80 Mbit/s the
    whole of this guest takes ~23 s, unshaped a few."""
    lay = layout(lab)
    for k in lay.host_numbers:
        set_migration_link_rate(lay, k, None)


def agent(lab: LabHandle, host: str) -> httpx.Client:
    """The agent API of host, as the server reaches it (its certificate)."""
    return processes.agent_http(layout(lab), processes.host_number(host), timeout=10)


def incoming(lab: LabHandle, host: str, mid: int) -> dict[str, Any]:
    with agent(lab, host) as c:
        r = c.get(f"/migrations/{mid}/incoming")
        r.raise_for_status()
        return dict(r.json())


def signal_agent(lab: LabHandle, host: str, sig: signal.Signals) -> None:
    processes.kill_agent(lab.name, host, sig)


def other(host: str) -> str:
    return "host-2" if host == "host-1" else "host-1"


def wait_end(api: VmshiftClient, mid: int, timeout: float = 240) -> dict[str, Any]:
    return wait_for(f"migration {mid} to end",
                    lambda: m if (m := api.get_migration(mid))["status"] in ENDED else None,
                    timeout=timeout, interval=0.3)


def freeze_source_until_stream_completed(lab: LabHandle, api: VmshiftClient, mid: int, src: str,
                                         dst: str) -> None:
    """SIGSTOP the source agent in pre-copy; return once the target's QEMU holds the whole stream
    (it stays paused: nobody has confirmed)."""
    wait_migration_phase(api, mid, {"precopy"})
    signal_agent(lab, src, signal.SIGSTOP)
    lift_slow_link(lab)  # QEMU finishes the stream on its own: nothing to race against any more
    state = wait_for("the target's stream to complete",
                     lambda: s if (s := incoming(lab, dst, mid))["stream"] == "completed" else None,
                     timeout=120, interval=0.2)
    assert state["qemu_status"] == "paused", f"the target ran before the source confirmed: {state}"


def qemu_hosts(lab: LabHandle, uuid: str) -> list[str]:
    return sorted(host_of_pid(lab, p) for p in qemu_pids(uuid))


def test_target_waits_paused_until_the_source_confirms(
    lab: LabHandle, api: VmshiftClient, vm: dict[str, Any]
) -> None:
    src = api.get_vm(VM)["host"]
    dst = other(src)
    before = guest_check(lab, VM)
    mid = start_migration(lab, VM, dst)
    wait_migration_phase(api, mid, {"precopy"})
    target = [p for p in qemu_pids(vm["uuid"]) if host_of_pid(lab, p) == dst]
    assert len(target) == 1, target
    argv = psutil.Process(target[0]).cmdline()
    assert "-S" in argv and "-incoming" in argv, argv
    state = incoming(lab, dst, mid)
    assert state["qemu_status"] == "inmigrate" and state["stream"] in ("active", "setup"), state
    lift_slow_link(lab)
    end = wait_end(api, mid)
    assert end["status"] == "completed", end["error"]
    verify_guest(lab, api, VM, dst, before)
    marks = end["timeline"]
    for key in ("source_stopped", "last_byte_sent", "confirm_sent", "target_loaded", "target_cont"):
        assert key in marks, f"timeline lacks {key}: {marks}"
    assert marks["source_stopped"] <= marks["last_byte_sent"] <= marks["confirm_sent"] <= marks["target_cont"]
    shown = vmshift(lab, "migration", "show", str(mid)).stdout
    assert "Switchover timeline" in shown and "target vCPUs running" in shown


def test_cancel_in_the_switchover_is_refused(lab: LabHandle, api: VmshiftClient, vm: dict[str, Any]) -> None:
    """The source agent shows the switchover the moment QEMU's event says so; a cancel from then
    on is refused with a clear message and the migration finishes."""
    src = api.get_vm(VM)["host"]
    dst = other(src)
    before = guest_check(lab, VM)
    mid = start_migration(lab, VM, dst)
    task_id = api.get_migration(mid)["task_id"]
    with agent(lab, src) as c:
        wait_for("the source agent to report the switchover",
                 lambda: c.get(f"/migrations/{mid}").json()["phase"] in ("switchover", "finish"),
                 timeout=120, interval=0.01)
    with pytest.raises(VmshiftError) as refused:
        api.cancel_task(task_id)
    assert "the switchover has started" in str(refused.value).lower(), refused.value
    end = wait_end(api, mid)
    assert end["status"] == "completed", end["error"]
    assert api.get_task(task_id)["state"] == "success"
    events = api.list_events(limit=50, target=VM)
    assert any(e["kind"] == "migration.cancel_refused" for e in events), events
    verify_guest(lab, api, VM, dst, before)


def test_source_qemu_killed_after_its_last_byte(
    lab: LabHandle, api: VmshiftClient, vm: dict[str, Any]
) -> None:
    src = api.get_vm(VM)["host"]
    dst = other(src)
    before = guest_check(lab, VM)
    mid = start_migration(lab, VM, dst)
    try:
        freeze_source_until_stream_completed(lab, api, mid, src, dst)
        source_qemu = [p for p in qemu_pids(vm["uuid"]) if host_of_pid(lab, p) == src]
        assert len(source_qemu) == 1
        os.kill(source_qemu[0], signal.SIGKILL)
    finally:
        signal_agent(lab, src, signal.SIGCONT)
    end = wait_end(api, mid)
    assert end["status"] == "completed", end["error"]  # the target's proof decided: it runs the VM
    verify_guest(lab, api, VM, dst, before)


def test_source_agent_killed_in_the_switchover(
    lab: LabHandle, api: VmshiftClient, vm: dict[str, Any]
) -> None:
    src = api.get_vm(VM)["host"]
    dst = other(src)
    before = guest_check(lab, VM)
    mid = start_migration(lab, VM, dst)
    try:
        freeze_source_until_stream_completed(lab, api, mid, src, dst)
    finally:
        signal_agent(lab, src, signal.SIGKILL)
        processes.start_agent(lab.name, src)
    end = wait_end(api, mid)
    assert end["status"] == "completed", end["error"]
    verify_guest(lab, api, VM, dst, before)


def test_server_restarted_after_completed(lab: LabHandle, api: VmshiftClient, vm: dict[str, Any]) -> None:
    """The agents finish the move without the server; the restarted server records it."""
    src = api.get_vm(VM)["host"]
    dst = other(src)
    before = guest_check(lab, VM)
    mid = start_migration(lab, VM, dst)
    wait_migration_phase(api, mid, {"precopy"})
    rec = load_record(lab.name)
    assert rec is not None
    server_pid = rec.pids["server"]
    os.kill(server_pid, signal.SIGSTOP)
    lift_slow_link(lab)  # the server froze in pre-copy: the agents finish without it
    try:
        wait_for("the target to run the VM",
                 lambda: incoming(lab, dst, mid)["state"] == "activated", timeout=120, interval=0.3)
        assert api.get_migration  # the server is frozen: nothing recorded the move yet
    finally:
        os.kill(server_pid, signal.SIGKILL)
        psutil.wait_procs([psutil.Process(server_pid)], timeout=10)
        rec.pids.pop("server", None)
        rec.save()
        processes.start_server(lab.name)
    end = wait_end(api, mid)
    assert end["status"] == "completed", end["error"]
    verify_guest(lab, api, VM, dst, before)


def test_confirm_path_cut_after_completed_needs_finalize(
    lab: LabHandle, api: VmshiftClient, vm: dict[str, Any]
) -> None:
    """The source cannot reach the target agent once its stream completed: the VM waits paused on
    both hosts, a critical event names the finalize command, and finalize finishes the move (the
    server reaches the target over its own management path)."""
    src = api.get_vm(VM)["host"]
    dst = other(src)
    lay = layout(lab)
    dst_ip = lay.host_mgmt_address(processes.host_number(dst))
    src_ns = lay.host_ns(processes.host_number(src))
    before = guest_check(lab, VM)
    mid = start_migration(lab, VM, dst)
    route = ["ip", "-n", src_ns, "route", "add", "blackhole", f"{dst_ip}/32"]
    try:
        try:
            freeze_source_until_stream_completed(lab, api, mid, src, dst)
            subprocess.run(route, check=True)
        finally:
            signal_agent(lab, src, signal.SIGCONT)
        end = wait_end(api, mid, timeout=120)
        assert end["status"] == "needs_finalize", (end["status"], end["error"])
        assert f"vmshift migration finalize {mid}" in (end["error"]["hint"] or ""), end["error"]
        events = api.list_events(limit=50, target=VM)
        critical = [e for e in events if e["severity"] == "critical" and "finalize" in e["message"]]
        assert critical and f"vmshift migration finalize {mid}" in critical[0]["message"], events
        assert qemu_hosts(lab, vm["uuid"]) == sorted([src, dst]), "both copies wait, paused"
        for host in (src, dst):
            with agent(lab, host) as c:
                listed = {v["name"]: v for v in c.get("/vms").json()}
                assert listed[VM]["qemu_status"] in ("postmigrate", "paused"), listed[VM]
        with agent(lab, dst) as c:  # the target holds the whole VM: it refuses to discard it
            refused = c.delete(f"/migrations/{mid}")
            assert refused.status_code == 409 and refused.json()["error"]["code"] == "stream_completed"
        refused_resume = vmshift(lab, "vm", "resume", VM, check=False)
        said = " ".join((refused_resume.stdout + refused_resume.stderr).split())  # rich wraps lines
        assert refused_resume.returncode != 0 and "could run it twice" in said, said
        done = vmshift_json(lab, "migration", "finalize", str(mid), timeout=180)
        assert done["status"] == "completed", done
    finally:
        subprocess.run(["ip", "-n", src_ns, "route", "del", "blackhole", f"{dst_ip}/32"], check=False)
    verify_guest(lab, api, VM, dst, before)


def test_source_qemu_killed_in_precopy_is_reported_lost(
    lab: LabHandle, api: VmshiftClient, vm: dict[str, Any]
) -> None:
    """Neither host has the whole VM: the migration says `lost` (from the target's proof), the
    serial log stays, no QEMU runs; the VM starts again from its disks. (Runs last: it stops the VM.)"""
    src = api.get_vm(VM)["host"]
    dst = other(src)
    mid = start_migration(lab, VM, dst)
    wait_migration_phase(api, mid, {"precopy"})
    source_qemu = [p for p in qemu_pids(vm["uuid"]) if host_of_pid(lab, p) == src]
    os.kill(source_qemu[0], signal.SIGKILL)
    end = wait_end(api, mid)
    assert end["status"] == "lost", (end["status"], end["error"])
    assert "serial log is kept" in end["error"]["message"], end["error"]
    serial = lab.root / "datastores" / "shared-1"
    assert any(serial.rglob("serial.log")), "the serial log is kept"
    assert qemu_pids(vm["uuid"]) == []
    events = api.list_events(limit=50, target=VM)
    assert any(e["severity"] == "critical" and "lost" in e["message"] for e in events), events
    info = api.get_vm(VM)
    assert info["host"] == src and info["power_state"] == "poweredOff", info
    vmshift(lab, "vm", "start", VM)
    after = guest_check(lab, VM)
    assert after["echo"] is True
