"""Issue 6, "reconcile finds every VM", with real QEMU: a second QEMU of a VM started behind the
server's back is paused within two heartbeats; a killed QEMU is reported as died, and a VM its host
forgot as missing; vm delete is refused while any host runs a QEMU of the VM, and removes nothing.

One small VM (1 vCPU, 128 MiB, no NIC, one 16 MiB disk on shared-1) on host-1 serves every check;
each test brings it to the state it needs, and the module fixture deletes it at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.lab.helpers import LabHandle, qemu_pids, vmshift, vmshift_json, wait_for
from tests.lab.vmotion import host_of_pid, layout
from vmshift.client import VmshiftClient
from vmshift.lab import processes
from vmshift.server.settings import ServerSettings

pytestmark = pytest.mark.lab
VM = "recon"
COPY_DATASTORE = "local-host-2"
HEARTBEAT_S = next(f.default for f in dataclasses.fields(ServerSettings) if f.name == "heartbeat_interval_s")


def agent(lab: LabHandle, k: int) -> httpx.Client:
    """The host's agent API, as the server reaches it (its certificate)."""
    return processes.agent_http(layout(lab), k)


def runtime(lab: LabHandle, k: int) -> dict[str, Any] | None:
    with agent(lab, k) as a:
        r = a.get(f"/vms/{VM}")
    return dict(r.json()) if r.status_code == 200 else None


def events(api: VmshiftClient, kind: str) -> list[dict[str, Any]]:
    return [e for e in api.list_events(limit=500, target=VM) if e["kind"] == kind]


def shared_folder(lab: LabHandle) -> Path:
    return layout(lab).shared_datastore / VM


def ensure_running_on_host1(lab: LabHandle, api: VmshiftClient) -> None:
    if api.get_vm(VM)["power_state"] != "poweredOn":
        vmshift(lab, "vm", "start", VM)
    assert (runtime(lab, 1) or {}).get("qemu_status") == "running"


def start_copy_on_host2(lab: LabHandle) -> None:
    """Start a genuine second QEMU of the VM on host-2, as someone working behind the server's back.

    It has the VM's name, uuid, vCPUs, memory, CPU model, machine type and kernel, so every host
    report says it is the same VM. Two things differ, and must: its disk is a fresh one of the same
    size on host-2's local datastore, because QEMU's image locking refuses a second writer on the
    shared disk (the lock is exactly what keeps a real duplicate from corrupting it), and it has no
    NIC, because a second guest with the VM's MAC would steal the VM's switch port. Its home being
    host-2's local datastore also means deleting it there can never touch the VM's shared folder.
    """
    spec = json.loads((shared_folder(lab) / "vm.json").read_text())
    spec["datastore"] = COPY_DATASTORE
    spec["disks"] = [d | {"datastore": COPY_DATASTORE} for d in spec["disks"]]
    spec["nics"] = []
    with agent(lab, 2) as a:
        r = a.put(f"/vms/{VM}", json=spec)
        assert r.status_code == 200, r.text
        r = a.post(f"/vms/{VM}/power", json={"action": "start"})
        assert r.status_code == 200, r.text
        assert r.json()["qemu_status"] == "running", r.json()


def remove_copy_on_host2(lab: LabHandle) -> None:
    with agent(lab, 2) as a:
        if a.get(f"/vms/{VM}").status_code != 200:
            return
        r = a.post(f"/vms/{VM}/power", json={"action": "stop"})
        assert r.status_code == 200, r.text
        r = a.delete(f"/vms/{VM}")
        assert r.status_code == 200, r.text
    assert (shared_folder(lab) / "vm.json").is_file(), "removing the copy must not touch the VM's files"


def aside(lab: LabHandle) -> Path:
    """Where the test hides host-1's registration of the VM (outside the agent's vms/ folder)."""
    return layout(lab).agent_state_dir(1) / f"aside-{VM}"


def qemu_on(lab: LabHandle, uuid: str, host: str) -> int:
    pids = [p for p in qemu_pids(uuid) if host_of_pid(lab, p) == host]
    assert len(pids) == 1, f"expected one QEMU of {VM} on {host}, found {pids}"
    return pids[0]


@pytest.fixture(scope="module")
def recon(lab: LabHandle, api: VmshiftClient) -> Iterator[dict[str, Any]]:
    vm = dict(vmshift_json(
        lab, "vm", "create", VM, "--host", "host-1", "--cpus", "1", "--memory", "128",
        "--datastore", "shared-1", "--disk", "16M", "--image", "lab-guest", "--start",
    ))  # fmt: skip
    moved_aside = aside(lab)
    try:
        yield vm
    finally:
        processes.ensure_agent(lab.name, 1)
        processes.ensure_agent(lab.name, 2)
        remove_copy_on_host2(lab)
        if moved_aside.exists():
            shutil.rmtree(moved_aside)
        vmshift(lab, "vm", "stop", VM, check=False)
        vmshift(lab, "vm", "delete", VM, check=False)
        wait_for(f"{VM} to leave the inventory", lambda: VM not in [v["name"] for v in api.list_vms()],
                 timeout=60)  # fmt: skip


