"""The live-migration orchestrator: a ``vm.migrate`` task body on the TaskEngine (issue 3).

Phases: (queued →) check → estimate → prepare (target ``POST /migrations/incoming``) → the source
agent's control loop (``POST /migrations``), polled every ``migration_poll_interval_s`` and mirrored
into the task and the migration row → completed (the VM moves in the inventory in the same
transaction) or failed/cancelled (the VM stays on the source).

The source agent owns the migration once started, so the server can die at any point: at start-up
``resume_all`` picks every unfinished migration up again and keeps polling (a migration that had not
reached the source yet is rolled back on the target and prepared again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from vmshift.errors import ApiError, ConflictError, HostUnreachableError, VmshiftError
from vmshift.model.agent_migration import AgentRef, IncomingRequest, MigrationProgress, OutgoingMigration
from vmshift.model.api import ErrorInfo, TaskKind
from vmshift.model.enums import TaskState
from vmshift.model.migration import (
    CheckReport,
    MigrationCreate,
    MigrationPhase,
    MigrationPrediction,
    MigrationSettings,
    MigrationStatus,
)
from vmshift.model.vm import VmSpec
from vmshift.server.agent_client import AgentPool
from vmshift.server.db.schema import HostRow, MigrationRow, TaskRow, VmRow, utcnow
from vmshift.server.migration_checks import effective_bandwidth, plan_migration, predict
from vmshift.server.migration_store import AGENT_PHASES, complete, fail, get_migration_row, mirror, set_phase
from vmshift.server.settings import ServerSettings
from vmshift.server.tasks import TaskBody, TaskContext, TaskEngine

log = logging.getLogger("vmshift.server.migrations")

CANCEL_CONFIRM_S = 20.0  # how long a cancel waits for the source agent to report the end


class MigrationFailedError(VmshiftError):
    """The migration ended without moving the VM (the VM stays on its source)."""

    status = 500
    code = "migration_failed"


class MigrationOrchestrator:
    """Starts, resumes and cancels migration task bodies; hands out per-host migration slots."""

    def __init__(
        self, sessions: sessionmaker[Session], agents: AgentPool, tasks: TaskEngine, settings: ServerSettings
    ) -> None:
        self._sessions = sessions
        self._agents = agents
        self._tasks = tasks
        self._settings = settings
        self._slots = asyncio.Condition()

    # -- start and resume ------------------------------------------------------------------
    def start(self, migration_id: int, task_id: int, vm: str, *, resume: bool = False) -> None:
        self._tasks.start(task_id, vm, self.body(migration_id, resume), resumable=True, resume=resume)

    def resume_all(self) -> int:
        """Pick up every migration a previous server left unfinished; return how many were resumed."""
        resumed = 0
        with self._sessions.begin() as s:
            rows = s.scalars(
                select(MigrationRow)
                .where(MigrationRow.status.in_([MigrationStatus.QUEUED, MigrationStatus.RUNNING]))
                .order_by(MigrationRow.id)
            ).all()
            todo = [(r.id, r.task_id, r.vm) for r in rows]
            task_states = {
                t.id: t.state
                for t in s.scalars(select(TaskRow).where(TaskRow.kind == TaskKind.VM_MIGRATE.value))
            }
        for mid, task_id, vm in todo:
            if task_id is None or task_states.get(task_id, TaskState.ERROR).finished:
                fail(
                    self._sessions,
                    mid,
                    ErrorInfo(
                        code="task_lost", message="Its task ended while the server was down.", hint=None
                    ),
                )
                continue
            log.info("resuming migration %s of %s (task %s)", mid, vm, task_id)
            self.start(mid, task_id, vm, resume=True)
            resumed += 1
        self._fail_orphan_tasks()
        return resumed

    def _fail_orphan_tasks(self) -> None:
        """A vm.migrate task whose migration already ended (server died in between) ends too."""
        with self._sessions.begin() as s:
            for t in s.scalars(
                select(TaskRow).where(
                    TaskRow.kind == TaskKind.VM_MIGRATE.value,
                    TaskRow.state.in_([TaskState.QUEUED, TaskState.RUNNING]),
                )
            ):
                m = s.scalar(select(MigrationRow).where(MigrationRow.task_id == t.id))
                if m is None or m.status.finished:
                    ok = m is not None and m.status is MigrationStatus.COMPLETED
                    t.state, t.finished_at = (TaskState.SUCCESS if ok else TaskState.ERROR), utcnow()
                    t.phase, t.percent = t.state.value, 100 if ok else t.percent
                    if ok and m is not None:
                        t.result = {"migration_id": m.id, "status": m.status.value}
                    else:
                        restarted = {
                            "code": "server_restarted",
                            "message": "The server restarted.",
                            "hint": None,
                        }
                        t.error = m.error if m is not None else restarted

    def body(self, migration_id: int, resume: bool) -> TaskBody:
        async def run(ctx: TaskContext) -> dict[str, Any]:
            return await self._run(ctx, migration_id, resume)

        return run

    # -- the task body ------------------------------------------------------------------------
    async def _run(self, ctx: TaskContext, mid: int, resume: bool) -> dict[str, Any]:
        try:
            try:
                waited = await self._acquire_slot(ctx, mid)
                if waited:
                    await self._recheck(ctx, mid)
                adopted = await self._adopt(mid) if resume else None
                if adopted is None:
                    await self._estimate(ctx, mid)
                    adopted = await self._prepare_and_start(ctx, mid)
                final = await self._poll(ctx, mid, adopted)
                return self._conclude(mid, final)
            except asyncio.CancelledError:
                if ctx.server_stopping:
                    raise
                late = await self._cancel(mid)
                if late is not None and late.status is MigrationStatus.COMPLETED:
                    return self._conclude(mid, late)  # too late to cancel: the VM already moved
                raise
            except VmshiftError as e:
                await self._abandon(mid, e)
                raise
        finally:
            async with self._slots:
                self._slots.notify_all()

    async def _acquire_slot(self, ctx: TaskContext, mid: int) -> bool:
        """Wait until both hosts are below their concurrent-migration limits (FIFO); True if it waited."""
        waited = False
        while True:
            with self._sessions.begin() as s:
                row = get_migration_row(s, mid)
                if row.status is not MigrationStatus.QUEUED:
                    return waited
                if _slot_free(s, row):
                    row.status, row.phase, row.started_at = (
                        MigrationStatus.RUNNING,
                        MigrationPhase.CHECK,
                        utcnow(),
                    )
                    return waited
            if not waited:
                ctx.progress("queued: waiting for a migration slot", 0)
                waited = True
            async with self._slots:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slots.wait(), timeout=1.0)

    async def _recheck(self, ctx: TaskContext, mid: int) -> None:
        """After waiting in the queue, the world may have changed: run the checks again."""
        ctx.progress("check", 1)
        with self._sessions() as s:
            row = get_migration_row(s, mid)
            vm, target = row.vm, row.target_host
        plan = await plan_migration(self._sessions, self._agents, vm, MigrationCreate(host=target))
        with self._sessions.begin() as s:
            row = get_migration_row(s, mid)
            row.checks = plan.report.model_dump(mode="json")
            row.measured_bandwidth_bps = plan.bandwidth_bps or row.measured_bandwidth_bps
        raise_for_report(plan.report)

    def _context(self, mid: int) -> tuple[MigrationRow, VmSpec, str, str, float | None]:
        """The row, the VM's spec, source and target agent addresses, the usable bandwidth."""
        with self._sessions() as s:
            row = get_migration_row(s, mid)
            vm = s.scalar(select(VmRow).where(VmRow.name == row.vm))
            src = s.scalar(select(HostRow).where(HostRow.name == row.source_host))
            dst = s.scalar(select(HostRow).where(HostRow.name == row.target_host))
            if vm is None or src is None or dst is None:
                raise ConflictError(
                    f"VM {row.vm}, host {row.source_host} or host {row.target_host} left the inventory.",
                    hint="Check the inventory and start the migration again.",
                )
            rates = [x for x in (src.migration_link_rate_bps, dst.migration_link_rate_bps) if x]
            settings = MigrationSettings.model_validate(row.settings or {})
            bandwidth = effective_bandwidth(
                row.measured_bandwidth_bps, min(rates) if rates else None, settings.bandwidth_limit_bps
            )
            return row, VmSpec.model_validate(vm.spec), src.address, dst.address, bandwidth

    async def _estimate(self, ctx: TaskContext, mid: int) -> None:
        row, spec, src_addr, _dst, bandwidth = self._context(mid)
        if row.prediction is not None:
            return
        set_phase(self._sessions, mid, MigrationPhase.ESTIMATE)
        ctx.progress("estimate", 2)
        settings = MigrationSettings.model_validate(row.settings or {})
        try:
            prediction = await predict(self._agents, src_addr, spec, settings, bandwidth)
        except VmshiftError as e:  # a prediction is nice to have, not a reason to refuse
            log.warning("migration %s: no prediction (%s)", mid, e)
            return
        with self._sessions.begin() as s:
            get_migration_row(s, mid).prediction = prediction.model_dump(mode="json")

    async def _prepare_and_start(self, ctx: TaskContext, mid: int) -> MigrationProgress:
        row, spec, src_addr, dst_addr, bandwidth = self._context(mid)
        set_phase(self._sessions, mid, MigrationPhase.PREPARE)
        ctx.progress("prepare target", 5)
        incoming = await self._agents.get(dst_addr).migration_incoming(
            IncomingRequest(migration_id=mid, spec=spec)
        )
        prediction = MigrationPrediction.model_validate(row.prediction) if row.prediction else None
        outgoing = OutgoingMigration(
            migration_id=mid,
            vm=row.vm,
            uri=incoming.uri,
            target_agent=AgentRef(address=dst_addr, token=self._settings.agent_token),
            settings=MigrationSettings.model_validate(row.settings or {}),
            bandwidth_bps=bandwidth,
            dirty_rate_bps=prediction.dirty_rate_bps if prediction else None,
        )
        progress = await self._agents.get(src_addr).migration_start(outgoing)
        with self._sessions.begin() as s:
            get_migration_row(s, mid).phase = MigrationPhase.PRECOPY
        mirror(self._sessions, mid, progress)
        return progress

    async def _adopt(self, mid: int) -> MigrationProgress | None:
        """After a server restart: the source agent's record, or None if the source never got it."""
        row, _spec, src_addr, dst_addr, _bw = self._context(mid)
        if row.phase not in AGENT_PHASES and row.phase is not MigrationPhase.PREPARE:
            return None
        try:
            return await self._agents.get(src_addr).migration_progress(mid)
        except ApiError as e:
            if e.status != 404:
                raise
        if row.phase in AGENT_PHASES:
            raise MigrationFailedError(
                f"The source agent has no record of migration {mid}.",
                hint="Check where the VM runs with 'vmshift vm show'.",
            )
        await self._rollback_target(dst_addr, mid)  # prepared but never started: prepare again
        return None

    async def _poll(self, ctx: TaskContext, mid: int, progress: MigrationProgress) -> MigrationProgress:
        """Mirror the source agent's progress until it ends; wait out a restarting source agent."""
        _row, _spec, src_addr, _dst, _bw = self._context(mid)
        client = self._agents.get(src_addr)
        lost_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            mirror(self._sessions, mid, progress)
            ctx.progress(phase_label(progress), percent_of(progress))
            if progress.status.finished:
                return progress
            await asyncio.sleep(self._settings.migration_poll_interval_s)
            try:
                progress = await client.migration_progress(mid, timeout_s=5.0)
                lost_since = None
            except (HostUnreachableError, ApiError) as e:
                if isinstance(e, ApiError) and e.status not in (404, 502, 503, 504):
                    raise
                lost_since = lost_since if lost_since is not None else loop.time()
                if loop.time() - lost_since > self._settings.migration_agent_grace_s:
                    raise MigrationFailedError(
                        f"The source agent did not report migration {mid} for "
                        f"{self._settings.migration_agent_grace_s:.0f} s ({e.message.rstrip('.')}).",
                        hint="Check the source host's agent and where the VM runs.",
                    ) from e
                ctx.progress(f"{phase_label(progress)} (source agent not answering)", percent_of(progress))

    def _conclude(self, mid: int, p: MigrationProgress) -> dict[str, Any]:
        if p.status is MigrationStatus.COMPLETED:
            complete(self._sessions, mid, p)
            return {
                "migration_id": mid,
                "status": p.status.value,
                "total_ms": p.metrics.total_ms,
                "downtime_ms": p.metrics.downtime_ms,
            }
        err = p.error or ErrorInfo(
            code="migration_failed", message="The source agent gave no reason.", hint=None
        )
        fail(self._sessions, mid, err, cancelled=p.status is MigrationStatus.CANCELLED, progress=p)
        raise MigrationFailedError(
            f"Migration {mid} of VM {p.vm} {p.status.value}: {err.message.rstrip('.')}; "
            "the VM stays on its source.",
            hint=err.hint,
        )

    async def _cancel(self, mid: int) -> MigrationProgress | None:
        """A user cancelled: stop the migration wherever it is; None if it never reached the source."""
        row, _spec, src_addr, dst_addr, _bw = self._context(mid)
        cancelled = ErrorInfo(code="cancelled", message="A user cancelled the migration.", hint=None)
        if row.status.finished:
            return None
        if row.phase not in AGENT_PHASES:
            if row.phase is MigrationPhase.PREPARE:
                # the start request may have reached the source just before the cancel
                with contextlib.suppress(VmshiftError):
                    await self._agents.get(src_addr).migration_cancel(mid)
                await self._rollback_target(dst_addr, mid)
            fail(self._sessions, mid, cancelled, cancelled=True)
            return None
        client = self._agents.get(src_addr)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_CONFIRM_S
        try:
            p = await client.migration_cancel(mid)
            while not p.status.finished and loop.time() < deadline:
                await asyncio.sleep(self._settings.migration_poll_interval_s)
                p = await client.migration_progress(mid, timeout_s=5.0)
        except VmshiftError as e:
            fail(
                self._sessions,
                mid,
                ErrorInfo(
                    code="cancel_unconfirmed",
                    message=f"The cancel could not be confirmed by the source agent: {e.message}",
                    hint="Check where the VM runs with 'vmshift vm show'.",
                ),
                cancelled=True,
            )
            return None
        if p.status is MigrationStatus.COMPLETED:
            return p
        fail(self._sessions, mid, p.error or cancelled, cancelled=True, progress=p)
        return p

    async def _abandon(self, mid: int, e: VmshiftError) -> None:
        """Record an error the server itself ran into; roll back a target prepared for nothing."""
        with self._sessions() as s:
            row = get_migration_row(s, mid)
            finished, phase, target = row.status.finished, row.phase, row.target_host
            dst = s.scalar(select(HostRow).where(HostRow.name == target))
            dst_addr = dst.address if dst is not None else None
        if finished:
            return
        if phase is MigrationPhase.PREPARE and dst_addr is not None:
            await self._rollback_target(dst_addr, mid)
        fail(self._sessions, mid, ErrorInfo(code=e.code, message=e.message, hint=e.hint))

    async def _rollback_target(self, address: str, mid: int) -> None:
        try:
            await self._agents.get(address).migration_rollback(mid)
        except VmshiftError as e:
            log.warning("migration %s: target rollback failed: %s", mid, e)


def _slot_free(s: Session, row: MigrationRow) -> bool:
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
    return all(busy[h] < limits.get(h, 4) for h in hosts)


def raise_for_report(report: CheckReport) -> None:
    if report.errors:
        first = report.errors[0]
        raise ConflictError(first.message, hint=first.hint)


def phase_label(p: MigrationProgress) -> str:
    if p.phase is MigrationPhase.PRECOPY:
        return f"precopy round {p.round}"
    return p.phase.value


def percent_of(p: MigrationProgress) -> int:
    """Prepare is 5 %, pre-copy 10-95 % by bytes sent against bytes sent plus bytes left, then 97-99 %."""
    if p.phase in (MigrationPhase.SWITCHOVER, MigrationPhase.POSTCOPY):
        return 97
    if p.phase in (MigrationPhase.FINISH, MigrationPhase.COMPLETED):
        return 99
    done, left = p.transferred_bytes, p.remaining_bytes
    if done + left <= 0:
        return 5
    return 10 + int(85 * done / (done + left))
