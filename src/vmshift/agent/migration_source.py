"""Source role of a live migration: the owner of the control loops next to QEMU (docs/migration.md).

``OutgoingMigrations`` answers the agent API (start, progress, cancel, finalize) and owns one
asyncio task per outgoing migration, running a ``SourceLoop`` (agent/source_loop.py, pre-copy) that
ends in one of the endings of ``SourceEndings`` (agent/source_endings.py):

- **complete**: QEMU says ``completed`` → at once, over the kept-alive connection, the target is
  told to run (``activate``, libvirt's confirm); then the source QEMU quits;
- **rollback**: QEMU failed or was cancelled before completing → the source runs unpaused (QEMU
  resumes it), the target discards its receiving QEMU (which never ran: it waits with ``-S``);
- **decided by the target's proof** when the source QEMU vanished: the target holds the whole
  stream → it is activated; it does not → the VM is ``lost`` (reported, never guessed);
- **needs finalize**: the stream completed but the target cannot be reached: the VM waits paused
  on both hosts for ``vmshift migration finalize ID``.

The record is persisted in ``state_dir/migrations/ID.json`` so a restarted agent resumes the loop
where QEMU is now. Safety rule: once QEMU says the stream completed, the source is never resumed
unless the target proves its copy never ran. Phases change only through ``migration.phases``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

import httpx

from vmshift.agent import migration_tls
from vmshift.agent.migration_store import MigrationRole, MigrationStore, StoredMigration
from vmshift.agent.source_loop import SourceLoop
from vmshift.agent.supervisor import Supervisor
from vmshift.errors import (
    ConflictError,
    NotFoundError,
    SwitchoverStartedError,
    VmshiftError,
)
from vmshift.migration.samples import QemuMigrationStatus
from vmshift.migration.uri import check_migration_uri
from vmshift.model.agent_migration import FinalizeRequest, MigrationProgress, OutgoingMigration
from vmshift.model.migration import (
    ActionKind,
    MigrationPhase,
    MigrationStatus,
)
from vmshift.qemu import migration_qmp as mq
from vmshift.tls.files import HostTlsFiles

log = logging.getLogger(__name__)
Q = QemuMigrationStatus
P = MigrationPhase
#: QEMU statuses in which the switchover has begun: a cancel is refused from here on.
SWITCHOVER_STARTED = frozenset({Q.PRE_SWITCHOVER, Q.DEVICE, Q.COMPLETED})
SWITCHOVER_STARTED_MESSAGE = "The switchover has started; the migration will finish or fail on its own."


class OutgoingMigrations:
    """Owner of the control-loop tasks of this host's outgoing migrations."""

    def __init__(self, supervisor: Supervisor, store: MigrationStore, *, sample_interval_s: float = 0.25,
                 stall_timeout_s: float = 10.0, target_check_interval_s: float = 2.0,
                 target_down_after_s: float = 6.0, activation_deadline_s: float = 20.0,
                 settle_s: float = 0.2, restore_deadline_s: float = 60.0,
                 target_transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.supervisor = supervisor
        self.store = store
        self.sample_interval_s = sample_interval_s
        self.stall_timeout_s = stall_timeout_s
        self.target_check_interval_s = target_check_interval_s
        self.target_down_after_s = target_down_after_s
        self.activation_deadline_s = activation_deadline_s
        self.settle_s = settle_s
        self.restore_deadline_s = restore_deadline_s  # a silent source QEMU, once its target is gone
        self.target_transport = target_transport  # None: real HTTP (tests pass a mock target agent)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._records: dict[int, StoredMigration] = {}

    # ----- API -----------------------------------------------------------------------------------
    async def start(self, req: OutgoingMigration) -> MigrationProgress:
        check_migration_uri(req.uri, req.target_migration_address)  # 400 before QEMU is touched
        existing = self._get(req.migration_id)
        if existing is not None:
            assert existing.progress is not None
            same = existing.request is not None and existing.request.vm == req.vm and (
                existing.request.nonce == req.nonce)
            if same:
                return self._progress(existing)  # the same request again
            if not existing.progress.status.finished or req.nonce is None:
                raise ConflictError(f"Migration {req.migration_id} already exists on this host "
                                    f"(VM {existing.vm}, from another server or an older database).",
                                    hint="Let it end, or remove its record from the agent's state directory.")
            log.info("migration %d: replacing a finished record of another server", req.migration_id)
        if req.tls is not None:
            migration_tls.require_enrolled(self.tls_files)
        if not self.supervisor.is_alive(req.vm):
            raise ConflictError(f"VM {req.vm!r} is not running on this host, so it cannot be live-migrated.",
                                hint="Start it first, or use a cold migration.")
        for rec in self._records.values():
            progress = rec.progress
            if rec.vm == req.vm and progress is not None and not progress.status.finished:
                raise ConflictError(f"VM {req.vm!r} is already migrating (migration {rec.migration_id}).",
                                    hint="Wait for it or cancel it.")
        progress = MigrationProgress(migration_id=req.migration_id, vm=req.vm, phase=P.PREPARE,
                                     status=MigrationStatus.RUNNING, updated_at=datetime.now(UTC),
                                     nonce=req.nonce)
        rec = StoredMigration(role=MigrationRole.SOURCE, migration_id=req.migration_id, vm=req.vm,
                              request=req, progress=progress)
        self._save(rec)
        self._spawn(rec)
        return self._progress(rec)

    def get(self, migration_id: int) -> MigrationProgress:
        return self._progress(self._require(migration_id))

    async def cancel(self, migration_id: int, wait_s: float = 20.0) -> MigrationProgress:
        """Cancel before the switchover; refused once QEMU has started it (read from QEMU itself)."""
        rec = self._require(migration_id)
        progress = self._progress(rec)
        if progress.status.finished:
            return progress
        postcopy_asked = any(a.kind is ActionKind.START_POSTCOPY for a in progress.actions)
        # before `migrate` (a relocate's disk copy) QEMU's status is that of an older migration
        if (progress.phase in (P.POSTCOPY, P.FINISH, P.SWITCHOVER) or postcopy_asked
                or (rec.migrate_sent and await self._qemu_switching(rec))):
            raise SwitchoverStartedError(
                f"Migration {migration_id} cannot be cancelled: {SWITCHOVER_STARTED_MESSAGE[0].lower()}"
                f"{SWITCHOVER_STARTED_MESSAGE[1:]}",
                hint=f"Follow it with 'vmshift migration show {migration_id}'.")
        rec.cancel_requested = True
        self._save(rec)
        with contextlib.suppress(VmshiftError):
            await mq.migrate_cancel(self.supervisor.qmp_session(rec.vm))
        task = self._tasks.get(migration_id)
        if task is None or task.done():
            self._spawn(rec)
            task = self._tasks[migration_id]
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), timeout=wait_s)
        return self._progress(rec)

    async def finalize(self, migration_id: int, req: FinalizeRequest) -> MigrationProgress:
        """End a migration that waits paused on both hosts (``needs_finalize``)."""
        rec = self._require(migration_id)
        assert rec.progress is not None
        if rec.progress.status.finished:
            return self._progress(rec)
        if rec.progress.status is not MigrationStatus.NEEDS_FINALIZE:
            raise ConflictError(f"Migration {migration_id} is still running; there is nothing to finalize.",
                                hint=f"Follow it with 'vmshift migration show {migration_id}'.")
        task = self._tasks.get(migration_id)
        if task is not None and not task.done():
            raise ConflictError(f"Migration {migration_id} is being finalized already.", hint="Wait for it.")
        loop = SourceLoop(self, rec)
        try:
            await loop.finalize(req.resolution)
        finally:
            await loop.close()
        return self._progress(rec)

    async def resume_all(self) -> None:
        """At agent start: pick up every unfinished outgoing migration again."""
        for rec in self.store.all():
            if rec.role is not MigrationRole.SOURCE or rec.progress is None:
                continue
            self._records[rec.migration_id] = rec
            if rec.progress.status is MigrationStatus.RUNNING:
                log.info("migration %d: resuming the control loop of VM %s", rec.migration_id, rec.vm)
                self._spawn(rec)

    async def close(self) -> None:
        """Agent exit: stop the loops without touching QEMU (it keeps migrating; a restart resumes)."""
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    def release(self, migration_id: int) -> bool:
        """Retention is about to remove this record: drop it from memory unless it is still in use."""
        rec = self._records.get(migration_id)
        if rec is None:
            return True
        task = self._tasks.get(migration_id)
        if rec.progress is None or not rec.progress.status.finished or (task is not None and not task.done()):
            return False
        del self._records[migration_id]
        self._tasks.pop(migration_id, None)
        return True

    # ----- bookkeeping ---------------------------------------------------------------------------
    @property
    def tls_files(self) -> HostTlsFiles:
        return HostTlsFiles.of(self.supervisor.config.state_dir)

    def _get(self, migration_id: int) -> StoredMigration | None:
        rec = self._records.get(migration_id)
        if rec is None:
            rec = self.store.load(migration_id)
            if rec is None or rec.role is not MigrationRole.SOURCE:
                return None
            self._records[migration_id] = rec
        return rec

    def _require(self, migration_id: int) -> StoredMigration:
        rec = self._get(migration_id)
        if rec is None:
            raise NotFoundError(f"This host runs no outgoing migration {migration_id}.",
                                hint="Check the migration id and the source host.")
        return rec

    async def _qemu_switching(self, rec: StoredMigration) -> bool:
        try:
            answer = await mq.query_migrate(self.supervisor.qmp_session(rec.vm))
        except VmshiftError:
            return False
        status = Q.parse(str(answer.get("status", "none")))
        return status in SWITCHOVER_STARTED or status.postcopy

    @staticmethod
    def _progress(rec: StoredMigration) -> MigrationProgress:
        assert rec.progress is not None
        return rec.progress.model_copy(deep=True)

    def _save(self, rec: StoredMigration) -> None:
        assert rec.progress is not None
        rec.progress.updated_at = datetime.now(UTC)
        self._records[rec.migration_id] = rec
        self.store.save(rec)

    def _spawn(self, rec: StoredMigration) -> None:
        task = asyncio.create_task(self._run(rec), name=f"migration-{rec.migration_id}")
        self._tasks[rec.migration_id] = task

    async def _run(self, rec: StoredMigration) -> None:
        loop = SourceLoop(self, rec)
        try:
            await loop.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not leave the record "running" with nobody told
            log.exception("migration %d: the control loop crashed", rec.migration_id)
            with contextlib.suppress(Exception):
                await loop.crashed(exc)
        finally:
            await loop.close()
