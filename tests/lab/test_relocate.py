"""Issue 8, item 3: shared-nothing migration (host and datastore together), the VM running, real QEMU.

One VM for the module, on host-1 with its files on shared-1: memtest, the disk log on its first disk
and a paced disk writer on its second, so the disks hold data to copy while the guest writes. It moves
host-1/shared-1 -> host-2/local-host-2 (a datastore only host-2 sees) and back, under a TCP hold; then
faults mid-copy on a slow migration link (a user cancel, the target QEMU killed) must leave it running
on host-1 on its own disks, with nothing of it left on host-2: no QEMU (which held the NBD exports), no
files.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.lab.helpers import LabHandle, guest_check, qemu_pids, vmshift, vmshift_json, wait_for
from tests.lab.vmotion import host_of_pid, layout, verify_guest, wait_migration_end
from vmshift.client import VmshiftClient
from vmshift.lab import processes
from vmshift.lab.lab import run_probe
from vmshift.lab.layout import LabLayout, load_record
from vmshift.lab.probe import tcp_hold_process, verify_ok
from vmshift.lab.topology import set_migration_link, set_migration_link_rate

pytestmark = pytest.mark.lab
VM = "rl-1"
SLOW_LINK = "40mbit"  # the disks' copy lasts tens of seconds: long enough to inject a fault into it
HOME = {"host-1": "shared-1", "host-2": "local-host-2"}


def folder(lay: LabLayout, ds: str) -> Path:
    return lay.datastores_dir / ds / VM


def open_disks(uuid: str) -> list[str]:
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


def qemu_log(lab: LabHandle, host: int = 1) -> str:
    path = layout(lab).agent_state_dir(host) / "vms" / VM / "qemu.log"
    return path.read_text()[-3000:] if path.exists() else f"({path} is gone)"


def rings_intact(lab: LabHandle, ip: str) -> dict[str, Any]:
    """The guest re-reads its disk log and disk writer rings: every durable record intact."""
    rec = load_record(lab.name)
    assert rec is not None
    answer = run_probe(rec, ["verify", ip], timeout=150)
    assert verify_ok(answer), answer
    return answer


def writing(lab: LabHandle, after_seq: int = 0) -> dict[str, Any]:
    return wait_for("the disk writer to make chunks durable",
                    lambda: c if ((c := guest_check(lab, VM))["diskwrite"] or {}).get("durable_seq", 0)
                    > after_seq + 16 else None, timeout=120)


def assert_home(lab: LabHandle, api: VmshiftClient, uuid: str, host: str) -> None:
    """The inventory, the running QEMU and the datastores agree: the VM and all its files are at host's
    datastore, and no other datastore keeps a folder of it."""
    lay, ds = layout(lab), HOME[host]
    shown = api.get_vm(VM)
    assert shown["host"] == host and shown["datastore"] == ds, shown
    assert all(d["datastore"] == ds for d in shown["disks"]), shown
    assert open_disks(uuid) == sorted(str(folder(lay, ds) / d["file"]) for d in shown["disks"])
    for other in ("shared-1", "local-host-1", "local-host-2"):
        if other != ds:
            assert not folder(lay, other).exists(), f"{folder(lay, other)} left behind"


@pytest.fixture(scope="module")
def rvm(lab: LabHandle) -> Iterator[dict[str, Any]]:
    vm = dict(vmshift_json(
        lab, "vm", "create", VM, "--host", "host-1", "--cpus", "1", "--memory", "192",
        "--datastore", "shared-1", "--network", "VM Network", "--disk", "64M", "--disk", "128M",
        "--image", "lab-guest", "--start",
        "--kernel-args", "vmshift.memtest=32,20 vmshift.disklog=1 vmshift.diskwrite=4",
    ))
    writing(lab)
    yield vm
    vmshift(lab, "vm", "stop", VM, check=False)
    vmshift(lab, "vm", "delete", VM, check=False)


def relocate(lab: LabHandle, host: str, *extra: str) -> dict[str, Any]:
    return dict(vmshift_json(lab, "vm", "migrate", VM, "--host", host, "--datastore", HOME[host], *extra,
                             timeout=600))


def test_relocate_there_and_back_keeps_memory_disks_and_connection(
        lab: LabHandle, api: VmshiftClient, rvm: dict[str, Any]) -> None:
    lay = layout(lab)
    uuid = rvm["uuid"]
    assert_home(lab, api, uuid, "host-1")
    hold = tcp_hold_process(lay.client_ns, rvm["ip"])
    try:
        wait_for("the TCP hold to connect", lambda: guest_check(lab, VM)["echo"], timeout=30)
        for host, source in (("host-2", "host-1"), ("host-1", "host-2")):
            before = writing(lab)
            m = relocate(lab, host)
            assert m["status"] == "completed", m.get("error")
            assert m["kind"] == "relocate" and (m["source_host"], m["target_host"]) == (source, host)
            assert (m["source_datastore"], m["target_datastore"]) == (HOME[source], HOME[host])
            assert 0 <= m["downtime_ms"] <= 1000, m
            print(f"\n{source}/{HOME[source]} -> {host}/{HOME[host]}: {m['total_ms']} ms total, "
                  f"{m['downtime_ms']} ms downtime")
            after = verify_guest(lab, api, VM, host, before)
            assert after["memtest"]["mismatches"] == 0
            assert after["diskwrite"]["errors"] == 0 and after["diskwrite"]["first_seq"] == before[
                "diskwrite"]["first_seq"], "the guest rebooted or its writes failed"
            assert_home(lab, api, uuid, host)
            listening = [c.laddr for c in psutil.Process(qemu_pids(uuid)[0]).net_connections(kind="tcp")
                         if c.status == psutil.CONN_LISTEN]
            assert listening == [], f"the running VM's QEMU still listens (NBD exports?): {listening}"
            rings_intact(lab, rvm["ip"])
            shown = vmshift_json(lab, "vm", "show", VM)
            assert shown["host"] == host and shown["datastore"] == HOME[host], shown
    finally:
        report = hold.stop()
    assert report["survived"], f"the TCP connection broke: {report}"


@pytest.fixture()
def slow_link(lab: LabHandle) -> Iterator[None]:
    lay = layout(lab)
    for k in lay.host_numbers:
        set_migration_link_rate(lay, k, SLOW_LINK)
    try:
        yield
    finally:
        for k in lay.host_numbers:
            set_migration_link(lay, k, True)
            set_migration_link_rate(lay, k, None)
            processes.ensure_agent(lab.name, k)


def start_mid_copy(lab: LabHandle, api: VmshiftClient) -> dict[str, Any]:
    """Start host-1/shared-1 -> host-2/local-host-2 and wait until the disks' copy is under way."""
    assert api.get_vm(VM)["host"] == "host-1"
    out = vmshift_json(lab, "vm", "migrate", VM, "--host", "host-2", "--datastore", "local-host-2",
                       "--no-wait")
    mid = int(out.get("migration_id") or out["id"])

    def copying() -> dict[str, Any] | None:
        m = api.get_migration(mid)
        assert m["status"] not in ("failed", "cancelled", "completed"), f"migration ended early: {m}"
        done = (m.get("progress") or {}).get("transferred_bytes", 0)
        total = (m.get("progress") or {}).get("total_bytes", 0)
        return m if m["phase"] == "copy" and 0 < done < total else None

    return wait_for(f"migration {mid} to copy disks", copying, timeout=120, interval=0.2)


