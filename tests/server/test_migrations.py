"""Live migration through the server against fake source/target agents (real HTTP, real database)."""

from __future__ import annotations

from typing import Any

import httpx
from conftest import ServerHarness, wait_for
from sqlalchemy import create_engine, func, select
from test_migrations_fakes import BANDWIDTH, DIRTY_RATE, Pair, migrating_agents_fixture, pair_fixture  # noqa: F401

from vmshift.model.enums import PowerState
from vmshift.model.migration import Migration
from vmshift.server.db.schema import MigrationRow, TaskRow


def migrate(server: ServerHarness, vm: str = "vm-1", **kw: Any) -> Any:
    return server.client.post(f"/vms/{vm}/migrate", json={"host": "host-2", **kw})


def migration_count(server: ServerHarness) -> tuple[int, int]:
    engine = create_engine(server.settings.database_url())
    try:
        with engine.connect() as conn:
            return (
                conn.scalar(select(func.count()).select_from(MigrationRow)) or 0,
                conn.scalar(select(func.count()).select_from(TaskRow).where(TaskRow.kind == "vm.migrate"))
                or 0,
            )
    finally:
        engine.dispose()


def migration_calls(agent: Any) -> list[tuple[str, str]]:
    return [m for m in agent.mutations if "/migrations" in m[1]]


def test_happy_path_moves_the_vm_and_stores_metrics(server: ServerHarness, pair: Pair) -> None:
    src, dst = pair
    r = migrate(server)
    assert r.status_code == 202, r.text
    started = r.json()
    assert started["kind"] == "vm.migrate" and started["migration_id"] > 0
    task = server.wait_task(started["id"])
    assert task["state"] == "success", task
    assert task["result"]["migration_id"] == started["migration_id"] and task["percent"] == 100

    m = Migration.model_validate(server.client.get(f"/migrations/{started['migration_id']}").json())
    assert m.status.value == "completed" and m.phase.value == "completed"
    assert (m.source_host, m.target_host, m.task_id) == ("host-1", "host-2", started["id"])
    assert m.metrics.total_ms == 1234 and m.downtime_ms == 42 and m.rounds == 3 and m.bytes_sent > 0
    assert [a.kind.value for a in m.actions] == ["set_downtime_limit"]
    assert m.prediction is not None and m.predicted_total_ms is not None
    assert m.prediction.bandwidth_bps == BANDWIDTH and m.prediction.dirty_rate_bps == DIRTY_RATE
    assert m.prediction.zero_fraction == 0.75  # the fake QEMU is resident for a quarter of the guest
    assert m.checks is not None and m.checks.ok and m.finished_at is not None
    assert m.settings.max_downtime_ms == 500 and not m.settings.allow_postcopy

    vm = server.client.get("/vms/vm-1").json()
    assert vm["host"] == "host-2" and vm["power_state"] == "poweredOn"
    # the target got the VM's spec and a grant for host-1; the source the target's address and
    # the grant's capability (a new one per migration)
    assert dst.incoming == {} and "vm-1" in dst.vms and "vm-1" not in src.vms
    out = src.outgoing[m.id]
    grant = dst.grants[m.id]
    assert grant.peer == "host-1" and out.target_agent.capability == grant.capability
    assert len(grant.capability) >= 43 and grant.expires_at > m.finished_at
    assert dst.revoked == [m.id]  # once it completed, the source may call the target no more
    assert out.uri == "tcp:127.0.0.1:4444"
    assert out.bandwidth_bps == BANDWIDTH and out.dirty_rate_bps == DIRTY_RATE
    kinds = [e["kind"] for e in server.client.get("/events?target=vm-1").json()]
    assert "vm.migrated" in kinds and "migration.started" in kinds
    listed = server.client.get("/migrations?vm=vm-1").json()
    assert [x["id"] for x in listed] == [m.id]
    # the heartbeat keeps the VM on host-2 (the target now reports it, the source does not)
    hb = server.client.get("/hosts/host-2").json()["last_heartbeat"]
    wait_for(lambda: server.client.get("/hosts/host-2").json()["last_heartbeat"] != hb, 10, "a heartbeat")
    assert server.client.get("/vms/vm-1").json()["host"] == "host-2"
    assert server.client.get("/hosts/host-2").json()["vms"] == ["vm-1"]

    # and back again, with a per-migration downtime budget
    r = server.client.post("/vms/vm-1/migrate", json={"host": "host-1", "max_downtime_ms": 800})
    assert r.status_code == 202, r.text
    assert server.wait_task(r.json()["id"])["state"] == "success"
    assert server.client.get("/vms/vm-1").json()["host"] == "host-1"
    back = server.client.get(f"/migrations/{r.json()['migration_id']}").json()
    assert back["settings"]["max_downtime_ms"] == 800

    # a switch to post-copy after some seconds needs post-copy allowed; then it reaches the source agent
    r = migrate(server, postcopy_after_s=2.5)
    assert r.status_code == 400 and "post-copy is not allowed for VM 'vm-1'" in r.json()["error"]["message"]
    assert "--allow-postcopy" in r.json()["error"]["hint"]
    assert server.client.get("/vms/vm-1").json()["host"] == "host-1"
    r = migrate(server, postcopy_after_s=2.5, allow_postcopy=True)
    assert r.status_code == 202, r.text
    assert server.wait_task(r.json()["id"])["state"] == "success"
    settings = src.outgoing[r.json()["migration_id"]].settings
    assert settings.allow_postcopy and settings.postcopy_after_s == 2.5

    text = server.client.get(f"{server.url}/metrics")
    assert text.status_code == 200
    assert 'vmshift_migrations{status="completed"} 3' in text.text
    assert "vmshift_migration_downtime_seconds_count 3" in text.text
    assert 'vmshift_migration_downtime_seconds_bucket{le="0.05"} 3' in text.text
    assert httpx.get(f"{server.url}/metrics", verify=server.tls()).status_code == 401  # same token as the API


