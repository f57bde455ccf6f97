"""A server restart in mid-migration: the migration is resumed (not failed) and recorded."""

from __future__ import annotations

from conftest import ServerHarness, wait_for
from test_migrations_fakes import Pair, migrating_agents_fixture, pair_fixture  # noqa: F401


def test_server_restart_resumes_a_running_migration(server: ServerHarness, pair: Pair) -> None:
    src, _dst = pair
    src.hold = True
    r = server.client.post("/vms/vm-1/migrate", json={"host": "host-2"})
    assert r.status_code == 202
    mid, tid = r.json()["migration_id"], r.json()["id"]
    wait_for(lambda: server.client.get(f"/migrations/{mid}").json()["phase"] == "precopy", 10, "precopy")

    server.stop()  # graceful: the task must stay running in the database, the agent untouched
    assert ("POST", f"/api/v1/migrations/{mid}/cancel") not in src.mutations
    server.start()
    task = server.client.get(f"/tasks/{tid}").json()
    assert task["state"] == "running", task
    assert server.client.get(f"/migrations/{mid}").json()["status"] == "running"
    polls = len(src.mutations)
    src.hold = False
    done = server.wait_task(tid)
    assert done["state"] == "success", done
    m = server.client.get(f"/migrations/{mid}").json()
    assert m["status"] == "completed" and m["downtime_ms"] == 42
    assert server.client.get("/vms/vm-1").json()["host"] == "host-2"
    assert len(src.mutations) == polls  # resumed by polling, not by starting again
    events = [e["message"] for e in server.client.get("/events?target=vm-1").json()]
    assert any("resumed" in e for e in events)


def test_restart_before_the_source_started_prepares_again(server: ServerHarness, pair: Pair) -> None:
    """The server died between preparing the target and starting the source: roll back, prepare again."""
    src, dst = pair
    src.hold = True
    r = server.client.post("/vms/vm-1/migrate", json={"host": "host-2"})
    mid, tid = r.json()["migration_id"], r.json()["id"]
    wait_for(lambda: server.client.get(f"/migrations/{mid}").json()["phase"] == "precopy", 10, "precopy")
    server.stop()
    # make it look as if the source never got the start request
    src.progress.pop(mid)
    src.outgoing.pop(mid)
    from sqlalchemy import create_engine, update

    from vmshift.model.migration import MigrationPhase
    from vmshift.server.db.schema import MigrationRow

    engine = create_engine(server.settings.database_url())
    with engine.begin() as conn:
        conn.execute(update(MigrationRow).where(MigrationRow.id == mid).values(phase=MigrationPhase.PREPARE))
    engine.dispose()
    src.hold = False
    server.start()
    assert server.wait_task(tid)["state"] == "success"
    assert ("DELETE", f"/api/v1/migrations/{mid}") in dst.mutations
    assert mid in src.outgoing and server.client.get("/vms/vm-1").json()["host"] == "host-2"
