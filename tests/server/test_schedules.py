"""Scheduled migrations through a real server (SQLite or PostgreSQL) and fake agents.

Runs are due a second or two away and the tests wait on the run's event, never on a sleep. Restarts
stop and start the same server on the same database; a crash between claim and start is made by
writing the claimed run straight into the database while the server is down.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import ServerHarness, wait_for
from sqlalchemy import Engine, create_engine, func, insert, select, update
from test_migrations_fakes import Pair, migrating_agents_fixture, pair_fixture  # noqa: F401
from typer.testing import CliRunner

from vmshift.cli.main import app
from vmshift.errors import VmshiftError
from vmshift.model.schedule import ScheduleRunOutcome
from vmshift.server.db.schema import MigrationRow, ScheduleRow, ScheduleRunRow


@pytest.fixture
def db(server: ServerHarness) -> Iterator[Engine]:
    engine = create_engine(server.settings.database_url())
    yield engine
    engine.dispose()


def soon(seconds: float = 2.0) -> str:  # far enough that a slow request still arrives before it
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def add(server: ServerHarness, **body: Any) -> Any:
    body.setdefault("vm", "vm-1")
    body.setdefault("migrate", {"host": "host-2"})
    return server.client.post("/schedules", json=body)


def events(server: ServerHarness, kind: str, target: str = "vm-1") -> list[dict[str, Any]]:
    return [e for e in server.client.get(f"/events?target={target}&limit=500").json() if e["kind"] == kind]


def wait_event(
    server: ServerHarness, kind: str, count: int = 1, timeout_s: float = 15
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = wait_for(
        lambda: (evs := events(server, kind)) and len(evs) >= count and evs,
        timeout_s,
        f"{count} {kind} event(s)",
    )
    return found


def show(server: ServerHarness, name: str) -> dict[str, Any]:
    r = server.client.get(f"/schedules/{name}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def migrations(db: Engine) -> int:
    with db.connect() as conn:
        return conn.scalar(select(func.count()).select_from(MigrationRow)) or 0


def test_a_scheduled_migration_fires_once_at_its_time_and_not_again_after_a_restart(
    server: ServerHarness, pair: Pair, db: Engine
) -> None:
    r = add(server, name="move-1", at=soon())
    assert r.status_code == 201, r.text
    assert r.json()["next_due_at"] is not None and r.json()["runs"] == []

    started = wait_event(server, "schedule.run_started")
    assert "move-1" in started[0]["message"]
    sched = show(server, "move-1")
    assert sched["next_due_at"] is None  # a one-time schedule is done once claimed
    [run] = sched["runs"]
    assert run["outcome"] == "started" and run["migration_id"] is not None
    assert server.wait_task(run["task_id"])["state"] == "success"
    assert server.client.get("/vms/vm-1").json()["host"] == "host-2"
    assert show(server, "move-1")["runs"][0]["migration_status"] == "completed"

    server.stop()
    server.start()
    # a later schedule firing proves the scheduler has looked at move-1 since the restart
    assert add(server, name="back", at=soon(), migrate={"host": "host-1"}).status_code == 201
    wait_event(server, "schedule.run_started", count=2)
    assert len(show(server, "move-1")["runs"]) == 1
    back = show(server, "back")["runs"][0]
    assert server.wait_task(back["task_id"])["state"] == "success"
    assert migrations(db) == 2 and server.client.get("/vms/vm-1").json()["host"] == "host-1"
    assert not events(server, "schedule.run_skipped")


def test_a_run_claimed_by_a_server_that_stopped_before_starting_it_is_skipped(
    server: ServerHarness, pair: Pair, db: Engine
) -> None:
    assert add(server, name="later", at=soon(3600)).status_code == 201
    server.stop()
    with db.begin() as conn:  # what a crash right after the claim's commit leaves behind
        sid, due = conn.execute(select(ScheduleRow.id, ScheduleRow.next_due_at)).one()
        conn.execute(update(ScheduleRow).values(next_due_at=None))
        conn.execute(
            insert(ScheduleRunRow).values(
                schedule_id=sid,
                due_at=due,
                claimed_at=datetime.now(UTC),
                outcome=ScheduleRunOutcome.CLAIMED.value,
            )
        )
    server.start()
    skipped = wait_event(server, "schedule.run_skipped")
    assert "never started twice" in skipped[0]["message"]
    [run] = show(server, "later")["runs"]
    assert run["outcome"] == "skipped" and run["migration_id"] is None
    assert migrations(db) == 0 and server.client.get("/vms/vm-1").json()["host"] == "host-1"


def test_due_times_missed_while_down_fire_once_within_grace_and_are_skipped_beyond_it(
    server: ServerHarness, pair: Pair, db: Engine
) -> None:
    now = datetime.now(UTC)
    hour_ago = now - timedelta(hours=1)
    assert add(server, name="every-minute", cron="* * * * *").status_code == 201
    assert add(server, name="daily", cron=f"{hour_ago.minute} {hour_ago.hour} * * *").status_code == 201
    server.stop()
    with db.begin() as conn:  # as if the server had been down for the last ten minutes / hour
        ten_min_ago = (now - timedelta(minutes=10)).replace(second=0, microsecond=0)
        conn.execute(
            update(ScheduleRow).where(ScheduleRow.name == "every-minute").values(next_due_at=ten_min_ago)
        )
        daily_due = hour_ago.replace(second=0, microsecond=0)
        conn.execute(update(ScheduleRow).where(ScheduleRow.name == "daily").values(next_due_at=daily_due))
    server.start()

    wait_event(server, "schedule.run_started")
    minute = show(server, "every-minute")
    assert server.client.delete("/schedules/every-minute").status_code == 200  # no second run in this test
    [run] = minute["runs"]
    assert run["outcome"] == "started" and "earlier due time(s)" in run["message"]
    assert now - timedelta(seconds=61) <= datetime.fromisoformat(run["due_at"]) <= datetime.now(UTC)

    skipped = wait_for(
        lambda: [e for e in events(server, "schedule.run_skipped") if "daily" in e["message"]],
        15,
        "daily's skip",
    )
    assert "grace window" in skipped[0]["message"]
    daily = show(server, "daily")
    assert [r["outcome"] for r in daily["runs"]] == ["skipped"]
    assert datetime.fromisoformat(daily["next_due_at"]) > datetime.now(UTC) + timedelta(hours=22)
    assert server.wait_task(run["task_id"])["state"] == "success"
    assert migrations(db) == 1


def test_a_run_whose_checks_fail_is_skipped_with_the_first_failed_check(
    server: ServerHarness, pair: Pair, db: Engine
) -> None:
    r = server.client.post("/hosts/host-2/maintenance", json={"enter": True})
    assert r.status_code == 200, r.text
    assert add(server, name="blocked", at=soon()).status_code == 201
    skipped = wait_event(server, "schedule.run_skipped")
    assert "maintenance" in skipped[0]["message"] and skipped[0]["severity"] == "warning"
    [run] = show(server, "blocked")["runs"]
    assert run["outcome"] == "skipped" and "maintenance" in run["message"] and run["migration_id"] is None
    assert migrations(db) == 0


def test_a_run_that_finds_the_vm_being_moved_is_skipped(
    server: ServerHarness, pair: Pair, db: Engine
) -> None:
    src, _dst = pair
    src.hold = True
    r = server.client.post("/vms/vm-1/migrate", json={"host": "host-2"})
    assert r.status_code == 202, r.text
    mid = r.json()["migration_id"]
    assert add(server, name="clash", at=soon()).status_code == 201
    skipped = wait_event(server, "schedule.run_skipped")
    assert f"migration {mid}" in skipped[0]["message"]
    assert show(server, "clash")["runs"][0]["outcome"] == "skipped" and migrations(db) == 1
    src.hold = False
    assert server.wait_task(r.json()["id"])["state"] == "success"


def test_add_refuses_what_cannot_work_with_one_clear_sentence(server: ServerHarness, pair: Pair) -> None:
    at = soon(3600)
    assert add(server, name="first", at=at).status_code == 201
    near = (datetime.fromisoformat(at) + timedelta(seconds=30)).isoformat()
    r = add(server, name="second", at=near)
    assert r.status_code == 409 and "first" in r.json()["error"]["message"] and r.json()["error"]["hint"]
    assert (
        add(
            server, name="second", at=(datetime.fromisoformat(at) + timedelta(minutes=2)).isoformat()
        ).status_code
        == 201
    )
    cases: list[tuple[dict[str, Any], int, str]] = [
        (dict(name="first", at=soon(7200)), 409, "exists already"),
        (dict(at=soon(-60)), 400, "in the past"),
        (dict(cron="every day"), 400, "not valid"),
        (dict(cron="0 2 * * *", timezone="Mars/Olympus"), 400, "not known"),
        (dict(at=soon(), cron="0 2 * * *"), 422, "exactly one"),
        (dict(at="2026-12-01T02:00:00"), 422, "time zone"),
        (dict(vm="nope", at=soon(60)), 404, "nope"),
        (dict(at=soon(60), migrate={"host": "host-9"}), 404, "host-9"),
        (dict(at=soon(60), migrate={"host": "host-2", "dry_run": True}), 422, "dry run"),
    ]
    for body, status, words in cases:
        r = add(server, **body)
        assert r.status_code == status, (body, r.text)
        assert words in r.json()["error"]["message"], (body, r.text)

    listed = server.client.get("/schedules").json()
    assert [s["name"] for s in listed] == ["first", "second"]
    assert server.client.get("/schedules?vm=vm-2").json() == []
    # half an hour off the two single times: a cron run within a minute of one would be refused
    cron = f"{(datetime.fromisoformat(at).minute + 30) % 60} 2 * * *"
    auto = add(server, cron=cron).json()
    assert auto["name"] == f"vm-1-{auto['id']}" and auto["cron"] == cron
    assert server.client.delete("/schedules/first").status_code == 200
    r = server.client.get("/schedules/first")
    assert r.status_code == 404 and "second" in r.json()["error"]["hint"]
    kinds = [e["kind"] for e in server.client.get("/events?target=vm-1").json()]
    assert "schedule.created" in kinds and "schedule.deleted" in kinds


def cli(server: ServerHarness, *args: str) -> tuple[int, str, BaseException | None]:
    result = CliRunner().invoke(app, [*server.cli_args(), *args])
    return result.exit_code, result.stdout, result.exception


def test_cli_add_list_show_delete_with_the_options_of_vm_migrate(server: ServerHarness, pair: Pair) -> None:
    code, out, _ = cli(server, "schedule", "add", "--at", "+1s", "--name", "soon", "--json", "--",
                       "vm", "migrate", "vm-1", "--host", "host-2", "--max-downtime", "700",
                       "--bandwidth-limit", "400mbit")  # fmt: skip
    assert code == 0, out
    added = json.loads(out)
    assert added["migrate"]["host"] == "host-2" and added["migrate"]["max_downtime_ms"] == 700
    assert added["migrate"]["bandwidth_limit_bps"] == 50e6
    wait_event(server, "schedule.run_started")
    code, out, _ = cli(server, "schedule", "show", "soon", "--json")
    [run] = json.loads(out)["runs"]
    assert code == 0 and run["outcome"] == "started"
    assert server.wait_task(run["task_id"])["state"] == "success"
    code, out, _ = cli(server, "schedule", "show", "soon")
    assert code == 0 and "Runs (newest first)" in out and "started" in out

    code, out, _ = cli(server, "schedule", "add", "--cron", "0 2 * * *", "--tz", "Europe/Paris", "--",
                       "vm", "migrate", "vm-1", "--host", "host-1")  # fmt: skip
    assert code == 0 and "cron '0 2 * * *' (Europe/Paris)" in out, out
    code, out, _ = cli(server, "schedule", "list", "--json")
    assert code == 0 and [s["name"] for s in json.loads(out)] == ["soon", "vm-1-2"]
    code, out, _ = cli(server, "schedule", "list")
    assert code == 0 and "soon" in out and "vm-1-2" in out

    for args, words in [
        (["--at", "+1h", "--", "vm", "migrate", "vm-1", "--host", "host-2", "--dry-run"], "no meaning"),
        (["--at", "+1h", "--", "vm", "migrate", "vm-1", "--hots", "host-2"], "No such option"),
        (["--at", "+1h", "--", "vm", "start", "vm-1"], "runs 'vm migrate'"),
        (["--at", "soon", "--", "vm", "migrate", "vm-1", "--host", "host-2"], "not an ISO 8601 time"),
        (["--", "vm", "migrate", "vm-1", "--host", "host-2"], "exactly one of --at"),
        (["--at", "+1h", "--", "vm", "migrate", "vm-1"], "names no target"),
    ]:
        code, _out, exc = cli(server, "schedule", "add", *args)
        assert code != 0 and isinstance(exc, VmshiftError) and words in str(exc), (args, exc)

    code, out, _ = cli(server, "schedule", "delete", "vm-1-2")
    assert code == 0 and "deleted" in out
    code, _out, exc = cli(server, "schedule", "show", "vm-1-2")
    assert code != 0 and isinstance(exc, VmshiftError) and exc.message == "Schedule 'vm-1-2' does not exist."
