"""Per-host migration slots: one FIFO queue for every kind of move (live, relocate, disk moves).

A move waits, queued, until neither of its hosts is at its concurrent-migration limit counting the
running moves and the older queued ones (``placement.capacity.at_limit`` decides). The state is in
the database (the rows' status), so the queue holds across a server restart; the condition only
wakes the waiters early when a move ends.
"""

from __future__ import annotations

import asyncio
import contextlib

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from vmshift.migration.phases import check_transition
from vmshift.model.migration import MigrationPhase, MigrationStatus
from vmshift.placement.capacity import at_limit
from vmshift.server.db.schema import HostRow, MigrationRow, utcnow
from vmshift.server.migration_store import get_migration_row
from vmshift.server.tasks import TaskContext


class MigrationSlots:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._ended = asyncio.Condition()

    async def release(self) -> None:
        """A move (of any kind) ended: wake the ones queued for a slot."""
        async with self._ended:
            self._ended.notify_all()

    async def acquire(self, ctx: TaskContext, mid: int) -> bool:
        """Wait until both hosts are below their limits (FIFO), then mark the move running; True if
        it waited (the caller checks the move again: the world may have changed)."""
        waited = False
        while True:
            with self._sessions.begin() as s:
                row = get_migration_row(s, mid)
                if row.status is not MigrationStatus.QUEUED:
                    return waited
                if slot_free(s, row):
                    row.phase = check_transition(row.phase, MigrationPhase.CHECK)
                    row.status, row.started_at = MigrationStatus.RUNNING, utcnow()
                    return waited
            if not waited:
                ctx.progress("queued: waiting for a migration slot", 0)
                waited = True
            async with self._ended:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ended.wait(), timeout=1.0)


def slot_free(s: Session, row: MigrationRow) -> bool:
    """Running migrations plus older queued ones stay below each host's limit (FIFO per host)."""
    hosts = {row.source_host, row.target_host}
    limits = {h.name: h.migration_limit for h in s.scalars(select(HostRow).where(HostRow.name.in_(hosts)))}
    busy = dict.fromkeys(hosts, 0)
    for other in s.scalars(
        select(MigrationRow).where(
            MigrationRow.id != row.id,
            (MigrationRow.status == MigrationStatus.RUNNING)
            | ((MigrationRow.status == MigrationStatus.QUEUED) & (MigrationRow.id < row.id)),
        )
    ):
        for h in {other.source_host, other.target_host} & hosts:
            busy[h] += 1
    return not at_limit(busy, limits, hosts)