def assert_rolled_back(lab: LabHandle, api: VmshiftClient, rvm: dict[str, Any], end: dict[str, Any],
                       before: dict[str, Any], status: str) -> None:
    assert end["status"] == status, end
    assert end["error"] and end["error"]["message"], "a rolled-back migration says why"
    pids = qemu_pids(rvm["uuid"])
    assert len(pids) == 1 and host_of_pid(lab, pids[0]) == "host-1", (
        f"expected one QEMU of the VM, on host-1: {pids}; the migration ended {end['error']}; "
        f"host-1's agent log ends:\n{layout(lab).log_file('host-1').read_text()[-3000:]}\n"
        f"its QEMU log ends:\n{qemu_log(lab)}")
    assert not folder(layout(lab), "local-host-2").exists(), "the target's files are left behind"
    after = verify_guest(lab, api, VM, "host-1", before)
    assert after["diskwrite"]["errors"] == 0 and after["diskwrite"]["first_seq"] == before[
        "diskwrite"]["first_seq"], "the guest rebooted or its writes failed"
    assert_home(lab, api, rvm["uuid"], "host-1")
    rings_intact(lab, rvm["ip"])


def test_cancel_mid_copy_keeps_the_vm_on_its_host_and_disks(
        lab: LabHandle, api: VmshiftClient, rvm: dict[str, Any], slow_link: None) -> None:
    before = writing(lab)
    m = start_mid_copy(lab, api)
    vmshift(lab, "task", "cancel", str(m["task_id"]))
    end = wait_migration_end(api, m["id"], timeout=120)
    assert_rolled_back(lab, api, rvm, end, before, "cancelled")


def test_target_qemu_killed_mid_copy_keeps_the_vm_on_its_host_and_disks(
        lab: LabHandle, api: VmshiftClient, rvm: dict[str, Any], slow_link: None) -> None:
    before = writing(lab)
    m = start_mid_copy(lab, api)
    target = [p for p in qemu_pids(rvm["uuid"]) if host_of_pid(lab, p) == "host-2"]
    assert len(target) == 1, target
    os.kill(target[0], signal.SIGKILL)
    end = wait_migration_end(api, m["id"], timeout=120)
    assert_rolled_back(lab, api, rvm, end, before, "failed")
    assert "mirror" in end["error"]["message"] or "target" in end["error"]["message"], end["error"]


