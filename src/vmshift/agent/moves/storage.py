"""Storage vMotion (kind STORAGE): a running VM's files move to another datastore of its host.

Steps (docs/storage-vmotion.md):

1. PREPARE: check the target, create each target image (same virtual size, the target spec's file
   name and format) and ``blockdev-add`` it as a node ``mvID-dN``.
2. COPY: one ``blockdev-mirror`` per disk from the device's current root node (``sync=full``,
   background copy); sample the jobs, let ``migration.mirror_policy`` decide when a disk turns
   write-blocking (``block-job-change``), until every disk is READY.
3. PIVOT (the point of no return): ``job-complete`` on every disk, wait for each job's end.
4. FINISH: the VM's definition at the new home (vm.json = the target spec, home.json), the serial
   log copied and its chardev pointed there, then the old nodes deleted and the old files removed.

A disk on an iSCSI datastore is a LUN (agent/iscsi_disks.py): as a target it is made by the storage
role, attached read-write to this host and opened over QEMU's initiator before the mirror; as a
source it is detached and removed once the VM runs on its copy. Which node a guest device uses
tells whether a disk pivoted (a LUN has no file name to compare).

Any failure before the pivot (cancel, a QEMU error, ENOSPC on the target — the mirror ends with an
error — or an agent restart) rolls back: jobs cancelled, target nodes deleted, target files and
folder removed; the VM never stopped using its original files. After the pivot nothing is rolled
back: a disk whose mirror failed at the pivot stays where it was, the VM's definition names each
disk where it really is (``query-block`` says which file each device uses), and the move ends
FAILED with a message that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from pathlib import Path

from pydantic import BaseModel

from vmshift.agent.moves import storage_nodes as nodes
from vmshift.agent.moves.jobs import MoveContext, MoveJob
from vmshift.agent.qemu_user import unreachable
from vmshift.errors import ConflictError, InvalidInputError, QemuError, VmshiftError
from vmshift.migration.mirror_policy import (
    DiskView,
    MirrorPolicySettings,
    MirrorSample,
    decide_switch,
    may_pivot,
    rates,
    totals,
)
from vmshift.model.enums import DiskFormat
from vmshift.model.migration import MigrationPhase
from vmshift.model.moves import DiskProgress
from vmshift.model.vm import VmSpec
from vmshift.qemu import block_qmp as bq
from vmshift.qemu.cmdline import disk_device_id
from vmshift.qemu.qmp import QmpSession

log = logging.getLogger(__name__)
P = MigrationPhase
PIVOT_TIMEOUT_S = 60.0
CANCEL_TIMEOUT_S = 30.0
KEEP_SAMPLES_S = 10.0


class StorageDisk(BaseModel):
    index: int
    source_path: str
    target_path: str
    format: DiskFormat
    size_bytes: int
    source_node: str
    target_node: str
    job_id: str
    direct: bool = False  # the target is on a shared directory datastore: opened with O_DIRECT
    source_lun: bool = False  # the source is a LUN of an iSCSI datastore (source_path: its note)
    target_lun: bool = False  # the target is one (target_path: its note, written when it is made)
    source_file_node: str = ""  # the protocol node under source_node (a LUN's is found by this name)
    created: bool = False  # the target image was created by this move (rollback removes it)
    node_added: bool = False
    mirror_started: bool = False
    write_blocking: bool = False
    pivoted: bool = False
    error: str | None = None


class StorageDetail(BaseModel):
    source_spec: VmSpec
    final_spec: VmSpec
    target_dir: str
    created_dir: bool = False
    disks: list[StorageDisk]
    config_switched: bool = False
    serial_moved: bool = False
    old_removed: bool = False


def make_mover(ctx: MoveContext, job: MoveJob) -> StorageMover:
    return StorageMover(ctx, job)


class StorageMover:
    def __init__(self, ctx: MoveContext, job: MoveJob, policy: MirrorPolicySettings | None = None) -> None:
        self.ctx = ctx
        self.job = job
        self.policy = policy or MirrorPolicySettings()
        self.detail: StorageDetail | None = job.detail_as(StorageDetail)
        self._samples: dict[int, list[MirrorSample]] = {}

    # ----- the interface of jobs.py -------------------------------------------------------------
    async def run(self) -> None:
        qmp = self.ctx.supervisor.qmp_session(self.job.request.vm)
        detail = await self._plan(qmp)
        await self._prepare(qmp, detail)
        await self._copy(qmp, detail)
        await self._pivot(qmp, detail)
        await self._finish(qmp, detail)

    async def finish(self) -> None:
        detail = self._require_detail()
        qmp = self.ctx.supervisor.qmp_session(self.job.request.vm)
        await self._complete_pending(qmp, detail)
        await self._finish(qmp, detail)

    async def rollback(self, error: VmshiftError | None) -> None:
        detail = self.detail
        if detail is None:
            return  # nothing was created
        qmp: QmpSession | None
        try:
            qmp = self.ctx.supervisor.qmp_session(self.job.request.vm)
        except VmshiftError as exc:  # QEMU is gone: it holds no node; only files remain
            log.warning("move %d: rolling back without QEMU: %s", self.job.move_id, exc)
            qmp = None
        if qmp is not None:
            await self._cancel_jobs(qmp, detail)
            for disk in detail.disks:
                dev = await bq.device_of(qmp, disk_device_id(disk.index))
                if not nodes.uses(dev, disk.source_node, disk.source_path):
                    raise QemuError(
                        f"Disk {disk.index} of VM {self.job.request.vm!r} uses {dev.filename}, not its "
                        f"original {disk.source_path}, although the move never pivoted.",
                        hint="Leave the files as they are and look at the VM's QEMU log.")
                if disk.node_added:
                    await nodes.del_nodes(qmp, disk.target_node, Path(disk.target_path),
                                     nodes.file_node(disk.target_node) if disk.target_lun else None)
                    disk.node_added = False
                    self._save(detail)
        for disk in detail.disks:
            if disk.created:
                if disk.target_lun:
                    await nodes.drop_lun(self.ctx.files, detail.final_spec, disk.index)
                Path(disk.target_path).unlink(missing_ok=True)
                disk.created = False
        target_dir = Path(detail.target_dir)
        if detail.created_dir:
            shutil.rmtree(target_dir, ignore_errors=True)
            detail.created_dir = False
        self._save(detail)
        self._report(detail)

    # ----- PREPARE -------------------------------------------------------------------------------
    async def _plan(self, qmp: QmpSession) -> StorageDetail:
        req, files = self.job.request, self.ctx.files
        source = files.load_spec(req.vm)
        target = req.target_spec
        if target.name != source.name or target.uuid != source.uuid or len(target.disks) != len(source.disks):
            raise InvalidInputError(f"The target spec of move {req.move_id} is not VM {req.vm!r} with its "
                                    f"{len(source.disks)} disks.", hint="Send the VM's own spec, relocated.")
        if req.disk_format is not None:
            target = target.model_copy(update={"disks": [
                d.model_copy(update={"format": req.disk_format}) for d in target.disks]})
        src_paths, dst_paths = files.paths(source), files.paths(target)  # NotFoundError: unknown datastore
        src_luns = {d.file for _, d in files.iscsi_disks(source)}
        dst_luns = {d.file for _, d in files.iscsi_disks(target)}
        both = [d.file for d in source.disks if d.file in src_luns and d.file in dst_luns]
        if both:
            raise InvalidInputError(f"A disk move cannot take disk {both[0]!r} of VM {req.vm!r} from one "
                                    "iSCSI datastore to another yet (both keep it as a LUN named after "
                                    "the VM).", hint="Move it to a directory datastore first, then on.")
        if (dst_paths.vm_dir / "vm.json").exists() and dst_paths.vm_dir != src_paths.vm_dir:
            raise ConflictError(f"{dst_paths.vm_dir} already holds a VM definition.",
                                hint="Remove that folder or pick another datastore.")
        disks = []
        for i, (src, dst) in enumerate(zip(src_paths.disks, dst_paths.disks, strict=True)):
            if src == dst:
                raise InvalidInputError(f"Disk {i} of VM {req.vm!r} is already {dst}.",
                                        hint="Pick another target datastore.")
            if dst.exists():
                raise ConflictError(f"The target file {dst} already exists.",
                                    hint="Remove it (a leftover?) or pick another datastore.")
            dev = await bq.device_of(qmp, disk_device_id(i))
            from_lun = source.disks[i].file in src_luns
            if from_lun and i not in src_paths.luns:
                raise ConflictError(f"Disk {i} of VM {req.vm!r} has no readable LUN note at {src}.",
                                    hint="Restart the VM from its definition first.")
            if not from_lun and dev.filename != str(src):
                raise ConflictError(f"Disk {i} of VM {req.vm!r} runs on {dev.filename}, not {src} as its "
                                    "definition says.", hint="Restart the VM from its definition first.")
            disks.append(StorageDisk(index=i, source_path=str(src), target_path=str(dst),
                                     format=target.disks[i].format, size_bytes=dev.virtual_size,
                                     source_node=dev.node_name, target_node=f"mv{req.move_id}-d{i}",
                                     job_id=f"mv{req.move_id}-d{i}", direct=i in dst_paths.direct,
                                     source_lun=from_lun, target_lun=target.disks[i].file in dst_luns,
                                     source_file_node=nodes.protocol_node(dev.node_name, i)))
        detail = StorageDetail(source_spec=source, final_spec=target, target_dir=str(dst_paths.vm_dir),
                               disks=disks)
        self._save(detail)
        return detail

    async def _prepare(self, qmp: QmpSession, detail: StorageDetail) -> None:
        target_dir = Path(detail.target_dir)
        identity = self.ctx.supervisor.qemu_identity
        if not target_dir.exists():
            detail.created_dir = True
            self._save(detail)
            target_dir.mkdir(parents=True)
        for disk in detail.disks:
            self.job.check_cancel()
            disk.created = True
            self._save(detail)
            if disk.target_lun:
                await self._prepare_lun(qmp, detail, disk)
                continue
            target = Path(disk.target_path)
            target.parent.mkdir(parents=True, exist_ok=True)
            blocked = unreachable(identity, target.parent)
            if blocked is not None:
                raise ConflictError(f"QEMU runs as {identity.user!r}, which cannot pass through {blocked} "
                                    f"to reach {target.parent}.",
                                    hint=f"Let it through (chmod o+x {blocked}) or pick another datastore.")
            identity.own_dir(target.parent)
            await nodes.qemu_img_create(self.ctx.qemu_img, target, disk.format, disk.size_bytes)
            identity.own_file(target)  # QEMU opens it next (blockdev-add)
            disk.node_added = True
            self._save(detail)
            await bq.blockdev_add_file_image(qmp, node_name=disk.target_node,
                                             file_node_name=nodes.file_node(disk.target_node),
                                             path=Path(disk.target_path), fmt=disk.format,
                                             direct=disk.direct)
        self._report(detail)

    async def _prepare_lun(self, qmp: QmpSession, detail: StorageDetail, disk: StorageDisk) -> None:
        lun = await nodes.make_lun(self.ctx.files, detail.final_spec, disk.index, disk.size_bytes,
                                   Path(disk.target_path))
        disk.node_added = True
        self._save(detail)
        await nodes.add_lun_node(qmp, disk.format, disk.target_node, lun)

    # ----- COPY ----------------------------------------------------------------------------------
    async def _copy(self, qmp: QmpSession, detail: StorageDetail) -> None:
        self.job.set_phase(P.COPY)
        copy_started = time.monotonic()
        for disk in detail.disks:
            self.job.check_cancel()
            disk.mirror_started = True
            self._save(detail)
            await bq.blockdev_mirror(qmp, job_id=disk.job_id, device=disk.source_node,
                                     target=disk.target_node,
                                     speed_bps=self._copy_limit_bps())
        while True:
            qmp = self.ctx.supervisor.qmp_session(self.job.request.vm)  # the agent may have reconnected
            jobs = await bq.query_block_jobs(qmp)
            now = time.monotonic()
            views = []
            for disk in detail.disks:
                info = jobs.get(disk.job_id)
                if info is None or info.status.ended or info.error:
                    why = info.error if info is not None and info.error else "it ended before the pivot"
                    raise QemuError(f"The mirror of disk {disk.index} to {disk.target_path} failed: {why}.",
                                    hint="Check the target datastore's free space and health, then retry.")
                samples = self._samples.setdefault(disk.index, [])
                samples.append(MirrorSample(now, info.offset_bytes, info.len_bytes, info.ready))
                del samples[:-max(2, int(KEEP_SAMPLES_S / max(0.05, self.ctx.sample_interval_s)))]
                if not disk.write_blocking and self.job.request.allow_write_blocking:
                    decision = decide_switch(samples, self.policy)
                    if decision.switch:
                        await bq.set_copy_mode(qmp, disk.job_id, bq.CopyMode.WRITE_BLOCKING)
                        disk.write_blocking = True
                        if self.job.progress.write_blocking_after_s is None:
                            self.job.progress.write_blocking_after_s = round(now - copy_started, 3)
                        log.info("move %d: disk %d write-blocking (%s: %s)", self.job.move_id, disk.index,
                                 decision.reason, decision.detail)
                views.append(DiskView(ready=info.ready))
            self._report(detail)
            if may_pivot(views):
                return
            self.job.check_cancel()
            await self.job.sleep(self.ctx.sample_interval_s)

    # ----- PIVOT ---------------------------------------------------------------------------------
    async def _pivot(self, qmp: QmpSession, detail: StorageDetail) -> None:
        self.job.check_cancel()
        self.job.set_phase(P.PIVOT)
        self.job.commit()
        started = time.monotonic()
        after_seq = qmp.last_seq
        for disk in detail.disks:
            try:
                await bq.job_complete(qmp, disk.job_id)
            except QemuError as exc:
                disk.error = exc.message
        await self._wait_jobs_end(qmp, detail, after_seq)
        self.job.progress.pivot_ms = round((time.monotonic() - started) * 1000, 1)
        await self._note_pivoted(qmp, detail)

    async def _complete_pending(self, qmp: QmpSession, detail: StorageDetail) -> None:
        """After a restart in PIVOT or FINISH: complete any mirror still READY, then read which file
        each device uses now."""
        jobs = await bq.query_block_jobs(qmp)
        after_seq = qmp.last_seq
        for disk in detail.disks:
            info = jobs.get(disk.job_id)
            if info is not None and info.ready and not info.status.ended:
                with contextlib.suppress(QemuError):
                    await bq.job_complete(qmp, disk.job_id)
        await self._wait_jobs_end(qmp, detail, after_seq)
        await self._note_pivoted(qmp, detail)

    async def _wait_jobs_end(self, qmp: QmpSession, detail: StorageDetail, after_seq: int) -> None:
        """Wait for every disk's job to end (BLOCK_JOB_COMPLETED, or no longer running), then dismiss."""
        deadline = time.monotonic() + PIVOT_TIMEOUT_S
        pending = {d.job_id: d for d in detail.disks}
        while pending and time.monotonic() < deadline:
            seen = qmp.last_seq  # before the query: an event landing during it still wakes the wait
            for event in list(qmp.recent_events):
                if event.seq > after_seq and event.name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                    disk = pending.pop(str(event.data.get("device")), None)
                    if disk is not None and event.data.get("error"):
                        disk.error = str(event.data["error"])
            if pending:
                jobs = await bq.query_block_jobs(qmp)
                for job_id in list(pending):
                    info = jobs.get(job_id)
                    if info is None or info.status.ended:
                        disk = pending.pop(job_id)
                        if info is not None and info.error:
                            disk.error = info.error
            if pending:
                await qmp.wait_event("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", timeout_s=0.5,
                                     after_seq=seen)
        jobs = await bq.query_block_jobs(qmp)
        for disk in detail.disks:
            info = jobs.get(disk.job_id)
            if info is not None and info.status.ended:
                with contextlib.suppress(QemuError):
                    await bq.job_dismiss(qmp, disk.job_id)

    async def _note_pivoted(self, qmp: QmpSession, detail: StorageDetail) -> None:
        for disk in detail.disks:
            dev = await bq.device_of(qmp, disk_device_id(disk.index))
            disk.pivoted = nodes.uses(dev, disk.target_node, disk.target_path)
            if not disk.pivoted and not nodes.uses(dev, disk.source_node, disk.source_path):
                raise QemuError(f"Disk {disk.index} uses {dev.filename}, neither its source nor its target.",
                                hint="Leave the files as they are and look at the VM's QEMU log.")
        self._save(detail)

    # ----- FINISH --------------------------------------------------------------------------------
    async def _finish(self, qmp: QmpSession, detail: StorageDetail) -> None:
        self.job.set_phase(P.FINISH)
        stayed = [d for d in detail.disks if not d.pivoted]
        spec = detail.final_spec if not stayed else self._mixed_spec(detail)
        if not detail.config_switched:
            self.ctx.files.switch_home(spec)
            detail.config_switched = True
            self._save(detail)
        self.job.progress.written_spec = spec
        src_dir, dst_dir = Path(self.ctx.files.paths(detail.source_spec).vm_dir), Path(detail.target_dir)
        home_moved = spec.datastore != detail.source_spec.datastore
        if home_moved and not detail.serial_moved:
            old_paths, new_paths = self.ctx.files.paths(detail.source_spec), self.ctx.files.paths(spec)
            if not await self.ctx.supervisor.move_serial_log(self.job.request.vm, old_paths, new_paths):
                await nodes.move_serial_log(qmp, src_dir / "serial.log", dst_dir / "serial.log")
            detail.serial_moved = True
            self._save(detail)
        if not detail.old_removed:
            for disk in detail.disks:
                if disk.pivoted:
                    done_with, node, lun = disk.source_path, disk.source_node, disk.source_lun
                    protocol, lun_spec = disk.source_file_node, detail.source_spec
                else:
                    done_with, node, lun = disk.target_path, disk.target_node, disk.target_lun
                    protocol, lun_spec = nodes.file_node(disk.target_node), detail.final_spec
                await nodes.del_nodes(qmp, node, Path(done_with), protocol if lun else None)
                if lun:
                    await nodes.drop_lun(self.ctx.files, lun_spec, disk.index)
                Path(done_with).unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # a disk folder apart from the home, now empty
                    Path(done_with).parent.rmdir()
            if home_moved:
                shutil.rmtree(src_dir, ignore_errors=True)
            elif stayed and detail.created_dir:
                shutil.rmtree(dst_dir, ignore_errors=True)
            detail.old_removed = True
            self._save(detail)
        self._report(detail)
        if stayed:
            where = "; ".join(f"disk {d.index} stays {d.source_path} "
                              f"({d.error or 'its mirror did not pivot'})" for d in stayed)
            raise QemuError(f"The pivot of VM {self.job.request.vm!r} was partial: {where}. The VM runs and "
                            "its definition names each disk where it is.",
                            hint="Move the VM again to bring its remaining disks over.")

    def _mixed_spec(self, detail: StorageDetail) -> VmSpec:
        """The honest definition after a partial pivot: the home and the disks that stayed keep the
        source's place, the pivoted disks name their new files."""
        disks = [detail.final_spec.disks[d.index] if d.pivoted else detail.source_spec.disks[d.index]
                 for d in detail.disks]
        return detail.source_spec.model_copy(update={"disks": disks})

    # ----- rollback helpers ----------------------------------------------------------------------
    async def _cancel_jobs(self, qmp: QmpSession, detail: StorageDetail) -> None:
        started = [d for d in detail.disks if d.mirror_started]
        for disk in started:
            with contextlib.suppress(QemuError):  # not found: never started or already gone
                await bq.block_job_cancel(qmp, disk.job_id, force=True)
        deadline = time.monotonic() + CANCEL_TIMEOUT_S
        while True:
            jobs = await bq.query_block_jobs(qmp)
            live = [d for d in started if (j := jobs.get(d.job_id)) is not None and not j.status.ended]
            if not live:
                break
            if time.monotonic() > deadline:
                raise QemuError(f"The mirrors {', '.join(d.job_id for d in live)} did not stop within "
                                f"{CANCEL_TIMEOUT_S:g} s.",
                                hint="Look at the VM's QEMU log; retry the cancel.")
            await asyncio.sleep(0.1)
        for disk in started:
            if disk.job_id in jobs:
                with contextlib.suppress(QemuError):
                    await bq.job_dismiss(qmp, disk.job_id)
            disk.mirror_started = False
        self._save(detail)

    # ----- bookkeeping ---------------------------------------------------------------------------
    def _copy_limit_bps(self) -> int:
        """The request's cap on each mirror's background copy, else the agent's (0: none). A write-blocking
        mirror still copies each guest write at once, uncapped."""
        return int(self.job.request.speed_bps or 0) or self.ctx.mirror_speed_bps

    def _require_detail(self) -> StorageDetail:
        if self.detail is None:
            raise QemuError(f"Move {self.job.move_id} has no record of its disks.",
                            hint="Look at the VM's files by hand; the agent cannot tell where they are.")
        return self.detail

    def _save(self, detail: StorageDetail) -> None:
        self.detail = detail
        self.job.set_detail(detail)

    def _report(self, detail: StorageDetail) -> None:
        progress = self.job.progress
        latest, disk_rates, out = [], [], []
        for disk in detail.disks:
            samples = self._samples.get(disk.index, [])
            last = samples[-1] if samples else MirrorSample(0.0, 0, disk.size_bytes)
            if disk.pivoted:
                last = MirrorSample(last.time_s, last.len_bytes, last.len_bytes, True)
            latest.append(last)
            disk_rates.append(rates(samples, self.policy.window_s, self.policy.min_span_s))
            out.append(DiskProgress(index=disk.index, source=disk.source_path, target=disk.target_path,
                                    total_bytes=last.len_bytes,
                                    done_bytes=min(last.offset_bytes, last.len_bytes),
                                    ready=last.ready, write_blocking=disk.write_blocking))
        t = totals(latest, disk_rates)
        progress.disks = out
        progress.total_bytes, progress.done_bytes = t.total_bytes, t.done_bytes
        progress.rate_bps, progress.eta_s = round(t.rate_bps, 1), t.eta_s
        self.job.save()
