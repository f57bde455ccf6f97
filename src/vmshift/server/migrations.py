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

from vmshift.client.agent import AgentPool
from vmshift.errors import ConflictError, NotFoundError, SwitchoverStartedError, VmshiftError
from vmshift.migration.grants import grant_lifetime_s, mint_grant
from vmshift.migration.progress import percent_of, phase_label
from vmshift.model.agent_migration import AgentRef, IncomingRequest, MigrationProgress, OutgoingMigration
from vmshift.model.api import ErrorInfo, EventKind, TaskKind
from vmshift.model.enums import EventSeverity, MigrationKind, TaskState
from vmshift.model.migration import (
    CheckReport,
    MigrationCreate,
    MigrationPhase,
    MigrationPrediction,
    MigrationSettings,
    MigrationStatus,
)
from vmshift.model.vm import VmSpec
from vmshift.server.db.schema import HostRow, MigrationRow, ServerIdentityRow, TaskRow, utcnow
from vmshift.server.events import record_event
from vmshift.server.migration_checks import effective_bandwidth, plan_migration, predict
from vmshift.server.migration_slots import MigrationSlots
from vmshift.server.migration_store import (
    AGENT_PHASES,
    complete,
    fail,
    get_migration_row,
    lost,
    migration_parties,
    mirror,
    needs_finalize,
    set_phase,
)
from vmshift.server.migration_stream import plan_stream, record_stream
from vmshift.server.settings import ServerSettings
from vmshift.server.tasks import TaskBody, TaskContext, TaskEngine

log = logging.getLogger("vmshift.server.migrations")

CANCEL_CONFIRM_S = 20.0  # how long a cancel waits for the source agent to report the end
#: The kinds this orchestrator runs: a relocate is a live migration whose disks the source mirrors
#: into NBD exports of the target first (agent/relocate_mirrors.py); other kinds are disk moves.
ORCHESTRATED = (MigrationKind.LIVE, MigrationKind.RELOCATE)


class MigrationFailedError(VmshiftError):
    """The migration ended without moving the VM (the VM stays on its source)."""

    status = 500
    code = "migration_failed"


class MigrationNeedsFinalizeError(MigrationFailedError):
    """The stream completed but the target could not be told to run: the VM waits paused on both."""

    code = "needs_finalize"