def test_check_only_and_dry_run_answer_without_starting(server: ServerHarness, pair: Pair) -> None:
    src, dst = pair
    r = migrate(server, check_only=True)
    assert r.status_code == 200, r.text
    results = {x["check"]: x for x in r.json()["results"]}
    assert all(x["severity"] == "ok" for x in results.values()), results  # both hosts hold certificates
    assert "reaches host-2" in results["reachability"]["message"]

    r = migrate(server, dry_run=True, bandwidth_limit_bps=50e6)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prediction"]["bandwidth_bps"] == 50e6  # the limit caps the measured 125 MB/s
    assert body["prediction"]["dirty_rate_bps"] == DIRTY_RATE
    assert body["prediction"]["memory_bytes"] == 256 * 2**20 and body["prediction"]["total_ms"] > 0
    assert body["settings"]["bandwidth_limit_bps"] == 50e6
    assert migration_count(server) == (0, 0)
    assert migration_calls(src) == [] and migration_calls(dst) == []
    assert server.client.get("/vms/vm-1").json()["host"] == "host-1"


def test_failed_checks_answer_the_first_error_and_change_nothing(server: ServerHarness, pair: Pair) -> None:
    src, dst = pair
    cases = []
    server.client.post("/hosts/host-2/maintenance", json={"enter": True})
    cases.append(
        (migrate(server), 409, "The target host host-2 is in maintenance mode.", "target_maintenance")
    )
    server.client.post("/hosts/host-2/maintenance", json={"enter": False})
    dst.netperf = False  # an agent without the netperf endpoints
    cases.append((migrate(server), 409, "no netperf endpoint", "reachability"))
    dst.netperf, src.reachable = True, False
    cases.append((migrate(server), 409, "cannot reach 127.0.0.1:9", "reachability"))
    src.reachable = True
    cases.append((migrate(server, host="host-1"), 409, "already runs on host-1", "kind"))  # nothing to move
    for r, status, text, check in cases:
        assert r.status_code == status, r.text
        body = r.json()
        assert text in body["error"]["message"] and body["error"]["hint"], body
        failed = [x for x in body["report"]["results"] if x["severity"] == "error"]
        assert failed[0]["check"] == check and failed[0]["message"] == body["error"]["message"]
    r = migrate(server, host="host-9")
    assert r.status_code == 404 and "host-9" in r.json()["error"]["message"]
    # check_only reports the error with 200 (the CLI exits 1 on it)
    src.reachable = False
    r = migrate(server, check_only=True)
    assert r.status_code == 200 and any(x["severity"] == "error" for x in r.json()["results"])
    assert migration_count(server) == (0, 0)
    assert migration_calls(src) == [] and migration_calls(dst) == []
    assert server.client.get("/vms/vm-1").json()["host"] == "host-1"


