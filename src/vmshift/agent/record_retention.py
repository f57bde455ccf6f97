"""Retention of this agent's records: finished migration and move records older than
``record_retention_days`` (agent config; 0 keeps them forever) are removed from ``state_dir``.

A purge runs once at start, after the resumes, and then every ``PURGE_INTERVAL_S``. It never removes
the record of an unfinished migration (a source that is running or waits for finalize, a target
that still listens) or move, nor a rolled-back target record that still lists paths it could not
remove (that list is what a later cleanup needs). The owners of the in-memory copies are asked first
(``release``): one that still uses a record keeps it, file included.

A record's age counts from its end: a move's ``ended_at``, else the time its file was last written
(every change of a record rewrites its file, the last one when it ends).

Purges run in the event loop without awaiting in between, so no request handler sees a record
half-removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vmshift.agent.migration_store import MigrationRole, MigrationStore, StoredMigration, TargetState
from vmshift.agent.moves.store import MoveStore, StoredMove

log = logging.getLogger(__name__)

PURGE_INTERVAL_S = 3600.0
DAY_S = 86400.0

Release = Callable[[int], bool]
"""Asked before a record goes: drop it from memory and say True, or say False when still in use."""


def _always(_record_id: int) -> bool:
    return True


def migration_finished(rec: StoredMigration) -> bool:
    if rec.role is MigrationRole.SOURCE:
        return rec.progress is not None and rec.progress.status.finished
    if rec.target_state is None or not rec.target_state.finished:
        return False
    return rec.target_state is TargetState.ACTIVATED or not rec.created_paths


def move_finished(rec: StoredMove) -> bool:
    return rec.progress.state.finished


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


@dataclass
class PurgedRecords:
    migrations: list[int] = field(default_factory=list)
    moves: list[int] = field(default_factory=list)


class RecordRetention:
    def __init__(self, migrations: MigrationStore, moves: MoveStore, retention_days: int,
                 release_migration: Release = _always, release_move: Release = _always,
                 clock: Callable[[], float] = time.time) -> None:
        self.migrations = migrations
        self.moves = moves
        self.retention_days = retention_days
        self._release_migration = release_migration
        self._release_move = release_move
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    def purge(self) -> PurgedRecords:
        out = PurgedRecords()
        if self.retention_days <= 0:
            return out
        cut = self._clock() - self.retention_days * DAY_S
        for rec in self.migrations.all():
            ended = _mtime(self.migrations.path(rec.migration_id))
            if (migration_finished(rec) and ended is not None and ended < cut
                    and self._release_migration(rec.migration_id)):
                self.migrations.remove(rec.migration_id)
                out.migrations.append(rec.migration_id)
        for move in self.moves.all():
            move_id = move.progress.move_id
            ended = move.ended_at if move.ended_at is not None else _mtime(self.moves.path(move_id))
            if move_finished(move) and ended is not None and ended < cut and self._release_move(move_id):
                self.moves.remove(move_id)
                out.moves.append(move_id)
        if out.migrations or out.moves:
            log.info("retention removed %d migration record(s) and %d move record(s) older than %d day(s)",
                     len(out.migrations), len(out.moves), self.retention_days)
        return out

    def start(self) -> None:
        """Purge now, then every ``PURGE_INTERVAL_S``."""
        self._safe_purge()
        self._task = asyncio.create_task(self._loop(), name="agent-record-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(PURGE_INTERVAL_S)
            self._safe_purge()

    def _safe_purge(self) -> None:
        try:
            self.purge()
        except Exception:  # a bad file or a full disk must not stop the agent
            log.exception("record retention failed")
