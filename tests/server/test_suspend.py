"""vm.suspend against fake agents: the task, the stored power state, and what may follow it."""

from __future__ import annotations

from typing import Any

from conftest import AgentFactory, ServerHarness, wait_for
from vmshift_fake_agent import FakeAgent

from vmshift.model.enums import PowerAction

POOL = {"cidr": "10.213.3.0/24", "first": "10.213.3.100", "last": "10.213.3.101"}


def running_vm(server: ServerHarness, agents: AgentFactory) -> FakeAgent:
    agent, token = agents("host-1")
    server.add_host(token)
    assert server.client.put("/networks/VM Network/ip-pool", json=POOL).status_code == 200
    body = {"name": "vm-1", "host": "host-1", "datastore": "shared-1", "memory_mib": 256,
            "networks": ["VM Network"], "disks_mib": [64], "start": True}
    r = server.client.post("/vms", json=body)
    assert r.status_code == 202 and server.wait_task(r.json()["id"])["state"] == "success"
    return agent


def power_state(server: ServerHarness) -> str:
    state: str = server.client.get("/vms/vm-1").json()["power_state"]
    return state


def suspend(server: ServerHarness) -> dict[str, Any]:
    r = server.client.post("/vms/vm-1/suspend")
    assert r.status_code == 202, r.text
    assert r.json()["kind"] == "vm.suspend"
    done: dict[str, Any] = server.wait_task(r.json()["id"])
    return done


def test_suspend_stores_suspended_and_resume_runs_it_again(
    server: ServerHarness, agents: AgentFactory
) -> None:
    agent = running_vm(server, agents)
    task = suspend(server)
    assert task["state"] == "success", task
    assert task["result"]["power_state"] == "suspended" and task["result"]["write_bps"] > 0
    assert task["result"]["state_file"].endswith("/vm-1/suspended.state")
    assert power_state(server) == "suspended"
    assert ("POST", "/api/v1/vms/vm-1/suspend") in agent.mutations

    again = server.client.post("/vms/vm-1/suspend")
    assert again.status_code == 409 and "suspended" in again.json()["error"]["message"]

    r = server.client.post("/vms/vm-1/resume", json={})
    assert r.status_code == 202 and server.wait_task(r.json()["id"])["state"] == "success"
    assert power_state(server) == "poweredOn"
    assert agent.power_requests[-1][:2] == ("vm-1", PowerAction.RESUME)


def test_a_powered_off_vm_is_not_suspended(server: ServerHarness, agents: AgentFactory) -> None:
    agent = running_vm(server, agents)
    r = server.client.post("/vms/vm-1/power", json={"action": "stop"})
    assert server.wait_task(r.json()["id"])["state"] == "success"
    refused = server.client.post("/vms/vm-1/suspend")
    assert refused.status_code == 409 and "poweredOff" in refused.json()["error"]["message"]
    assert ("POST", "/api/v1/vms/vm-1/suspend") not in agent.mutations


def test_a_suspended_vm_is_not_missing_and_can_be_deleted(
    server: ServerHarness, agents: AgentFactory
) -> None:
    agent = running_vm(server, agents)
    assert suspend(server)["state"] == "success"
    lists = agent.vm_lists
    wait_for(lambda: agent.vm_lists >= lists + 3, 10, "heartbeats after the suspend")
    assert power_state(server) == "suspended", "a heartbeat must keep the agent's 'suspended'"
    events = server.client.get("/events", params={"target": "vm-1"}).json()
    assert not any(e["kind"] == "vm.missing" for e in events), events
    r = server.client.delete("/vms/vm-1")
    assert r.status_code == 202 and server.wait_task(r.json()["id"])["state"] == "success"
