"""VM create/power/delete against fake agents, and bad input: a 4xx and nothing changed."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import AgentFactory, ServerHarness
from vmshift_fake_agent import FakeAgent

from vmshift.model.api import Vm

POOL = {"cidr": "10.213.2.0/24", "first": "10.213.2.100", "last": "10.213.2.101"}


def vm_body(name: str = "vm-1", **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name,
        "host": "host-1",
        "datastore": "shared-1",
        "memory_mib": 256,
        "kernel_args": "console=ttyS0",
        "networks": ["VM Network"],
        "disks_mib": [64],
    }
    body.update(kw)
    return body


@pytest.fixture
def cluster(server: ServerHarness, agents: AgentFactory) -> tuple[FakeAgent, FakeAgent]:
    """Two hosts sharing datastore shared-1; the VM network has a two-address pool."""
    ag1, t1 = agents("host-1")
    ag2, t2 = agents("host-2", shared=False)
    server.add_host(t1)
    server.add_host(t2)
    assert server.client.put("/networks/VM Network/ip-pool", json=POOL).status_code == 200
    return ag1, ag2


def create(server: ServerHarness, **kw: Any) -> dict[str, Any]:
    r = server.client.post("/vms", json=vm_body(**kw))
    assert r.status_code == 202, r.text
    task: dict[str, Any] = r.json()
    assert task["kind"] == "vm.create" and task["state"] in ("queued", "running", "success")
    done: dict[str, Any] = server.wait_task(task["id"])
    return done


def test_create_builds_the_spec_and_allocates_addresses(server: ServerHarness, cluster: Any) -> None:
    ag1, ag2 = cluster
    task = create(server, start=True)
    assert task["state"] == "success", task
    vm = Vm.model_validate(server.client.get("/vms/vm-1").json())
    assert vm.power_state.value == "poweredOn" and vm.host == "host-1"
    assert vm.ip == "10.213.2.100" and vm.nics[0].ip == "10.213.2.100"
    assert vm.nics[0].mac.startswith("52:54:00:")
    assert vm.cpu_model == "Opteron_G2-v1"  # newest model both hosts run (EPYC-v4 lacks features)
    assert vm.machine_type == "pc-q35-10.0"
    assert [d.file for d in vm.disks] == ["disk0.qcow2"] and vm.disks[0].datastore == "shared-1"
    spec = ag1.specs["vm-1"]
    assert spec.boot.image == "lab-guest" and spec.boot.cmdline == "console=ttyS0 vmshift.ip=10.213.2.100/24"
    assert spec.nics[0].mac == vm.nics[0].mac and ag2.mutations == []
    assert ("POST", "/api/v1/vms/vm-1/power") in ag1.mutations

    task2 = create(server, name="vm-2", machine_type="pc", datastore="local-host-1")
    assert task2["state"] == "success"
    vm2 = Vm.model_validate(server.client.get("/vms/vm-2").json())
    assert vm2.machine_type == "pc-i440fx-10.0" and vm2.ip == "10.213.2.101"
    assert vm2.nics[0].mac != vm.nics[0].mac and vm2.power_state.value == "poweredOff"
    # the pool (2 addresses) is now exhausted: refused, nothing changed
    before = server.counts()
    r = server.client.post("/vms", json=vm_body("vm-3"))
    assert r.status_code == 422 and "no free address" in r.json()["error"]["message"]
    assert server.counts() == before


def _bad_requests() -> list[tuple[str, Any, int, str]]:
    return [
        ("duplicate name", vm_body("vm-1"), 409, "already exists"),
        ("unknown host", vm_body("vm-9", host="host-9"), 404, "Host 'host-9' does not exist"),
        ("unknown datastore", vm_body("vm-9", datastore="nope"), 404, "Datastore 'nope' does not exist"),
        ("datastore not on host", vm_body("vm-9", datastore="local-host-2"), 400, "does not see datastore"),
        ("unknown network", vm_body("vm-9", networks=["Nope"]), 404, "Network 'Nope' does not exist"),
        ("unknown image", vm_body("vm-9", image="nope"), 404, "Image 'nope'"),
        ("memory beyond host", vm_body("vm-9", memory_mib=4096), 422, "more than host host-1's total"),
        ("cpu model not runnable", vm_body("vm-9", cpu_model="EPYC-v4"), 422, "cannot run CPU model"),
        ("bad machine type", vm_body("vm-9", machine_type="pc-q35-2.0"), 400, "not supported"),
        ("missing field", {"name": "vm-9", "host": "host-1"}, 422, "Field 'datastore' is required"),
        ("bad name", vm_body("bad name!"), 422, "Field 'name' is invalid"),
        ("bad memory", vm_body("vm-9", memory_mib="lots"), 422, "Field 'memory_mib' is invalid"),
        ("malformed JSON", b'{"name": "vm-9", ', 400, "not valid JSON"),
    ]


@pytest.mark.parametrize(
    ("case", "body", "status", "text"), _bad_requests(), ids=[c[0] for c in _bad_requests()]
)
def test_bad_create_changes_nothing(
    server: ServerHarness, cluster: Any, case: str, body: Any, status: int, text: str
) -> None:
    ag1, ag2 = cluster
    assert create(server)["state"] == "success"
    before_vms = server.client.get("/vms").json()
    before_counts = server.counts()
    before_mutations = (list(ag1.mutations), list(ag2.mutations))
    if isinstance(body, bytes):
        r = server.client.post("/vms", content=body, headers={"Content-Type": "application/json"})
    else:
        r = server.client.post("/vms", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert text in err["message"], err
    assert err["message"].endswith(".") and err["code"]
    if status == 404:
        assert err["hint"] and err["hint"].startswith("Known")
    assert server.client.get("/vms").json() == before_vms
    assert server.counts() == before_counts
    assert (ag1.mutations, ag2.mutations) == before_mutations


def test_host_in_maintenance_or_disconnected_refuses_create(server: ServerHarness, cluster: Any) -> None:
    server.client.post("/hosts/host-1/maintenance", json={"enter": True})
    before = server.counts()
    r = server.client.post("/vms", json=vm_body())
    assert r.status_code == 409 and "maintenance" in r.json()["error"]["message"]
    assert server.counts() == before


def test_delete_running_vm_is_refused_then_allowed_and_frees_addresses(
    server: ServerHarness, cluster: Any
) -> None:
    ag1, _ = cluster
    assert create(server, start=True)["state"] == "success"
    mac = server.client.get("/vms/vm-1").json()["nics"][0]["mac"]
    before, mutations = server.counts(), list(ag1.mutations)
    r = server.client.delete("/vms/vm-1")
    assert r.status_code == 409 and "running" in r.json()["error"]["message"] and r.json()["error"]["hint"]
    assert server.counts() == before and ag1.mutations == mutations
    assert server.client.get("/vms/vm-1").json()["power_state"] == "poweredOn"

    r = server.client.post("/vms/vm-1/power", json={"action": "stop"})
    assert r.status_code == 202 and server.wait_task(r.json()["id"])["state"] == "success"
    assert server.client.get("/vms/vm-1").json()["power_state"] == "poweredOff"
    r = server.client.delete("/vms/vm-1")
    assert r.status_code == 202
    assert server.wait_task(r.json()["id"])["state"] == "success"
    assert server.client.get("/vms/vm-1").status_code == 404
    counts = server.counts()
    assert (counts["vm"], counts["mac_allocation"], counts["ip_allocation"]) == (0, 0, 0)
    assert "vm-1" not in ag1.vms
    # the freed IP is handed out again
    assert create(server, name="vm-again")["state"] == "success"
    again = server.client.get("/vms/vm-again").json()
    assert again["ip"] == "10.213.2.100" and again["nics"][0]["mac"] != "" and mac


def test_failed_define_rolls_back_the_inventory(server: ServerHarness, cluster: Any) -> None:
    ag1, _ = cluster
    ag1.fail_define = True
    task = create(server)
    assert task["state"] == "error" and task["error"]["message"] == "qemu-img failed."
    assert server.client.get("/vms").json() == []
    counts = server.counts()
    assert (counts["vm"], counts["mac_allocation"], counts["ip_allocation"]) == (0, 0, 0)
    host = server.client.get("/hosts/host-1").json()
    assert host["vms"] == []
    assert server.client.delete("/hosts/host-1").status_code == 204


def test_host_with_vms_cannot_be_removed(server: ServerHarness, cluster: Any) -> None:
    assert create(server)["state"] == "success"
    r = server.client.delete("/hosts/host-1")
    assert r.status_code == 409 and "vm-1" in r.json()["error"]["hint"]
    assert [h["name"] for h in server.client.get("/hosts").json()] == ["host-1", "host-2"]
