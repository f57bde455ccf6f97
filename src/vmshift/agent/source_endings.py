"""The state of one source control loop and the ways a migration ends (docs/switchover.md).

``SourceEndings`` holds what the loop knows (record, samples, the kept-alive client of the target)
and every ending: complete (confirm the target at once, then quit the source), roll back, decide
from the target's proof when the source QEMU vanished (activate it, or report the VM ``lost``),
wait for finalize (``needs_finalize``), resume the source on proof the target never ran.
``SourceLoop`` (agent/source_loop.py) adds the pre-copy that leads to one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from vmshift.agent.migration_store import StoredMigration
from vmshift.agent.relocate_mirrors import RelocateMirrors
from vmshift.client.agent import AgentClient, AgentCredentials
from vmshift.errors import ConflictError, IncomingFailedError, QemuError, StreamCompletedError, VmshiftError
from vmshift.migration.phases import check_transition
from vmshift.migration.policy import ConvergencePolicy, PolicySettings
from vmshift.migration.samples import MigrationSample, QemuMigrationStatus, summarize
from vmshift.model.api import ErrorInfo
from vmshift.model.migration import ActionKind, MigrationMetrics, MigrationPhase, MigrationStatus
from vmshift.qemu import migration_qmp as mq
from vmshift.qemu.qmp import QmpSession
from vmshift.tls.peer import CAPABILITY_HEADER

if TYPE_CHECKING:
    from vmshift.agent.migration_source import OutgoingMigrations

log = logging.getLogger("vmshift.agent.migration_source")
Q = QemuMigrationStatus
P = MigrationPhase


class SourceEndings:
    """One run of the control loop for one migration (fresh or resumed): state and endings."""

    def __init__(self, owner: OutgoingMigrations, rec: StoredMigration) -> None:
        assert rec.request is not None and rec.progress is not None
        self.o, self.rec, self.req, self.p = owner, rec, rec.request, rec.progress
        self.samples: list[MigrationSample] = []
        self.postcopy_confirmed = False  # the target was told to run once post-copy began
        if self.req.mirror_targets:  # a relocate never hands the VM over before its disks are complete
            self.req.settings = self.req.settings.model_copy(update={"allow_postcopy": False,
                                                                     "postcopy_after_s": None})
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
        # It presents this host's issued certificate and the migration's capability (agent/access.py).
        ref = self.req.target_agent
        creds = (AgentCredentials.of_host(self.o.supervisor.config.state_dir, ref.capability)
                 if self.o.target_transport is None
                 else AgentCredentials(None, {CAPABILITY_HEADER: ref.capability}))
        self.target = AgentClient(ref.address, creds, timeout_s=10.0, connect_timeout_s=3.0,
                                  transport=self.o.target_transport)
        self.mirrors = RelocateMirrors(self)  # inactive unless the migration relocates the disks

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

    async def _cancel_qemu(self) -> None:
        with contextlib.suppress(QemuError):
            await mq.migrate_cancel(self.qmp())

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
        source_unknown = False  # True: the source QEMU could not be read nor restored
        if not self.source_alive():
            if self.rec.migrate_sent:
                await self._decide_from_target(f"{reason} The source QEMU is gone as well")
                return
            reason = f"{reason} The source QEMU is gone as well."
        else:
            await self.mirrors.abandon()  # a relocate: stop the disk mirrors, the source keeps its disks
            try:
                # before `migrate` QEMU may still report the migration that brought the VM here
                if self.rec.migrate_sent and await self._final_status() is Q.COMPLETED:
                    log.warning("migration %d: the stream completed before the cancel", self.rec.migration_id)
                    await self._complete()
                    return
                qmp = self.qmp()
                if not (await qmp.query_status()).running:
                    await qmp.cont()  # QEMU paused the source for the switchover; the stream did not complete
            except VmshiftError as exc:
                reason = f"{reason} Restoring the source failed too: {exc.message}"
                source_unknown = True
        target_discarded = False
        try:
            await self.target.migration_rollback(self.rec.migration_id, timeout_s=10.0)
            target_discarded = True
        except VmshiftError as exc:
            if exc.code == StreamCompletedError.code and source_unknown:
                # QEMU did not answer (e.g. stuck in the switchover on a cut link) and its stream
                # completed meanwhile: the whole VM waits, never run, on the target, and the source
                # is paused. Only the target's proof may decide: never report this as "failed".
                await self._needs_finalize(f"{reason} Meanwhile the target received the whole VM")
                return
            if exc.code == StreamCompletedError.code:
                reason = f"{reason} The target kept its complete, never-run copy: {exc.message}"
            else:
                log.warning("migration %d: target rollback failed: %s", self.rec.migration_id, exc)
        if source_unknown and target_discarded:
            reason = await self._restore_source_late(reason)
        cancelled = self.rec.cancel_requested
        await self._finish(MigrationStatus.CANCELLED if cancelled else MigrationStatus.FAILED,
                           P.CANCELLED if cancelled else P.FAILED, reason, "cancelled" if cancelled else code)

    async def _restore_source_late(self, reason: str) -> str:
        """The source QEMU did not answer in the rollback (stuck writing to a cut link) and the
        target has discarded its copy since: this copy is the only one, whatever QEMU's stream ends
        in (QEMU reports ``completed`` once its last bytes are in its socket, which the discarded
        target may never have read). Wait for QEMU to answer again and run the VM."""
        deadline = time.monotonic() + self.o.restore_deadline_s
        while self.source_alive():
            try:
                await self._final_status()
                qmp = self.qmp()
                if not (await qmp.query_status()).running:
                    await qmp.cont()
                return f"{reason} The source QEMU answered again after the target's copy was discarded: " \
                       "the VM runs on the source."
            except VmshiftError as exc:
                if time.monotonic() > deadline:
                    return f"{reason} The source QEMU still does not answer ({exc.message})."
                await asyncio.sleep(0.5)
        return f"{reason} The source QEMU exited."

    async def _complete(self) -> None:
        """The source QEMU completed: tell the target to run, at once; then stop the source."""
        self._mark_source_timeline()
        self.set_phase(P.FINISH)
        activated: bool | None
        if self.postcopy_confirmed:  # the target runs since post-copy began
            activated, why = True, ""
        else:
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

    async def _activate_target(self, deadline_s: float | None = None) -> tuple[bool | None, str]:
        """True: the target runs the VM; False: it could not be reached or refused (why);
        None: it proved its copy never ran, and the source was resumed."""
        deadline = time.monotonic() + (self.o.activation_deadline_s if deadline_s is None else deadline_s)
        delay, why = 0.25, ""
        with contextlib.suppress(Exception):  # the stream's news is a courtesy: never fail the move for it
            await self.o.supervisor.publish_now()  # the source stopped: say so before the target runs
        while True:
            try:
                await self.target.migration_activate(self.rec.migration_id, timeout_s=40.0)
                return True, ""
            except VmshiftError as exc:
                if exc.code == IncomingFailedError.code and not self._postcopy_began():
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
        old_spec = None
        if self.mirrors.active:  # a relocate: the old files go once the target runs the VM
            with contextlib.suppress(VmshiftError):
                old_spec = self.o.supervisor.files.load_spec(self.rec.vm)
        try:
            await self.o.supervisor.stop_and_unregister(self.rec.vm)
            if old_spec is not None:
                self.mirrors.remove_source_files(old_spec)
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
        # only a completed stream is the whole VM: a target in post-copy still needed the source
        if state.qemu_alive and stream is Q.COMPLETED:
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


class Rollback(Exception):
    """End the migration through the rollback (the VM stays on the source)."""


    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.reason, self.code = reason, code


class SourceGone(Exception):
    """The source QEMU vanished after `migrate`: the target's proof decides."""


    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
