"""Reconcile against fake agents: a duplicate is paused, a missing VM and an orphan QEMU are reported
once each, a migration explains its two copies, and vm delete refuses while any host runs a QEMU."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import AgentFactory, ServerHarness, wait_for
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from vmshift_fake_agent import FakeAgent

from vmshift.model.enums import PowerAction, PowerState
from vmshift.model.migration import MigrationPhase, MigrationStatus
from vmshift.model.vm import VmRuntime
from vmshift.server.db.schema import MigrationRow

BODY = {"name": "vm-1", "host": "host-1", "datastore": "shared-1", "memory_mib": 128, "start": True}
FINDINGS = {"vm.running_elsewhere", "vm.missing", "vm.duplicate", "vm.orphan_qemu"}


@pytest.fixture
def two(server: ServerHarness, agents: AgentFactory) -> tuple[FakeAgent, FakeAgent, str]:
    """host-1 and host-2 sharing shared-1; vm-1 runs on host-1. Returns (agent 1, agent 2, vm uuid)."""
    ag1, t1 = agents("host-1")
    ag2, t2 = agents("host-2")
    server.add_host(t1)
    server.add_host(t2)
    assert server.wait_task(server.client.post("/vms", json=BODY).json()["id"])["state"] == "success"
    return ag1, ag2, server.client.get("/vms/vm-1").json()["uuid"]


def events(server: ServerHarness, kinds: set[str] | None = None) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = server.client.get("/events?target=vm-1&limit=1000").json()
    return [e for e in found if kinds is None or e["kind"] in kinds]


def beats(agent: FakeAgent, n: int) -> None:
    """Wait until the server listed the agent's VMs n more times (n heartbeats of that host)."""
    until = agent.vm_lists + n
    wait_for(lambda: agent.vm_lists >= until, 10, f"{n} heartbeats")


def pauses(agent: FakeAgent) -> list[tuple[str, PowerAction, int]]:
    return [p for p in agent.power_requests if p[1] is PowerAction.PAUSE]


def power(server: ServerHarness, action: str) -> None:
    task = server.wait_task(server.client.post("/vms/vm-1/power", json={"action": action}).json()["id"])
    assert task["state"] == "success", task


def copy(uuid: str, state: PowerState, status: str, incoming: int | None = None) -> VmRuntime:
    return VmRuntime(name="vm-1", uuid=uuid, power_state=state, pid=777, qemu_status=status,
                     incoming_migration=incoming)  # fmt: skip


def test_duplicate_is_paused_within_two_heartbeats_and_reported_once(
    server: ServerHarness, two: tuple[FakeAgent, FakeAgent, str]
) -> None:
    ag1, ag2, uuid = two
    lists_before = ag2.vm_lists
    ag2.vms["vm-1"] = copy(uuid, PowerState.POWERED_ON, "running")  # a second QEMU behind our back

    (dup,) = wait_for(lambda: events(server, {"vm.duplicate"}), 10, "a duplicate event")
    ((vm, _action, at_list),) = pauses(ag2)
    # paused by the round the changed poll starts (two heartbeats on an idle machine), long before
    # the full round's 30 s: a loaded machine may take a few more polls of 0.2 s
    assert vm == "vm-1" and at_list - lists_before <= 10, "paused within a few heartbeats"
    assert dup["severity"] == "critical" and "host-2" in dup["message"] and "paused" in dup["message"]
    assert ag2.vms["vm-1"].power_state is PowerState.PAUSED
    # the copy the inventory names is left alone, and the inventory is unchanged
    assert pauses(ag1) == []
    vm = server.client.get("/vms/vm-1").json()
    assert vm["host"] == "host-1" and vm["power_state"] == "poweredOn"

    beats(ag2, 3)  # the paused copy is still there: no new event, no second pause
    assert len(events(server, FINDINGS)) == 1 and len(pauses(ag2)) == 1

    ag2.vms["vm-1"].power_state = PowerState.POWERED_ON  # someone resumes it: paused again, reported
    wait_for(lambda: len(events(server, {"vm.duplicate"})) == 2, 10, "a second duplicate event")
    assert len(pauses(ag2)) == 2

    del ag2.vms["vm-1"]
    wait_for(lambda: events(server, {"vm.finding_cleared"}), 10, "the finding to clear")
    assert events(server, {"vm.finding_cleared"})[0]["severity"] == "info"
    beats(ag2, 2)
    assert len(events(server, FINDINGS)) == 2


