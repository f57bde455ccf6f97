"""Issue 2, end to end: VMs boot on lab hosts, survive agent and server restarts, bad input is refused."""

from __future__ import annotations

import signal
from typing import Any

import httpx
import psutil
import pytest

from tests.lab.helpers import LabHandle, guest_check, qemu_pids, vmshift, vmshift_json, wait_for
from vmshift.client import VmshiftClient

pytestmark = pytest.mark.lab

GUEST_ARGS = "vmshift.memtest=32,20 vmshift.disklog=1"


def create_vm(lab: LabHandle, name: str, host: str, *extra: str) -> dict[str, Any]:
    return dict(vmshift_json(
        lab, "vm", "create", name, "--host", host, "--cpus", "1", "--memory", "192",
        "--datastore", "shared-1", "--network", "VM Network", "--disk", "64M", "--image", "lab-guest",
        "--kernel-args", GUEST_ARGS, "--start", *extra,
    ))


@pytest.fixture(scope="module")
def web(lab: LabHandle) -> dict[str, Any]:
    """One VM booted on host-1, shared by the tests of this module."""
    vm = create_vm(lab, "web-1", "host-1")
    guest_check(lab, "web-1")
    return vm


def inventory(api: VmshiftClient) -> dict[str, Any]:
    """What a user would compare before and after a restart."""
    vms = {
        v["name"]: (v["uuid"], v["host"], v["datastore"], v["ip"], tuple(n["mac"] for n in v["nics"]),
                    v["cpu_model"], v["machine_type"])
        for v in api.list_vms()
    }
    hosts = {h["name"]: (h["address"], h["cluster"]) for h in api.list_hosts()}
    datastores = {d["name"]: (d["uuid"], tuple(sorted(d["hosts"]))) for d in api.list_datastores()}
    networks = {n["name"]: n.get("ip_pool") for n in api.list_networks()}
    return {"vms": vms, "hosts": hosts, "datastores": datastores, "networks": networks}


def test_vm_boots_and_guest_is_healthy(lab: LabHandle, web: dict[str, Any]) -> None:
    assert web["name"] == "web-1"
    assert web["host"] == "host-1"
    assert web["power_state"] == "poweredOn"
    assert web["datastore"] == "shared-1"
    assert web["ip"], "the lab should assign an IP"
    folder = lab.root / "datastores" / "shared-1" / "web-1"
    assert (folder / "vm.json").is_file() and (folder / "serial.log").is_file()
    assert list(folder.glob("*.qcow2")), "the VM's disk should live in DATASTORE/NAME/"

    first = guest_check(lab, "web-1")
    assert first["echo"] is True
    assert first["memtest"]["mismatches"] == 0
    def progressed() -> dict[str, Any] | None:
        c = guest_check(lab, "web-1")
        grew = (c["memtest"]["pages"] > first["memtest"]["pages"]
                and c["disklog"]["durable_seq"] > first["disklog"]["durable_seq"])
        return c if grew else None

    second = wait_for("memtest and disklog to make progress", progressed, timeout=60)
    assert second["memtest"]["mismatches"] == 0

    shown = vmshift_json(lab, "vm", "show", "web-1")
    for key in ("name", "host", "power_state", "datastore", "ip"):
        assert key in shown


def test_agent_sigkill_and_restart_keeps_vm_running(
    lab: LabHandle, web: dict[str, Any], api: VmshiftClient
) -> None:
    from vmshift.lab import processes

    pids = qemu_pids(web["uuid"])
    assert len(pids) == 1, f"expected one QEMU process for web-1, got {pids}"
    processes.kill_agent(lab.name, "host-1", signal.SIGKILL)
    assert psutil.pid_exists(pids[0]), "the VM must outlive its agent"
    wait_for("server to notice host-1 is gone",
             lambda: api.get_host("host-1")["connection_state"] == "disconnected", timeout=60)
    processes.start_agent(lab.name, "host-1")
    wait_for("host-1 to reconnect", lambda: api.get_host("host-1")["connection_state"] == "connected",
             timeout=60)
    vm = api.get_vm("web-1")
    assert vm["host"] == "host-1" and vm["power_state"] == "poweredOn"
    assert qemu_pids(web["uuid"]) == pids, "the same QEMU process keeps running"
    check = guest_check(lab, "web-1")
    assert check["echo"] and check["memtest"]["mismatches"] == 0


def test_server_restart_loses_nothing(lab: LabHandle, web: dict[str, Any], api: VmshiftClient) -> None:
    from vmshift.lab import processes

    before = inventory(api)
    processes.restart_server(lab.name)
    wait_for("server to answer again", lambda: api.about(), timeout=60)
    assert inventory(api) == before
    wait_for("hosts to be connected after the restart",
             lambda: all(h["connection_state"] == "connected" for h in api.list_hosts()), timeout=60)
    assert api.get_vm("web-1")["power_state"] == "poweredOn"


# --- bad input: each case a clear error, a non-zero exit, nothing changed ------------------------------

def _snapshot(lab: LabHandle, api: VmshiftClient) -> tuple[Any, ...]:
    vms = sorted((v["name"], v["host"], v["power_state"], v["ip"]) for v in api.list_vms())
    folders = sorted(p.name for p in (lab.root / "datastores").glob("*/*") if p.name != "images")
    return vms, folders


