"""Task lifecycle and cancel, server restart, heartbeat (disconnect/reconnect), reconcile of dead VMs."""

from __future__ import annotations

from conftest import AgentFactory, ServerHarness, wait_for
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from vmshift_fake_agent import UvicornThread

from vmshift.model.enums import TaskState
from vmshift.server.db.schema import TaskRow

BODY = {"name": "vm-1", "host": "host-1", "datastore": "shared-1", "memory_mib": 128}


def test_task_lifecycle_and_cancel(server: ServerHarness, agents: AgentFactory) -> None:
    ag1, t1 = agents("host-1")
    server.add_host(t1)
    ag1.define_delay_s = 30  # the define hangs on the host long enough to cancel it
    r = server.client.post("/vms", json=BODY)
    assert r.status_code == 202
    create_id = r.json()["id"]
    wait_for(
        lambda: server.client.get(f"/tasks/{create_id}").json()["state"] == "running", 10, "running task"
    )
    assert server.client.get("/vms/vm-1").json()["power_state"] == "poweredOff"

    # a second task on the same VM waits its turn (queued) and can be cancelled there
    r = server.client.post("/vms/vm-1/power", json={"action": "start"})
    power_id = r.json()["id"]
    assert server.client.get(f"/tasks/{power_id}").json()["state"] == "queued"
    r = server.client.post(f"/tasks/{power_id}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"

    r = server.client.post(f"/tasks/{create_id}/cancel")
    assert r.status_code == 200
    task = r.json()
    assert task["state"] == "cancelled" and task["started_at"] and task["finished_at"]
    # cancelling the creation rolls the VM back out of the inventory
    assert server.client.get("/vms").json() == []
    assert server.counts()["mac_allocation"] == 0
    r = server.client.post(f"/tasks/{create_id}/cancel")
    assert r.status_code == 409 and "already finished" in r.json()["error"]["message"]
    assert server.client.post("/tasks/99999/cancel").status_code == 404

    ag1.define_delay_s = 0
    r = server.client.post("/vms", json=BODY | {"start": True})
    done = server.wait_task(r.json()["id"])
    assert (
        done["state"] == "success" and done["percent"] == 100 and done["result"]["power_state"] == "poweredOn"
    )
    tasks = server.client.get("/tasks?limit=2").json()
    assert [t["id"] for t in tasks] == [done["id"], power_id]
    kinds = [e["kind"] for e in server.client.get("/events?target=vm-1").json()]
    assert {"task.started", "task.cancelled", "task.finished", "vm.created", "vm.deleted"} <= set(kinds)


def test_restart_keeps_inventory_and_fails_orphaned_tasks(
    server: ServerHarness, agents: AgentFactory, db_url: str
) -> None:
    _, t1 = agents("host-1")
    server.add_host(t1)
    server.client.put(
        "/networks/VM Network/ip-pool",
        json={"cidr": "10.0.0.0/24", "first": "10.0.0.10", "last": "10.0.0.20"},
    )
    assert server.wait_task(server.client.post("/vms", json=BODY).json()["id"])["state"] == "success"
    before = {p: server.client.get(p).json() for p in ("/hosts", "/vms", "/datastores", "/networks")}
    before_counts = server.counts()
    server.stop()

    # a task a crashed server left "running" in the database
    engine = create_engine(db_url)
    with Session(engine) as s, s.begin():
        orphan = TaskRow(kind="vm.power", target="vm-1", state=TaskState.RUNNING, params={}, phase="power")
        s.add(orphan)
        s.flush()
        orphan_id = orphan.id
    engine.dispose()

    server.start()
    assert server.counts()["vm"] == before_counts["vm"]
    after = {p: server.client.get(p).json() for p in ("/hosts", "/vms", "/datastores", "/networks")}
    for p in ("/vms", "/datastores", "/networks"):
        assert after[p] == before[p], p
    assert [h["name"] for h in after["/hosts"]] == ["host-1"]
    orphan_view = server.client.get(f"/tasks/{orphan_id}").json()
    assert orphan_view["state"] == "error" and orphan_view["error"]["code"] == "server_restarted"
    # names still unique after the restart
    assert server.client.post("/vms", json=BODY).status_code == 409


def _host_state(server: ServerHarness) -> str:
    state: str = server.client.get("/hosts/host-1").json()["connection_state"]
    return state


def test_heartbeat_marks_dead_agent_disconnected_and_back(
    server: ServerHarness, agents: AgentFactory
) -> None:
    ag1, t1 = agents("host-1")
    server.add_host(t1)
    first_beat = server.client.get("/hosts/host-1").json()["last_heartbeat"]
    wait_for(
        lambda: server.client.get("/hosts/host-1").json()["last_heartbeat"] != first_beat, 10, "a heartbeat"
    )
    t1.stop()
    wait_for(lambda: _host_state(server) == "disconnected", 15, "host-1 disconnected")
    events = server.client.get("/events?target=host-1").json()
    assert events[0]["kind"] == "host.disconnected" and events[0]["severity"] == "warning"
    r = server.client.post("/vms", json=BODY)
    assert r.status_code == 409 and "disconnected" in r.json()["error"]["message"]

    # the agent comes back on the same address (with the certificate it was issued)
    back = UvicornThread(ag1.app(), port=t1.port, tls=ag1.tls).start()
    try:
        wait_for(lambda: _host_state(server) == "connected", 15, "host-1 connected again")
        assert server.client.get("/events?target=host-1&limit=1").json()[0]["kind"] == "host.connected"
    finally:
        back.stop()


def test_reconcile_marks_a_died_vm_powered_off(server: ServerHarness, agents: AgentFactory) -> None:
    ag1, t1 = agents("host-1")
    server.add_host(t1)
    assert (
        server.wait_task(server.client.post("/vms", json=BODY | {"start": True}).json()["id"])["state"]
        == "success"
    )
    assert server.client.get("/vms/vm-1").json()["power_state"] == "poweredOn"
    rt = ag1.vms["vm-1"]
    rt.cpu_seconds, rt.rss_mib = 12.5, 100.0
    wait_for(lambda: server.client.get("/vms/vm-1").json()["stats"]["cpu_seconds"] == 12.5, 10, "stats")
    rt.died, rt.exit_reason, rt.power_state = True, "killed by signal 9", rt.power_state.POWERED_OFF
    wait_for(
        lambda: server.client.get("/vms/vm-1").json()["power_state"] == "poweredOff", 10, "VM powered off"
    )
    died = [e for e in server.client.get("/events?target=vm-1").json() if e["kind"] == "vm.died"]
    assert len(died) == 1 and died[0]["severity"] == "warning" and "signal 9" in died[0]["message"]
