"""Task engine: tasks live in the database and run as owned asyncio tasks.

One task at a time per target (a VM or host name): later tasks on the same target wait, queued.
A task left queued or running by a server that died is marked as failed at start-up, except
*resumable* kinds (live migrations): their owner picks them up again with ``start(..., resume=True)``,
and a server shutdown leaves them running in the database instead of failing them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from vmshift.errors import ConflictError, NotFoundError, VmshiftError
from vmshift.model.api import EventKind, TaskKind
from vmshift.model.enums import EventSeverity, TaskState
from vmshift.server.db.schema import TASK_PHASE_CHARS, TaskRow, utcnow
from vmshift.server.events import record_event

log = logging.getLogger("vmshift.server.tasks")


@dataclass
class TaskContext:
    """Handed to a task body so it can report its phase and progress."""

    task_id: int
    target: str
    sessions: sessionmaker[Session]
    engine: TaskEngine

    @property
    def server_stopping(self) -> bool:
        """True when a cancel comes from server shutdown, not from a user (do not roll back then)."""
        return self.engine.stopping

    def progress(self, phase: str, percent: int) -> None:
        with self.sessions.begin() as s:
            row = s.get(TaskRow, self.task_id)
            if row is not None:
                row.phase, row.percent = phase[:TASK_PHASE_CHARS], max(0, min(100, percent))


TaskBody = Callable[[TaskContext], Awaitable[dict[str, Any] | None]]
CancelGuard = Callable[[], Awaitable[None]]


class TaskEngine:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._running: dict[int, asyncio.Task[None]] = {}
        self._guards: dict[int, CancelGuard] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._active_targets: dict[str, int] = {}
        self._claimed: dict[str, int] = {}  # target -> tasks started (running or waiting for the lock)
        self._last_end: dict[str, float] = {}
        self.stopping = False

    @staticmethod
    def create(s: Session, kind: TaskKind, target: str, params: dict[str, Any] | None = None) -> TaskRow:
        """Add a queued task to the caller's transaction (so the change and its task commit together)."""
        row = TaskRow(
            kind=kind.value, target=target, state=TaskState.QUEUED, params=params or {}, phase="queued"
        )
        s.add(row)
        s.flush()
        return row

    def start(
        self,
        task_id: int,
        target: str,
        body: TaskBody,
        *,
        resumable: bool = False,
        resume: bool = False,
        cancel_guard: CancelGuard | None = None,
    ) -> None:
        """Run ``body`` for a committed task row; the engine owns the asyncio task.

        ``resumable``: a server shutdown leaves the task running in the database (its owner resumes it).
        ``resume``: the row is already running (picked up again after a server restart).
        ``cancel_guard``: awaited before a user's cancel; it raises (e.g. ConflictError) to refuse it.
        """
        if cancel_guard is not None:
            self._guards[task_id] = cancel_guard
        t = asyncio.create_task(
            self._run(task_id, target, body, resumable, resume), name=f"vmshift-task-{task_id}"
        )
        self._running[task_id] = t
        self._claimed[target] = self._claimed.get(target, 0) + 1

        def done(_t: asyncio.Task[None]) -> None:
            self._running.pop(task_id, None)
            self._guards.pop(task_id, None)
            left = self._claimed.get(target, 1) - 1
            if left > 0:
                self._claimed[target] = left
            else:
                self._claimed.pop(target, None)

        t.add_done_callback(done)

    def busy_since(self, target: str, since: float) -> bool:
        """True if a task works on ``target`` now or ended after loop time ``since``.

        The heartbeat leaves such VMs alone: an agent report fetched before a task finished is stale.
        """
        return (
            target in self._active_targets
            or target in self._claimed
            or self._last_end.get(target, float("-inf")) >= since
        )

    async def _run(self, task_id: int, target: str, body: TaskBody, resumable: bool, resume: bool) -> None:
        lock = self._locks.setdefault(target, asyncio.Lock())
        try:
            async with lock:
                self._active_targets[target] = task_id
                try:
                    await self._run_locked(task_id, target, body, resume)
                finally:
                    self._active_targets.pop(target, None)
                    self._last_end[target] = asyncio.get_running_loop().time()
        except asyncio.CancelledError:
            if self.stopping and resumable:
                log.info("task %s left running for the next server start", task_id)
            elif self.stopping:
                self._finish(
                    task_id,
                    TaskState.ERROR,
                    error={
                        "code": "server_stopped",
                        "message": "The server stopped while the task ran.",
                        "hint": "Check the target's state and run the operation again if needed.",
                    },
                )
            else:
                self._finish(task_id, TaskState.CANCELLED)
            raise

    async def _run_locked(self, task_id: int, target: str, body: TaskBody, resume: bool) -> None:
        with self._sessions.begin() as s:
            row = s.get(TaskRow, task_id)
            if row is None or row.state.finished:
                return
            if row.state is TaskState.RUNNING and not resume:
                return
            if row.state is TaskState.QUEUED:
                row.state, row.started_at, row.phase = TaskState.RUNNING, utcnow(), "running"
                record_event(s, EventKind.TASK_STARTED, target, f"Task {task_id} ({row.kind}) started.")
            else:
                record_event(s, EventKind.TASK_STARTED, target, f"Task {task_id} ({row.kind}) resumed.")
        try:
            result = await body(TaskContext(task_id, target, self._sessions, self))
        except VmshiftError as e:
            self._finish(task_id, TaskState.ERROR, error=e.to_dict())
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("task %s failed unexpectedly", task_id)
            self._finish(
                task_id,
                TaskState.ERROR,
                error={
                    "code": "internal",
                    "message": f"The task failed unexpectedly: {type(e).__name__}: {e}.",
                    "hint": "See the server log for details.",
                },
            )
        else:
            self._finish(task_id, TaskState.SUCCESS, result=result or {})

    def _finish(
        self,
        task_id: int,
        state: TaskState,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        with self._sessions.begin() as s:
            row = s.get(TaskRow, task_id)
            if row is None or row.state.finished:
                return
            row.state, row.finished_at, row.result, row.error = state, utcnow(), result, error
            row.phase = state.value
            if state is TaskState.SUCCESS:
                row.percent = 100
                record_event(
                    s, EventKind.TASK_FINISHED, row.target, f"Task {task_id} ({row.kind}) succeeded."
                )
            elif state is TaskState.CANCELLED:
                record_event(
                    s,
                    EventKind.TASK_CANCELLED,
                    row.target,
                    f"Task {task_id} ({row.kind}) was cancelled.",
                    EventSeverity.WARNING,
                )
            else:
                msg = (error or {}).get("message", "unknown error")
                record_event(
                    s,
                    EventKind.TASK_FAILED,
                    row.target,
                    f"Task {task_id} ({row.kind}) failed: {msg}",
                    EventSeverity.ERROR,
                )

    async def cancel(self, task_id: int) -> None:
        with self._sessions.begin() as s:
            row = s.get(TaskRow, task_id)
            if row is None:
                raise NotFoundError(
                    f"Task {task_id} does not exist.", hint="List tasks with GET /api/v1/tasks."
                )
            if row.state.finished:
                raise ConflictError(
                    f"Task {task_id} has already finished ({row.state.value}).",
                    hint="Only queued or running tasks can be cancelled.",
                )
        t = self._running.get(task_id)
        if t is None:  # queued with no runner (should not happen): just mark it
            self._finish(task_id, TaskState.CANCELLED)
            return
        guard = self._guards.get(task_id)
        if guard is not None:
            await guard()
        t.cancel()
        await asyncio.wait({t}, timeout=30)

    def recover(self, keep: Collection[TaskKind] = ()) -> int:
        """Mark tasks a dead server left queued or running as failed; return how many.

        Tasks of the ``keep`` kinds are left alone: their owner resumes them.
        """
        with self._sessions.begin() as s:
            q = select(TaskRow).where(TaskRow.state.in_([TaskState.QUEUED, TaskState.RUNNING]))
            if keep:
                q = q.where(TaskRow.kind.not_in([k.value for k in keep]))
            rows = s.scalars(q).all()
            for row in rows:
                row.state, row.finished_at, row.phase = TaskState.ERROR, utcnow(), "error"
                row.error = {
                    "code": "server_restarted",
                    "message": "The server restarted while the task ran.",
                    "hint": "Check the target's state and run the operation again if needed.",
                }
                record_event(
                    s,
                    EventKind.TASK_FAILED,
                    row.target,
                    f"Task {row.id} ({row.kind}) failed: the server restarted.",
                    EventSeverity.ERROR,
                )
            return len(rows)

    async def shutdown(self) -> None:
        self.stopping = True
        tasks = list(self._running.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
