"""The registry of this agent's disk moves, and the one interface every kind's mover implements.

``MoveJobs`` answers the agent API (start, progress, cancel), owns one asyncio task per running
move, persists each move (``store.py``) and, at agent start-up, rolls back or finishes every move
its record says was unfinished. A kind is a module, found through :data:`MOVERS` and imported only
when a move of that kind starts, so a missing module only refuses that kind.

The mover interface
-------------------
A kind's module defines ``make_mover(ctx: MoveContext, job: MoveJob) -> Mover``; a :class:`Mover`
has three coroutines, all driven by the registry (never called concurrently):

``run()``
    A fresh move, from PREPARE to FINISH. Set phases with ``job.set_phase`` (COPY, PIVOT or VERIFY,
    FINISH; checked by ``migration.phases``), report bytes in ``job.progress`` and ``job.save()``,
    keep what rollback or finish will need in ``job.set_detail(model)`` *before* each step that
    creates something, call ``job.check_cancel()`` between steps and wait with
    ``await job.sleep(s)`` (it wakes on a cancel). Call ``job.commit()`` just before the step after
    which the move can no longer be undone (Storage vMotion: ``job-complete``); from then on a cancel
    is refused and failures are never rolled back. Return normally when done: the registry sets
    COMPLETED. Raise (a ``VmshiftError`` with a message and hint) to fail.
``rollback(error)``
    Undo everything of an uncommitted move so the VM stays or runs on its original files and no
    target file or export is left; ``error`` is None for a cancel. Must be idempotent and work from
    ``job.detail_as(...)`` alone: it also runs after an agent restart, in a new process. The registry
    has set phase ROLLBACK and sets FAILED or CANCELLED afterwards.
``finish()``
    After an agent restart of a *committed* move: complete it forward from the record (idempotent).
    Return normally for COMPLETED; raise to end FAILED with a message that says exactly what state
    the VM's files are in (the record is then the only account of it).

An uncommitted move found unfinished at start-up is rolled back (``rollback`` with an error saying
the agent restarted).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast

from pydantic import BaseModel, ValidationError

from vmshift.agent.datastores import Datastores
from vmshift.agent.moves.store import MoveStore, StoredMove
from vmshift.agent.supervisor import Supervisor
from vmshift.agent.vmfiles import VmFiles
from vmshift.errors import ConflictError, InvalidInputError, NotFoundError, VmshiftError
from vmshift.migration.phases import can_transition, check_transition
from vmshift.model.api import ErrorInfo
from vmshift.model.enums import MigrationKind
from vmshift.model.migration import MigrationPhase
from vmshift.model.moves import DiskMoveRequest, MoveProgress, MoveState

log = logging.getLogger(__name__)
P = MigrationPhase
M = TypeVar("M", bound=BaseModel)

#: kind -> module that defines ``make_mover(ctx, job)``; imported when a move of that kind starts.
MOVERS: dict[MigrationKind, str] = {
    MigrationKind.STORAGE: "vmshift.agent.moves.storage",
    MigrationKind.COLD: "vmshift.agent.moves.cold",
    MigrationKind.SUSPENDED: "vmshift.agent.moves.cold",
}


class MoveCancelledError(ConflictError):
    """Raised inside a mover by ``job.check_cancel()``: the move was asked to stop and rolls back."""

    code = "move_cancelled"


class MoveCommittedError(ConflictError):
    """A cancel came after the move's point of no return: it finishes (or fails) on its own."""

    code = "move_committed"


@dataclass(frozen=True)
class MoveContext:
    """What movers may use on this host."""

    supervisor: Supervisor
    files: VmFiles
    datastores: Datastores
    qemu_img: str = "qemu-img"
    sample_interval_s: float = 0.25
    mirror_speed_bps: int = 0  # 0: unlimited (tests and benchmarks cap it)


