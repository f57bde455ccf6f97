"""Retention of events, tasks and migrations (server/retention.py): what goes, and what never goes.

The first test runs the server's own purge loop against fake agents; the others call one purge on a
real database (PostgreSQL in CI) with rows written straight into it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from conftest import ServerHarness, wait_for
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker
from test_migrations_fakes import AgentStarter, migrating_agents_fixture, start_vm  # noqa: F401

from vmshift.model.enums import EventSeverity, MigrationKind, TaskState
from vmshift.model.migration import MigrationPhase, MigrationStatus
from vmshift.server.db.schema import EventRow, MigrationRow, TaskRow, utcnow
from vmshift.server.db.setup import make_engine, upgrade_schema
from vmshift.server.retention import Retention, RetentionPolicy

OLD = utcnow() - timedelta(days=60)


@pytest.fixture
def quick_purge_server(tmp_path: Path, db_url: str) -> Iterator[ServerHarness]:
    harness = ServerHarness(tmp_path / "state", db_url)
    harness.settings = dataclasses.replace(harness.settings, retention_interval_s=0.2)
    harness.start()
    try:
        yield harness
    finally:
        harness.close()


def _backdate_everything(server: ServerHarness) -> None:
    sessions = sessionmaker(server._db)
    with sessions.begin() as s:
        s.execute(update(EventRow).values(time=OLD))
        s.execute(update(TaskRow).values(created_at=OLD))
        s.execute(update(TaskRow).where(TaskRow.finished_at.is_not(None)).values(finished_at=OLD))
        s.execute(update(MigrationRow).values(created_at=OLD))
        s.execute(update(MigrationRow).where(MigrationRow.finished_at.is_not(None)).values(finished_at=OLD))


def test_the_server_purges_old_history_but_keeps_a_running_migration(
    quick_purge_server: ServerHarness, migrating_agents: AgentStarter
) -> None:
    server = quick_purge_server
    h1, t1 = migrating_agents("host-1")
    h2, t2 = migrating_agents("host-2")
    h1.peer, h2.peer = h2, h1
    h2.journal = h1.journal
    server.add_host(t1)
    server.add_host(t2)
    start_vm(server)
    done = server.client.post("/vms/vm-1/migrate", json={"host": "host-2"}).json()
    assert server.wait_task(done["id"])["state"] == "success"
    h2.hold = True  # the way back stays running
    running = server.client.post("/vms/vm-1/migrate", json={"host": "host-1"}).json()
    def status() -> str:
        return str(server.client.get(f"/migrations/{running['migration_id']}").json()["status"])

    wait_for(lambda: status() == "running", 10, "the second migration to run")
    create_task = next(t for t in server.client.get("/tasks").json() if t["kind"] == "vm.create")
    assert create_task["state"] == "success"
    old_events = len(server.client.get("/events?limit=10000").json())

    _backdate_everything(server)

    def gone(path: str) -> bool:
        return bool(server.client.get(path).status_code == 404)

    def old_events_left() -> int:
        with server._db.connect() as conn:
            q = select(func.count()).select_from(EventRow).where(EventRow.time < OLD + timedelta(days=1))
            return conn.scalar(q) or 0

    wait_for(lambda: gone(f"/migrations/{done['migration_id']}") and gone(f"/tasks/{done['id']}")
             and gone(f"/tasks/{create_task['id']}") and old_events_left() == 0, 10, "the old history to go")
    kept = server.client.get(f"/migrations/{running['migration_id']}").json()
    assert kept["status"] == "running"
    assert server.client.get(f"/tasks/{running['id']}").json()["state"] == "running"
    assert [m["id"] for m in server.client.get("/migrations").json()] == [running["migration_id"]]

    # every purge that removed something said so (a purge may have caught the back-dating half-way,
    # so there may be two): together they count each removed row once
    purges = [e for e in server.client.get("/events?target=server").json() if e["kind"] == "retention.purged"]
    assert purges and all(e["severity"] == "info" for e in purges)
    removed: dict[str, int] = {}
    count = re.compile(r"(\d+) (finished migration|finished task|event)\(s\) older than 30 day\(s\)")
    for e in purges:
        for n, what in count.findall(e["message"]):
            removed[what] = removed.get(what, 0) + int(n)
    assert removed["finished migration"] == 1 and removed["finished task"] == 2  # vm.create, the done move
    assert removed["event"] >= old_events  # and those recorded between the count and the back-dating

    h2.hold = False
    assert server.wait_task(running["id"])["state"] == "success"
    assert server.client.get(f"/migrations/{running['migration_id']}").json()["status"] == "completed"


# -- one purge on a database --------------------------------------------------------------------------
@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    upgrade_schema(engine)
    try:
        yield sessionmaker(engine, expire_on_commit=False)
    finally:
        engine.dispose()


def _task(s: Session, state: TaskState, finished_at: datetime | None, created_at: datetime = OLD) -> int:
    row = TaskRow(kind="vm.migrate", target="vm-1", state=state, created_at=created_at,
                  finished_at=finished_at)
    s.add(row)
    s.flush()
    return row.id


def _migration(s: Session, status: MigrationStatus, finished_at: datetime | None, task_id: int | None) -> int:
    row = MigrationRow(vm="vm-1", kind=MigrationKind.LIVE, source_host="host-1", target_host="host-2",
                       status=status, phase=MigrationPhase.PRECOPY, task_id=task_id, created_at=OLD,
                       finished_at=finished_at)
    s.add(row)
    s.flush()
    return row.id


def _ids(s: Session, table: type[TaskRow] | type[MigrationRow]) -> set[int]:
    return set(s.scalars(select(table.id)))


def test_unfinished_work_and_what_it_names_are_never_purged(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        # an old migration waiting for finalize whose task already ended: both stay
        t_finalize = _task(s, TaskState.ERROR, OLD)
        m_finalize = _migration(s, MigrationStatus.NEEDS_FINALIZE, None, t_finalize)
        # a finished migration whose task still runs (it records the end): both stay
        t_busy = _task(s, TaskState.RUNNING, None)
        m_busy = _migration(s, MigrationStatus.COMPLETED, OLD, t_busy)
        # queued and running migrations and tasks, created long ago
        t_queued = _task(s, TaskState.QUEUED, None)
        m_queued = _migration(s, MigrationStatus.QUEUED, None, t_queued)
        m_running = _migration(s, MigrationStatus.RUNNING, None, None)
        # finished and old: these go
        t_done = _task(s, TaskState.SUCCESS, OLD)
        m_done = _migration(s, MigrationStatus.FAILED, OLD, t_done)
        m_lost = _migration(s, MigrationStatus.LOST, None, None)  # no finish recorded: its creation counts
        t_cancelled = _task(s, TaskState.CANCELLED, OLD)
        # finished but young: stays
        t_young = _task(s, TaskState.SUCCESS, utcnow() - timedelta(days=29), created_at=utcnow())

    counts = Retention(sessions, RetentionPolicy(), 3600).purge()

    assert (counts.migrations, counts.tasks) == (2, 2)
    with sessions() as s:
        assert _ids(s, MigrationRow) == {m_finalize, m_busy, m_queued, m_running}
        assert _ids(s, TaskRow) == {t_finalize, t_busy, t_queued, t_young}
        assert m_done not in _ids(s, MigrationRow) and m_lost not in _ids(s, MigrationRow)
        assert t_done not in _ids(s, TaskRow) and t_cancelled not in _ids(s, TaskRow)
        summary = s.scalars(select(EventRow).where(EventRow.kind == "retention.purged")).all()
    assert [e.message for e in summary] == [
        "Retention removed 2 finished migration(s) older than 30 day(s), "
        "2 finished task(s) older than 30 day(s)."
    ]


def test_purge_deletes_in_batches_and_zero_days_keeps_forever(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        s.add_all(EventRow(time=OLD, severity=EventSeverity.INFO, kind="vm.created", target=f"vm-{i}",
                           message="old") for i in range(1203))
        s.add(EventRow(time=utcnow(), severity=EventSeverity.INFO, kind="vm.created", target="new",
                       message="new"))
        done = _task(s, TaskState.SUCCESS, OLD)

    keep_all = Retention(sessions, RetentionPolicy(event_days=0, task_days=0, migration_days=0), 3600).purge()
    assert keep_all.total == 0
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(EventRow)) == 1204
        purges = select(func.count()).select_from(EventRow).where(EventRow.kind == "retention.purged")
        assert s.scalar(purges) == 0

    counts = Retention(sessions, RetentionPolicy(task_days=0, batch_rows=500), 3600).purge()
    assert (counts.events, counts.tasks, counts.migrations) == (1203, 0, 0)
    with sessions() as s:
        left = s.scalars(select(EventRow).order_by(EventRow.id)).all()
        assert [e.target for e in left] == ["new", "server"]
        assert left[1].message == "Retention removed 1203 event(s) older than 30 day(s)."
        assert _ids(s, TaskRow) == {done}
