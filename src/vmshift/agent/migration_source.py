"""Source role of a live migration: the control loop next to QEMU (docs/migration.md).

One owned asyncio task per outgoing migration: set up QEMU, ``migrate``, sample ``query-migrate``
every 250 ms into the pure ``ConvergencePolicy``, apply its actions, and finish with either the
completion steps (target ``activate``, source QEMU quit, VM unregistered here) or the rollback
steps (``migrate_cancel``, source running unpaused, target ``DELETE``). The record is persisted in
``state_dir/migrations/ID.json`` so a restarted agent resumes the loop where QEMU is now.

Safety rule: once QEMU says the stream completed, the source is never resumed (``cont``).
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
from vmshift.errors import (
    ApiError,
    ConflictError,
    IncomingFailedError,
    NotFoundError,
    QemuError,
    VmshiftError,
)
from vmshift.migration.policy import Action, ConvergencePolicy, PolicySettings
from vmshift.migration.samples import MigrationSample, QemuMigrationStatus, summarize
from vmshift.model.agent_migration import MigrationProgress, OutgoingMigration
from vmshift.model.api import ErrorInfo
from vmshift.model.migration import ActionKind, MigrationMetrics, MigrationPhase, MigrationStatus
from vmshift.qemu import migration_qmp as mq
from vmshift.qemu.qmp import QmpSession

log = logging.getLogger(__name__)
Q = QemuMigrationStatus
P = MigrationPhase


class MigrationFailed(VmshiftError):
    code = "migration_failed"


class OutgoingMigrations:
    """Owner of the control-loop tasks of this host's outgoing migrations."""

    def __init__(self, supervisor: Supervisor, store: MigrationStore, *, sample_interval_s: float = 0.25,
                 stall_timeout_s: float = 10.0, target_check_interval_s: float = 2.0,
                 target_down_after_s: float = 6.0) -> None:
        self.supervisor = supervisor
        self.store = store
        self.sample_interval_s = sample_interval_s
        self.stall_timeout_s = stall_timeout_s
        self.target_check_interval_s = target_check_interval_s
        self.target_down_after_s = target_down_after_s
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._records: dict[int, StoredMigration] = {}

    # ----- API -----------------------------------------------------------------------------------
    async def start(self, req: OutgoingMigration) -> MigrationProgress:
        existing = self._get(req.migration_id)
        if existing is not None:
            if existing.request is not None and existing.request.vm == req.vm:
                return self._progress(existing)  # the same request again
            raise ConflictError(f"Migration {req.migration_id} already exists on this host.")
        if not self.supervisor.is_alive(req.vm):
            raise ConflictError(f"VM {req.vm!r} is not running on this host, so it cannot be live-migrated.",
                                hint="Start it first, or use a cold migration.")
        for rec in self._records.values():
            progress = rec.progress
            if rec.vm == req.vm and progress is not None and not progress.status.finished:
                raise ConflictError(f"VM {req.vm!r} is already migrating (migration {rec.migration_id}).",
                                    hint="Wait for it or cancel it.")
        progress = MigrationProgress(migration_id=req.migration_id, vm=req.vm, phase=P.PREPARE,
                                     status=MigrationStatus.RUNNING, updated_at=datetime.now(UTC))
        rec = StoredMigration(role=MigrationRole.SOURCE, migration_id=req.migration_id, vm=req.vm,
                              request=req, progress=progress)
        self._save(rec)
        self._spawn(rec)
        return self._progress(rec)

    def get(self, migration_id: int) -> MigrationProgress:
        rec = self._get(migration_id)
        if rec is None:
            raise NotFoundError(f"This host runs no outgoing migration {migration_id}.",
                                hint="Check the migration id and the source host.")
        return self._progress(rec)

    async def cancel(self, migration_id: int, wait_s: float = 20.0) -> MigrationProgress:
        rec = self._get(migration_id)
        if rec is None:
            raise NotFoundError(f"This host runs no outgoing migration {migration_id}.")
        progress = self._progress(rec)
        if progress.status.finished:
            return progress
        if progress.phase in (P.POSTCOPY, P.FINISH, P.SWITCHOVER):
            raise ConflictError(f"Migration {migration_id} is past the point of no return "
                                f"({progress.phase}).",
                                hint="Let it finish.")
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

    async def resume_all(self) -> None:
        """At agent start: pick up every unfinished outgoing migration again."""
        for rec in self.store.all():
            if rec.role is not MigrationRole.SOURCE or rec.progress is None:
                continue
            self._records[rec.migration_id] = rec
            if not rec.progress.status.finished:
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

    # ----- the loop ------------------------------------------------------------------------------
    async def _run(self, rec: StoredMigration) -> None:
        try:
            await _Loop(self, rec).run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("migration %d: the control loop crashed", rec.migration_id)


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
        self.http = httpx.AsyncClient(base_url=f"http://{self.req.target_agent.address}/api/v1",
                                      headers={"Authorization": f"Bearer {self.req.target_agent.token}"},
                                      timeout=httpx.Timeout(10.0, connect=3.0), trust_env=False)

    def now(self) -> float:
        return time.time() - self.rec.started_at

    def save(self) -> None:
        self.o._save(self.rec)

    def qmp(self) -> QmpSession:
        return self.o.supervisor.qmp_session(self.rec.vm)

    async def run(self) -> None:
        try:
            outcome = await self._drive()
            if outcome is Q.COMPLETED:
                await self._complete()
        except _Rollback as rb:
            await self._rollback(rb.reason, rb.code)
        except VmshiftError as exc:
            await self._rollback(exc.message, exc.code)
        finally:
            await self.http.aclose()

    async def _drive(self) -> QemuMigrationStatus:
        """Set up and sample until QEMU's migration finishes; returns COMPLETED or raises _Rollback."""
        if not self.o.supervisor.is_alive(self.rec.vm):
            raise _Rollback(f"The source QEMU of VM {self.rec.vm!r} is not running.", "qemu_error")
        # a QEMU that never migrated answers query-migrate with {} (no status)
        current = QemuMigrationStatus.parse(str((await mq.query_migrate(self.qmp())).get("status", "none")))
        if not self.rec.migrate_sent and await self._sent_before_restart(current):
            # the agent died between `migrate` and saving that it sent it: QEMU is the truth
            self.rec.migrate_sent = True
            self.p.phase = P.PRECOPY
            self.save()
        elif not self.rec.migrate_sent:
            await self._setup()
        elif current is Q.NONE:
            raise _Rollback("The source QEMU has no migration in progress (it was restarted).", "qemu_error")
        last_bytes, last_progress_at = -1, time.monotonic()
        target_ok_at, next_target_check = time.monotonic(), 0.0
        while True:
            answer = await mq.query_migrate(self.qmp())
            sample = MigrationSample.from_qmp(answer, self.now())
            self.samples.append(sample)
            self._update(sample)
            if sample.status is Q.COMPLETED:
                return Q.COMPLETED
            if sample.status in (Q.FAILED, Q.CANCELLED):
                if self.rec.cancel_requested:
                    raise _Rollback("The migration was cancelled by the user.", "cancelled")
                raise _Rollback(f"QEMU reports the migration {sample.status.value}: "
                                f"{sample.error or 'no reason given'}.", "migration_failed")
            if self.rec.cancel_requested and sample.status is not Q.CANCELLING:
                await self._cancel_qemu()
                continue
            if sample.status is Q.ACTIVE:
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
            await asyncio.sleep(self.o.sample_interval_s)

    async def _sent_before_restart(self, current: QemuMigrationStatus) -> bool:
        """Did QEMU already get our `migrate`? A status left from an earlier attempt, or from the
        migration that brought this VM here (a former target reports that one as completed), is no
        sign; an outgoing stream in flight is, and so is a completed one that left the VM paused."""
        if current in (Q.NONE, Q.FAILED, Q.CANCELLED, Q.UNKNOWN):
            return False
        if current is Q.COMPLETED:
            return (await self.qmp().query_status()).status == "postmigrate"
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
        await mq.migrate(qmp, self.req.uri)
        self.rec.migrate_sent = True
        self.p.phase = P.PRECOPY
        self.save()
        log.info("migration %d: VM %s -> %s started", self.rec.migration_id, self.rec.vm, self.req.uri)

    def _update(self, sample: MigrationSample) -> None:
        p = self.p
        p.round, p.remaining_bytes, p.total_bytes = sample.round, sample.remaining_bytes, sample.total_bytes
        p.transferred_bytes, p.throughput_bps = sample.transferred_bytes, sample.throughput_bps
        p.dirty_rate_bps, p.throttle_percent = sample.dirty_rate_bps, sample.throttle_percent
        if sample.status.postcopy:
            p.phase = P.POSTCOPY
        elif sample.status in (Q.PRE_SWITCHOVER, Q.DEVICE):
            p.phase = P.SWITCHOVER
        elif sample.status in (Q.ACTIVE, Q.SETUP) and p.phase is P.PREPARE:
            p.phase = P.PRECOPY
        p.metrics = summarize(self.samples)
        self.save()

    def _summary(self) -> MigrationMetrics:
        """Final metrics from the samples; a post-copy shorter than the sampling interval still shows
        in QEMU's MIGRATION events (read once at the end, not on every sample)."""
        metrics = summarize(self.samples)
        if not metrics.postcopy and self.o.supervisor.is_alive(self.rec.vm):
            with contextlib.suppress(VmshiftError):
                events = self.qmp().events_named("MIGRATION")
                metrics.postcopy = any(str(e.data.get("status", "")).startswith("postcopy") for e in events
                                       if e.time >= (self.rec.started_at or 0) - 1)
        return metrics

    async def _apply(self, action: Action) -> None:
        qmp = self.qmp()
        if action.kind is ActionKind.SET_DOWNTIME_LIMIT and action.value is not None:
            await mq.set_parameters(qmp, {"downtime-limit": round(action.value * 1000)})
            self.p.downtime_limit_ms = round(action.value * 1000)
        elif action.kind is ActionKind.SET_THROTTLE and action.value is not None:
            await mq.set_parameters(qmp, mq.throttle_parameters(int(action.value)))
        elif action.kind is ActionKind.START_POSTCOPY:
            await mq.start_postcopy(qmp)
            # From here QEMU may hand the VM to the target at any moment (it may also finish the
            # pre-copy first): no more cancel, and never `cont` the source on a failure.
            self.p.phase = P.POSTCOPY
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
            r = await self.http.get("/health", timeout=2.0)
            return r.status_code < 500
        except httpx.HTTPError:
            return False

    # ----- endings -------------------------------------------------------------------------------
    async def _final_status(self) -> QemuMigrationStatus:
        """Cancel QEMU's migration if it still runs and wait until it settles."""
        deadline = time.monotonic() + 15.0
        while True:
            answer = await mq.query_migrate(self.qmp())
            status = QemuMigrationStatus.parse(str(answer.get("status", "none")))
            if status.finished or status is Q.NONE:
                if status is Q.COMPLETED:
                    self.samples.append(MigrationSample.from_qmp(answer, self.now()))
                return status
            if status is not Q.CANCELLING:
                await self._cancel_qemu()
            if time.monotonic() > deadline:
                raise QemuError("QEMU's migration did not stop after migrate_cancel within 15 s.")
            await asyncio.sleep(0.1)

    async def _rollback(self, reason: str, code: str) -> None:
        p, vm = self.p, self.rec.vm
        log.warning("migration %d: rolling back (%s)", self.rec.migration_id, reason)
        if p.phase is P.POSTCOPY:  # the source no longer holds the whole VM: no rollback, no cont
            await self._finish(MigrationStatus.FAILED, P.FAILED, reason, code)
            return
        p.phase = P.ROLLBACK
        self.save()
        if self.o.supervisor.is_alive(vm):
            try:
                if await self._final_status() is Q.COMPLETED:
                    log.warning("migration %d: the stream completed before the cancel", self.rec.migration_id)
                    await self._complete()
                    return
                qmp = self.qmp()
                status = await qmp.query_status()
                if not status.running:
                    await qmp.cont()  # QEMU paused the source for the switchover; the stream did not complete
            except VmshiftError as exc:
                reason = f"{reason} Restoring the source failed too: {exc.message}"
        else:
            reason = f"{reason} The source QEMU is gone as well."
        with contextlib.suppress(httpx.HTTPError):
            await self.http.delete(f"/migrations/{self.rec.migration_id}", timeout=10.0)
        cancelled = self.rec.cancel_requested
        await self._finish(MigrationStatus.CANCELLED if cancelled else MigrationStatus.FAILED,
                           P.CANCELLED if cancelled else P.FAILED, reason, "cancelled" if cancelled else code)

    async def _complete(self) -> None:
        p, vm = self.p, self.rec.vm
        p.phase = P.FINISH
        p.metrics = self._summary()
        self.save()
        error: VmshiftError | None = None
        for attempt in range(6):
            try:
                r = await self.http.post(f"/migrations/{self.rec.migration_id}/activate", timeout=40.0)
                if r.status_code < 300:
                    error = None
                    break
                refusal = ApiError.from_response(r, r.text[:300])
                if refusal.code == IncomingFailedError.code:
                    await self._resume_after_failed_load(refusal.message)
                    return
                error = MigrationFailed(f"The target agent refused to activate the VM "
                                        f"(HTTP {r.status_code}): {r.text[:300]}")
                if r.status_code < 500:
                    break
            except httpx.HTTPError as exc:
                error = MigrationFailed(f"The target agent did not answer the activation ({exc!r}).")
            await asyncio.sleep(min(8.0, 1.0 * 2**attempt))
        if error is not None:
            # Never resume the source after the stream completed unless the target proves its copy
            # never ran: it stays paused for an operator.
            await self._finish(MigrationStatus.FAILED, P.FAILED,
                               f"{error.message} The source VM stays paused (never resumed after the "
                               "stream completed).", "activation_failed")
            return
        try:
            await self.o.supervisor.stop_and_unregister(vm)
        except VmshiftError as exc:
            log.warning("migration %d: stopping the source QEMU failed: %s", self.rec.migration_id, exc)
        await self._finish(MigrationStatus.COMPLETED, P.COMPLETED, None, None)

    async def _resume_after_failed_load(self, target_says: str) -> None:
        """The target could not load the stream and removed its QEMU: this copy is the only one."""
        reason = target_says
        try:
            qmp = self.qmp()
            if not (await qmp.query_status()).running:
                await qmp.cont()
            reason += " The VM was resumed on the source."
        except VmshiftError as exc:
            reason += f" Resuming the source failed too: {exc.message}"
        await self._finish(MigrationStatus.FAILED, P.FAILED, reason, IncomingFailedError.code)

    async def _finish(self, status: MigrationStatus, phase: MigrationPhase, reason: str | None,
                      code: str | None) -> None:
        p = self.p
        p.status, p.phase = status, phase
        if self.samples:
            p.metrics = self._summary()
        if reason is not None:
            if code == "activation_failed":
                hint = "Check the target host: if its VM runs, stop the paused source QEMU by hand."
            elif phase is P.FAILED and any(a.kind is ActionKind.START_POSTCOPY for a in p.actions):
                hint = ("Post-copy had been started, so the source was not resumed; check which host "
                        "runs the VM before starting it anywhere.")
            else:
                hint = "The VM keeps running on the source host; retry once the cause is fixed."
            p.error = ErrorInfo(code=code or "migration_failed", message=reason, hint=hint)
        self.save()
        log.info("migration %d: %s%s", self.rec.migration_id, status.value, f" ({reason})" if reason else "")


class _Rollback(Exception):
    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.reason, self.code = reason, code