BAD_CREATES: list[tuple[str, list[str], str]] = [
    ("duplicate name", ["web-1", "--host", "host-1", "--datastore", "shared-1"], "already"),
    ("unknown host", ["x-1", "--host", "host-9", "--datastore", "shared-1"], "host-9"),
    ("unknown datastore", ["x-2", "--host", "host-1", "--datastore", "nope-1"], "nope-1"),
    ("unknown network", ["x-3", "--host", "host-1", "--datastore", "shared-1", "--network", "Nowhere"],
     "Nowhere"),
    ("datastore not on host", ["x-4", "--host", "host-1", "--datastore", "local-host-2"], "local-host-2"),
    ("memory beyond host", ["x-5", "--host", "host-1", "--datastore", "shared-1", "--memory", "10000000"],
     "memory"),
]


@pytest.mark.parametrize(("case", "args", "needle"), BAD_CREATES, ids=[c[0] for c in BAD_CREATES])
def test_bad_vm_create_is_refused(lab: LabHandle, web: dict[str, Any], api: VmshiftClient,
                                  case: str, args: list[str], needle: str) -> None:
    before = _snapshot(lab, api)
    proc = vmshift(lab, "vm", "create", *args, "--disk", "64M", check=False)
    assert proc.returncode != 0, f"{case}: should fail"
    assert needle.lower() in proc.stderr.lower(), proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(lab, api) == before


def test_delete_running_vm_is_refused(lab: LabHandle, web: dict[str, Any], api: VmshiftClient) -> None:
    before = _snapshot(lab, api)
    proc = vmshift(lab, "vm", "delete", "web-1", check=False)
    assert proc.returncode != 0
    assert "running" in proc.stderr.lower() or "powered on" in proc.stderr.lower(), proc.stderr
    assert _snapshot(lab, api) == before
    assert guest_check(lab, "web-1")["echo"]


def test_missing_or_wrong_token_is_refused(lab: LabHandle, web: dict[str, Any], api: VmshiftClient) -> None:
    before = _snapshot(lab, api)
    env = {**lab.env, "VMSHIFT_TOKEN": "wrong-token"}
    proc = vmshift(lab, "vm", "stop", "web-1", check=False, env=env)
    assert proc.returncode != 0 and "token" in proc.stderr.lower(), proc.stderr
    r = httpx.post(f"{lab.server}/api/v1/vms/web-1/power", json={"action": "stop"}, verify=lab.tls())
    assert r.status_code == 401 and r.json()["error"]["message"]
    assert _snapshot(lab, api) == before


def test_malformed_json_is_refused(lab: LabHandle, web: dict[str, Any], api: VmshiftClient) -> None:
    before = _snapshot(lab, api)
    r = httpx.post(f"{lab.server}/api/v1/vms", content=b'{"name": "bad", ',
                   headers={"Authorization": f"Bearer {lab.token}", "Content-Type": "application/json"},
                   verify=lab.tls())
    assert r.status_code in (400, 422)
    assert r.json()["error"]["message"]
    assert _snapshot(lab, api) == before


# --- lifecycle ---------------------------------------------------------------------------------------

def test_power_cycle_and_delete(lab: LabHandle, api: VmshiftClient) -> None:
    vm = create_vm(lab, "life-1", "host-2")
    assert vm["host"] == "host-2" and vm["power_state"] == "poweredOn"
    booted = guest_check(lab, "life-1")
    assert booted["disklog"]["records_verified_at_boot"] == 0, "a fresh disk has no records yet"

    # After a reset the guest boots again and finds the records of its first boot on the disk.
    wait_for("a first durable disklog record",
             lambda: guest_check(lab, "life-1")["disklog"]["durable_seq"] > 0, timeout=60)
    vmshift(lab, "vm", "reset", "life-1")
    rebooted = wait_for(
        "guest to reboot after reset",
        lambda: c if (c := guest_check(lab, "life-1"))["disklog"]["records_verified_at_boot"] > 0 else None,
        timeout=180,
    )
    assert rebooted["disklog"]["corrupt_at_boot"] == 0

    shut = vmshift_json(lab, "vm", "shutdown", "life-1", timeout=300)
    assert shut["power_state"] == "poweredOff"
    assert qemu_pids(vm["uuid"]) == []
    started = vmshift_json(lab, "vm", "start", "life-1")
    assert started["power_state"] == "poweredOn"
    after = guest_check(lab, "life-1")
    assert after["memtest"]["mismatches"] == 0
    # disklog resumes after the last durable record of the previous boot
    assert after["disklog"]["durable_seq"] >= booted["disklog"]["durable_seq"]

    stopped = vmshift_json(lab, "vm", "stop", "life-1")
    assert stopped["power_state"] == "poweredOff"
    vmshift(lab, "vm", "delete", "life-1")
    assert "life-1" not in {v["name"] for v in api.list_vms()}
    assert not (lab.root / "datastores" / "shared-1" / "life-1").exists()
    events = vmshift_json(lab, "event", "list", "--target", "life-1")
    assert events, "operations on a VM are recorded as events"
    tasks = vmshift_json(lab, "task", "list")
    assert any(t["kind"] == "vm.delete" and t["state"] == "success" for t in tasks)

