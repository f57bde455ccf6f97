"""The scheduler: one owned background task that starts scheduled migrations when they are due.

Once per due time, across restarts: each schedule stores its next due time. A run is *claimed* in one
transaction that advances that time (only if it still holds the value read) and inserts the run row
(unique per schedule and due time); the migration starts only after that commit. So a server that stops
between claim and start has advanced the schedule already: at the next start the run is marked skipped
(an event says so), never started twice. Due times missed while the server was down are handled by
``model.schedule_times.decide`` (fire once for the latest, if within the grace window; else skip).

Each run is an ordinary migration started through ``server.migration_start.start_migration``; one that
fails its checks, or finds the VM being migrated, is skipped with an event saying why. Runs for the
same VM are started one at a time, so two schedules never start two moves of one VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from vmshift.errors import VmshiftError
from vmshift.model.api import EventKind
from vmshift.model.enums import EventSeverity
from vmshift.model.migration import MigrationCreate
from vmshift.model.schedule import ScheduleRunOutcome
from vmshift.model.schedule_times import GRACE_S, Action, Decision, When, decide
from vmshift.server.db.schema import MigrationRow, ScheduleRow, ScheduleRunRow, utcnow
from vmshift.server.events import record_event

if TYPE_CHECKING:
    from vmshift.server.core import ServerCore

log = logging.getLogger("vmshift.server.schedules")

ADOPT_WINDOW_S = 30.0
"""At start-up, a migration of the VM created this soon after a run's claim is taken as that run's (the
server stopped after starting it but before recording it)."""


@dataclass(frozen=True)
class ScheduleSettings:
    grace_s: float = GRACE_S  # a due time missed by at most this much still fires
    max_sleep_s: float = 5.0  # the loop looks at least this often (schedules added by another server)
    min_sleep_s: float = 0.05


def when_of(row: ScheduleRow) -> When:
    return When(at=row.at, cron=row.cron, timezone=row.timezone)


def _stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class _Due:
    id: int
    name: str
    vm: str
    when: When
    next_due: datetime
    request: MigrationCreate


class Scheduler:
    """Owns the scheduling loop and the tasks that start runs; ``start`` and ``stop`` bracket them."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: ScheduleSettings | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._sessions = sessions
        self._settings = settings or ScheduleSettings()
        self._clock = clock
        self._core: ServerCore | None = None
        self._task: asyncio.Task[None] | None = None
        self._firing: set[asyncio.Task[None]] = set()
        self._vm_locks: dict[str, asyncio.Lock] = {}
        self._wake = asyncio.Event()

    def start(self, core: ServerCore) -> None:
        self._core = core
        self.recover_claims()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="vmshift-scheduler")

    async def stop(self) -> None:
        """Stop looking and cancel runs being started: a cancelled run stays claimed (skipped at the
        next start, never run twice)."""
        tasks = [t for t in (self._task, *self._firing) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        self._firing.clear()

    def wake(self) -> None:
        """A schedule was added or removed: look again now instead of at the next planned time."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                sleep_s = self.tick()
            except Exception:  # a bug or a database hiccup in one round must not stop scheduling
                log.exception("scheduler round failed")
                sleep_s = self._settings.max_sleep_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), sleep_s)
            self._wake.clear()

    # -- one round --------------------------------------------------------------------------------
    def tick(self) -> float:
        """Claim every due run, start the ones that fire; return how long to sleep."""
        now = self._clock()
        for due in self._due(now):
            decision = decide(due.when, due.next_due, now, self._settings.grace_s)
            if decision is None or decision.action is Action.WAIT:
                continue
            run_id = self._claim(due, decision, now)
            if run_id is not None and decision.action is Action.FIRE:
                self._spawn(run_id, due, decision)
        with self._sessions() as s:
            nearest = s.scalar(
                select(ScheduleRow.next_due_at)
                .where(ScheduleRow.next_due_at.is_not(None))
                .order_by(ScheduleRow.next_due_at)
                .limit(1)
            )
        if nearest is None:
            return self._settings.max_sleep_s
        until = (nearest - self._clock()).total_seconds()
        if until <= 0:  # still due after this round: claimed elsewhere or failed; do not spin
            return self._settings.max_sleep_s
        return max(self._settings.min_sleep_s, min(self._settings.max_sleep_s, until))

    def _due(self, now: datetime) -> list[_Due]:
        with self._sessions() as s:
            rows = s.scalars(
                select(ScheduleRow).where(ScheduleRow.next_due_at <= now).order_by(ScheduleRow.next_due_at)
            ).all()
            return [
                _Due(r.id, r.name, r.vm, when_of(r), r.next_due_at, MigrationCreate.model_validate(r.request))
                for r in rows
                if r.next_due_at is not None
            ]

    def _claim(self, due: _Due, decision: Decision, now: datetime) -> int | None:
        """Advance the schedule and insert its run in one transaction; the run's id, or None if another
        server (or round) took this due time first."""
        skipped = decision.action is Action.SKIP
        message = None
        if skipped:
            message = (
                f"The run due {_stamp(decision.due_at)} was missed by {decision.late_s:.0f} s (the server "
                f"was not running), more than the {self._settings.grace_s:.0f} s grace window."
            )
        if decision.missed:
            missed = (
                f"{decision.missed} earlier due time(s) passed while the server was down and were not run."
            )
            message = f"{message} {missed}" if message else missed
        try:
            with self._sessions.begin() as s:
                advanced = cast(
                    CursorResult[Any],
                    s.execute(
                        update(ScheduleRow)
                        .where(ScheduleRow.id == due.id, ScheduleRow.next_due_at == due.next_due)
                        .values(next_due_at=decision.next_due_at)
                        .execution_options(synchronize_session=False)
                    ),
                )
                if advanced.rowcount != 1:
                    return None
                outcome = ScheduleRunOutcome.SKIPPED if skipped else ScheduleRunOutcome.CLAIMED
                run = ScheduleRunRow(
                    schedule_id=due.id,
                    due_at=decision.due_at,
                    claimed_at=now,
                    outcome=outcome,
                    message=message,
                )
                s.add(run)
                s.flush()
                if skipped:
                    record_event(
                        s,
                        EventKind.SCHEDULE_RUN_SKIPPED,
                        due.vm,
                        f"Schedule {due.name}: {message}",
                        EventSeverity.WARNING,
                    )
                return run.id
        except IntegrityError:  # the run of this due time exists: someone else claimed it
            log.info("run of schedule %s due %s was claimed elsewhere", due.name, decision.due_at)
            return None

    # -- starting a run ---------------------------------------------------------------------------
    def _spawn(self, run_id: int, due: _Due, decision: Decision) -> None:
        t = asyncio.create_task(self._fire(run_id, due, decision), name=f"vmshift-schedule-run-{run_id}")
        self._firing.add(t)
        t.add_done_callback(self._firing.discard)

    async def _fire(self, run_id: int, due: _Due, decision: Decision) -> None:
        lock = self._vm_locks.setdefault(due.vm, asyncio.Lock())
        async with lock:  # runs of one VM start one after the other: the second finds it busy
            try:
                started = await self._start(due)
            except VmshiftError as e:
                self._skipped(run_id, due, decision, e.message)
                return
            except Exception as e:  # a bug: say so on the run rather than leave it claimed
                log.exception("run %s of schedule %s failed to start", run_id, due.name)
                self._skipped(run_id, due, decision, f"The migration could not be started ({e!r}).")
                return
            self._started(run_id, due, decision, *started)

    async def _start(self, due: _Due) -> tuple[int, int]:
        """Start the run's migration; (migration id, task id). Raises VmshiftError to skip it."""
        from vmshift.server.migration_start import start_migration

        assert self._core is not None  # start_migration refuses a VM that another move holds (409)
        started = await start_migration(self._core, due.vm, due.request)
        return started.migration_id, started.id

    def _skipped(self, run_id: int, due: _Due, decision: Decision, reason: str) -> None:
        with self._sessions.begin() as s:
            run = s.get(ScheduleRunRow, run_id)
            if run is None:  # the schedule was deleted meanwhile
                return
            missed = f" {run.message}" if run.message else ""
            run.outcome, run.message = ScheduleRunOutcome.SKIPPED, f"{reason}{missed}"
            record_event(
                s,
                EventKind.SCHEDULE_RUN_SKIPPED,
                due.vm,
                f"Schedule {due.name}: the run due {_stamp(decision.due_at)} was skipped: {reason}",
                EventSeverity.WARNING,
            )

    def _started(self, run_id: int, due: _Due, decision: Decision, migration_id: int, task_id: int) -> None:
        with self._sessions.begin() as s:
            due_at = _stamp(decision.due_at)
            text = f"Schedule {due.name} started migration {migration_id} of VM {due.vm} (due {due_at})."
            run = s.get(ScheduleRunRow, run_id)
            if run is not None:
                run.outcome, run.migration_id, run.task_id = ScheduleRunOutcome.STARTED, migration_id, task_id
                run.message = f"{text} {run.message}" if run.message else text
            record_event(s, EventKind.SCHEDULE_RUN_STARTED, due.vm, text)

    # -- start-up ---------------------------------------------------------------------------------
    def recover_claims(self) -> int:
        """Runs left claimed by a server that stopped between claim and start: skipped (an event each),
        unless a migration of the VM was created right after the claim (then it is that run's)."""
        fixed = 0
        with self._sessions.begin() as s:
            stale = s.scalars(
                select(ScheduleRunRow).where(ScheduleRunRow.outcome == ScheduleRunOutcome.CLAIMED)
            )
            for run in stale:
                fixed += 1
                schedule = run.schedule
                m = s.scalar(
                    select(MigrationRow)
                    .where(
                        MigrationRow.vm == schedule.vm,
                        MigrationRow.created_at >= run.claimed_at,
                        MigrationRow.created_at <= run.claimed_at + timedelta(seconds=ADOPT_WINDOW_S),
                    )
                    .order_by(MigrationRow.id)
                    .limit(1)
                )
                if m is not None:
                    run.outcome, run.migration_id, run.task_id = ScheduleRunOutcome.STARTED, m.id, m.task_id
                    run.message = (
                        f"The server stopped while starting this run; migration {m.id}, created right after "
                        "the claim, is taken as its migration."
                    )
                    record_event(
                        s,
                        EventKind.SCHEDULE_RUN_STARTED,
                        schedule.vm,
                        f"Schedule {schedule.name}: {run.message}",
                    )
                    continue
                run.outcome = ScheduleRunOutcome.SKIPPED
                run.message = (
                    f"The server stopped after claiming the run due {_stamp(run.due_at)} and before starting "
                    "its migration; a claimed run is never started twice, so it was skipped."
                )
                record_event(
                    s,
                    EventKind.SCHEDULE_RUN_SKIPPED,
                    schedule.vm,
                    f"Schedule {schedule.name}: {run.message}",
                    EventSeverity.WARNING,
                )
        return fixed


__all__ = ["ScheduleSettings", "Scheduler", "when_of"]