def test_migration_link_cut_mid_copy_keeps_the_vm_on_its_host_and_disks(
        lab: LabHandle, api: VmshiftClient, rvm: dict[str, Any], slow_link: None) -> None:
    """The NBD requests hang on the cut link: the copy's stall detector ends it, the rollback cancels
    the mirrors and aborts the stuck NBD connections; the guest never noticed (background mirrors)."""
    lay = layout(lab)
    before = writing(lab)
    m = start_mid_copy(lab, api)
    set_migration_link(lay, 2, False)
    end = wait_migration_end(api, m["id"], timeout=180)
    set_migration_link(lay, 2, True)
    print("\n" + "\n".join(line for line in lay.log_file("host-1").read_text().splitlines()[-200:]
                            if "relocate_mirrors" in line or "rolling back" in line))
    assert_rolled_back(lab, api, rvm, end, before, "failed")


def test_target_agent_restarted_mid_copy_is_consistent(
        lab: LabHandle, api: VmshiftClient, rvm: dict[str, Any], slow_link: None) -> None:
    """The receiving QEMU outlives its agent and keeps exporting: the move may finish or roll back,
    but the VM runs on exactly one host from the files the inventory names."""
    before = writing(lab)
    m = start_mid_copy(lab, api)
    processes.kill_agent(lab.name, "host-2", signal.SIGKILL)
    processes.start_agent(lab.name, "host-2")
    lay = layout(lab)
    for k in lay.host_numbers:  # the rest of the copy at full speed: the paced writer never outruns it
        set_migration_link_rate(lay, k, None)
    end = wait_migration_end(api, m["id"], timeout=300)
    assert end["status"] in ("completed", "failed"), end
    host = api.get_vm(VM)["host"]
    verify_guest(lab, api, VM, host, before)
    assert_home(lab, api, rvm["uuid"], host)
    rings_intact(lab, rvm["ip"])
    if host == "host-2":  # back home for the module's other tests
        m = relocate(lab, "host-1")
        assert m["status"] == "completed", m.get("error")


def in_agent_ns(lab: LabHandle, host: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run argv in the mount namespace of host's agent (and of the QEMUs it starts): ``ip netns exec``
    gave it its own, and the root mount is private, so a mount made outside would not reach it."""
    rec = load_record(lab.name)
    assert rec is not None
    pid = rec.pids[f"host-{host}"]
    return subprocess.run(["nsenter", "-t", str(pid), "-m", "--", *argv], capture_output=True, text=True,
                          check=True, timeout=60)


@pytest.fixture()
def small_local_2(lab: LabHandle) -> Iterator[Path]:
    """local-host-2 on a 300 MiB tmpfs (its marker and images copied in), seen by host-2's agent only."""
    ds = layout(lab).datastores_dir / "local-host-2"
    saved = Path(tempfile.mkdtemp(prefix="rl-ds-"))
    shutil.copytree(ds, saved / "ds", symlinks=True)
    in_agent_ns(lab, 2, "mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(ds))
    try:
        in_agent_ns(lab, 2, "cp", "-a", f"{saved}/ds/.", str(ds))

        def on_tmpfs() -> bool:  # the agent rescans every 5 s: one scan may have found the copy half made
            listed = {d["name"]: d for d in vmshift_json(lab, "datastore", "list")}
            seen = listed.get("local-host-2") or {}
            return "host-2" in seen.get("hosts", []) and 0 < seen.get("capacity_mib", 0) <= 300

        wait_for("host-2 to report local-host-2 on its 300 MiB tmpfs", on_tmpfs, timeout=30)
        yield ds
    finally:
        in_agent_ns(lab, 2, "umount", "-l", str(ds))
        shutil.rmtree(saved, ignore_errors=True)


def test_target_datastore_full_mid_copy_keeps_the_vm_on_its_host_and_disks(
        lab: LabHandle, api: VmshiftClient, rvm: dict[str, Any], slow_link: None,
        small_local_2: Path) -> None:
    before = writing(lab)
    m = start_mid_copy(lab, api)
    free = int(in_agent_ns(lab, 2, "df", "-B1", "--output=avail", str(small_local_2)).stdout.split()[-1])
    in_agent_ns(lab, 2, "fallocate", "-l", str(max(0, free - (2 << 20))), str(small_local_2 / "filler"))
    end = wait_migration_end(api, m["id"], timeout=180)
    assert_rolled_back(lab, api, rvm, end, before, "failed")
    assert "space" in end["error"]["message"].lower(), end["error"]
    left = in_agent_ns(lab, 2, "ls", "-A", str(small_local_2)).stdout.split()
    assert VM not in left, f"the target's files are left behind on the full datastore: {left}"
