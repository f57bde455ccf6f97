"""Source side of a relocate (shared-nothing migration): the disks' mirrors into the target's NBD exports.

The source loop (agent/source_loop.py, agent/source_endings.py) calls this module at three points
and is otherwise the live loop:

1. ``copy`` before ``migrate`` (phase COPY): one NBD client node per disk (``blockdev-add`` driver
   ``nbd``) and a ``blockdev-mirror`` (sync=full) from the drive into it in background mode (see
   ``WRITE_BLOCKING`` for why not write-blocking over NBD); when every mirror is READY memory migrates
   as in a live migration, with QEMU's ``pause-before-switchover`` capability on;
2. ``check`` on every pre-copy sample: a mirror that failed or ended (the NBD connection cut, the
   target QEMU killed, ENOSPC on the target datastore) fails the migration;
3. ``switchover`` once QEMU waits in ``pre-switchover`` (the vCPUs are stopped, the device state not
   sent yet): each READY mirror is completed without pivot (``block-job-cancel``, not forced, so it
   finishes its last sync), checked to have ended without an error, its node deleted (which flushes
   and closes the NBD connection), and only then ``migrate-continue`` lets the device state go. The
   target receives the end of the stream only after holding every disk, and runs only after the
   source saw ``completed`` (the safe switchover of a live migration).

Any failure before that raises a ``VmshiftError``; the loop's rollback calls ``abandon`` (the NBD
connections aborted, so requests stuck on a cut link fail at once, then the mirrors cancelled by
force and their nodes deleted), cancels the migration so the source runs on its own disks, and
tells the target to remove its QEMU, exports and files. libvirt drives NBD storage migration in the
same order (docs/shared-nothing.md, "Compared with libvirt").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from vmshift.errors import ConflictError, QemuError, VmshiftError
from vmshift.migration.mirror_policy import (
    DiskView,
    MirrorPolicySettings,
    MirrorSample,
    decide_switch,
    may_pivot,
    rates,
    totals,
)
from vmshift.model.migration import MigrationPhase
from vmshift.model.moves import NbdTarget
from vmshift.model.vm import VmSpec
from vmshift.qemu import block_qmp as bq
from vmshift.qemu import tls_qmp
from vmshift.qemu.cmdline import disk_device_id
from vmshift.qemu.qmp import QmpSession

if TYPE_CHECKING:
    from vmshift.agent.source_endings import SourceEndings

log = logging.getLogger(__name__)
P = MigrationPhase
KEEP_SAMPLES = 40
CHECK_INTERVAL_S = 1.0
END_TIMEOUT_S = 30.0
RECONNECT_DELAY_S = 1
OUTRUN_S = 30.0  # background copy: a disk whose remaining bytes do not shrink this long fails the move
#: Write-blocking mirrors over NBD are off. Measured on QEMU 10.0.2 in the lab: when the migration link
#: is cut while a write-blocking mirror holds guest writes, failing its stuck NBD requests (a TCP abort,
#: QMP ``yank``, or the end of ``reconnect-delay``) crashed the source QEMU with heap corruption
#: ("corrupted double-linked list") in 3 of 5 runs, killing the VM a rollback must keep running; in
#: background mode the same fault rolled back cleanly every time. So the copy stays in background
#: mode (a guest that outruns the link fails the move after OUTRUN_S, with the VM untouched), and the
#: last dirty blocks are drained in ``pre-switchover``. Storage vMotion to local files keeps the policy.
WRITE_BLOCKING = False
ABORT_AFTER_S = 2.0  # a force cancel still draining after this is stuck on a cut link


class RelocateMirrors:
    """The disk mirrors of one outgoing relocate (inactive, and never called into, for a live migration)."""

    def __init__(self, loop: SourceEndings, policy: MirrorPolicySettings | None = None) -> None:
        self.loop = loop
        self.targets: list[NbdTarget] = list(loop.req.mirror_targets)
        self.policy = policy or MirrorPolicySettings()
        self._samples: dict[int, list[MirrorSample]] = {}
        self._next_check = 0.0
        self._write_blocking: set[int] = set()
        self._outrun_since: dict[int, float] = {}
        self.switched = False  # the mirrors were completed and the device state let go

    @property
    def active(self) -> bool:
        return bool(self.targets)

    def job_id(self, index: int) -> str:
        return f"rl{self.loop.rec.migration_id}-d{index}"

    def capabilities(self) -> dict[str, bool]:
        """Migration capabilities a relocate needs: stop before the device state goes, no post-copy."""
        return {"pause-before-switchover": True, "postcopy-ram": False} if self.active else {}

    # ----- 1. COPY -------------------------------------------------------------------------------
    async def copy(self) -> None:
        """Mirror every disk into its export and wait until all are READY (raises on any failure)."""
        loop = self.loop
        qmp = loop.qmp()
        await self.abandon()  # an earlier run of this loop (agent restart) may have left mirrors
        loop.set_phase(P.COPY)
        loop.save()
        for target in self.targets:
            dev = await bq.device_of(qmp, disk_device_id(target.index))
            if dev.virtual_size != target.size_bytes:
                raise ConflictError(
                    f"Disk {target.index} of VM {loop.rec.vm!r} has {dev.virtual_size} bytes but its target "
                    f"offers {target.size_bytes}.", hint="Fix the VM's disk size in its spec, then retry.")
            url = urlsplit(target.uri)
            job = self.job_id(target.index)
            node: dict[str, object] = {
                "driver": "nbd", "node-name": job, "export": url.path.lstrip("/"),
                "reconnect-delay": RECONNECT_DELAY_S,
                "server": {"type": "inet", "host": url.hostname or "", "port": str(url.port)},
            }
            if loop.req.tls is not None:  # an encrypted migration: its disks travel over TLS too
                node.update({"tls-creds": tls_qmp.CREDS_ID, "tls-hostname": url.hostname or ""})
            await qmp.execute("blockdev-add", node)
            await bq.blockdev_mirror(qmp, job_id=job, device=dev.node_name, target=job)
        log.info("migration %d: mirroring %d disk(s) of %s to the target", loop.rec.migration_id,
                 len(self.targets), loop.rec.vm)
        next_target_check = 0.0
        target_ok_at = last_moved_at = time.monotonic()
        last_done = -1
        while True:
            if loop.rec.cancel_requested:
                raise ConflictError("The migration was cancelled by the user during the disk copy.",
                                    hint="The VM keeps running on its original host and disks.")
            qmp = loop.qmp()
            seen = qmp.last_seq
            jobs = await self._sample(qmp)
            views = [DiskView(ready=jobs[self.job_id(t.index)].ready) for t in self.targets]
            for target in self.targets:
                await self._maybe_switch(qmp, target)
            self._report()
            if may_pivot(views):
                break
            now = time.monotonic()
            done = sum(jobs[self.job_id(t.index)].offset_bytes for t in self.targets)
            if done != last_done:
                last_done, last_moved_at = done, now
            elif now - last_moved_at > loop.o.stall_timeout_s:  # a cut link leaves NBD requests hanging
                raise QemuError(f"The disk copy moved no byte for {loop.o.stall_timeout_s:g} s: the "
                                "migration link looks cut.", hint="Check the migration network, then retry.")
            if now >= next_target_check:
                next_target_check = now + loop.o.target_check_interval_s
                if await self._target_alive():
                    target_ok_at = now
                elif now - target_ok_at > loop.o.target_down_after_s:
                    raise QemuError(f"The target agent {loop.req.target_agent.address} stopped answering "
                                    "during the disk copy.", hint="Check the target host; then retry.")
            await qmp.wait_event("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR",
                                 timeout_s=loop.o.sample_interval_s, after_seq=seen)
        if WRITE_BLOCKING:  # nothing is left to drain when the vCPUs stop for the switchover
            for target in self.targets:
                await self._set_write_blocking(qmp, target)
        self._report()
        loop.save()

    async def _target_alive(self) -> bool:
        try:
            await self.loop.target.health(timeout_s=2.0)
            return True
        except VmshiftError as exc:
            return not exc.retryable  # an answer that is an error still proves the agent runs

    async def _sample(self, qmp: QmpSession) -> dict[str, bq.BlockJob]:
        """Every mirror's job, each appended to its samples; raises if one failed or ended."""
        jobs = await bq.query_block_jobs(qmp)
        now = time.monotonic()
        for target in self.targets:
            info = jobs.get(self.job_id(target.index))
            if info is None or info.status.ended or info.error:
                why = info.error if info is not None and info.error else "it ended before the switchover"
                raise QemuError(f"The mirror of disk {target.index} to {target.uri} failed: {why}.",
                                hint="Check the migration link and the target datastore's free space, "
                                     "then retry.")
            samples = self._samples.setdefault(target.index, [])
            samples.append(MirrorSample(now, info.offset_bytes, info.len_bytes, info.ready))
            del samples[:-KEEP_SAMPLES]
        return jobs

    async def _maybe_switch(self, qmp: QmpSession, target: NbdTarget) -> None:
        """Write-blocking as the mirror policy says (if enabled); else fail a copy the guest outruns."""
        samples = self._samples.get(target.index, [])
        if self._blocking(target) or not samples:
            return
        if WRITE_BLOCKING:
            decision = decide_switch(samples, self.policy)
            if decision.switch:
                log.info("migration %d: disk %d write-blocking (%s: %s)", self.loop.rec.migration_id,
                         target.index, decision.reason, decision.detail)
                await self._set_write_blocking(qmp, target)
            return
        r = rates(samples, self.policy.window_s, self.policy.min_span_s)
        full = samples[-1].time_s - samples[0].time_s >= self.policy.window_s * 0.9
        if samples[-1].ready or not full or r.drain_rate_bps > 0:
            self._outrun_since.pop(target.index, None)
            return
        since = self._outrun_since.setdefault(target.index, samples[-1].time_s)
        if samples[-1].time_s - since > OUTRUN_S:
            raise QemuError(
                f"The guest writes disk {target.index} faster than the copy to the target drains it "
                f"({r.copy_rate_bps / 2**20:.1f} MiB/s copied, {r.remaining_bytes >> 20} MiB left, not "
                f"shrinking for {OUTRUN_S:g} s).",
                hint="Retry when the guest writes less, or over a faster migration link.")

    def _blocking(self, target: NbdTarget) -> bool:
        return target.index in self._write_blocking

    async def _set_write_blocking(self, qmp: QmpSession, target: NbdTarget) -> None:
        if self._blocking(target):
            return
        await bq.set_copy_mode(qmp, self.job_id(target.index), bq.CopyMode.WRITE_BLOCKING)
        self._write_blocking.add(target.index)

    def _report(self) -> None:
        """The copy's bytes, rate and ETA in the progress (what the task and the CLI show in COPY)."""
        p = self.loop.p
        latest = [s[-1] for s in (self._samples.get(t.index, []) for t in self.targets) if s]
        if not latest:
            return
        t = totals(latest, [rates(self._samples[i], self.policy.window_s, self.policy.min_span_s)
                            for i in sorted(self._samples)])
        p.mirror_bytes = t.done_bytes
        if p.phase is P.COPY:
            p.total_bytes, p.transferred_bytes = t.total_bytes, t.done_bytes
            p.remaining_bytes = max(0, t.total_bytes - t.done_bytes)
            p.throughput_bps, p.eta_s = round(t.rate_bps, 1), t.eta_s
        p.write_blocking = bool(self._write_blocking)
        self.loop.save()

    # ----- 2. during pre-copy --------------------------------------------------------------------
    async def check(self) -> None:
        """About once a second during pre-copy: every mirror still runs, READY and error-free."""
        if not self.active or self.switched or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + CHECK_INTERVAL_S
        await self._sample(self.loop.qmp())

    # ----- 3. the switchover ---------------------------------------------------------------------
    async def switchover(self) -> None:
        """QEMU waits in ``pre-switchover``: complete the mirrors without pivot, prove none failed,
        close the NBD connections, then let the device state go (``migrate-continue``)."""
        if not self.active or self.switched:
            return
        loop, qmp = self.loop, self.loop.qmp()
        started = time.monotonic()
        jobs = await self._sample(qmp)
        for target in self.targets:
            job = jobs[self.job_id(target.index)]
            if not job.ready:
                raise QemuError(f"The mirror of disk {target.index} is not in sync at the switchover.",
                                hint="Retry the migration.")
        after_seq = qmp.last_seq
        for target in self.targets:
            await bq.block_job_cancel(qmp, self.job_id(target.index), force=False)
        ended = await self._wait_ended(qmp, after_seq)
        for target in self.targets:
            job_id = self.job_id(target.index)
            end = ended.get(job_id)
            if end is None or end.error or end.offset_bytes < end.len_bytes:
                why = (end.error if end is not None and end.error else
                       "it did not end" if end is None else f"{end.len_bytes - end.offset_bytes} B unsent")
                raise QemuError(f"The mirror of disk {target.index} did not complete: {why}.",
                                hint="The VM keeps running on the source; retry the migration.")
            with contextlib.suppress(QemuError):
                await bq.job_dismiss(qmp, job_id)
            await bq.blockdev_del(qmp, job_id)  # flushes and closes the NBD connection
        self.switched = True
        log.info("migration %d: %d mirror(s) completed in %.1f ms, the device state follows",
                 loop.rec.migration_id, len(self.targets), (time.monotonic() - started) * 1000)
        await qmp.execute("migrate-continue", {"state": "pre-switchover"})

    async def _wait_ended(self, qmp: QmpSession, after_seq: int,
                          timeout_s: float = END_TIMEOUT_S) -> dict[str, bq.BlockJob]:
        """Wait until every mirror's job has ended; its last view (offsets, error) by job id."""
        deadline = time.monotonic() + timeout_s
        wanted = {self.job_id(t.index) for t in self.targets}
        while True:
            jobs = await bq.query_block_jobs(qmp)
            wanted &= set(jobs)  # a job QEMU no longer lists has nothing left to end
            done = {j: jobs[j] for j in wanted if j in jobs and jobs[j].status.ended}
            if len(done) == len(wanted) or time.monotonic() > deadline:
                return done
            await qmp.wait_event("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", timeout_s=0.2,
                                 after_seq=after_seq)

    # ----- rollback and the end ------------------------------------------------------------------
    async def abandon(self) -> None:
        """Stop every mirror of this migration by force and delete its node (nothing is left in QEMU)."""
        if not self.active or not self.loop.source_alive():
            return
        with contextlib.suppress(VmshiftError):
            qmp = self.loop.qmp()
            mid = self.loop.rec.migration_id
            after_seq = qmp.last_seq
            jobs = await bq.query_block_jobs(qmp)
            mine = [self.job_id(t.index) for t in self.targets if self.job_id(t.index) in jobs]
            running = [j for j in mine if not jobs[j].status.ended]

            async def cancel_all() -> None:
                for job_id in running:
                    with contextlib.suppress(QemuError):
                        await bq.block_job_cancel(qmp, job_id, force=True)
                await self._wait_ended(qmp, after_seq)

            # A cancel drains the mirrors' requests, and QEMU's monitor waits for that drain: on a cut
            # link it would wait for TCP to give up (minutes). So the cancel goes first (aborting the
            # connections while the jobs still ran crashed QEMU 10.0.2 with the guest's writes in flight
            # through write-blocking mirrors: "malloc(): unsorted double linked list corrupted"), and if
            # it has not ended within ABORT_AFTER_S the stuck NBD connections are aborted under it.
            if running:
                task = asyncio.create_task(cancel_all(), name=f"migration-{mid}-mirror-cancel")
                done, _ = await asyncio.wait({task}, timeout=ABORT_AFTER_S)
                if not done:
                    await self._abort_connections()
                    log.warning("migration %d: the mirrors' cancel hung on their NBD connections: "
                                "aborted them", mid)
                try:
                    await asyncio.wait_for(task, timeout=END_TIMEOUT_S)
                except TimeoutError:
                    log.error("migration %d: the mirrors did not end within %g s", mid, END_TIMEOUT_S)
            log.info("migration %d: mirrors ended; deleting the NBD nodes", mid)
            for job_id in mine:
                with contextlib.suppress(QemuError):
                    await bq.job_dismiss(qmp, job_id)
            nodes = {n.node_name for n in await bq.query_nodes(qmp)}
            for target in self.targets:
                if self.job_id(target.index) in nodes:
                    with contextlib.suppress(QemuError):
                        await bq.blockdev_del(qmp, self.job_id(target.index))
        self._write_blocking.clear()

    async def _abort_connections(self) -> None:
        """Abort this host's TCP connections to the exports (``ss -K``: the kernel fails the sockets
        with ECONNABORTED, as a reset from the peer would). A cut link gives no reset for minutes of
        TCP retries, while write-blocking mirrors hold the guest's writes. Not QMP ``yank`` of the NBD
        nodes: the same abort from inside QEMU, but it asks QEMU's monitor, which a stuck drain blocks."""
        for host, port in sorted({(u.hostname or "", u.port or 0) for u in map(urlsplit, self._uris())}):
            try:
                proc = await asyncio.create_subprocess_exec(
                    "ss", "-K", "dst", host, "dport", "=", str(port),
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
                _, err = await proc.communicate()
            except OSError as exc:
                log.warning("migration %d: cannot abort the NBD connections: %s", self.loop.rec.migration_id,
                            exc)
                return
            if proc.returncode != 0:
                log.warning("migration %d: ss -K to %s:%d failed: %s", self.loop.rec.migration_id, host, port,
                            err.decode(errors="replace").strip()[:200])

    def _uris(self) -> list[str]:
        return [t.uri for t in self.targets]

    def remove_source_files(self, spec: VmSpec) -> None:
        """The VM runs on the target from its new disks: remove its old disks and folder here.

        Never a file of the target: the target refused to start if any of its paths existed."""
        if not self.active:
            return
        paths = self.loop.o.supervisor.files.paths(spec)
        for disk in paths.disks:
            disk.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                if disk.parent != paths.vm_dir:
                    disk.parent.rmdir()
        shutil.rmtree(Path(paths.vm_dir), ignore_errors=True)
        log.info("migration %d: removed the old files of %s in %s", self.loop.rec.migration_id, spec.name,
                 paths.vm_dir)
