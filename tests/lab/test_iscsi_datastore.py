"""A lab guest on the iSCSI datastore iscsi-1 (the session's 3-host lab with --iscsi, one VM for
every check): it boots from its LUN, live-migrates host-1 -> host-2 and back with its disk log
intact, a second host may not attach its LUN read-write, a 5 s freeze of tgtd only stalls its
writes, a tgtd gone for good is reported while QEMU keeps answering, Storage vMotion takes its
disk off the LUN to a directory datastore and back, and deleting the VM removes its LUN.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab.helpers import LabHandle, guest_check, vmshift, vmshift_json, wait_for
from tests.lab.vmotion import verify_guest
from vmshift.client import VmshiftClient
from vmshift.lab import processes, storage
from vmshift.lab.lab import run_probe
from vmshift.lab.layout import LabRecord, load_record
from vmshift.lab.probe import verify_ok

pytestmark = pytest.mark.lab
VM = "isc-1"


def record(lab: LabHandle) -> LabRecord:
    rec = load_record(lab.name)
    assert rec is not None and rec.iscsi
    return rec


def agent_runtime(lab: LabHandle, host: int) -> dict[str, Any]:
    with processes.agent_http(record(lab).layout, host, timeout=10) as http:
        r = http.get(f"/vms/{VM}")
        assert r.status_code == 200, r.text
        runtime: dict[str, Any] = r.json()
        return runtime


def durable(lab: LabHandle) -> int:
    return int(guest_check(lab, VM)["disklog"]["durable_seq"])


def writing_past(lab: LabHandle, seq: int) -> dict[str, Any]:
    """The guest's check once its disk log made records past ``seq`` durable."""
    return wait_for(f"the guest's disk log past record {seq}",
                    lambda: c if (c := guest_check(lab, VM))["disklog"]["durable_seq"] > seq else None,
                    timeout=60)


def verify_disk_log(lab: LabHandle, ip: str, at_least: int) -> None:
    """The guest reads its whole disk log back: every record it made durable is there."""
    answer = run_probe(record(lab), ["verify", ip], timeout=150)
    assert verify_ok(answer), answer
    assert answer["disklog"]["to_seq"] >= at_least, answer


@pytest.fixture(scope="module")
def vm(lab3: LabHandle) -> Iterator[dict[str, Any]]:
    created = dict(vmshift_json(
        lab3, "vm", "create", VM, "--host", "host-1", "--cpus", "1", "--memory", "192",
        "--datastore", "iscsi-1", "--network", "VM Network", "--disk", "64M", "--image", "lab-guest",
        "--kernel-args", "vmshift.memtest=16M,4 vmshift.disklog=1", "--start",
    ))
    yield created
    vmshift(lab3, "vm", "stop", VM, check=False)
    vmshift(lab3, "vm", "delete", VM, check=False)


@pytest.mark.timeout(300)
def test_vmotion_on_iscsi_keeps_every_durable_record(
    lab3: LabHandle, api3: VmshiftClient, vm: dict[str, Any]
) -> None:
    lab = lab3
    runtime = agent_runtime(lab, 1)
    assert runtime["power_state"] == "poweredOn" and runtime["io_error"] is None
    qemu_log = (record(lab).layout.agent_state_dir(1) / "vms" / VM / "qemu.log").read_text()
    assert '"driver":"iscsi"' in qemu_log and '"timeout":10' in qemu_log, "the disk is not opened over iSCSI"
    assert storage.target_luns(record(lab)) == {1}
    for target in ("host-2", "host-1"):
        before = guest_check(lab, VM)
        # plain: encrypted migration is tested elsewhere and is not what this checks
        m = vmshift_json(lab, "vm", "migrate", VM, "--host", target, "--encryption", "disabled")
        assert m["status"] == "completed", m
        # shared storage: a plain live migration, the disk stays on its LUN and nothing of it is copied
        assert m["kind"] == "live" and m["target_datastore"] is None, m
        after = verify_guest(lab, api3, VM, target, before)
    # the log is one sequence: reading it all back once proves the records of both legs
    verify_disk_log(lab, vm["ip"], after["disklog"]["durable_seq"])