def test_second_qemu_is_found_within_two_heartbeats_and_paused(
    lab: LabHandle, api: VmshiftClient, recon: dict[str, Any]
) -> None:
    ensure_running_on_host1(lab, api)
    start_copy_on_host2(lab)
    started = datetime.now(UTC)
    beats: set[datetime] = set()

    def reported() -> dict[str, Any] | None:
        beat = api.get_host("host-2")["last_heartbeat"]
        if beat and (at := datetime.fromisoformat(beat)) > started:
            beats.add(at)
        found = events(api, "vm.duplicate")
        return found[0] if found else None

    dup = wait_for("a vm.duplicate event", reported, timeout=60, interval=0.2)
    seen = sorted(b for b in beats if b <= datetime.fromisoformat(dup["time"]))
    assert len(seen) <= 2, f"found after {len(seen)} heartbeats of host-2 ({HEARTBEAT_S:g} s apart)"
    assert dup["severity"] == "critical" and "paused the copy on host-2" in dup["message"], dup

    # the copy the inventory does not name is paused; the VM itself still runs where it did
    copy = runtime(lab, 2)
    assert copy is not None and copy["power_state"] == "paused" and copy["qemu_status"] == "paused", copy
    assert (runtime(lab, 1) or {}).get("qemu_status") == "running"
    info = api.get_vm(VM)
    assert info["host"] == "host-1" and info["power_state"] == "poweredOn"
    assert qemu_on(lab, recon["uuid"], "host-2") and qemu_on(lab, recon["uuid"], "host-1")


def test_delete_is_refused_while_a_host_runs_a_qemu_and_removes_nothing(
    lab: LabHandle, api: VmshiftClient, recon: dict[str, Any]
) -> None:
    ensure_running_on_host1(lab, api)
    if runtime(lab, 2) is None:
        start_copy_on_host2(lab)
    wait_for("the copy on host-2 to be paused",
             lambda: (runtime(lab, 2) or {}).get("qemu_status") == "paused", timeout=60)  # fmt: skip
    files = sorted(p.name for p in shared_folder(lab).iterdir())
    assert "vm.json" in files and "disk0.qcow2" in files

    refused = vmshift(lab, "vm", "delete", VM, check=False)
    assert refused.returncode != 0 and "cannot be deleted while running" in refused.stderr, refused

    # the inventory's copy is off now, but host-2 still runs a QEMU of the VM
    vmshift(lab, "vm", "stop", VM)
    assert api.get_vm(VM)["power_state"] == "poweredOff" and (runtime(lab, 1) or {}).get("pid") is None
    refused = vmshift(lab, "vm", "delete", VM, check=False)
    assert refused.returncode != 0, refused
    assert "cannot be deleted: host host-2 runs a QEMU of it" in refused.stderr, refused.stderr

    # nothing was removed or changed: inventory, host registration, files, the copy
    assert api.get_vm(VM)["host"] == "host-1"
    assert runtime(lab, 1) is not None, "host-1 still has the VM registered"
    assert sorted(p.name for p in shared_folder(lab).iterdir()) == files
    assert (runtime(lab, 2) or {}).get("qemu_status") == "paused"
    assert not [t for t in api.list_tasks(limit=200) if t["kind"] == "vm.delete" and t["target"] == VM]
    remove_copy_on_host2(lab)


def test_killed_qemu_is_reported_died_and_a_forgotten_vm_missing(
    lab: LabHandle, api: VmshiftClient, recon: dict[str, Any]
) -> None:
    """SIGKILL leaves the host knowing the VM: its agent reports the QEMU died, so the finding is
    vm.died (warning, poweredOff), not missing. Missing is a VM no host can account for: here the
    host loses the VM's registration while its agent is down (a wiped state directory)."""
    remove_copy_on_host2(lab)
    ensure_running_on_host1(lab, api)
    died_before = len(events(api, "vm.died"))
    os.kill(qemu_on(lab, recon["uuid"], "host-1"), signal.SIGKILL)

    def new_death() -> list[dict[str, Any]] | None:
        found = events(api, "vm.died")
        return found if len(found) > died_before else None

    died = wait_for("a vm.died event", new_death, timeout=60)
    assert died[0]["severity"] == "warning" and "stopped unexpectedly" in died[0]["message"], died[0]
    shown = vmshift_json(lab, "vm", "show", VM)
    assert shown["power_state"] == "poweredOff" and shown["host"] == "host-1"
    assert events(api, "vm.missing") == [], "a QEMU its host saw die is not missing"

    # the host forgets the VM: agent down, QEMU killed, registration gone, agent back
    vmshift(lab, "vm", "start", VM)
    state = layout(lab).agent_state_dir(1) / "vms"
    processes.kill_agent(lab.name, 1, signal.SIGKILL)
    os.kill(qemu_on(lab, recon["uuid"], "host-1"), signal.SIGKILL)
    wait_for("the QEMU to exit", lambda: not qemu_pids(recon["uuid"]), timeout=30)
    (state / VM).rename(aside(lab))
    processes.start_agent(lab.name, 1)
    (missing,) = wait_for("a vm.missing event", lambda: events(api, "vm.missing"), timeout=60)
    assert missing["severity"] == "critical" and "host-1 runs no QEMU for it" in missing["message"]
    assert vmshift_json(lab, "vm", "show", VM)["power_state"] == "missing"

    # its registration comes back: the host reports the VM (its QEMU died) and the mark clears
    processes.kill_agent(lab.name, 1, signal.SIGKILL)
    aside(lab).rename(state / VM)
    processes.start_agent(lab.name, 1)
    (found,) = wait_for("the missing mark to clear", lambda: [
        e for e in events(api, "vm.finding_cleared") if "no longer missing" in e["message"]], timeout=60)
    assert found["severity"] == "info" and "poweredOff" in found["message"], found
    assert vmshift_json(lab, "vm", "show", VM)["power_state"] == "poweredOff"
    assert len(events(api, "vm.missing")) == 1
