"""Source role of a live migration: the control loop next to QEMU (docs/migration.md).

One owned asyncio task per outgoing migration: set up QEMU, ``migrate``, then follow QEMU's
``MIGRATION`` events (the ``events`` capability) and sample ``query-migrate`` every 250 ms for the
pure ``ConvergencePolicy``. It ends in one of:

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
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from vmshift.agent.migration_store import MigrationRole, MigrationStore, StoredMigration
from vmshift.agent.supervisor import Supervisor
from vmshift.client.agent import AgentClient
from vmshift.errors import (
    ConflictError,
    IncomingFailedError,
    NotFoundError,
    QemuError,
    StreamCompletedError,
    SwitchoverStartedError,
    VmshiftError,
)
from vmshift.migration.phases import check_transition
from vmshift.migration.policy import Action, ConvergencePolicy, PolicySettings
from vmshift.migration.samples import MigrationSample, QemuMigrationStatus, summarize
from vmshift.model.agent_migration import FinalizeRequest, MigrationProgress, OutgoingMigration
from vmshift.model.api import ErrorInfo
from vmshift.model.enums import QemuRunState as RunState
from vmshift.model.migration import (
    ActionKind,
    FinalizeResolution,
    MigrationMetrics,
    MigrationPhase,
    MigrationStatus,
)
from vmshift.qemu import migration_qmp as mq
from vmshift.qemu.qmp import QmpSession

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
                 settle_s: float = 0.2, target_transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.supervisor = supervisor
        self.store = store
        self.sample_interval_s = sample_interval_s
        self.stall_timeout_s = stall_timeout_s
        self.target_check_interval_s = target_check_interval_s
        self.target_down_after_s = target_down_after_s
        self.activation_deadline_s = activation_deadline_s
        self.settle_s = settle_s
        self.target_transport = target_transport  # None: real HTTP (tests pass a mock target agent)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._records: dict[int, StoredMigration] = {}

    # ----- API -----------------------------------------------------------------------------------
    async def start(self, req: OutgoingMigration) -> MigrationProgress:
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
        if (progress.phase in (P.POSTCOPY, P.FINISH, P.SWITCHOVER) or postcopy_asked
                or await self._qemu_switching(rec)):
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
        loop = _Loop(self, rec)
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

    # ----- bookkeeping ---------------------------------------------------------------------------
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
        loop = _Loop(self, rec)
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


class _Loop:
    """One run of the control loop for one migration (fresh or resumed)."""

    def __init__(self, owner: OutgoingMigrations, rec: StoredMigration) -> None:
        assert rec.request is not None and rec.progress is not None
        self.o, self.rec, self.req, self.p = owner, rec, rec.request, rec.progress
        self.samples: list[MigrationSample] = []
        overrides: dict[str, Any] = {}
        if self.req.dirty_rate_bps:
            overrides["dirty_rate_hint_bps"] = self.req.dirty_rate_bps
        self.policy = ConvergencePolicy(PolicySettings.from_migration(
            self.req.settings, bandwidth_bps=self.req.bandwidth_bps, **overrides))
        if self.p.downtime_limit_ms:  # resumed: remember what is in force in QEMU
            self.policy.state.downtime_limit_s = self.p.downtime_limit_ms / 1000
            self.policy.state.throttle_percent = self.p.throttle_percent
        # One kept-alive connection to the target for the whole migration: the health checks
        # during pre-copy keep it warm, so the confirm at the switchover costs no handshake.
        self.target = AgentClient(self.req.target_agent.address, self.req.target_agent.token,
                                  timeout_s=10.0, connect_timeout_s=3.0,
                                  transport=self.o.target_transport)

    async def close(self) -> None:
        await self.target.aclose()

    def now(self) -> float:
        return time.time() - self.rec.started_at

    def save(self) -> None:
        self.o._save(self.rec)

    def qmp(self) -> QmpSession:
        return self.o.supervisor.qmp_session(self.rec.vm)

    def source_alive(self) -> bool:
        return self.o.supervisor.is_alive(self.rec.vm)

    def set_phase(self, phase: MigrationPhase) -> None:
        if self.p.phase is not phase:
            self.p.phase = check_transition(self.p.phase, phase)

    async def run(self) -> None:
        try:
            await self._drive()
            await self._complete()
        except _SourceGone as gone:
            await self._decide_from_target(gone.reason)
        except _Rollback as rb:
            await self._rollback(rb.reason, rb.code)
        except VmshiftError as exc:
            if self.rec.migrate_sent and not self.source_alive():
                await self._decide_from_target(f"The source QEMU exited during the migration ({exc.message})")
            else:
                await self._rollback(exc.message, exc.code)

    async def crashed(self, exc: Exception) -> None:
        """The loop hit a bug: end the record in a state the server reports (never silently running)."""
        if self.p.status is not MigrationStatus.RUNNING:
            return
        reason = f"The source agent's control loop failed ({type(exc).__name__}: {exc})."
        if self.p.phase in (P.PREPARE, P.PRECOPY) and self.source_alive():
            await self._rollback(reason, "internal")
        else:
            await self._needs_finalize(reason)

    async def finalize(self, resolution: FinalizeResolution) -> None:
        if resolution is FinalizeResolution.TARGET_ACTIVATED:
            await self._stop_source_and_complete()
        elif resolution is FinalizeResolution.RESUME_SOURCE:
            if not self.source_alive():
                await self._finish(MigrationStatus.LOST, P.LOST,
                                   f"VM {self.rec.vm!r} is lost: its source QEMU is gone and the target "
                                   "never received the whole VM.", "vm_lost")
                return
            await self._resume_source("The target never ran the VM.", "resumed_source")
        elif self.source_alive():
            await self._complete()
        else:
            await self._decide_from_target("The source QEMU is gone")

    # ----- pre-copy ------------------------------------------------------------------------------
    async def _drive(self) -> None:
        """Set up, then follow QEMU until the stream completed; raises _Rollback or _SourceGone."""
        if not self.source_alive():
            if self.rec.migrate_sent:
                raise _SourceGone("The source QEMU exited during the migration")
            raise _Rollback(f"The source QEMU of VM {self.rec.vm!r} is not running.", "qemu_error")
        # a QEMU that never migrated answers query-migrate with {} (no status)
        current = Q.parse(str((await mq.query_migrate(self.qmp())).get("status", "none")))
        if not self.rec.migrate_sent and await self._sent_before_restart(current):
            # the agent died between `migrate` and saving that it sent it: QEMU is the truth
            self.rec.migrate_sent = True
            self.set_phase(P.PRECOPY)
            self.save()
        elif not self.rec.migrate_sent:
            await self._setup()
        elif current is Q.NONE:
            raise _Rollback("The source QEMU has no migration in progress (it was restarted).", "qemu_error")
        last_bytes, last_progress_at = -1, time.monotonic()
        target_ok_at, next_target_check = time.monotonic(), 0.0
        while True:
            if not self.source_alive():
                raise _SourceGone("The source QEMU exited during the migration")
            qmp = self.qmp()
            seen = qmp.last_seq
            try:
                answer = await mq.query_migrate(qmp)
            except QemuError:
                if not self.source_alive():
                    raise _SourceGone("The source QEMU exited during the migration") from None
                raise
            sample = MigrationSample.from_qmp(answer, self.now())
            self.samples.append(sample)
            self._update(sample)
            if sample.status is Q.COMPLETED:
                return
            if sample.status in (Q.FAILED, Q.CANCELLED):
                if self.rec.cancel_requested:
                    raise _Rollback("The migration was cancelled by the user.", "cancelled")
                raise _Rollback(f"QEMU reports the migration {sample.status.value}: "
                                f"{sample.error or 'no reason given'}.", "migration_failed")
            if self.rec.cancel_requested:
                if sample.status is not Q.CANCELLING:
                    await self._cancel_qemu()  # then wait for QEMU's event, not spin
            elif sample.status is Q.ACTIVE:
                for action in self.policy.decide(sample):
                    await self._apply(action)
            # a cut link leaves QEMU "active" with nothing moving
            if sample.transferred_bytes != last_bytes:
                last_bytes, last_progress_at = sample.transferred_bytes, time.monotonic()
            elif time.monotonic() - last_progress_at > self.o.stall_timeout_s and not sample.status.postcopy:
                raise _Rollback(f"No data reached the target for {self.o.stall_timeout_s:g} s: "
                                "the migration link looks cut.", "migration_stalled")
            if time.monotonic() >= next_target_check and not sample.status.postcopy:
                next_target_check = time.monotonic() + self.o.target_check_interval_s
                if await self._target_alive():
                    target_ok_at = time.monotonic()
                elif time.monotonic() - target_ok_at > self.o.target_down_after_s:
                    raise _Rollback(f"The target agent {self.req.target_agent.address} stopped answering.",
                                    "host_unreachable")
            # QEMU's MIGRATION event (completed, failed, ...) ends the wait at once
            event = await qmp.wait_event("MIGRATION", timeout_s=self.o.sample_interval_s, after_seq=seen)
            if event is not None:
                status = Q.parse(str(event.data.get("status", "")))
                if status is Q.COMPLETED:
                    return  # QEMU's own word: confirm now, sample afterwards (one round trip less)
                self._note_event(status)

    def _note_event(self, status: QemuMigrationStatus) -> None:
        """QEMU announces the switchover by event while its monitor is busy sending the last pages
        (query-migrate waits for the big lock then): show the phase at once."""
        if status in (Q.PRE_SWITCHOVER, Q.DEVICE) and self.p.phase is P.PRECOPY:
            self.set_phase(P.SWITCHOVER)
            self.save()

    async def _sent_before_restart(self, current: QemuMigrationStatus) -> bool:
        """Did QEMU already get our `migrate`? A status left from an earlier attempt, or from the
        migration that brought this VM here (a former target reports that one as completed), is no
        sign; an outgoing stream in flight is, and so is a completed one that left the VM paused."""
        if current in (Q.NONE, Q.FAILED, Q.CANCELLED, Q.UNKNOWN):
            return False
        if current is Q.COMPLETED:
            return (await self.qmp().query_status()).state is RunState.POSTMIGRATE
        return True

    async def _setup(self) -> None:
        qmp, s = self.qmp(), self.req.settings
        caps = await mq.query_capabilities(qmp)
        wanted = {"events": True, "auto-converge": True, "postcopy-ram": s.allow_postcopy,
                  "multifd": False}  # multifd: no gain measured under TCG on 2 cores (docs/migration.md)
        if "validate-uuid" in caps:
            wanted["validate-uuid"] = True
        await mq.set_capabilities(qmp, {k: v for k, v in wanted.items() if k in caps})
        bandwidth = int(s.bandwidth_limit_bps) if s.bandwidth_limit_bps else mq.UNLIMITED_BANDWIDTH
        cfg = self.policy.settings
        initial_ms = round(min(cfg.initial_downtime_s, cfg.max_downtime_s) * 1000)
        # A limit holds for the whole migration: post-copy has its own cap (0 = unlimited).
        postcopy_cap = int(s.bandwidth_limit_bps) if s.bandwidth_limit_bps else 0
        await mq.set_parameters(qmp, {"max-bandwidth": bandwidth, "max-postcopy-bandwidth": postcopy_cap,
                                      "downtime-limit": initial_ms, **mq.NO_THROTTLE})
        self.p.downtime_limit_ms = initial_ms
        self.rec.started_at = time.time()
        if self.rec.cancel_requested:  # accepted while this set-up ran: never start the stream
            raise _Rollback("The migration was cancelled by the user.", "cancelled")
        await mq.migrate(qmp, self.req.uri)
        self.rec.migrate_sent = True
        self.set_phase(P.PRECOPY)
        self.save()
        log.info("migration %d: VM %s -> %s started", self.rec.migration_id, self.rec.vm, self.req.uri)

    def _update(self, sample: MigrationSample) -> None:
        p = self.p
        p.round, p.remaining_bytes, p.total_bytes = sample.round, sample.remaining_bytes, sample.total_bytes
        p.transferred_bytes, p.throughput_bps = sample.transferred_bytes, sample.throughput_bps
        p.dirty_rate_bps, p.throttle_percent = sample.dirty_rate_bps, sample.throttle_percent
        if p.phase is P.PREPARE and sample.status is not Q.NONE:
            self.set_phase(P.PRECOPY)
        if sample.status.postcopy:
            self.set_phase(P.POSTCOPY)
        elif sample.status in (Q.PRE_SWITCHOVER, Q.DEVICE) and p.phase is P.PRECOPY:
            self.set_phase(P.SWITCHOVER)
        p.metrics = self._metrics()
        self.save()

    def _metrics(self) -> MigrationMetrics:
        metrics = summarize(self.samples) if self.samples else self.p.metrics
        metrics.timeline = self.rec.timeline
        return metrics

    def _summary(self) -> MigrationMetrics:
        """Final metrics from the samples; a post-copy shorter than the sampling interval still shows
        in QEMU's MIGRATION events (read once at the end, not on every sample)."""
        metrics = self._metrics()
        if not metrics.postcopy and self.source_alive():
            with contextlib.suppress(VmshiftError):
                events = self.qmp().events_named("MIGRATION")
                metrics.postcopy = any(str(e.data.get("status", "")).startswith("postcopy") for e in events
                                       if e.time >= (self.rec.started_at or 0) - 1)
        return metrics

    def _postcopy_requested(self) -> bool:
        return any(a.kind is ActionKind.START_POSTCOPY for a in self.p.actions)

    def _postcopy_began(self) -> bool:
        """Did QEMU really enter post-copy? From the samples, or its MIGRATION events for one
        shorter than a sampling interval; a mere request is no proof."""
        if self.p.phase is P.POSTCOPY or any(s.status.postcopy for s in self.samples):
            return True
        if not self._postcopy_requested():
            return False
        if not self.source_alive():
            return True  # cannot tell, and nothing to resume anyway
        with contextlib.suppress(VmshiftError):
            return any(str(e.data.get("status", "")).startswith("postcopy")
                       for e in self.qmp().events_named("MIGRATION")
                       if e.time >= (self.rec.started_at or 0) - 1)
        return True  # cannot tell: keep the safe side (no cont)

    def _mark_source_timeline(self) -> None:
        """Timeline: the source's STOP (vCPUs stopped) and MIGRATION completed events, QEMU's clock."""
        if not self.source_alive():
            return
        with contextlib.suppress(VmshiftError):
            qmp = self.qmp()
            since = (self.rec.started_at or 0) - 1
            stops = [e for e in qmp.events_named("STOP") if e.time >= since]
            done = [e for e in qmp.events_named("MIGRATION")
                    if e.time >= since and e.data.get("status") == "completed"]
            if stops:
                self.rec.timeline.source_stopped = stops[-1].time
            if done:
                self.rec.timeline.last_byte_sent = done[-1].time

    async def _apply(self, action: Action) -> None:
        qmp = self.qmp()
        if action.kind is ActionKind.SET_DOWNTIME_LIMIT and action.value is not None:
            await mq.set_parameters(qmp, {"downtime-limit": round(action.value * 1000)})
            self.p.downtime_limit_ms = round(action.value * 1000)
        elif action.kind is ActionKind.SET_THROTTLE and action.value is not None:
            await mq.set_parameters(qmp, mq.throttle_parameters(int(action.value)))
        elif action.kind is ActionKind.START_POSTCOPY:
            # From here QEMU may hand the VM to the target at any moment (it may also finish the
            # pre-copy first): no more cancel. The phase follows QEMU's postcopy-active, because
            # QEMU also accepts this request for a migration that has already failed.
            await mq.start_postcopy(qmp)
        self.p.actions.append(action.to_record())
        self.save()
        log.info("migration %d: %s %s — %s", self.rec.migration_id, action.kind.value, action.value,
                 action.reason)
        if action.kind is ActionKind.ABORT:
            await self._cancel_qemu()
            raise _Rollback(f"Aborted by the convergence policy: {action.reason}.", "migration_timeout")

    async def _cancel_qemu(self) -> None:
        with contextlib.suppress(QemuError):
            await mq.migrate_cancel(self.qmp())

    async def _target_alive(self) -> bool:
        try:
            await self.target.health(timeout_s=2.0)
            return True
        except VmshiftError as exc:
            return not exc.retryable  # an answer that is an error still proves the agent runs

    # ----- endings -------------------------------------------------------------------------------
    async def _final_status(self) -> QemuMigrationStatus:
        """Cancel QEMU's migration if it still runs and wait until it settles."""
        deadline = time.monotonic() + 15.0
        while True:
            qmp = self.qmp()
            seen = qmp.last_seq
            answer = await mq.query_migrate(qmp)
            status = Q.parse(str(answer.get("status", "none")))
            if status.finished or status is Q.NONE:
                if status is Q.COMPLETED:
                    self.samples.append(MigrationSample.from_qmp(answer, self.now()))
                return status
            if status is not Q.CANCELLING:
                await self._cancel_qemu()
            if time.monotonic() > deadline:
                raise QemuError("QEMU's migration did not stop after migrate_cancel within 15 s.")
            await qmp.wait_event("MIGRATION", timeout_s=0.1, after_seq=seen)

    async def _rollback(self, reason: str, code: str) -> None:
        p = self.p
        log.warning("migration %d: rolling back (%s)", self.rec.migration_id, reason)
        if p.phase is P.POSTCOPY or self._postcopy_began():
            # the source no longer holds the whole VM: no rollback, no cont
            await self._finish(MigrationStatus.FAILED, P.FAILED, reason, code)
            return
        self.set_phase(P.ROLLBACK)
        self.save()
        if not self.source_alive():
            if self.rec.migrate_sent:
                await self._decide_from_target(f"{reason} The source QEMU is gone as well")
                return
            reason = f"{reason} The source QEMU is gone as well."
        else:
            try:
                if await self._final_status() is Q.COMPLETED:
                    log.warning("migration %d: the stream completed before the cancel", self.rec.migration_id)
                    await self._complete()
                    return
                qmp = self.qmp()
                if not (await qmp.query_status()).running:
                    await qmp.cont()  # QEMU paused the source for the switchover; the stream did not complete
            except VmshiftError as exc:
                reason = f"{reason} Restoring the source failed too: {exc.message}"
        try:
            await self.target.migration_rollback(self.rec.migration_id, timeout_s=10.0)
        except VmshiftError as exc:
            if exc.code == StreamCompletedError.code:
                reason = f"{reason} The target kept its complete, never-run copy: {exc.message}"
            else:
                log.warning("migration %d: target rollback failed: %s", self.rec.migration_id, exc)
        cancelled = self.rec.cancel_requested
        await self._finish(MigrationStatus.CANCELLED if cancelled else MigrationStatus.FAILED,
                           P.CANCELLED if cancelled else P.FAILED, reason, "cancelled" if cancelled else code)

    async def _complete(self) -> None:
        """The source QEMU completed: tell the target to run, at once; then stop the source."""
        self._mark_source_timeline()
        self.set_phase(P.FINISH)
        self.rec.timeline.confirm_sent = time.time()
        activated, why = await self._activate_target()
        if activated is None:
            return  # the target proved it never ran: the source was resumed
        await self._final_sample()
        self.p.metrics = self._summary()
        self.save()
        if not activated:
            await self._needs_finalize(f"The target agent could not be told to run the VM: {why}")
            return
        # The target's vCPU now fills TCG's empty code cache (tens of ms, bench/README.md): leave
        # it the CPU for a moment before this host's QEMU quits and the timeline is fetched.
        await asyncio.sleep(self.o.settle_s)
        await self._fetch_target_timeline()
        await self._stop_source_and_complete()

    async def _final_sample(self) -> None:
        """QEMU's final answer (total time, downtime), read after the confirm went out."""
        if not self.source_alive():
            return
        with contextlib.suppress(VmshiftError):
            answer = await mq.query_migrate(self.qmp())
            sample = MigrationSample.from_qmp(answer, self.now())
            if sample.status is Q.COMPLETED:
                self.samples.append(sample)

    async def _activate_target(self) -> tuple[bool | None, str]:
        """True: the target runs the VM; False: it could not be reached or refused (why);
        None: it proved its copy never ran, and the source was resumed."""
        deadline = time.monotonic() + self.o.activation_deadline_s
        delay, why = 0.25, ""
        while True:
            try:
                await self.target.migration_activate(self.rec.migration_id, timeout_s=40.0)
                return True, ""
            except VmshiftError as exc:
                if exc.code == IncomingFailedError.code:
                    await self._resume_source(exc.message, IncomingFailedError.code)
                    return None, exc.message
                why = exc.message
                if not (exc.retryable or exc.status >= 500):  # a 4xx refusal will not change
                    return False, why
            if time.monotonic() + delay > deadline:
                return False, why
            await asyncio.sleep(delay)
            delay = min(4.0, delay * 2)

    async def _fetch_target_timeline(self) -> None:
        with contextlib.suppress(VmshiftError):
            state = await self.target.migration_incoming_state(self.rec.migration_id)
            tl = self.rec.timeline
            tl.target_loaded = state.timeline.target_loaded
            tl.target_cont = state.timeline.target_cont
            tl.first_announce = state.timeline.first_announce

    async def _stop_source_and_complete(self) -> None:
        try:
            await self.o.supervisor.stop_and_unregister(self.rec.vm)
        except VmshiftError as exc:
            log.warning("migration %d: stopping the source QEMU failed: %s", self.rec.migration_id, exc)
        if self.p.phase is not P.FINISH:
            self.set_phase(P.FINISH)
        await self._finish(MigrationStatus.COMPLETED, P.COMPLETED, None, None)

    async def _decide_from_target(self, reason: str) -> None:
        """The source QEMU vanished after `migrate`: only the target's QEMU can say where the VM is."""
        mid, vm = self.rec.migration_id, self.rec.vm
        reason = reason.rstrip(".")
        try:
            state = await self.target.migration_incoming_state(mid)
        except VmshiftError as exc:
            await self._needs_finalize(f"{reason}, and the target cannot say whether it received the "
                                       f"whole VM ({exc.message})")
            return
        stream = Q.parse(state.stream or "none")
        if state.qemu_alive and (stream is Q.COMPLETED or state.qemu_status == RunState.RUNNING.value):
            log.warning("migration %d: source QEMU gone, the target holds the whole VM: activating it", mid)
            self.set_phase(P.FINISH)
            self.rec.timeline.confirm_sent = time.time()
            activated, why = await self._activate_target()
            if not activated:
                await self._needs_finalize(f"{reason}; the target holds the whole VM but could not be "
                                           f"activated: {why}")
                return
            await self._fetch_target_timeline()
            await self._stop_source_and_complete()
            return
        # the target never got all of it (and never ran it: -S): it is useless, the VM is lost
        with contextlib.suppress(VmshiftError):
            await self.target.migration_rollback(mid, timeout_s=10.0)
        paths = self.o.supervisor.files.paths(self.o.supervisor.files.load_spec(vm))
        await self._finish(
            MigrationStatus.LOST, P.LOST,
            f"VM {vm!r} is lost: {reason}, and the target had not received the whole VM "
            f"(its stream was {stream.value}). Its serial log is kept in {paths.serial_log}.",
            "vm_lost")

    async def _resume_source(self, why: str, code: str) -> None:
        """The target proved its copy never ran: this copy is the only one; run it again."""
        reason = why
        try:
            qmp = self.qmp()
            if not (await qmp.query_status()).running:
                await qmp.cont()
            reason += " The VM was resumed on the source."
        except VmshiftError as exc:
            reason += f" Resuming the source failed too: {exc.message}"
        self.set_phase(P.FINISH)
        await self._finish(MigrationStatus.FAILED, P.FAILED, reason, code)

    async def _needs_finalize(self, reason: str) -> None:
        """Never guess: the VM waits paused on both hosts until an operator's finalize decides."""
        self.p.status = MigrationStatus.NEEDS_FINALIZE
        if self.p.phase is not P.FINISH:
            with contextlib.suppress(ConflictError):
                self.set_phase(P.FINISH)
        mid = self.rec.migration_id
        self.p.error = ErrorInfo(
            code="needs_finalize",
            message=f"{reason.rstrip('.')}. The VM stays paused on both hosts.",
            hint=(f"Once the target host answers, run 'vmshift migration finalize {mid}'; if the target "
                  f"provably never ran the VM, 'vmshift vm resume {self.rec.vm}' resumes the source."))
        self.p.metrics = self._metrics()
        self.save()
        log.error("migration %d: needs finalize (%s)", mid, reason)

    async def _finish(self, status: MigrationStatus, phase: MigrationPhase, reason: str | None,
                      code: str | None) -> None:
        p = self.p
        self.set_phase(phase)
        p.status = status
        p.metrics = self._summary() if self.samples else self._metrics()
        if reason is not None:
            if status is MigrationStatus.LOST:
                hint = "Start the VM again from its disks (a cold boot); check the hosts' QEMU logs first."
            elif phase is P.FAILED and self._postcopy_began():
                hint = ("Post-copy had been started, so the source was not resumed; check which host "
                        "runs the VM before starting it anywhere.")
            else:
                hint = "The VM keeps running on the source host; retry once the cause is fixed."
            p.error = ErrorInfo(code=code or "migration_failed", message=reason, hint=hint)
        else:
            p.error = None
        self.save()
        log.info("migration %d: %s%s", self.rec.migration_id, status.value, f" ({reason})" if reason else "")


class _Rollback(Exception):
    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.reason, self.code = reason, code


class _SourceGone(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