@pytest.mark.timeout(120)
def test_a_second_host_may_not_attach_the_lun(lab3: LabHandle, vm: dict[str, Any]) -> None:
    lab = lab3
    rec = record(lab)
    owner = str(vmshift_json(lab, "vm", "show", VM)["host"])
    other = 2 if owner == "host-1" else 1
    spec = json.loads((rec.layout.iscsi_datastore(int(owner[-1])) / VM / "vm.json").read_text())
    with processes.agent_http(rec.layout, other, timeout=30) as http:
        assert http.put(f"/vms/{VM}", json=spec).status_code == 200
        r = http.post(f"/vms/{VM}/power", json={"action": "start"})
        assert r.status_code == 409, r.text
        message = r.json()["error"]["message"]
        assert f"attached read-write on {owner}" in message and "outside a migration" in message, message
        # the stale definition goes; the LUN stays with the host that runs the VM
        assert http.delete(f"/vms/{VM}").status_code in (200, 204)
    assert storage.target_luns(rec) == {1}
    writing_past(lab, durable(lab) + 20)


@pytest.mark.timeout(180)
def test_target_frozen_then_gone(lab3: LabHandle, vm: dict[str, Any]) -> None:
    lab = lab3
    rec = record(lab)
    host = int(str(vmshift_json(lab, "vm", "show", VM)["host"])[-1])
    # Frozen for 5 s: the guest's writes wait, then go on; nothing durable is lost.
    before = durable(lab)
    storage.signal_tgtd(rec, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        wait_for("a guest write stalled on the frozen target",
                 lambda: guest_check(lab, VM)["disklog"]["latency"]["inflight_ms"] > 1000, timeout=20)
        time.sleep(max(0.0, 5.0 - (time.monotonic() - frozen_at)))  # the fault lasts 5 s
    finally:
        storage.signal_tgtd(rec, signal.SIGCONT)
    resumed = writing_past(lab, before + 20)
    # the write in flight at the freeze waited for it (max since boot: the 10 s window may be past)
    assert resumed["disklog"]["errors"] == 0 and resumed["disklog"]["latency"]["max_boot_ms"] >= 4000, resumed

    # Gone for good: the agent reports the VM's storage lost, QEMU keeps answering QMP.
    storage.signal_tgtd(rec, signal.SIGKILL)
    lost = wait_for("the agent to report the lost target",
                    lambda: r if (r := agent_runtime(lab, host))["io_error"] else None, timeout=40)
    assert "stopped answering" in lost["io_error"] and rec.layout.iscsi_portal in lost["io_error"], lost
    assert lost["qemu_status"] == "running", lost  # QMP answered: QEMU is not hung

    # The target back (tgtd and its LUNs): the waiting writes complete, nothing durable lost.
    at_loss = durable(lab)
    storage.restart(rec)
    wait_for("the report to clear", lambda: agent_runtime(lab, host)["io_error"] is None, timeout=30)
    back = writing_past(lab, at_loss + 20)
    assert back["disklog"]["errors"] == 0, back
    # every record made durable before, during and after both faults reads back
    verify_disk_log(lab, vm["ip"], back["disklog"]["durable_seq"])


@pytest.mark.timeout(300)
def test_storage_vmotion_between_the_lun_and_a_directory(
    lab3: LabHandle, api3: VmshiftClient, vm: dict[str, Any]
) -> None:
    """`vm migrate --datastore`, the VM running: iscsi-1 -> the host's directory datastore (its LUN
    removed once the VM runs on the file) -> iscsi-1 (a new LUN), the guest verified after each."""
    lab = lab3
    rec = record(lab)
    owner = str(vmshift_json(lab, "vm", "show", VM)["host"])
    local = f"local-{owner}"
    for target in (local, "iscsi-1"):
        before = guest_check(lab, VM)
        m = vmshift_json(lab, "vm", "migrate", VM, "--datastore", target)
        assert m["status"] == "completed" and m["kind"] == "storage", m
        after = verify_guest(lab, api3, VM, owner, before)
        shown = vmshift_json(lab, "vm", "show", VM)
        assert shown["datastore"] == target and shown["host"] == owner, shown
        assert {d["datastore"] for d in shown["disks"]} == {target}, shown
        runtime = agent_runtime(lab, int(owner[-1]))
        assert runtime["power_state"] == "poweredOn" and runtime["io_error"] is None, runtime
        if target == local:
            assert storage.target_luns(rec) == set(), "the LUN the VM left is still on the target"
            assert not any((rec.layout.storage_dir / "luns").iterdir()), "the LUN's backing file is left"
        else:
            assert len(storage.target_luns(rec)) == 1, storage.target_luns(rec)
    verify_disk_log(lab, vm["ip"], after["disklog"]["durable_seq"])


@pytest.mark.timeout(120)
def test_deleting_the_vm_removes_its_lun(lab3: LabHandle, vm: dict[str, Any]) -> None:
    lab = lab3
    rec = record(lab)
    assert len(storage.target_luns(rec)) == 1
    vmshift(lab, "vm", "stop", VM)
    vmshift(lab, "vm", "delete", VM)
    assert storage.target_luns(rec) == set()
    assert not any((rec.layout.storage_dir / "luns").iterdir()), "the LUN's backing file is left"


@pytest.mark.timeout(120)
def test_datastore_add_registers_the_existing_target_and_refuses_a_dead_portal(lab3: LabHandle) -> None:
    """`datastore add --iscsi`: the lab's target (with its storage role) registered a second time, as
    an operator registers one they run; a portal nobody listens on is refused and nothing is left;
    `datastore remove` takes it back."""
    lay = record(lab3).layout
    args = ["--target", storage.target_iqn(lay), "--storage-role", storage.role_url(lay),
            "--token-file", str(storage.token_file(lay))]
    dead = f"{lay.storage_net}.99:3260"  # in the lab's storage network, where nothing has that address
    refused = vmshift(lab3, "datastore", "add", "iscsi-9", "--iscsi", dead, *args, check=False)
    said = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode != 0, said
    assert f"The iSCSI portal {dead} does not answer from host host-1" in said, said
    folders = [lay.datastores_dir / f"registered-host-{k}" / "iscsi-9" for k in lay.host_numbers]
    assert not any(f.exists() for f in folders), "a refused add left a folder"
    assert "iscsi-9" not in [d["name"] for d in vmshift_json(lab3, "datastore", "list")]

    added = vmshift_json(lab3, "datastore", "add", "iscsi-2", "--iscsi", lay.iscsi_portal, *args)
    assert added["kind"] == "iscsi" and added["hosts"] == ["host-1", "host-2", "host-3"], added
    listed = {d["name"]: d for d in vmshift_json(lab3, "datastore", "list")}
    assert listed["iscsi-2"]["shared"] and listed["iscsi-2"]["capacity_mib"] > 0, listed

    # and taken back: gone from every host and the inventory, the target and its LUNs untouched
    luns = storage.target_luns(record(lab3))
    assert vmshift_json(lab3, "datastore", "remove", "iscsi-2") == {"removed": "iscsi-2"}
    kept = [lay.datastores_dir / f"registered-host-{k}" / "iscsi-2" for k in lay.host_numbers]
    assert not any(f.exists() for f in kept), "a removed datastore left a folder"
    assert "iscsi-2" not in [d["name"] for d in vmshift_json(lab3, "datastore", "list")]
    assert storage.target_luns(record(lab3)) == luns