def test_copy_on_another_host_is_reported_but_not_paused(
    server: ServerHarness, two: tuple[FakeAgent, FakeAgent, str]
) -> None:
    _ag1, ag2, uuid = two
    power(server, "stop")
    ag2.vms["vm-1"] = copy(uuid, PowerState.POWERED_ON, "running")  # the only running copy
    (found,) = wait_for(lambda: events(server, {"vm.running_elsewhere"}), 10, "a running-elsewhere event")
    assert found["severity"] == "critical" and "host-2" in found["message"] and "host-1" in found["message"]
    beats(ag2, 3)
    assert pauses(ag2) == [] and len(events(server, FINDINGS)) == 1
    assert server.client.get("/vms/vm-1").json()["power_state"] == "poweredOff"


def test_missing_vm_is_marked_reported_once_and_found_again(
    server: ServerHarness, two: tuple[FakeAgent, FakeAgent, str]
) -> None:
    ag1, _ag2, uuid = two
    # a QEMU that died is the host's report, not a missing VM
    ag1.vms["vm-1"].died, ag1.vms["vm-1"].power_state = True, PowerState.POWERED_OFF
    wait_for(lambda: events(server, {"vm.died"}), 10, "vm.died")
    assert server.client.get("/vms/vm-1").json()["power_state"] == "poweredOff"
    power(server, "start")

    forgotten = ag1.vms.pop("vm-1")  # the host no longer knows the VM at all
    (missing,) = wait_for(lambda: events(server, {"vm.missing"}), 10, "vm.missing")
    assert missing["severity"] == "critical" and "host-1" in missing["message"]
    assert server.client.get("/vms/vm-1").json()["power_state"] == "missing"
    beats(ag1, 3)
    assert len(events(server, {"vm.missing"})) == 1 and not events(server, {"vm.died"})[1:]

    # start re-registers it on its host before powering it on
    ag1.mutations.clear()
    task = server.wait_task(server.client.post("/vms/vm-1/power", json={"action": "start"}).json()["id"])
    assert task["state"] == "success", task
    assert [m[0] for m in ag1.mutations] == ["PUT", "POST"]
    assert ag1.vms["vm-1"].uuid == forgotten.uuid == uuid
    wait_for(lambda: events(server, {"vm.finding_cleared"}), 10, "the missing mark to clear")
    assert server.client.get("/vms/vm-1").json()["power_state"] == "poweredOn"


def test_missing_vm_found_again_takes_the_hosts_state(
    server: ServerHarness, two: tuple[FakeAgent, FakeAgent, str]
) -> None:
    ag1, _ag2, _uuid = two
    gone = ag1.vms.pop("vm-1")
    wait_for(lambda: server.client.get("/vms/vm-1").json()["power_state"] == "missing", 10, "missing")
    gone.power_state, gone.pid, gone.died = PowerState.POWERED_OFF, None, True
    ag1.vms["vm-1"] = gone  # the host's agent comes back knowing the VM; its QEMU had died
    (cleared,) = wait_for(lambda: events(server, {"vm.finding_cleared"}), 10, "found again")
    assert "poweredOff" in cleared["message"]
    assert server.client.get("/vms/vm-1").json()["power_state"] == "poweredOff"


