"""The task body of a disk move (Storage vMotion, cold, suspended): one task, one rollback.

Phases: (queued →) check → prepare (the target agent's NBD exports when the host changes) → the
source agent's job (copy → pivot or verify → finish), polled into the migration row and the task →
completed: on another host the target registers the VM and the source forgets it, and the VM's
new spec and host are recorded in the same transaction as the row. Any failure before that leaves
the VM on its original host and files: the source job rolls back its copies, the server removes
the target's exports and files.

The source agent owns a job once started, so the server may restart at any point: ``resume_all``
follows every unfinished disk move again (one that had not reached the source is rolled back on
the target and prepared again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from vmshift.client.agent import AgentPool
from vmshift.errors import ConflictError, NotFoundError, VmshiftError
from vmshift.migration.disk_plan import disk_sizes_bytes, moves_files
from vmshift.migration.phases import can_reach, check_transition
from vmshift.migration.progress import move_label, move_live, move_percent
from vmshift.model.api import ErrorInfo, EventKind, TaskKind
from vmshift.model.enums import DiskFormat, EventSeverity, MigrationKind, TaskState
from vmshift.model.migration import MigrationCreate, MigrationPhase, MigrationSettings, MigrationStatus
from vmshift.model.moves import DiskExportRequest, DiskMoveRequest, MoveProgress, MoveState
from vmshift.model.vm import VmSpec
from vmshift.server.db.schema import HostRow, MigrationRow, TaskRow, VmRow, utcnow
from vmshift.server.events import record_event
from vmshift.server.migration_store import fail, get_migration_row, migration_parties, set_phase
from vmshift.server.migrations import MigrationFailedError, MigrationOrchestrator, raise_for_report
from vmshift.server.moves.plan import kind_for, plan_disk_move
from vmshift.server.settings import ServerSettings
from vmshift.server.tasks import TaskBody, TaskContext, TaskEngine

log = logging.getLogger("vmshift.server.moves")

CANCEL_CONFIRM_S = 60.0  # how long a cancel waits for the source job to roll back
#: Phases in which the source agent's job owns the move.
JOB_PHASES = frozenset({MigrationPhase.COPY, MigrationPhase.PIVOT, MigrationPhase.VERIFY,
                        MigrationPhase.FINISH, MigrationPhase.ROLLBACK})


class DiskMoves:
    """Starts, resumes and cancels disk-move task bodies (the live kinds stay with the orchestrator)."""

    def __init__(self, sessions: sessionmaker[Session], agents: AgentPool, tasks: TaskEngine,
                 settings: ServerSettings, orchestrator: MigrationOrchestrator) -> None:
        self._sessions = sessions
        self._agents = agents
        self._tasks = tasks
        self._settings = settings
        self._orchestrator = orchestrator  # its server id
        self._slots = orchestrator.slots  # one queue of migration slots for every kind

    def start(self, migration_id: int, task_id: int, vm: str, *, resume: bool = False) -> None:
        self._tasks.start(task_id, vm, self.body(migration_id, resume), resumable=True, resume=resume)

    def body(self, migration_id: int, resume: bool) -> TaskBody:
        async def run(ctx: TaskContext) -> dict[str, Any]:
            return await self._run(ctx, migration_id, resume)

        return run

    def resume_all(self) -> int:
        """Follow every disk move a previous server left unfinished; return how many."""
        with self._sessions() as s:
            rows = s.scalars(
                select(MigrationRow)
                .where(MigrationRow.kind.notin_([MigrationKind.LIVE, MigrationKind.RELOCATE]),  # orchestrator
                       MigrationRow.status.in_([MigrationStatus.QUEUED, MigrationStatus.RUNNING]))
                .order_by(MigrationRow.id)
            ).all()
            todo = [(r.id, r.task_id, r.vm) for r in rows]
            states = {t.id: t.state for t in s.scalars(select(TaskRow).where(
                TaskRow.kind == TaskKind.VM_MIGRATE.value))}
        resumed = 0
        for mid, task_id, vm in todo:
            if task_id is None or states.get(task_id, TaskState.ERROR).finished:
                fail(self._sessions, mid, ErrorInfo(code="task_lost",
                                                    message="Its task ended while the server was down.",
                                                    hint=None))
                continue
            log.info("resuming disk move %s of %s (task %s)", mid, vm, task_id)
            self.start(mid, task_id, vm, resume=True)
            resumed += 1
        return resumed

    # -- the task body ------------------------------------------------------------------------
    async def _run(self, ctx: TaskContext, mid: int, resume: bool) -> dict[str, Any]:
        try:
            try:
                waited = await self._slots.acquire(ctx, mid)
                if waited:
                    await self._recheck(ctx, mid)
                progress = await self._adopt(mid) if resume else None
                if progress is None and not self._copies(mid):
                    return await self._reregister(ctx, mid)
                if progress is None:
                    progress = await self._prepare_and_start(ctx, mid)
                final = await self._poll(ctx, mid, progress)
                return await self._conclude(mid, final)
            except asyncio.CancelledError:
                if ctx.server_stopping:
                    raise
                final_or_none = await self._cancel(mid)
                if final_or_none is not None and final_or_none.state is MoveState.COMPLETED:
                    return await self._conclude(mid, final_or_none)  # too late: the copy had finished
                raise
            except VmshiftError as e:
                await self._abandon(mid, e)
                raise
        finally:
            await self._slots.release()

    def _row(self, mid: int) -> tuple[MigrationRow, VmSpec, VmSpec, str, str]:
        """The row, the VM's spec now and after the move, the source and target agent addresses."""
        with self._sessions() as s:
            row = get_migration_row(s, mid)
            s.expunge(row)
            vm, src, dst = migration_parties(s, row, "move")
            spec = VmSpec.model_validate(vm.spec)
            target = VmSpec.model_validate(row.target_spec or vm.spec)
            return row, spec, target, src.address, dst.address

    def _copies(self, mid: int) -> bool:
        _row, spec, target, _src, _dst = self._row(mid)
        return moves_files(spec, target.datastore)

    async def _recheck(self, ctx: TaskContext, mid: int) -> None:
        ctx.progress("check", 1)
        row, _spec, _target, _src, _dst = self._row(mid)
        body = MigrationCreate(host=row.target_host, datastore=row.target_datastore,
                               disk_format=row.disk_format)
        with self._sessions.begin() as s:
            kind = kind_for(s, row.vm, body)
            if not isinstance(kind, MigrationKind) or kind is not row.kind:
                raise ConflictError(f"VM {row.vm} changed while its move waited in the queue.",
                                    hint="Start the move again.")
            plan = plan_disk_move(s, row.vm, body, kind)
            get_migration_row(s, mid).checks = plan.report.model_dump(mode="json")
        raise_for_report(plan.report)

    async def _adopt(self, mid: int) -> MoveProgress | None:
        """After a server restart: the source job's progress, or None if the source never got it."""
        row, _spec, _target, src_addr, dst_addr = self._row(mid)
        if row.phase not in JOB_PHASES and row.phase is not MigrationPhase.PREPARE:
            return None
        try:
            return self._identified(row, await self._agents.get(src_addr).move_progress(mid))
        except VmshiftError as e:
            if not e.not_found:
                raise
        if row.phase in JOB_PHASES:
            raise MigrationFailedError(f"The source agent has no record of disk move {mid}.",
                                       hint="Check the VM's files with 'vmshift vm show'.")
        if row.source_host != row.target_host:
            await self._drop_exports(dst_addr, mid)
        return None

    async def _prepare_and_start(self, ctx: TaskContext, mid: int) -> MoveProgress:
        row, spec, target, src_addr, dst_addr = self._row(mid)
        set_phase(self._sessions, mid, MigrationPhase.PREPARE)
        ctx.progress("prepare", 5)
        assert row.nonce is not None
        fmt = row.disk_format
        limit = MigrationSettings.model_validate(row.settings or {}).bandwidth_limit_bps
        request = DiskMoveRequest(move_id=mid, nonce=row.nonce, server_id=self._orchestrator.server_id,
                                  vm=row.vm, kind=row.kind, target_spec=target,
                                  disk_format=DiskFormat(fmt) if fmt else None,
                                  speed_bps=limit)
        if row.source_host != row.target_host:
            state_bytes = None
            if row.kind is MigrationKind.SUSPENDED:
                state_bytes = (await self._agents.get(src_addr).get_vm(row.vm)).suspend_state_bytes
                if state_bytes is None:
                    raise ConflictError(f"VM {row.vm} has no saved state on {row.source_host} any more.",
                                        hint="Check its power state with 'vmshift vm show'.")
            exports = await self._agents.get(dst_addr).disk_exports_create(DiskExportRequest(
                move_id=mid, nonce=row.nonce, spec=target, sizes_bytes=disk_sizes_bytes(spec),
                disk_format=DiskFormat(fmt) if fmt else DiskFormat.QCOW2, state_size_bytes=state_bytes))
            request.targets, request.state_uri = exports.targets, exports.state_uri
        progress = self._identified(row, await self._agents.get(src_addr).move_start(request))
        set_phase(self._sessions, mid, MigrationPhase.COPY)
        return progress

    def _identified(self, row: MigrationRow, p: MoveProgress) -> MoveProgress:
        if row.nonce is not None and p.nonce is not None and p.nonce != row.nonce:
            raise NotFoundError(f"The source agent's record of move {row.id} belongs to another server.",
                                hint="Check the VM's files with 'vmshift vm show'.")
        return p

    async def _poll(self, ctx: TaskContext, mid: int, progress: MoveProgress) -> MoveProgress:
        """Mirror the source job into the row and the task until it ends. A silent agent is waited
        for (only it knows which files the VM uses); cancel the task to stop waiting."""
        row, _spec, _target, src_addr, _dst = self._row(mid)
        client = self._agents.get(src_addr)
        while True:
            self._mirror(mid, progress)
            ctx.progress(move_label(progress), move_percent(progress))
            if progress.state.finished:
                return progress
            await asyncio.sleep(self._settings.migration_poll_interval_s)
            try:
                progress = self._identified(row, await client.move_progress(mid, timeout_s=5.0))
            except VmshiftError as e:
                if not e.retryable:
                    raise
                ctx.progress(f"{move_label(progress)} (source agent silent)", move_percent(progress))

    def _mirror(self, mid: int, p: MoveProgress) -> None:
        with self._sessions.begin() as s:
            row = get_migration_row(s, mid)
            if row.status.finished:
                return
            if p.phase in JOB_PHASES and p.phase is not row.phase:
                with contextlib.suppress(ConflictError):
                    set_phase_in(row, p.phase)
            row.progress = move_live(p).model_dump(mode="json")
            row.metrics = _metrics(p)

    async def _conclude(self, mid: int, p: MoveProgress) -> dict[str, Any]:
        row, spec, target, src_addr, dst_addr = self._row(mid)
        if p.state is not MoveState.COMPLETED:
            if row.source_host != row.target_host:
                await self._drop_exports(dst_addr, mid)
            if p.written_spec is not None and p.written_spec != spec:
                self._record_partial(row, p.written_spec)
            err = p.error or ErrorInfo(code="move_failed", message="The source agent gave no reason.",
                                       hint=None)
            cancelled = p.state is MoveState.CANCELLED
            fail(self._sessions, mid, err, cancelled=cancelled)
            raise MigrationFailedError(
                f"Move {mid} of VM {row.vm} {p.state.value}: {err.message.rstrip('.')}; the VM keeps its "
                "original files.", hint=err.hint)
        if row.source_host != row.target_host:
            await self._agents.get(dst_addr).disk_exports_delete(mid, keep_files=True)
            await self._hand_over(row, spec, target, src_addr, dst_addr)
        self._complete(mid, target, p)
        return {"migration_id": mid, "status": MigrationStatus.COMPLETED.value,
                "total_ms": _metrics(p)["total_ms"]}

    def _record_partial(self, row: MigrationRow, written: VmSpec) -> None:
        """A move that failed past its point of no return: the inventory follows the files as they are."""
        with self._sessions.begin() as s:
            vm = s.scalar(select(VmRow).where(VmRow.name == row.vm))
            if vm is not None:
                vm.spec = written.model_dump(mode="json")
            places = ", ".join(f"{d.file} on {d.datastore}" for d in written.disks)
            record_event(s, EventKind.MIGRATION_FAILED, row.vm,
                         f"Move {row.id} of VM {row.vm} ended part way: its disks are now {places}. "
                         f"Move it again with 'vmshift vm migrate {row.vm} --datastore "
                         f"{row.target_datastore}' to bring the rest over.", EventSeverity.WARNING)

    async def _hand_over(self, row: MigrationRow, spec: VmSpec, target: VmSpec, src_addr: str,
                         dst_addr: str) -> None:
        """The target host registers the VM on its copies; the source forgets it (and deletes the
        originals when they were copied, not shared)."""
        await self._agents.get(dst_addr).define_vm(target)
        try:
            copied = moves_files(spec, target.datastore)
            await self._agents.get(src_addr).delete_vm(row.vm, keep_files=not copied)
        except VmshiftError as e:
            with self._sessions.begin() as s:
                record_event(s, EventKind.MIGRATION_FAILED, row.vm,
                             f"VM {row.vm} moved to {row.target_host}, but {row.source_host} could not "
                             f"forget its old copy: {e.message} Delete it there by hand (its files are in "
                             f"{spec.datastore}/{row.vm}/).", EventSeverity.WARNING)

    async def _reregister(self, ctx: TaskContext, mid: int) -> dict[str, Any]:
        """A cold or suspended move between hosts that see the same datastore: nothing is copied."""
        row, spec, target, src_addr, dst_addr = self._row(mid)
        set_phase(self._sessions, mid, MigrationPhase.PREPARE)
        ctx.progress("register on target", 50)
        await self._hand_over(row, spec, target, src_addr, dst_addr)
        set_phase(self._sessions, mid, MigrationPhase.COPY)
        set_phase(self._sessions, mid, MigrationPhase.FINISH)
        self._complete(mid, target, None)
        return {"migration_id": mid, "status": MigrationStatus.COMPLETED.value}

    def _complete(self, mid: int, target: VmSpec, p: MoveProgress | None) -> None:
        """The VM's new files (and host) in the inventory, in the same transaction as the record."""
        with self._sessions.begin() as s:
            row = get_migration_row(s, mid)
            if row.status.finished:
                return
            vm = s.scalar(select(VmRow).where(VmRow.name == row.vm))
            host = s.scalar(select(HostRow).where(HostRow.name == row.target_host))
            if vm is not None and host is not None:
                vm.host, vm.spec = host, target.model_dump(mode="json")
            row.status, row.finished_at = MigrationStatus.COMPLETED, utcnow()
            set_phase_in(row, MigrationPhase.COMPLETED)
            if p is not None:
                row.metrics = _metrics(p)
            where = (f"from {row.source_host}/{row.source_datastore} "
                     f"to {row.target_host}/{row.target_datastore}")
            took = f"{row.metrics.get('total_ms')} ms" if row.metrics.get("total_ms") is not None else "done"
            record_event(s, EventKind.VM_MIGRATED, row.vm,
                         f"VM {row.vm} moved {where} ({row.kind.value} move {row.id}: {took}).")

    async def _cancel(self, mid: int) -> MoveProgress | None:
        """A user cancelled: stop the job and wait for its rollback; None if it never reached the source."""
        row, _spec, _target, src_addr, dst_addr = self._row(mid)
        cancelled = ErrorInfo(code="cancelled", message="A user cancelled the move.", hint=None)
        if row.status.finished:
            return None
        other_host = row.source_host != row.target_host
        if row.phase not in JOB_PHASES:
            if row.phase is MigrationPhase.PREPARE:
                with contextlib.suppress(VmshiftError):
                    await self._agents.get(src_addr).move_cancel(mid)
                if other_host:
                    await self._drop_exports(dst_addr, mid)
            fail(self._sessions, mid, cancelled, cancelled=True)
            return None
        client = self._agents.get(src_addr)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_CONFIRM_S
        try:
            p = await client.move_cancel(mid)
            while not p.state.finished and loop.time() < deadline:
                await asyncio.sleep(self._settings.migration_poll_interval_s)
                p = await client.move_progress(mid, timeout_s=5.0)
        except VmshiftError as e:
            log.warning("move %s: the cancel could not reach the source agent: %s", mid, e)
            fail(self._sessions, mid, ErrorInfo(
                code="cancel_undelivered",
                message=f"The cancel could not reach {row.source_host}: {e.message}",
                hint="Check the VM's files with 'vmshift vm show' once the host answers."), cancelled=True)
            return None
        if p.state is MoveState.COMPLETED:
            return p
        if other_host:
            await self._drop_exports(dst_addr, mid)
        if p.state.finished:
            fail(self._sessions, mid, p.error or cancelled, cancelled=True)
        else:
            fail(self._sessions, mid, ErrorInfo(
                code="cancel_pending", message=f"The source job did not end within {CANCEL_CONFIRM_S:.0f} s.",
                hint="It rolls back by itself; check the VM's files with 'vmshift vm show'."), cancelled=True)
        return p

    async def _abandon(self, mid: int, e: VmshiftError) -> None:
        with self._sessions() as s:
            row = get_migration_row(s, mid)
            finished, phase = row.status.finished, row.phase
            other_host = row.source_host != row.target_host
            dst = s.scalar(select(HostRow).where(HostRow.name == row.target_host))
            dst_addr = dst.address if dst is not None else None
        if finished:
            return
        if other_host and phase is MigrationPhase.PREPARE and dst_addr is not None:
            await self._drop_exports(dst_addr, mid)
        fail(self._sessions, mid, ErrorInfo(code=e.code, message=e.message, hint=e.hint))

    async def _drop_exports(self, address: str, mid: int) -> None:
        try:
            await self._agents.get(address).disk_exports_delete(mid, keep_files=False)
        except VmshiftError as e:
            if not e.not_found:
                log.warning("move %s: removing the target's exports failed: %s", mid, e)


def set_phase_in(row: MigrationRow, phase: MigrationPhase) -> None:
    """Advance the row's phase, skipping phases a poll missed but never going back."""
    if row.phase is phase:
        return
    row.phase = phase if can_reach(row.phase, phase) else check_transition(row.phase, phase)


def _metrics(p: MoveProgress) -> dict[str, Any]:
    """What the record keeps of a disk move: its time, bytes and rate (MigrationMetrics' fields)."""
    compared = [d.identical for d in p.disks if d.identical is not None]
    return {"total_ms": int(p.elapsed_s * 1000), "bytes_sent": p.done_bytes,
            "mean_throughput_bps": p.done_bytes / p.elapsed_s if p.elapsed_s > 0 else 0.0,
            "downtime_ms": int(p.pivot_ms) if p.pivot_ms is not None else None,
            "copies_identical": all(compared) if compared else None}

