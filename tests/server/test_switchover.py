"""The safe switchover as a user sees it through the API (docs/switchover.md), against scripted fake
agents (real HTTP, real database): a move left paused on both hosts, `migration finalize` and
`vm resume` decided from the target's proof, a cancel refused in the switchover, a lost VM, a
source record of another server, and a cancelled queued migration."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import ServerHarness, wait_for
from test_migrations_fakes import (
    QEMU_GONE,
    RUNS_VM,
    STREAM_ACTIVE,
    SWITCHOVER_STARTED,
    MigratingAgent,
    Pair,
    Proof,
    SourceEnd,
    migrating_agents_fixture,  # noqa: F401  (a fixture)
    pair_fixture,  # noqa: F401  (a fixture)
    start_vm,
)

from vmshift.model.enums import PowerState
from vmshift.model.migration import FinalizeResolution, MigrationPhase, MigrationStatus

ON, PAUSED, OFF = PowerState.POWERED_ON.value, PowerState.PAUSED.value, PowerState.POWERED_OFF.value


# -- what a user reads -------------------------------------------------------------------------------
def migrate(server: ServerHarness, vm: str = "vm-1", host: str = "host-2") -> dict[str, Any]:
    r = server.client.post(f"/vms/{vm}/migrate", json={"host": host})
    assert r.status_code == 202, r.text
    body: dict[str, Any] = r.json()
    return body


def migration(server: ServerHarness, mid: int) -> dict[str, Any]:
    body: dict[str, Any] = server.client.get(f"/migrations/{mid}").json()
    return body


def vm(server: ServerHarness, name: str = "vm-1") -> tuple[str, str]:
    body = server.client.get(f"/vms/{name}").json()
    return body["host"], body["power_state"]


def events(server: ServerHarness, target: str = "vm-1", kind: str | None = None) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = server.client.get(f"/events?target={target}&limit=1000").json()
    return [e for e in found if kind is None or e["kind"] == kind]


def tasks(server: ServerHarness, kind: str) -> list[dict[str, Any]]:
    return [t for t in server.client.get("/tasks?limit=1000").json() if t["kind"] == kind]


def starts(agent: MigratingAgent) -> int:
    """How many migrations the server started on this source agent."""
    return agent.mutations.count(("POST", "/api/v1/migrations"))


def heartbeats(server: ServerHarness, agent: MigratingAgent, n: int = 3) -> None:
    """Wait until the server has listed ``agent``'s VMs ``n`` more times (n heartbeats)."""
    seen = agent.vm_lists
    wait_for(lambda: agent.vm_lists >= seen + n, 10, f"{n} heartbeats of {agent.facts.name}")


def error_text(task: dict[str, Any]) -> str:
    err = task["error"] or {}
    return f"{err.get('message')} {err.get('hint')}"


def waiting_migration(server: ServerHarness, pair: Pair) -> tuple[int, int]:
    """Migrate vm-1 until it waits paused on both hosts (needs_finalize); its id and task id."""
    src, _dst = pair
    src.end = SourceEnd.NEEDS_FINALIZE
    started = migrate(server)
    task = server.wait_task(started["id"])
    assert task["state"] == "error", task
    mid = started["migration_id"]
    assert migration(server, mid)["status"] == MigrationStatus.NEEDS_FINALIZE.value
    return mid, started["id"]


def run_finalize(server: ServerHarness, mid: int) -> dict[str, Any]:
    r = server.client.post(f"/migrations/{mid}/finalize")
    assert r.status_code == 202, r.text
    assert r.json()["kind"] == "migration.finalize" and r.json()["target"] == "vm-1"
    return server.wait_task(r.json()["id"])