def test_orphan_incoming_qemu_is_reported_once(
    server: ServerHarness, two: tuple[FakeAgent, FakeAgent, str]
) -> None:
    _ag1, ag2, uuid = two
    ag2.vms["vm-1"] = copy(uuid, PowerState.PAUSED, "inmigrate", incoming=99)
    (orphan,) = wait_for(lambda: events(server, {"vm.orphan_qemu"}), 10, "vm.orphan_qemu")
    assert orphan["severity"] == "critical" and "host-2" in orphan["message"] and "99" in orphan["message"]
    beats(ag2, 3)
    assert len(events(server, FINDINGS)) == 1 and pauses(ag2) == []
    del ag2.vms["vm-1"]
    wait_for(lambda: events(server, {"vm.finding_cleared"}), 10, "the orphan to clear")


def _open_migration(db_url: str, status: MigrationStatus = MigrationStatus.RUNNING) -> int:
    engine = create_engine(db_url)
    with Session(engine) as s, s.begin():
        row = MigrationRow(vm="vm-1", source_host="host-1", target_host="host-2", status=status,
                           phase=MigrationPhase.PRECOPY, settings={})  # fmt: skip
        s.add(row)
        s.flush()
        mid = row.id
    engine.dispose()
    return mid


def _finish_migration(db_url: str, mid: int) -> None:
    engine = create_engine(db_url)
    with Session(engine) as s, s.begin():
        row = s.get(MigrationRow, mid)
        assert row is not None
        row.status, row.phase = MigrationStatus.FAILED, MigrationPhase.FAILED
    engine.dispose()


def test_an_unfinished_migration_explains_both_copies(
    server: ServerHarness, two: tuple[FakeAgent, FakeAgent, str], db_url: str
) -> None:
    ag1, ag2, uuid = two
    mid = _open_migration(db_url)
    ag2.vms["vm-1"] = copy(uuid, PowerState.PAUSED, "inmigrate", incoming=mid)  # receiving
    beats(ag2, 3)
    # switchover: the source is paused in postmigrate, the target runs before the server recorded it
    ag1.vms["vm-1"].power_state, ag1.vms["vm-1"].qemu_status = PowerState.PAUSED, "postmigrate"
    ag2.vms["vm-1"] = copy(uuid, PowerState.POWERED_ON, "running")
    beats(ag2, 3)
    assert events(server, FINDINGS) == [] and pauses(ag1) == pauses(ag2) == []

    # the server gives the migration up while the target still runs the VM: that is a finding now
    _finish_migration(db_url, mid)
    (found,) = wait_for(lambda: events(server, {"vm.running_elsewhere"}), 10, "running elsewhere")
    assert found["severity"] == "critical" and pauses(ag2) == []


@pytest.mark.parametrize("incoming", [None, 5], ids=["copy", "receiving"])
def test_delete_is_refused_while_any_host_runs_a_qemu(
    server: ServerHarness, two: tuple[FakeAgent, FakeAgent, str], incoming: int | None
) -> None:
    ag1, ag2, uuid = two
    power(server, "stop")
    ag2.vms["vm-1"] = copy(uuid, PowerState.PAUSED, "paused" if incoming is None else "inmigrate", incoming)
    ag1.mutations.clear()
    ag2.mutations.clear()
    tasks_before = server.counts()["task"]

    r = server.client.delete("/vms/vm-1")
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert "host-2" in error["message"] and "cannot be deleted" in error["message"] and error["hint"]
    # nothing changed: no task, no request to any agent, the VM is still in the inventory
    assert server.counts()["task"] == tasks_before
    assert ag1.mutations == ag2.mutations == []
    assert server.client.get("/vms/vm-1").json()["host"] == "host-1"
    assert "vm-1" in ag1.specs

    del ag2.vms["vm-1"]
    r = server.client.delete("/vms/vm-1")
    assert r.status_code == 202, r.text
    assert server.wait_task(r.json()["id"])["state"] == "success"
    assert ("DELETE", "/api/v1/vms/vm-1") in ag1.mutations and ag2.mutations == []