def test_failure_leaves_the_vm_on_the_source(server: ServerHarness, pair: Pair) -> None:
    src, dst = pair
    src.fail_at_round = 2
    r = migrate(server)
    assert r.status_code == 202
    task = server.wait_task(r.json()["id"])
    assert task["state"] == "error" and "target QEMU exited" in task["error"]["message"], task
    m = server.client.get(f"/migrations/{r.json()['migration_id']}").json()
    assert m["status"] == "failed" and "target QEMU exited" in m["error"]["message"]
    vm = server.client.get("/vms/vm-1").json()
    assert vm["host"] == "host-1" and vm["power_state"] == "poweredOn"
    assert "vm-1" in src.vms and "vm-1" not in dst.vms
    kinds = [e["kind"] for e in server.client.get("/events?target=vm-1").json()]
    assert "migration.failed" in kinds and "vm.migrated" not in kinds


def test_cancel_forwards_to_the_source_and_keeps_the_vm(server: ServerHarness, pair: Pair) -> None:
    src, dst = pair
    src.hold = True
    r = migrate(server)
    mid, tid = r.json()["migration_id"], r.json()["id"]
    wait_for(lambda: server.client.get(f"/tasks/{tid}").json()["phase"].startswith("precopy"), 10, "precopy")
    m = server.client.get(f"/migrations/{mid}").json()
    assert m["status"] == "running" and m["progress"]["round"] == 1 and m["progress"]["total_bytes"] > 0
    # the paused source during "switchover" must not make the heartbeat record a state change
    src.vms["vm-1"].power_state = PowerState.PAUSED
    hb = server.client.get("/hosts/host-1").json()["last_heartbeat"]
    wait_for(lambda: server.client.get("/hosts/host-1").json()["last_heartbeat"] != hb, 10, "a heartbeat")
    assert server.client.get("/vms/vm-1").json()["power_state"] == "poweredOn"

    r = server.client.post(f"/tasks/{tid}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.json()
    assert ("POST", f"/api/v1/migrations/{mid}/cancel") in src.mutations
    m = server.client.get(f"/migrations/{mid}").json()
    assert m["status"] == "cancelled" and m["error"]["code"] == "cancelled"
    assert server.client.get("/vms/vm-1").json()["host"] == "host-1"
    assert dst.incoming == {}


def test_migrations_queue_beyond_the_host_limit(server: ServerHarness, pair: Pair) -> None:
    from test_migrations_fakes import start_vm

    src, _dst = pair
    start_vm(server, "vm-2")
    r = server.client.patch("/hosts/host-1/migration-settings", json={"migration_limit": 1})
    assert r.status_code == 200 and r.json()["migration_limit"] == 1
    src.hold = True
    first = migrate(server).json()
    wait_for(lambda: server.client.get(f"/migrations/{first['migration_id']}").json()["status"] == "running",
             10, "first migration running")  # fmt: skip
    r = migrate(server, "vm-2", check_only=True)
    conc = next(x for x in r.json()["results"] if x["check"] == "concurrency")
    assert conc["severity"] == "warning" and "queue" in conc["message"]
    second = migrate(server, "vm-2").json()
    wait_for(lambda: "queued" in server.client.get(f"/tasks/{second['id']}").json()["phase"], 10, "queued")
    assert server.client.get(f"/migrations/{second['migration_id']}").json()["status"] == "queued"
    assert len([c for c in src.mutations if c == ("POST", "/api/v1/migrations")]) == 1
    r = migrate(server)  # the same VM twice: refused
    assert r.status_code == 409 and "already being migrated" in r.json()["error"]["message"]
    src.hold = False
    assert server.wait_task(first["id"])["state"] == "success"
    assert server.wait_task(second["id"])["state"] == "success"
    assert {v["name"]: v["host"] for v in server.client.get("/vms").json()} == {
        "vm-1": "host-2",
        "vm-2": "host-2",
    }
