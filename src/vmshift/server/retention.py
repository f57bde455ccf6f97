"""Retention: finished history (events, tasks, migrations) older than its setting is deleted.

A purge runs once at start and then every ``retention_interval_s``, in a worker thread so a large
backlog never stalls the API. It deletes in batches of ``retention_batch_rows`` rows, one short
transaction each, so other writers wait at most one batch. What it never deletes:

- a task that is queued or running, or that an unfinished migration names (``migration.task_id``);
- a migration that is queued, running or waiting for ``vmshift migration finalize``, or whose task is
  still queued or running.

Age is counted from when a task or migration finished (its creation if it never recorded a finish)
and from an event's time. A purge that removed something records one ``retention.purged`` event that
says how many rows of each kind went.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Select, and_, delete, exists, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from vmshift.model.api import EventKind
from vmshift.model.enums import TaskState
from vmshift.model.migration import MigrationStatus
from vmshift.server.db.schema import EventRow, MigrationRow, TaskRow, utcnow
from vmshift.server.events import record_event
from vmshift.server.migration_store import UNFINISHED
from vmshift.server.settings import ServerSettings

log = logging.getLogger("vmshift.server.retention")

FINISHED_TASK_STATES = tuple(s for s in TaskState if s.finished)
UNFINISHED_TASK_STATES = tuple(s for s in TaskState if not s.finished)
FINISHED_MIGRATION_STATUSES = tuple(s for s in MigrationStatus if s.finished)


@dataclass(frozen=True)
class RetentionPolicy:
    """Days to keep each kind of history (0: forever) and the rows one transaction deletes."""

    event_days: int = 30
    task_days: int = 30
    migration_days: int = 30
    batch_rows: int = 500

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> RetentionPolicy:
        return cls(
            event_days=settings.event_retention_days,
            task_days=settings.task_retention_days,
            migration_days=settings.migration_retention_days,
            batch_rows=settings.retention_batch_rows,
        )


def cutoff(now: datetime, days: int) -> datetime | None:
    """Rows older than this go; None when ``days`` is 0 (keep forever)."""
    return None if days <= 0 else now - timedelta(days=days)


@dataclass(frozen=True)
class PurgeCounts:
    events: int = 0
    tasks: int = 0
    migrations: int = 0

    @property
    def total(self) -> int:
        return self.events + self.tasks + self.migrations

    def message(self, policy: RetentionPolicy) -> str:
        parts = [
            f"{n} {what} older than {days} day(s)"
            for n, what, days in (
                (self.migrations, "finished migration(s)", policy.migration_days),
                (self.tasks, "finished task(s)", policy.task_days),
                (self.events, "event(s)", policy.event_days),
            )
            if n
        ]
        return f"Retention removed {', '.join(parts)}."


def _finished_before(finished_at: InstrumentedAttribute[datetime | None],
                     created_at: InstrumentedAttribute[datetime], cut: datetime) -> ColumnElement[bool]:
    """Finished before ``cut``; a row that never recorded its finish counts from its creation."""
    return or_(and_(finished_at.is_not(None), finished_at < cut),
               and_(finished_at.is_(None), created_at < cut))


def expired_migrations(cut: datetime, limit: int) -> Select[int]:
    task_busy = exists().where(TaskRow.id == MigrationRow.task_id, TaskRow.state.in_(UNFINISHED_TASK_STATES))
    return (
        select(MigrationRow.id)
        .where(
            MigrationRow.status.in_(FINISHED_MIGRATION_STATUSES),
            _finished_before(MigrationRow.finished_at, MigrationRow.created_at, cut),
            ~task_busy,
        )
        .order_by(MigrationRow.id)
        .limit(limit)
    )


def expired_tasks(cut: datetime, limit: int) -> Select[int]:
    named_by_open_migration = exists().where(
        MigrationRow.task_id == TaskRow.id, MigrationRow.status.in_(UNFINISHED)
    )
    return (
        select(TaskRow.id)
        .where(
            TaskRow.state.in_(FINISHED_TASK_STATES),
            _finished_before(TaskRow.finished_at, TaskRow.created_at, cut),
            ~named_by_open_migration,
        )
        .order_by(TaskRow.id)
        .limit(limit)
    )


def expired_events(cut: datetime, limit: int) -> Select[int]:
    return select(EventRow.id).where(EventRow.time < cut).order_by(EventRow.id).limit(limit)


class Retention:
    """Owns the purge loop; ``start`` and ``stop`` bracket it. ``purge`` is one round (tests call it)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        policy: RetentionPolicy,
        interval_s: float,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._sessions = sessions
        self._policy = policy
        self._interval_s = interval_s
        self._clock = clock
        self._stopping = threading.Event()
        self._purging = threading.Lock()  # held by the worker thread during a purge
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.create_task(self._loop(), name="vmshift-retention")

    async def stop(self) -> None:
        """Stop after the batch in flight, and wait for it: the database closes after this."""
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await asyncio.to_thread(self._wait_idle)

    def _wait_idle(self) -> None:
        with self._purging:
            pass

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.purge)
            except Exception:  # a database hiccup in one round must not end retention
                log.exception("retention purge failed")
            await asyncio.sleep(self._interval_s)

    def purge(self) -> PurgeCounts:
        """Delete what is past its retention, batch by batch; record one event if anything went."""
        with self._purging:
            now, policy = self._clock(), self._policy
            counts = PurgeCounts(
                migrations=self._delete(MigrationRow, expired_migrations, cutoff(now, policy.migration_days)),
                tasks=self._delete(TaskRow, expired_tasks, cutoff(now, policy.task_days)),
                events=self._delete(EventRow, expired_events, cutoff(now, policy.event_days)),
            )
            if counts.total:
                with self._sessions.begin() as s:
                    record_event(s, EventKind.RETENTION_PURGED, "server", counts.message(policy))
            return counts

    def _delete(
        self,
        table: type[MigrationRow] | type[TaskRow] | type[EventRow],
        expired: Callable[[datetime, int], Select[int]],
        cut: datetime | None,
    ) -> int:
        if cut is None:
            return 0
        removed, batch = 0, max(1, self._policy.batch_rows)
        while not self._stopping.is_set():
            with self._sessions.begin() as s:
                ids = list(s.scalars(expired(cut, batch)))
                if ids:
                    s.execute(delete(table).where(table.id.in_(ids)))
            removed += len(ids)
            if len(ids) < batch:
                break
        return removed
