"""The source's pre-copy control loop: set up QEMU, ``migrate``, follow its events and samples.

QEMU's ``MIGRATION`` events (the ``events`` capability) end each wait at once; ``query-migrate``
is sampled every 250 ms for the pure ``ConvergencePolicy``, whose actions are applied through QMP.
The loop ends in one of the endings of ``SourceEndings`` (agent/source_endings.py). A relocate
(shared-nothing) adds its disk mirrors through ``self.mirrors`` (agent/relocate_mirrors.py) at three
points: the copy before ``migrate``, a check on each sample, and the switchover in ``pre-switchover``.
"""

from __future__ import annotations

import time

from vmshift.agent import migration_tls
from vmshift.agent.source_endings import Q, Rollback, SourceEndings, SourceGone, log
from vmshift.errors import QemuError, VmshiftError
from vmshift.migration.policy import Action
from vmshift.migration.samples import MigrationSample, QemuMigrationStatus
from vmshift.model.enums import QemuRunState as RunState
from vmshift.model.migration import ActionKind, FinalizeResolution, MigrationStatus
from vmshift.model.migration import MigrationPhase as P
from vmshift.qemu import migration_qmp as mq


class SourceLoop(SourceEndings):
    """The whole control loop of one outgoing migration."""

    async def run(self) -> None:
        try:
            await self._drive()
            await self._complete()
        except SourceGone as gone:
            await self._decide_from_target(gone.reason)
        except Rollback as rb:
            await self._rollback(rb.reason, rb.code)
        except VmshiftError as exc:
            if self.rec.migrate_sent and not self.source_alive():
                await self._decide_from_target(f"The source QEMU exited during the migration ({exc.message})")
            else:
                await self._rollback(exc.message, exc.code)
        await self._reset_tls()

    async def crashed(self, exc: Exception) -> None:
        """The loop hit a bug: end the record in a state the server reports (never silently running)."""
        if self.p.status is not MigrationStatus.RUNNING:
            return
        reason = f"The source agent's control loop failed ({type(exc).__name__}: {exc})."
        if self.p.phase in (P.PREPARE, P.COPY, P.PRECOPY) and self.source_alive():
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
        await self._reset_tls()

    async def _reset_tls(self) -> None:
        """The migration ended and the VM still runs here (failed, cancelled, resumed): its next
        migration starts from plain QEMU parameters."""
        if self.req.tls is not None and self.p.status.finished and self.source_alive():
            await migration_tls.teardown(self.qmp(), self.rec.migration_id)

    async def _drive(self) -> None:
        """Set up, then follow QEMU until the stream completed; raises Rollback or SourceGone."""
        if not self.source_alive():
            if self.rec.migrate_sent:
                raise SourceGone("The source QEMU exited during the migration")
            raise Rollback(f"The source QEMU of VM {self.rec.vm!r} is not running.", "qemu_error")
        # a QEMU that never migrated answers query-migrate with {} (no status)
        current = Q.parse(str((await mq.query_migrate(self.qmp())).get("status", "none")))
        if not self.rec.migrate_sent and await self._sent_before_restart(current):
            # the agent died between `migrate` and saving that it sent it: QEMU is the truth
            self.rec.migrate_sent = True
            self.set_phase(P.PRECOPY)
            self.save()
        elif not self.rec.migrate_sent:
            await self._setup_tls()  # before a relocate's mirrors: their NBD connections use it too
            if self.mirrors.active:
                await self.mirrors.copy()  # every disk READY on the target before memory moves
            await self._setup()
        elif current is Q.NONE:
            raise Rollback("The source QEMU has no migration in progress (it was restarted).", "qemu_error")
        last_bytes, last_progress_at = -1, time.monotonic()
        target_ok_at, next_target_check = time.monotonic(), 0.0
        while True:
            if not self.source_alive():
                raise SourceGone("The source QEMU exited during the migration")
            qmp = self.qmp()
            seen = qmp.last_seq
            try:
                answer = await mq.query_migrate(qmp)
            except QemuError:
                if not self.source_alive():
                    raise SourceGone("The source QEMU exited during the migration") from None
                raise
            sample = MigrationSample.from_qmp(answer, self.now())
            self.samples.append(sample)
            self._update(sample)
            if sample.status is Q.COMPLETED:
                return
            if self.mirrors.active and not self.rec.cancel_requested:
                if sample.status is Q.PRE_SWITCHOVER:
                    await self.mirrors.switchover()
                elif sample.status is Q.ACTIVE:
                    await self.mirrors.check()
            if sample.status.postcopy and not self.postcopy_confirmed:
                await self._confirm_postcopy()
            if sample.status in (Q.FAILED, Q.CANCELLED):
                if self.rec.cancel_requested:
                    raise Rollback("The migration was cancelled by the user.", "cancelled")
                raise Rollback(f"QEMU reports the migration {sample.status.value}: "
                                f"{sample.error or 'no reason given'}.{self._tls_note()}", "migration_failed")
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
                raise Rollback(f"No data reached the target for {self.o.stall_timeout_s:g} s: "
                                "the migration link looks cut.", "migration_stalled")
            if time.monotonic() >= next_target_check and not sample.status.postcopy:
                next_target_check = time.monotonic() + self.o.target_check_interval_s
                if await self._target_alive():
                    target_ok_at = time.monotonic()
                elif time.monotonic() - target_ok_at > self.o.target_down_after_s:
                    raise Rollback(f"The target agent {self.req.target_agent.address} stopped answering.",
                                    "host_unreachable")
            # QEMU's MIGRATION event (completed, failed, ...) ends the wait at once
            event = await qmp.wait_event("MIGRATION", timeout_s=self.o.sample_interval_s, after_seq=seen)
            if event is not None:
                status = Q.parse(str(event.data.get("status", "")))
                if status is Q.COMPLETED:
                    return  # QEMU's own word: confirm now, sample afterwards (one round trip less)
                if status is Q.POSTCOPY_ACTIVE and not self.postcopy_confirmed:
                    self.set_phase(P.POSTCOPY)
                    await self._confirm_postcopy()
                self._note_event(status)

    async def _confirm_postcopy(self) -> None:
        """QEMU handed the VM over (post-copy: the source stopped for good, pages follow on demand):
        the target must run now, or nobody runs the guest while the rest of its memory moves."""
        self.rec.timeline.confirm_sent = time.time()
        activated, why = await self._activate_target(deadline_s=2.0)
        self.postcopy_confirmed = bool(activated)
        if not activated:  # retried on the next sample; the completion confirms again anyway
            log.warning("migration %d: the target could not be run in post-copy yet: %s",
                        self.rec.migration_id, why)

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

    def _tls_note(self) -> str:
        """What to look at when an encrypted stream fails (QEMU's reason is only a broken socket)."""
        if self.req.tls is None:
            return ""
        return (f" The stream was encrypted: {self.req.tls.peer} accepts only the host it was told to "
                "expect, and this host only a target certificate naming the migration address; the "
                "target's QEMU log says which check failed.")

    async def _setup_tls(self) -> None:
        """An encrypted migration: this QEMU speaks TLS to the target (agent/migration_tls.py);
        ``encrypted`` in the progress is read back from QEMU's own parameters."""
        qmp = self.qmp()
        if self.req.tls is not None:
            pid = (await self.o.supervisor.runtime(self.rec.vm)).pid
            if pid is None:
                raise Rollback(f"The source QEMU of VM {self.rec.vm!r} is not running.", "qemu_error")
            await migration_tls.setup_source(qmp, self.o.tls_files, pid, self.req.uri)
        else:  # a plain migration: nothing left of an earlier encrypted one may be in force
            await migration_tls.teardown(qmp, self.rec.migration_id)
        self.p.encrypted = await migration_tls.encrypted(qmp)
        self.save()

    async def _setup(self) -> None:
        qmp, s = self.qmp(), self.req.settings
        caps = await mq.query_capabilities(qmp)
        wanted = {"events": True, "auto-converge": True, "postcopy-ram": s.allow_postcopy,
                  "multifd": False}  # multifd: no gain measured under TCG on 2 cores (docs/migration.md)
        wanted.update(self.mirrors.capabilities())
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
            raise Rollback("The migration was cancelled by the user.", "cancelled")
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
            raise Rollback(f"Aborted by the convergence policy: {action.reason}.", "migration_timeout")

    async def _target_alive(self) -> bool:
        try:
            await self.target.health(timeout_s=2.0)
            return True
        except VmshiftError as exc:
            return not exc.retryable  # an answer that is an error still proves the agent runs

