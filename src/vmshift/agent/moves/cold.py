"""Cold and suspended moves (kinds COLD and SUSPENDED): a VM that runs no QEMU, copied file by file.

Steps (docs/cold-migration.md):

1. PREPARE: the VM runs no QEMU (and may not start until the move ends: ``Supervisor.moving``); a
   SUSPENDED VM has its state file. Same host (no ``request.targets``): create each target image
   (the target spec's name, format and the source's virtual size) and the state file's target.
   Other host: the target agent created and exports them already (``POST /disk-exports``).
2. COPY: ``qemu-img convert -n -W -m 16 --target-is-zero`` per disk into the target file or NBD
   export, then the state file (raw); progress from qemu-img's percent.
3. VERIFY: ``qemu-img compare`` per copy (``DiskProgress.identical``); any difference fails the move.
4. FINISH, same host only (the point of no return): the VM's definition at its new home (vm.json =
   the target spec, home.json), the serial log copied, then the old files removed. Other host: the
   source is left untouched; the server registers the VM on the target, ends the exports keeping
   their files and deletes the source afterwards.

Any failure before FINISH (cancel, ENOSPC, the export gone, qemu-img killed, an agent restart)
rolls back: qemu-img is stopped, the VM's original files were never written; on the same host the
target files this move created are removed, on another host they are the server's to remove
(``DELETE /disk-exports/ID?keep_files=false``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

import psutil
from pydantic import BaseModel

from vmshift.agent import disk_copy
from vmshift.agent.disk_copy import Image
from vmshift.agent.moves.jobs import MoveContext, MoveJob
from vmshift.errors import ConflictError, InvalidInputError, NotFoundError, QemuError, VmshiftError
from vmshift.model.enums import DiskFormat, MigrationKind
from vmshift.model.migration import MigrationPhase
from vmshift.model.moves import DiskProgress
from vmshift.model.vm import VmSpec
from vmshift.qemu.cmdline import VmPaths

log = logging.getLogger(__name__)
P = MigrationPhase
SAVE_INTERVAL_S = 1.0  # how often the record is rewritten while a copy runs (progress only)
SPEC_FILE = "vm.json"


class ColdCopy(BaseModel):
    """One image to copy: a disk (``index``) or the suspended state (``index`` None)."""

    index: int | None
    source: str
    source_format: DiskFormat
    target: str = ""  # a file path (same host) or an NBD URI
    target_format: DiskFormat = DiskFormat.RAW
    size_bytes: int
    created: bool = False  # same host: this move created the target file (rollback removes it)
    copied: bool = False
    identical: bool | None = None

    @property
    def what(self) -> str:
        return "the suspended state" if self.index is None else f"disk {self.index}"


class ColdDetail(BaseModel):
    vm: str
    same_host: bool
    source_spec: VmSpec
    final_spec: VmSpec
    copies: list[ColdCopy]
    created_dirs: list[str] = []
    copy_pid: int | None = None  # qemu-img in flight (an agent restart must stop it)
    switched: bool = False  # same host: vm.json and home.json name the target
    old_removed: bool = False


def make_mover(ctx: MoveContext, job: MoveJob) -> ColdMover:
    return ColdMover(ctx, job)


class ColdMover:
    def __init__(self, ctx: MoveContext, job: MoveJob) -> None:
        self.ctx = ctx
        self.job = job
        self.detail: ColdDetail | None = job.detail_as(ColdDetail)
        self._copy_started = 0.0
        self._last_save = 0.0

    # ----- the interface of jobs.py -------------------------------------------------------------
    async def run(self) -> None:
        vm = self.job.request.vm
        self.ctx.supervisor.moving[vm] = self.job.move_id  # lifted at the end, or by rollback()
        detail = await self._plan()
        await self._prepare(detail)
        self.job.set_phase(P.COPY)
        await self._copy(detail)
        self.job.set_phase(P.VERIFY)
        await self._verify(detail)
        if detail.same_host:
            self.job.set_phase(P.FINISH)
            self.job.commit()
            self._switch(detail)
        self.ctx.supervisor.moving.pop(vm, None)

    async def rollback(self, error: VmshiftError | None) -> None:
        vm = self.job.request.vm
        try:
            detail = self.detail
            if detail is None:
                return  # nothing was created
            await asyncio.to_thread(_stop_copy, detail)
            detail.copy_pid = None
            if detail.same_host and not detail.switched:
                for c in reversed(detail.copies):
                    if c.created:
                        Path(c.target).unlink(missing_ok=True)
                        c.created = False
                for d in sorted(detail.created_dirs, key=len, reverse=True):
                    with contextlib.suppress(OSError):  # not empty: something else lives there
                        os.rmdir(d)
                detail.created_dirs = []
            self._save(detail)
            log.info("move %d (VM %s) rolled back%s", self.job.move_id, vm,
                     "" if detail.same_host else "; the target's exports are the server's to remove")
        finally:
            self.ctx.supervisor.moving.pop(vm, None)

    async def finish(self) -> None:
        """After a restart past the point of no return (same host): switch and clean up again."""
        detail = self._require_detail()
        try:
            self._switch(detail)
        finally:
            self.ctx.supervisor.moving.pop(self.job.request.vm, None)

    # ----- PREPARE -------------------------------------------------------------------------------
    async def _plan(self) -> ColdDetail:
        req, files, sup = self.job.request, self.ctx.files, self.ctx.supervisor
        source = files.load_spec(req.vm)
        if sup.is_alive(req.vm):
            raise ConflictError(f"VM {req.vm!r} runs, so it cannot be moved cold.",
                                hint="Stop or suspend it first, or move it live.")
        target = req.target_spec
        if target.name != source.name or target.uuid != source.uuid or len(target.disks) != len(source.disks):
            raise InvalidInputError(f"The target spec of move {req.move_id} is not VM {req.vm!r} with its "
                                    f"{len(source.disks)} disks.", hint="Send the VM's own spec, relocated.")
        if req.disk_format is not None:
            target = target.model_copy(update={"disks": [
                d.model_copy(update={"format": req.disk_format}) for d in target.disks]})
        same_host = not req.targets
        src_paths = files.paths(source)
        files.require_file_disks(source, "A cold move")
        state = src_paths.suspend_state
        if req.kind is MigrationKind.SUSPENDED and not state.is_file():
            raise ConflictError(f"VM {req.vm!r} is not suspended: {state} does not exist.",
                                hint="Suspend it first, or move it cold once it is powered off.")
        if req.kind is MigrationKind.COLD and state.exists():
            raise ConflictError(f"VM {req.vm!r} is suspended, so a cold move would lose its saved state.",
                                hint="Move it as a suspended VM, or resume and stop it first.")
        copies = []
        for i, path in enumerate(src_paths.disks):
            info = await disk_copy.image_info(self.ctx.qemu_img, path)
            if info.fmt is not source.disks[i].format:
                raise QemuError(f"Disk {i} of VM {req.vm!r} ({path}) is {info.fmt.value}, not "
                                f"{source.disks[i].format.value} as its definition says.",
                                hint="Fix the VM's definition before moving it.")
            copies.append(ColdCopy(index=i, source=str(path), source_format=info.fmt,
                                   target_format=target.disks[i].format, size_bytes=info.virtual_size))
        if req.kind is MigrationKind.SUSPENDED:
            copies.append(ColdCopy(index=None, source=str(state), source_format=DiskFormat.RAW,
                                   size_bytes=state.stat().st_size))
        if same_host:
            self._same_host_targets(source, target, copies)
        else:
            self._remote_targets(copies)
        detail = ColdDetail(vm=req.vm, same_host=same_host, source_spec=source, final_spec=target,
                            copies=copies)
        self._save(detail)
        self._report(detail)
        return detail

    def _same_host_targets(self, source: VmSpec, target: VmSpec, copies: list[ColdCopy]) -> None:
        dst = self.ctx.files.paths(target)  # NotFoundError: a datastore this host does not mount
        self.ctx.files.require_file_disks(target, "A cold move")
        if (dst.vm_dir / SPEC_FILE).exists():
            raise ConflictError(f"{dst.vm_dir} already holds a VM definition.",
                                hint="Remove that folder or pick another datastore.")
        for c in copies:
            path = dst.suspend_state if c.index is None else dst.disks[c.index]
            if str(path) == c.source:
                raise InvalidInputError(f"{c.what.capitalize()} of VM {source.name!r} is already {path}.",
                                        hint="Pick another target datastore.")
            if path.exists():
                raise ConflictError(f"The target file {path} already exists.",
                                    hint="Remove it (a leftover?) or pick another datastore.")
            c.target = str(path)

    def _remote_targets(self, copies: list[ColdCopy]) -> None:
        req = self.job.request
        by_index = {t.index: t for t in req.targets}
        for c in copies:
            if c.index is None:
                if not req.state_uri:
                    raise InvalidInputError(f"Move {req.move_id} of suspended VM {req.vm!r} names no target "
                                            "for its state file.",
                                            hint="Create the exports with state_size_bytes and send their "
                                                 "state_uri.")
                c.target = req.state_uri
                continue
            t = by_index.get(c.index)
            if t is None:
                raise InvalidInputError(f"Move {req.move_id} names no NBD target for disk {c.index}.",
                                        hint="Send one target per disk of the VM.")
            if t.size_bytes < c.size_bytes:
                raise InvalidInputError(f"The NBD target of disk {c.index} offers {t.size_bytes} bytes, less "
                                        f"than the disk's {c.size_bytes}.",
                                        hint="Create the exports with the disks' virtual sizes.")
            c.target = t.uri

    async def _prepare(self, detail: ColdDetail) -> None:
        if not detail.same_host:
            return
        for c in detail.copies:
            self.job.check_cancel()
            parent = Path(c.target).parent
            if not parent.exists():
                detail.created_dirs.append(str(parent))
                self._save(detail)
                parent.mkdir(parents=True)
            c.created = True
            self._save(detail)  # before the file exists: a restart from here on removes it
            if c.index is None:
                with open(c.target, "xb") as f:
                    f.truncate(c.size_bytes)
            else:
                await disk_copy.create_image(self.ctx.qemu_img, Path(c.target), c.target_format, c.size_bytes)

    # ----- COPY and VERIFY -----------------------------------------------------------------------
    async def _copy(self, detail: ColdDetail) -> None:
        self._copy_started = time.monotonic()
        for c in detail.copies:
            self.job.check_cancel()
            share = [0.0]

            def on_progress(s: float, share: list[float] = share) -> None:
                share[0] = s

            def on_start(pid: int) -> None:
                detail.copy_pid = pid
                self._save(detail)

            src = Image(c.source, c.source_format)
            dst = Image.nbd(c.target) if disk_copy.is_nbd(c.target) else Image(c.target, c.target_format)
            task = asyncio.create_task(disk_copy.convert(
                self.ctx.qemu_img, src, dst, what=f"{c.what} of VM {detail.vm!r}", on_progress=on_progress,
                on_start=on_start, rate_bps=self.job.request.speed_bps), name=f"move-{self.job.move_id}-copy")
            try:
                while not task.done():
                    await asyncio.wait({task}, timeout=self.ctx.sample_interval_s)
                    if self.job.cancel_requested and not task.done():
                        task.cancel()
                    self._report(detail, current=c, share=share[0])
                if task.cancelled():  # by the cancel request above: qemu-img is stopped and reaped
                    self.job.check_cancel()
                await task
            finally:
                if not task.done():  # our own task was cancelled (agent exit): stop qemu-img with it
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, VmshiftError):
                        await task
            self.job.check_cancel()
            if c.index is None and not disk_copy.is_nbd(c.target):
                os.truncate(c.target, c.size_bytes)  # a raw target grows to whole sectors
            c.copied, detail.copy_pid = True, None
            self._save(detail)
            self._report(detail, force=True)

    async def _verify(self, detail: ColdDetail) -> None:
        for c in detail.copies:
            self.job.check_cancel()
            dst = Image.nbd(c.target) if disk_copy.is_nbd(c.target) else Image(c.target, c.target_format)
            c.identical = await disk_copy.compare(self.ctx.qemu_img, Image(c.source, c.source_format), dst,
                                                  what=f"{c.what} of VM {detail.vm!r}")
            self._save(detail)
            self._report(detail, force=True)
            if not c.identical:
                raise QemuError(f"The copy of {c.what} of VM {detail.vm!r} ({c.target}) differs from its "
                                "source.",
                                hint="The source is untouched; start the move again, and check the target "
                                     "datastore if it happens again.")

    # ----- FINISH (same host) --------------------------------------------------------------------
    def _switch(self, detail: ColdDetail) -> None:
        """Idempotent: the new definition, the serial log beside it, then the old files removed."""
        files = self.ctx.files
        old, new = files.paths(detail.source_spec), files.paths(detail.final_spec)
        if not detail.switched:
            logs = ((old.serial_log_old, new.serial_log_old), (old.serial_log, new.serial_log))
            for old_log, new_log in logs:
                if old_log.exists() and not new_log.exists():
                    tmp = new_log.with_name(new_log.name + ".tmp")
                    shutil.copyfile(old_log, tmp)
                    tmp.replace(new_log)
            files.switch_home(detail.final_spec)
            detail.switched = True
            self._save(detail)
        if not detail.old_removed:
            _remove_old(old, new)
            detail.old_removed = True
            self._save(detail)
        log.info("move %d: VM %s now lives on datastore %s", self.job.move_id, detail.vm,
                 detail.final_spec.datastore)

    # ----- bookkeeping ---------------------------------------------------------------------------
    def _require_detail(self) -> ColdDetail:
        if self.detail is None:
            raise NotFoundError(f"Move {self.job.move_id} has no record of its files.",
                                hint="Check the VM's folders by hand.")
        return self.detail

    def _save(self, detail: ColdDetail) -> None:
        self.detail = detail
        self.job.set_detail(detail)

    def _report(self, detail: ColdDetail, *, current: ColdCopy | None = None, share: float = 0.0,
                force: bool = False) -> None:
        """Bytes, rate and ETA of the job from qemu-img's percent (of each image's virtual size)."""
        prog = self.job.progress
        disks, total, done = [], 0, 0
        for c in detail.copies:
            c_done = c.size_bytes if c.copied else int(c.size_bytes * share) if c is current else 0
            total, done = total + c.size_bytes, done + c_done
            if c.index is not None:
                disks.append(DiskProgress(index=c.index, source=c.source, target=c.target,
                                          total_bytes=c.size_bytes, done_bytes=c_done, identical=c.identical))
        prog.disks, prog.total_bytes, prog.done_bytes = disks, total, done
        if self._copy_started:
            elapsed = time.monotonic() - self._copy_started
            prog.rate_bps = round(done / elapsed, 1) if elapsed > 0 else 0.0
            prog.eta_s = round((total - done) / prog.rate_bps, 1) if prog.rate_bps > 0 else None
        now = time.monotonic()
        if force or now - self._last_save >= SAVE_INTERVAL_S:
            self._last_save = now
            self.job.save()


def _remove_old(old: VmPaths, new: VmPaths) -> None:
    """The VM's old files that the new definition does not use, then its old folders if empty."""
    keep = {*new.disks, new.suspend_state, new.serial_log, new.serial_log_old, new.seed_iso,
            new.vm_dir / SPEC_FILE}
    # The seed ISO is not copied: the next start makes it again from the spec in the new folder.
    for path in [*old.disks, old.suspend_state, old.serial_log, old.serial_log_old, old.seed_iso,
                 old.vm_dir / SPEC_FILE]:
        if path not in keep:
            path.unlink(missing_ok=True)
    folders = {old.vm_dir, *(d.parent for d in old.disks)} - {new.vm_dir, *(d.parent for d in new.disks)}
    for folder in sorted(folders, key=lambda p: -len(str(p))):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _stop_copy(detail: ColdDetail) -> None:
    """Kill a qemu-img of this move that outlived its agent (recognised by its target in its argv)."""
    if detail.copy_pid is None:
        return
    try:
        proc = psutil.Process(detail.copy_pid)
        argv = proc.cmdline()
        if "convert" not in argv or not any(c.target in argv for c in detail.copies if c.target):
            return
        proc.kill()
        proc.wait(10)
        log.info("stopped qemu-img (pid %d) left copying by a previous agent", detail.copy_pid)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.TimeoutExpired):
        return