class MoveJob:
    """One move's record and the handles a mover uses to report and to notice a cancel."""

    def __init__(self, record: StoredMove, store: MoveStore, *, resumed: bool) -> None:
        self.record = record
        self.store = store
        self.resumed = resumed  # True: picked up again at agent start-up (only finish/rollback run)
        self._cancel = asyncio.Event()
        if record.cancel_requested:
            self._cancel.set()

    @property
    def request(self) -> DiskMoveRequest:
        return self.record.request

    @property
    def progress(self) -> MoveProgress:
        return self.record.progress

    @property
    def move_id(self) -> int:
        return self.record.progress.move_id

    @property
    def committed(self) -> bool:
        return self.record.committed

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def elapsed_s(self) -> float:
        return (self.record.ended_at or time.time()) - self.record.started_at

    def save(self) -> None:
        self.progress.elapsed_s = round(self.elapsed_s(), 3)
        self.store.save(self.record)

    def set_phase(self, phase: MigrationPhase) -> None:
        """Move to ``phase`` (a no-op if already there); ConflictError if the phase machine forbids it."""
        if self.progress.phase is not phase:
            self.progress.phase = check_transition(self.progress.phase, phase)
            log.info("move %d (VM %s): phase %s", self.move_id, self.request.vm, phase.value)
        self.save()

    def commit(self) -> None:
        """Mark the point of no return (persisted before the irreversible step is taken)."""
        self.record.committed = True
        self.save()

    def request_cancel(self) -> None:
        self.record.cancel_requested = True
        self.save()
        self._cancel.set()

    def check_cancel(self) -> None:
        if self._cancel.is_set() and not self.record.committed:
            raise MoveCancelledError(f"Move {self.move_id} of VM {self.request.vm!r} was cancelled.",
                                     hint="Start it again when wanted.")

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` or until a cancel is requested, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._cancel.wait()

    def detail_as(self, model: type[M]) -> M | None:
        if not self.record.detail:
            return None
        try:
            return model.model_validate(self.record.detail)
        except ValidationError as exc:
            log.warning("move %d: unreadable mover detail: %s", self.move_id, exc)
            return None

    def set_detail(self, detail: BaseModel) -> None:
        self.record.detail = detail.model_dump(mode="json")
        self.save()


class Mover(Protocol):
    async def run(self) -> None: ...

    async def rollback(self, error: VmshiftError | None) -> None: ...

    async def finish(self) -> None: ...


MoverFactory = Callable[[MoveContext, MoveJob], Mover]


def load_factory(kind: MigrationKind) -> MoverFactory:
    """The ``make_mover`` of ``kind``'s module; ConflictError if this agent has none."""
    module_name = MOVERS.get(kind)
    if module_name is None:
        raise InvalidInputError(f"A disk move of kind {kind.value!r} is not something an agent runs.",
                                hint="Live migrations use POST /api/v1/migrations.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConflictError(f"This agent cannot run {kind.value} moves yet ({module_name} is missing).",
                            hint="Upgrade the agent.") from exc
    factory = getattr(module, "make_mover", None)
    if not callable(factory):
        raise ConflictError(f"This agent's {module_name} has no make_mover().", hint="Upgrade the agent.")
    return cast(MoverFactory, factory)


def _error_info(exc: BaseException, prefix: str = "") -> ErrorInfo:
    if isinstance(exc, VmshiftError):
        return ErrorInfo(code=exc.code, message=prefix + exc.message, hint=exc.hint)
    return ErrorInfo(code="internal", message=f"{prefix}the move crashed: {exc!r}.",
                     hint="This is a bug; the agent log has the traceback.")


class MoveJobs:
    """Owner of this host's disk moves."""

    def __init__(self, ctx: MoveContext, store: MoveStore) -> None:
        self.ctx = ctx
        self.store = store
        self._jobs: dict[int, MoveJob] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}

    # ----- API -----------------------------------------------------------------------------------
    async def start(self, req: DiskMoveRequest) -> MoveProgress:
        existing = self._get(req.move_id)
        if existing is not None:
            if existing.request.vm == req.vm and existing.request.nonce == req.nonce:
                return self._view(existing)  # the same request again
            if not existing.progress.state.finished:
                raise ConflictError(
                    f"Move {req.move_id} already runs on this host (VM {existing.request.vm}).",
                    hint="Let it end or cancel it.")
            log.info("move %d: replacing a finished record of another request", req.move_id)
        for job in self._jobs.values():
            if job.request.vm == req.vm and not job.progress.state.finished:
                raise ConflictError(f"VM {req.vm!r} is already being moved (move {job.move_id}).",
                                    hint="Wait for it or cancel it.")
        self.ctx.files.load_spec(req.vm)  # NotFoundError if the VM is not defined here
        factory = load_factory(req.kind)
        progress = MoveProgress(move_id=req.move_id, nonce=req.nonce, vm=req.vm, kind=req.kind,
                                state=MoveState.RUNNING, phase=P.PREPARE)
        job = MoveJob(StoredMove(request=req, progress=progress), self.store, resumed=False)
        job.save()
        self._jobs[req.move_id] = job
        self._spawn(job, factory)
        return self._view(job)

    def get(self, move_id: int) -> MoveProgress:
        return self._view(self._require(move_id))

    async def cancel(self, move_id: int, wait_s: float = 60.0) -> MoveProgress:
        """Stop an uncommitted move and wait (up to ``wait_s``) for its rollback."""
        job = self._require(move_id)
        if job.progress.state.finished:
            return self._view(job)
        if job.committed:
            raise MoveCommittedError(
                f"Move {move_id} cannot be cancelled: the VM is switching to its new files.",
                hint=f"It finishes on its own; follow it with GET /api/v1/moves/{move_id}.")
        job.request_cancel()
        task = self._tasks.get(move_id)
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), timeout=wait_s)
        return self._view(job)

    async def resume_all(self) -> None:
        """At agent start: finish every committed unfinished move, roll back every other one."""
        for rec in self.store.all():
            job = MoveJob(rec, self.store, resumed=True)
            self._jobs[job.move_id] = job
            if rec.progress.state.finished:
                continue
            log.info("move %d (VM %s): unfinished at start-up in phase %s; %s", job.move_id, rec.request.vm,
                     rec.progress.phase.value, "finishing it" if rec.committed else "rolling it back")
            try:
                factory = load_factory(rec.request.kind)
            except VmshiftError as exc:
                job.progress.error = _error_info(exc, "The agent restarted and cannot resume the move: ")
                self._end(job, MoveState.FAILED)
                continue
            self._spawn(job, factory)

    async def wait(self, move_id: int, timeout_s: float) -> MoveProgress:
        """Tests and callers in-process: wait for the move's task to end (or the timeout)."""
        task = self._tasks.get(move_id)
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout=timeout_s)
        return self.get(move_id)

    async def close(self) -> None:
        """Agent exit: stop the tasks, leave QEMU as it is (a restart finishes or rolls back)."""
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    # ----- running -------------------------------------------------------------------------------
    def _spawn(self, job: MoveJob, factory: MoverFactory) -> None:
        self._tasks[job.move_id] = asyncio.create_task(self._drive(job, factory), name=f"move-{job.move_id}")

    async def _drive(self, job: MoveJob, factory: MoverFactory) -> None:
        try:
            mover = factory(self.ctx, job)
        except Exception as exc:
            log.exception("move %d: could not build its mover", job.move_id)
            job.progress.error = _error_info(exc)
            self._end(job, MoveState.FAILED)
            return
        try:
            if not job.resumed:
                await mover.run()
            elif job.committed:
                await mover.finish()
            else:
                raise ConflictError(
                    f"The agent restarted during move {job.move_id} before its point of no return, "
                    "so the move was rolled back.", hint="Start the move again.")
        except asyncio.CancelledError:
            raise  # agent exit: the record stays unfinished, the next start-up resumes it
        except MoveCancelledError:
            await self._rollback(job, mover, None)
            return
        except Exception as exc:
            if not isinstance(exc, VmshiftError):
                log.exception("move %d: the mover crashed", job.move_id)
            if job.committed:
                job.progress.error = _error_info(exc, "After the point of no return: ")
                self._end(job, MoveState.FAILED)
            else:
                log.warning("move %d failed, rolling back: %s", job.move_id, exc)
                await self._rollback(job, mover, exc)
            return
        if can_transition(job.progress.phase, P.FINISH):
            job.set_phase(P.FINISH)
        self._end(job, MoveState.COMPLETED)

    async def _rollback(self, job: MoveJob, mover: Mover, error: BaseException | None) -> None:
        if error is not None:
            job.progress.error = _error_info(error)
        if can_transition(job.progress.phase, P.ROLLBACK):
            job.set_phase(P.ROLLBACK)
        try:
            await mover.rollback(error if isinstance(error, VmshiftError) or error is None
                                 else VmshiftError(f"The move crashed: {error!r}."))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("move %d: rollback failed", job.move_id)
            first = job.progress.error.message if job.progress.error else "cancelled"
            job.progress.error = _error_info(exc, f"{first} Then the rollback failed: ")
            self._end(job, MoveState.FAILED)
            return
        self._end(job, MoveState.CANCELLED if error is None else MoveState.FAILED)

    def _end(self, job: MoveJob, state: MoveState) -> None:
        final = {MoveState.COMPLETED: P.COMPLETED, MoveState.FAILED: P.FAILED,
                 MoveState.CANCELLED: P.CANCELLED}[state]
        if can_transition(job.progress.phase, final):
            job.progress.phase = final
        elif job.progress.phase is not final:
            log.warning("move %d: ending in %s from phase %s", job.move_id, final.value,
                        job.progress.phase.value)
            job.progress.phase = final
        job.progress.state = state
        job.progress.eta_s = None if state is not MoveState.COMPLETED else 0.0
        job.record.ended_at = time.time()
        job.save()
        log.info("move %d (VM %s) %s", job.move_id, job.request.vm, state.value)

    def release(self, move_id: int) -> bool:
        """Retention is about to remove this record: drop it from memory unless it is still in use."""
        job = self._jobs.get(move_id)
        if job is None:
            return True
        task = self._tasks.get(move_id)
        if not job.progress.state.finished or (task is not None and not task.done()):
            return False
        del self._jobs[move_id]
        self._tasks.pop(move_id, None)
        return True

    # ----- bookkeeping ---------------------------------------------------------------------------
    def _get(self, move_id: int) -> MoveJob | None:
        job = self._jobs.get(move_id)
        if job is None and (rec := self.store.load(move_id)) is not None:
            job = MoveJob(rec, self.store, resumed=True)
            self._jobs[move_id] = job
        return job

    def _require(self, move_id: int) -> MoveJob:
        job = self._get(move_id)
        if job is None:
            raise NotFoundError(f"This host runs no disk move {move_id}.",
                                hint="Check the move id and the source host.")
        return job

    @staticmethod
    def _view(job: MoveJob) -> MoveProgress:
        view = job.progress.model_copy(deep=True)
        view.elapsed_s = round(job.elapsed_s(), 3)
        return view