class MigrationOrchestrator:
    """Starts, resumes and cancels migration task bodies (their slots: server/migration_slots.py)."""

    def __init__(
        self, sessions: sessionmaker[Session], agents: AgentPool, tasks: TaskEngine, settings: ServerSettings
    ) -> None:
        self._sessions = sessions
        self._agents = agents
        self._tasks = tasks
        self._settings = settings
        self.slots = MigrationSlots(sessions)  # shared with the disk moves (server/moves/runner.py)
        self._server_id: str | None = None

    # -- start and resume ------------------------------------------------------------------
    def start(self, migration_id: int, task_id: int, vm: str, *, resume: bool = False) -> None:
        async def guard() -> None:
            await self._refuse_late_cancel(migration_id)

        self._tasks.start(task_id, vm, self.body(migration_id, resume), resumable=True, resume=resume,
                          cancel_guard=guard)

    @property
    def server_id(self) -> str | None:
        """This database's identity (made with it); sent with every migration to the agents."""
        if self._server_id is None:
            with self._sessions() as s:
                self._server_id = s.scalar(select(ServerIdentityRow.id))
        return self._server_id

    def resume_all(self) -> int:
        """Pick up every migration a previous server left unfinished; return how many were resumed."""
        resumed = 0
        with self._sessions.begin() as s:
            rows = s.scalars(
                select(MigrationRow)
                .where(MigrationRow.kind.in_(ORCHESTRATED),  # disk moves: server/moves/runner.py
                       MigrationRow.status.in_([MigrationStatus.QUEUED, MigrationStatus.RUNNING]))
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
                waited = await self.slots.acquire(ctx, mid)
                if waited:
                    await self._recheck(ctx, mid)
                adopted = await self._adopt(mid) if resume else None
                if adopted is None:
                    await self._estimate(ctx, mid)
                    adopted = await self._prepare_and_start(ctx, mid)
                final = await self._poll(ctx, mid, adopted)
                await self._revoke_grant(mid, final)
                return self._conclude(mid, final)
            except asyncio.CancelledError:
                if ctx.server_stopping:
                    raise
                late = await self._cancel(mid)
                if late is not None and late.status is MigrationStatus.COMPLETED:
                    await self._revoke_grant(mid, late)
                    return self._conclude(mid, late)  # too late to cancel: the VM already moved
                if late is not None and late.status is MigrationStatus.RUNNING:
                    # the source refused: the switchover had started; follow it to its end
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
                    late = await self._poll(ctx, mid, late)
                    await self._revoke_grant(mid, late)
                    return self._conclude(mid, late)
                raise
            except VmshiftError as e:
                await self._abandon(mid, e)
                raise
        finally:
            await self.slots.release()

    async def _recheck(self, ctx: TaskContext, mid: int) -> None:
        """After waiting in the queue, the world may have changed: run the checks again."""
        ctx.progress("check", 1)
        with self._sessions() as s:
            row = get_migration_row(s, mid)
            vm, kind = row.vm, row.kind
            body = MigrationCreate(host=row.target_host, datastore=row.target_datastore,
                                   disk_format=row.disk_format,
                                   encryption=MigrationSettings.model_validate(row.settings or {}).encryption)
        plan = await plan_migration(self._sessions, self._agents, vm, body, kind)
        with self._sessions.begin() as s:
            row = get_migration_row(s, mid)
            row.checks = plan.report.model_dump(mode="json")
            row.measured_bandwidth_bps = plan.bandwidth_bps or row.measured_bandwidth_bps
        raise_for_report(plan.report)

    def _context(self, mid: int) -> tuple[MigrationRow, VmSpec, str, str, float | None]:
        """The row, the VM's spec, source and target agent addresses, the usable bandwidth."""
        with self._sessions() as s:
            row = get_migration_row(s, mid)
            vm, src, dst = migration_parties(s, row)
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
        stream = plan_stream(self._sessions, mid)  # before anything starts: encryption, the address
        set_phase(self._sessions, mid, MigrationPhase.PREPARE)
        ctx.progress("prepare target", 5)
        identity = {"server_id": self.server_id, "nonce": row.nonce}
        relocate = row.kind is MigrationKind.RELOCATE
        target_spec = VmSpec.model_validate(row.target_spec) if relocate and row.target_spec else spec
        settings = MigrationSettings.model_validate(row.settings or {})
        # the source host may call the target for this migration only, with this capability
        moved = (spec.memory_mib + (sum(d.size_mib for d in target_spec.disks) if relocate else 0)) << 20
        grant = mint_grant(row.source_host, grant_lifetime_s(settings, moved))
        incoming = await self._agents.get(dst_addr).migration_incoming(
            IncomingRequest(migration_id=mid, spec=target_spec, relocate=relocate, grant=grant,
                            tls=stream.target_tls, **identity)
        )
        try:
            uri = stream.uri(incoming)  # built here: the target's own URI string is never passed on
        except VmshiftError:
            await self._rollback_target(dst_addr, mid)
            raise
        if relocate and len(incoming.nbd) != len(target_spec.disks):
            await self._rollback_target(dst_addr, mid)
            raise ConflictError(
                f"The target agent offered {len(incoming.nbd)} disk exports for "
                f"{len(target_spec.disks)} disks.",
                hint="Update the target host's agent: it must support shared-nothing migration.",
            )
        prediction = MigrationPrediction.model_validate(row.prediction) if row.prediction else None
        outgoing = OutgoingMigration(
            migration_id=mid,
            vm=row.vm,
            uri=uri,
            target_migration_address=stream.target_migration_address,
            target_agent=AgentRef(address=dst_addr, capability=grant.capability),
            settings=settings,
            bandwidth_bps=bandwidth,
            dirty_rate_bps=prediction.dirty_rate_bps if prediction else None,
            mirror_targets=incoming.nbd,
            tls=stream.source_tls,
            **identity,
        )
        record_stream(self._sessions, mid, stream)
        progress = await self._agents.get(src_addr).migration_start(outgoing)
        self._check_identity(row, progress)
        set_phase(self._sessions, mid, MigrationPhase.COPY if relocate else MigrationPhase.PRECOPY)
        mirror(self._sessions, mid, progress)
        return progress

    async def _adopt(self, mid: int) -> MigrationProgress | None:
        """After a server restart: the source agent's record, or None if the source never got it."""
        row, _spec, src_addr, dst_addr, _bw = self._context(mid)
        if row.phase not in AGENT_PHASES and row.phase is not MigrationPhase.PREPARE:
            return None
        try:
            progress = await self._agents.get(src_addr).migration_progress(mid)
            self._check_identity(row, progress)
            return progress
        except VmshiftError as e:
            if not e.not_found:
                raise
        if row.phase in AGENT_PHASES:
            raise MigrationFailedError(
                f"The source agent has no record of migration {mid}.",
                hint="Check where the VM runs with 'vmshift vm show'.",
            )
        await self._rollback_target(dst_addr, mid)  # prepared but never started: prepare again
        return None

    async def _poll(self, ctx: TaskContext, mid: int, progress: MigrationProgress) -> MigrationProgress:
        """Mirror the source agent's progress until it ends.

        A source agent that stops answering does not fail the migration: only the agents can prove
        where the VM runs. Past the grace period the target is asked too; if it runs the VM, the
        move is recorded; otherwise the task keeps waiting for the source (cancel it to stop)."""
        row, _spec, src_addr, dst_addr, _bw = self._context(mid)
        client = self._agents.get(src_addr)
        lost_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            mirror(self._sessions, mid, progress)
            ctx.progress(phase_label(progress), percent_of(progress))
            if progress.status.finished or progress.status is MigrationStatus.NEEDS_FINALIZE:
                return progress
            await asyncio.sleep(self._settings.migration_poll_interval_s)
            try:
                answer = await client.migration_progress(mid, timeout_s=5.0)
                self._check_identity(row, answer)  # a foreign record is never followed
                progress, lost_since = answer, None
            except VmshiftError as e:
                if not (e.retryable or e.not_found):
                    raise
                lost_since = lost_since if lost_since is not None else loop.time()
                silent_s = loop.time() - lost_since
                if silent_s > self._settings.migration_agent_grace_s:
                    proof = await self._target_runs_vm(dst_addr, mid)
                    if proof:
                        progress.status, progress.phase = MigrationStatus.COMPLETED, MigrationPhase.COMPLETED
                        return progress
                ctx.progress(f"{phase_label(progress)} (source agent silent for {silent_s:.0f} s)",
                             percent_of(progress))

    async def _target_runs_vm(self, dst_addr: str, mid: int) -> bool:
        """The target's own proof that it runs the VM of migration ``mid`` (False when unsure)."""
        try:
            state = await self._agents.get(dst_addr).migration_incoming_state(mid)
        except VmshiftError:
            return False
        return state.qemu_alive and state.qemu_status == "running"

    def _check_identity(self, row: MigrationRow, p: MigrationProgress) -> None:
        """An agent's record with this id but another nonce belongs to another server or database."""
        if row.nonce is not None and p.nonce != row.nonce:
            raise NotFoundError(
                f"The source agent's record of migration {row.id} belongs to another server or an older "
                "database, not to this migration.",
                hint="Check where the VM runs with 'vmshift vm show'.",
            )

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
        if p.status is MigrationStatus.NEEDS_FINALIZE:
            needs_finalize(self._sessions, mid, p)
            raise MigrationNeedsFinalizeError(
                f"Migration {mid} of VM {p.vm} could not finish: {err.message.rstrip('.')}.", hint=err.hint
            )
        if p.status is MigrationStatus.LOST:
            lost(self._sessions, mid, p)
            raise MigrationFailedError(f"Migration {mid}: {err.message.rstrip('.')}.", hint=err.hint)
        fail(self._sessions, mid, err, cancelled=p.status is MigrationStatus.CANCELLED, progress=p)
        raise MigrationFailedError(
            f"Migration {mid} of VM {p.vm} {p.status.value}: {err.message.rstrip('.')}; "
            "the VM stays on its source.",
            hint=err.hint,
        )

    async def _refuse_late_cancel(self, mid: int) -> None:
        """Before a task cancel: refuse it (409) once the switchover has started, as the source
        agent reads it from QEMU; the migration then finishes or fails on its own."""
        with self._sessions() as s:
            row = get_migration_row(s, mid)
            phase, status, src = row.phase, row.status, row.source_host
            host = s.scalar(select(HostRow).where(HostRow.name == src))
            src_addr = host.address if host is not None else None
        if status is MigrationStatus.NEEDS_FINALIZE:
            raise ConflictError(
                f"Migration {mid} waits for 'vmshift migration finalize {mid}'; it cannot be cancelled.",
                hint=f"Run 'vmshift migration finalize {mid}' (or 'vmshift vm resume' if the target "
                "never ran the VM).",
            )
        if phase not in AGENT_PHASES or src_addr is None:
            return
        try:
            await self._agents.get(src_addr).migration_cancel(mid)
        except VmshiftError as e:
            if e.code == SwitchoverStartedError.code:
                self._cancel_refused(mid, e)
                raise SwitchoverStartedError(e.message, hint=e.hint) from e
            # anything else: the task's own cancel handling decides

    def _cancel_refused(self, mid: int, e: VmshiftError) -> None:
        with self._sessions.begin() as s:
            row = get_migration_row(s, mid)
            record_event(s, EventKind.MIGRATION_CANCEL_REFUSED, row.vm,
                         f"A cancel of migration {mid} was refused: {e.message}", EventSeverity.WARNING)

    async def _cancel(self, mid: int) -> MigrationProgress | None:
        """A user cancelled: stop the migration wherever it is; None if it never reached the source.
        A progress still RUNNING means the source refused (the switchover had started)."""
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
            if e.code == SwitchoverStartedError.code:
                self._cancel_refused(mid, e)
                return await client.migration_progress(mid, timeout_s=5.0)
            # the source cannot be reached: the migration goes on being followed, not guessed
            log.warning("migration %s: the cancel could not reach the source agent: %s", mid, e)
            with self._sessions.begin() as s:
                r = get_migration_row(s, mid)
                record_event(s, EventKind.MIGRATION_CANCEL_REFUSED, r.vm,
                             f"A cancel of migration {mid} could not be delivered to {r.source_host}: "
                             f"{e.message} The migration is followed until its agents report its end.",
                             EventSeverity.WARNING)
            p = MigrationProgress.model_validate(
                {"migration_id": mid, "vm": row.vm, "phase": row.phase, "status": MigrationStatus.RUNNING}
            )
            return p
        if p.status is MigrationStatus.COMPLETED or not p.status.finished:
            return p
        fail(self._sessions, mid, p.error or cancelled, cancelled=True, progress=p)
        return p

    async def _abandon(self, mid: int, e: VmshiftError) -> None:
        """Record an error the server itself ran into; roll back a target prepared for nothing."""
        with self._sessions() as s:
            row = get_migration_row(s, mid)
            finished, phase, target = row.status.finished, row.phase, row.target_host
            waiting = row.status is MigrationStatus.NEEDS_FINALIZE
            dst = s.scalar(select(HostRow).where(HostRow.name == target))
            dst_addr = dst.address if dst is not None else None
        if finished or waiting:  # a move that waits for finalize is not failed by the task ending
            return
        if phase is MigrationPhase.PREPARE and dst_addr is not None:
            await self._rollback_target(dst_addr, mid)
        fail(self._sessions, mid, ErrorInfo(code=e.code, message=e.message, hint=e.hint))

    async def _revoke_grant(self, mid: int, p: MigrationProgress) -> None:
        """The migration ended: its source host may call the target no more (the grant also
        expires on its own). Not while it waits for finalize: the source still confirms then."""
        if not p.status.finished:
            return
        try:
            _row, _spec, _src, dst_addr, _bw = self._context(mid)
            await self._agents.get(dst_addr).migration_revoke_grant(mid)
        except VmshiftError as e:
            log.warning("migration %s: revoking the source's grant on the target failed: %s", mid, e)

    async def _rollback_target(self, address: str, mid: int) -> None:
        try:
            await self._agents.get(address).migration_rollback(mid)
        except VmshiftError as e:
            log.warning("migration %s: target rollback failed: %s", mid, e)


def raise_for_report(report: CheckReport) -> None:
    if report.errors:
        first = report.errors[0]
        raise ConflictError(first.message, hint=first.hint)