def run_resume(server: ServerHarness, **body: Any) -> dict[str, Any]:
    r = server.client.post("/vms/vm-1/resume", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["kind"] == "migration.finalize"  # the VM waits for a migration: decided from the proof
    return server.wait_task(r.json()["id"])


def nothing_decided(pair: Pair, mid: int) -> None:
    """Neither agent was asked to change anything about the waiting migration."""
    src, dst = pair
    assert src.finalize_requests == []
    assert ("POST", f"/api/v1/migrations/{mid}/activate") not in dst.mutations
    assert ("DELETE", f"/api/v1/migrations/{mid}") not in dst.mutations
    assert dst.activations == [] and mid in dst.incoming


def still_waiting(server: ServerHarness, mid: int) -> None:
    m = migration(server, mid)
    assert m["status"] == MigrationStatus.NEEDS_FINALIZE.value and m["finished_at"] is None, m
    assert vm(server) == ("host-1", PAUSED)


# -- 1. a move left paused on both hosts ---------------------------------------------------------------
def test_needs_finalize_waits_paused_and_names_the_command(server: ServerHarness, pair: Pair) -> None:
    src, _dst = pair
    src.end = SourceEnd.NEEDS_FINALIZE
    started = migrate(server)
    mid, tid = started["migration_id"], started["id"]
    task = server.wait_task(tid)
    assert task["state"] == "error", task
    assert task["error"]["code"] == "needs_finalize"
    assert f"Migration {mid} of VM vm-1 could not finish" in task["error"]["message"]
    assert f"vmshift migration finalize {mid}" in task["error"]["hint"]

    m = migration(server, mid)
    assert m["status"] == "needs_finalize" and m["phase"] == MigrationPhase.FINISH.value
    assert m["error"]["code"] == "needs_finalize" and m["finished_at"] is None
    assert vm(server) == ("host-1", PAUSED)
    waiting = events(server, kind="migration.needs_finalize")
    assert len(waiting) == 1 and waiting[0]["severity"] == "critical", waiting
    assert f"vmshift migration finalize {mid}" in waiting[0]["message"]
    assert "vmshift vm resume vm-1" in waiting[0]["message"]
    assert events(server, kind="migration.failed") == [] and events(server, kind="vm.migrated") == []

    # the VM is held by the waiting migration: no second move, and the finished task cannot be cancelled
    r = server.client.post("/vms/vm-1/migrate", json={"host": "host-2"})
    assert r.status_code == 409, r.text
    refused = r.json()["error"]["message"]
    assert f"waits paused on two hosts for migration {mid}" in refused, refused
    assert len(server.client.get("/migrations").json()) == 1
    assert server.client.post(f"/tasks/{tid}/cancel").status_code == 409

    # nothing was decided, and the heartbeat (the source reports the VM paused) keeps it that way
    heartbeats(server, src)
    still_waiting(server, mid)
    nothing_decided(pair, mid)
    assert starts(src) == 1


def test_second_migrate_of_a_waiting_vm_points_to_finalize(server: ServerHarness, pair: Pair) -> None:
    mid, _tid = waiting_migration(server, pair)
    r = server.client.post("/vms/vm-1/migrate", json={"host": "host-2"})
    assert r.status_code == 409
    hint = r.json()["error"]["hint"]
    assert f"vmshift migration finalize {mid}" in hint, hint


def test_the_copies_of_a_waiting_migration_are_no_reconcile_finding(
    server: ServerHarness, pair: Pair
) -> None:
    _src, dst = pair
    mid, _tid = waiting_migration(server, pair)
    assert dst.vms["vm-1"].incoming_migration == mid  # the target reports its receiving QEMU
    heartbeats(server, dst)
    critical = [e for e in events(server) if e["severity"] == "critical"]
    assert [e["kind"] for e in critical] == ["migration.needs_finalize"], critical


# -- 2-5. migration finalize -----------------------------------------------------------------------
def test_finalize_activates_a_target_that_holds_the_stream(server: ServerHarness, pair: Pair) -> None:
    src, dst = pair
    mid, _tid = waiting_migration(server, pair)  # the target's proof: stream completed, QEMU paused
    before = len(src.journal)
    task = run_finalize(server, mid)
    assert task["state"] == "success", task
    assert task["result"] == {"migration_id": mid, "status": "completed"}
    # proof first, then the target runs, then the source stops its copy
    assert src.journal[before:] == [
        ("host-2", "GET", f"/api/v1/migrations/{mid}/incoming"),
        ("host-2", "POST", f"/api/v1/migrations/{mid}/activate"),
        ("host-1", "POST", f"/api/v1/migrations/{mid}/finalize"),
    ]
    assert src.finalize_requests == [(mid, FinalizeResolution.TARGET_ACTIVATED)]
    assert dst.activations == [mid]
    m = migration(server, mid)
    assert m["status"] == "completed" and m["phase"] == "completed" and m["finished_at"] is not None
    assert vm(server) == ("host-2", ON)
    moved = events(server, kind="vm.migrated")
    assert len(moved) == 1 and "from host-1 to host-2" in moved[0]["message"]
    assert ("DELETE", f"/api/v1/migrations/{mid}") not in dst.mutations
    assert "vm-1" not in src.vms and dst.vms["vm-1"].is_the_vm
    heartbeats(server, dst)
    assert vm(server) == ("host-2", ON)
    # finished now: a second finalize is refused
    r = server.client.post(f"/migrations/{mid}/finalize")
    assert r.status_code == 409 and "is completed" in r.json()["error"]["message"]


def test_finalize_of_a_target_that_runs_already_only_stops_the_source(
    server: ServerHarness, pair: Pair
) -> None:
    src, dst = pair
    mid, _tid = waiting_migration(server, pair)
    dst.script_proof(RUNS_VM)
    task = run_finalize(server, mid)
    assert task["state"] == "success", task
    assert ("POST", f"/api/v1/migrations/{mid}/activate") not in dst.mutations
    assert ("DELETE", f"/api/v1/migrations/{mid}") not in dst.mutations
    assert src.finalize_requests == [(mid, FinalizeResolution.TARGET_ACTIVATED)]
    assert migration(server, mid)["status"] == "completed"
    assert vm(server) == ("host-2", ON)
    assert "vm-1" not in src.vms


@pytest.mark.parametrize("proof", [STREAM_ACTIVE, QEMU_GONE], ids=["stream-active", "qemu-gone"])
def test_finalize_resumes_the_source_when_the_target_never_got_the_vm(
    server: ServerHarness, pair: Pair, proof: Proof
) -> None:
    src, dst = pair
    mid, _tid = waiting_migration(server, pair)
    dst.script_proof(proof)
    before = len(src.journal)
    task = run_finalize(server, mid)
    assert task["state"] == "success", task
    assert task["result"] == {"migration_id": mid, "status": "failed"}
    # the target's copy is discarded before the source runs again
    assert src.journal[before:] == [
        ("host-2", "GET", f"/api/v1/migrations/{mid}/incoming"),
        ("host-2", "DELETE", f"/api/v1/migrations/{mid}"),
        ("host-1", "POST", f"/api/v1/migrations/{mid}/finalize"),
    ]
    assert src.finalize_requests == [(mid, FinalizeResolution.RESUME_SOURCE)]
    assert dst.activations == [] and mid not in dst.incoming and "vm-1" not in dst.vms
    m = migration(server, mid)
    assert m["status"] == "failed" and m["finished_at"] is not None
    assert "resumed on the source" in m["error"]["message"]
    assert vm(server) == ("host-1", ON)
    assert src.vms["vm-1"].power_state is PowerState.POWERED_ON
    failed = events(server, kind="migration.failed")
    assert len(failed) == 1 and "stays on host-1" in failed[0]["message"]
    assert events(server, kind="vm.migrated") == []
    heartbeats(server, src)
    assert vm(server) == ("host-1", ON)


@pytest.mark.parametrize("how", ["answers-503", "agent-stopped"])
def test_finalize_with_the_target_unreachable_changes_nothing(
    server: ServerHarness, pair: Pair, how: str
) -> None:
    src, dst = pair
    mid, _tid = waiting_migration(server, pair)
    assert dst.thread is not None
    if how == "answers-503":
        dst.proof_unavailable = True
    else:
        dst.thread.stop(force=True)
    task = run_finalize(server, mid)
    assert task["state"] == "error", task
    assert "host-2 cannot be reached" in task["error"]["message"]
    assert "nothing was changed" in task["error"]["message"]
    assert "vmshift vm resume VM --force" in task["error"]["hint"]
    nothing_decided(pair, mid)
    still_waiting(server, mid)
    assert len(events(server, kind="migration.needs_finalize")) == 1

    # the target answers again: the same command finishes the move
    if how == "answers-503":
        dst.proof_unavailable = False
    else:
        dst.thread.start()
    task = run_finalize(server, mid)
    assert task["state"] == "success", task
    assert src.finalize_requests == [(mid, FinalizeResolution.TARGET_ACTIVATED)]
    assert migration(server, mid)["status"] == "completed"
    assert vm(server) == ("host-2", ON)


def test_a_waiting_migration_survives_a_server_restart(server: ServerHarness, pair: Pair) -> None:
    mid, tid = waiting_migration(server, pair)
    server.stop()
    server.start()
    still_waiting(server, mid)
    assert server.client.get(f"/tasks/{tid}").json()["state"] == "error"
    nothing_decided(pair, mid)
    task = run_finalize(server, mid)
    assert task["state"] == "success", task
    assert migration(server, mid)["status"] == "completed" and vm(server) == ("host-2", ON)


def test_finalize_with_the_source_unreachable_runs_the_vm_once_and_finishes_on_a_rerun(
    server: ServerHarness, pair: Pair
) -> None:
    src, dst = pair
    mid, _tid = waiting_migration(server, pair)
    assert src.thread is not None
    src.thread.stop(force=True)
    task = run_finalize(server, mid)
    assert task["state"] == "error", task
    # the target holds the whole VM and the source copy can never run again: the target runs it
    assert dst.activations == [mid] and dst.vms["vm-1"].power_state is PowerState.POWERED_ON
    assert src.vms["vm-1"].power_state is PowerState.PAUSED and src.finalize_requests == []
    assert migration(server, mid)["status"] == "needs_finalize"
    src.thread.start()
    task = run_finalize(server, mid)
    assert task["state"] == "success", task
    assert dst.activations == [mid]  # not activated twice
    assert src.finalize_requests == [(mid, FinalizeResolution.TARGET_ACTIVATED)]
    assert migration(server, mid)["status"] == "completed" and vm(server) == ("host-2", ON)


def test_finalize_with_the_source_unreachable_says_where_the_vm_runs(
    server: ServerHarness, pair: Pair
) -> None:
    src, _dst = pair
    mid, _tid = waiting_migration(server, pair)
    assert src.thread is not None
    src.thread.stop(force=True)
    task = run_finalize(server, mid)
    assert task["state"] == "error", task
    text = error_text(task)
    assert "host-2" in text and f"vmshift migration finalize {mid}" in text, text


def test_finalize_when_neither_host_holds_the_vm_reports_it_lost(server: ServerHarness, pair: Pair) -> None:
    src, dst = pair
    mid, _tid = waiting_migration(server, pair)
    gone = src.vms["vm-1"]  # the source QEMU died while it waited
    gone.power_state, gone.pid, gone.qemu_status, gone.died = PowerState.POWERED_OFF, None, None, True
    dst.script_proof(STREAM_ACTIVE)
    task = run_finalize(server, mid)
    assert task["state"] == "success", task
    assert task["result"] == {"migration_id": mid, "status": "lost"}
    assert src.finalize_requests == [(mid, FinalizeResolution.RESUME_SOURCE)]
    assert ("DELETE", f"/api/v1/migrations/{mid}") in dst.mutations and dst.activations == []
    m = migration(server, mid)
    assert m["status"] == "lost" and m["finished_at"] is not None
    assert vm(server) == ("host-1", OFF)
    lost = events(server, kind="vm.lost")
    assert len(lost) == 1 and lost[0]["severity"] == "critical"
    assert "vmshift vm start vm-1" in lost[0]["message"]


# -- 6. vm resume ------------------------------------------------------------------------------------
def test_vm_resume_needs_proof_that_the_target_never_ran_or_force(server: ServerHarness, pair: Pair) -> None:
    src, dst = pair
    mid, _tid = waiting_migration(server, pair)

    # the target holds the whole VM: resuming the source could run it twice
    task = run_resume(server)
    assert task["state"] == "error", task
    assert "could run it twice" in task["error"]["message"]
    assert "nothing was changed" in task["error"]["message"]
    assert f"vmshift migration finalize {mid}" in task["error"]["hint"]
    task = run_resume(server, force=True)  # --force never overrides a proof
    assert task["state"] == "error" and "could run it twice" in task["error"]["message"], task
    nothing_decided(pair, mid)
    still_waiting(server, mid)

    # the target host is down: nobody can tell, so without --force nothing happens
    assert dst.thread is not None
    dst.thread.stop(force=True)
    task = run_resume(server)
    assert task["state"] == "error", task
    assert "host-2 cannot be reached" in task["error"]["message"]
    assert "nothing was changed" in task["error"]["message"]
    assert "--force" in task["error"]["hint"]
    nothing_decided(pair, mid)
    still_waiting(server, mid)

    # --force: the operator vouches that the target's QEMU is gone
    task = run_resume(server, force=True)
    assert task["state"] == "success", task
    assert src.finalize_requests == [(mid, FinalizeResolution.RESUME_SOURCE)]
    assert dst.activations == []
    m = migration(server, mid)
    assert m["status"] == "failed" and "resumed on the source" in m["error"]["message"]
    assert vm(server) == ("host-1", ON)
    assert src.vms["vm-1"].power_state is PowerState.POWERED_ON


def test_vm_resume_of_a_target_that_never_got_the_vm_resumes_the_source(
    server: ServerHarness, pair: Pair
) -> None:
    src, dst = pair
    mid, _tid = waiting_migration(server, pair)
    dst.script_proof(STREAM_ACTIVE)
    task = run_resume(server)
    assert task["state"] == "success", task
    assert ("DELETE", f"/api/v1/migrations/{mid}") in dst.mutations
    assert src.finalize_requests == [(mid, FinalizeResolution.RESUME_SOURCE)]
    assert migration(server, mid)["status"] == "failed"
    assert vm(server) == ("host-1", ON)


# -- 7. finalize of a migration that does not wait ------------------------------------------------------
def test_finalize_of_a_completed_or_running_migration_is_refused(server: ServerHarness, pair: Pair) -> None:
    src, dst = pair
    done = migrate(server)
    assert server.wait_task(done["id"])["state"] == "success"
    r = server.client.post(f"/migrations/{done['migration_id']}/finalize")
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["message"] == (
        f"Migration {done['migration_id']} is completed; only a migration that waits paused on both hosts "
        "(needs_finalize) can be finalized."
    )
    assert f"vmshift migration show {done['migration_id']}" in err["hint"]

    src, dst = dst, src  # the VM now runs on host-2: migrate it back, held in pre-copy
    src.hold = True
    running = migrate(server, host="host-1")
    mid = running["migration_id"]
    wait_for(lambda: migration(server, mid)["phase"] == "precopy", 10, "pre-copy")
    r = server.client.post(f"/migrations/{mid}/finalize")
    assert r.status_code == 409 and f"Migration {mid} is running;" in r.json()["error"]["message"], r.text
    r = server.client.post("/migrations/999/finalize")
    assert r.status_code == 404 and "Migration 999 does not exist" in r.json()["error"]["message"]

    assert tasks(server, "migration.finalize") == []
    assert src.finalize_requests == [] and dst.finalize_requests == []
    assert migration(server, mid)["status"] == "running"
    src.hold = False
    assert server.wait_task(running["id"])["state"] == "success"
    assert vm(server) == ("host-1", ON)


# -- 8. a cancel in the switchover ----------------------------------------------------------------------
def test_cancel_in_the_switchover_is_refused_and_the_migration_completes(
    server: ServerHarness, pair: Pair
) -> None:
    src, dst = pair
    src.hold_switchover = True
    started = migrate(server)
    mid, tid = started["migration_id"], started["id"]
    wait_for(lambda: migration(server, mid)["phase"] == "switchover", 10, "the switchover")

    r = server.client.post(f"/tasks/{tid}/cancel")
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["code"] == "switchover_started" and SWITCHOVER_STARTED in err["message"], err
    assert ("POST", f"/api/v1/migrations/{mid}/cancel") in src.mutations
    refused = events(server, kind="migration.cancel_refused")
    assert len(refused) == 1 and refused[0]["severity"] == "warning"
    assert f"cancel of migration {mid} was refused" in refused[0]["message"]
    assert SWITCHOVER_STARTED in refused[0]["message"]
    assert server.client.get(f"/tasks/{tid}").json()["state"] == "running"
    assert migration(server, mid)["status"] == "running"
    assert ("DELETE", f"/api/v1/migrations/{mid}") not in dst.mutations

    src.hold_switchover = False
    task = server.wait_task(tid)
    assert task["state"] == "success", task
    m = migration(server, mid)
    assert m["status"] == "completed" and m["error"] is None
    assert vm(server) == ("host-2", ON)
    assert events(server, kind="task.cancelled") == [] and events(server, kind="migration.failed") == []


# -- 9. a lost VM -----------------------------------------------------------------------------------
def test_a_lost_vm_is_reported_critical_and_powered_off(server: ServerHarness, pair: Pair) -> None:
    src, dst = pair
    src.end = SourceEnd.LOST
    started = migrate(server)
    mid = started["migration_id"]
    task = server.wait_task(started["id"])
    assert task["state"] == "error", task
    assert f"Migration {mid}: VM 'vm-1' is lost" in task["error"]["message"]
    assert "from its disks" in task["error"]["hint"]
    m = migration(server, mid)
    assert m["status"] == "lost" and m["phase"] == "lost" and m["finished_at"] is not None
    assert m["error"]["code"] == "vm_lost" and "serial log is kept" in m["error"]["message"]
    assert vm(server) == ("host-1", OFF)
    lost = events(server, kind="vm.lost")
    assert len(lost) == 1 and lost[0]["severity"] == "critical", lost
    assert f"migration {mid}" in lost[0]["message"] and "vmshift vm start vm-1" in lost[0]["message"]
    assert events(server, kind="vm.migrated") == [] and events(server, kind="migration.needs_finalize") == []
    heartbeats(server, src)
    assert vm(server) == ("host-1", OFF)
    assert events(server, kind="vm.missing") == []
    # nothing waits: no finalize
    r = server.client.post(f"/migrations/{mid}/finalize")
    assert r.status_code == 409 and "is lost" in r.json()["error"]["message"]
    assert src.finalize_requests == [] and dst.activations == []


# -- 10. a source record of another server ----------------------------------------------------------
def test_a_start_answered_with_another_nonce_is_not_taken_for_this_migration(
    server: ServerHarness, pair: Pair
) -> None:
    src, dst = pair
    src.foreign_nonce = "0123456789abcdef0123456789abcdef"
    started = migrate(server)
    mid = started["migration_id"]
    task = server.wait_task(started["id"])
    assert task["state"] == "error", task
    assert "belongs to another server or an older database" in task["error"]["message"]
    assert src.outgoing[mid].nonce is not None and src.outgoing[mid].nonce != src.foreign_nonce
    m = migration(server, mid)
    assert m["status"] == "failed" and "belongs to another server" in m["error"]["message"]
    assert vm(server) == ("host-1", ON)
    assert ("DELETE", f"/api/v1/migrations/{mid}") in dst.mutations  # the prepared target is rolled back


def test_a_record_that_turns_into_another_servers_is_never_followed(
    server: ServerHarness, pair: Pair
) -> None:
    src, _dst = pair
    src.hold = True
    started = migrate(server)
    mid, tid = started["migration_id"], started["id"]
    wait_for(lambda: migration(server, mid)["phase"] == "precopy", 10, "pre-copy")
    # the agent's record of this id is now another server's, and that one has completed
    src.foreign_nonce = "another-server"
    record = src.progress[mid]
    record.status, record.phase = MigrationStatus.COMPLETED, MigrationPhase.COMPLETED
    polls = len(src.journal)

    def followed_or_ended() -> bool:
        ended = server.client.get(f"/tasks/{tid}").json()["state"] != "running"
        return ended or len(src.journal) >= polls + 3

    wait_for(followed_or_ended, 10, "three more polls of the source")
    task = server.client.get(f"/tasks/{tid}").json()
    assert task["state"] == "running", task
    assert migration(server, mid)["status"] == "running"
    assert vm(server)[0] == "host-1" and events(server, kind="vm.migrated") == []

    # this migration's own record answers again: it is followed to its end
    src.foreign_nonce = None
    record.status, record.phase = MigrationStatus.RUNNING, MigrationPhase.PRECOPY
    src.hold = False
    assert server.wait_task(tid)["state"] == "success"
    assert vm(server) == ("host-2", ON)


def test_a_restarted_server_does_not_adopt_another_servers_record(server: ServerHarness, pair: Pair) -> None:
    src, _dst = pair
    src.hold = True
    started = migrate(server)
    mid, tid = started["migration_id"], started["id"]
    wait_for(lambda: migration(server, mid)["phase"] == "precopy", 10, "pre-copy")
    server.stop()
    src.foreign_nonce = "another-server"
    record = src.progress[mid]
    record.status, record.phase = MigrationStatus.COMPLETED, MigrationPhase.COMPLETED
    server.start()
    task = server.wait_task(tid)
    assert task["state"] == "error", task
    m = migration(server, mid)
    assert m["status"] == "failed", m
    assert vm(server)[0] == "host-1" and events(server, kind="vm.migrated") == []


# -- 11. a cancelled queued migration ----------------------------------------------------------------
def test_a_cancelled_queued_migration_ends_at_once_and_the_next_one_starts(
    server: ServerHarness, pair: Pair
) -> None:
    src, dst = pair
    start_vm(server, "vm-2")
    start_vm(server, "vm-3")
    r = server.client.patch("/hosts/host-1/migration-settings", json={"migration_limit": 1})
    assert r.status_code == 200
    src.hold = True
    first = migrate(server)
    wait_for(lambda: migration(server, first["migration_id"])["status"] == "running", 10, "first running")
    second = migrate(server, "vm-2")
    third = migrate(server, "vm-3")
    for queued in (second, third):
        wait_for(lambda q=queued: "queued" in server.client.get(f"/tasks/{q['id']}").json()["phase"],
                 10, "queued")  # fmt: skip
        assert migration(server, queued["migration_id"])["status"] == "queued"

    r = server.client.post(f"/tasks/{second['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    m = migration(server, second["migration_id"])
    assert m["status"] == "cancelled" and m["error"]["code"] == "cancelled" and m["finished_at"] is not None
    assert vm(server, "vm-2") == ("host-1", ON)
    assert second["migration_id"] not in src.outgoing and second["migration_id"] not in dst.incoming
    assert migration(server, third["migration_id"])["status"] == "queued"  # the slot is still the first's

    src.hold = False
    assert server.wait_task(first["id"])["state"] == "success"
    assert server.wait_task(third["id"])["state"] == "success"
    assert migration(server, third["migration_id"])["status"] == "completed"
    assert {v["name"]: v["host"] for v in server.client.get("/vms").json()} == {
        "vm-1": "host-2",
        "vm-2": "host-1",
        "vm-3": "host-2",
    }
    assert starts(src) == 2  # vm-1 and vm-3; the cancelled vm-2 never reached the source
