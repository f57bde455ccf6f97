"""The disk-move registry and its records with a scripted mover (no QEMU): start, idempotence, cancel,
rollback on failure, a refused cancel after the point of no return, and recovery at start-up."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import BaseModel

from vmshift.agent.moves import jobs as jobs_mod
from vmshift.agent.moves.jobs import MoveCommittedError, MoveContext, MoveJob, MoveJobs, load_factory
from vmshift.agent.moves.store import MoveStore, StoredMove
from vmshift.errors import ConflictError, NotFoundError, QemuError, VmshiftError
from vmshift.model.enums import BootKind, MigrationKind
from vmshift.model.migration import MigrationPhase as P
from vmshift.model.moves import DiskMoveRequest, MoveProgress, MoveState
from vmshift.model.vm import BootSpec, VmSpec

SPEC = VmSpec(name="j-1", uuid="u-1", cpus=1, memory_mib=64, cpu_model="qemu64", machine_type="pc",
              datastore="a", boot=BootSpec(kind=BootKind.DISK))


class Files:
    def load_spec(self, name: str) -> VmSpec:
        if name != SPEC.name:
            raise NotFoundError(f"VM {name!r} is not defined on this host.", hint="Define it.")
        return SPEC


class Steps(BaseModel):
    done: list[str] = []


class Script:
    """What the fake mover does, set per test; ``log`` records the registry's calls."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.gate = asyncio.Event()
        self.fail: VmshiftError | None = None
        self.commit_before_gate = False
        self.rollback_fails = False


class FakeMover:
    def __init__(self, script: Script, job: MoveJob) -> None:
        self.script, self.job = script, job

    async def run(self) -> None:
        self.script.log.append("run")
        self.job.set_detail(Steps(done=["created"]))
        self.job.set_phase(P.COPY)
        if self.script.commit_before_gate:
            self.job.set_phase(P.PIVOT)
            self.job.commit()
        while not self.script.gate.is_set():
            self.job.check_cancel()
            await self.job.sleep(0.01)
        if self.script.fail is not None:
            raise self.script.fail
        if not self.job.committed:
            self.job.set_phase(P.PIVOT)
            self.job.commit()

    async def rollback(self, error: VmshiftError | None) -> None:
        steps = self.job.detail_as(Steps)
        self.script.log.append(f"rollback:{steps.done if steps else None}:{error.code if error else None}")
        if self.script.rollback_fails:
            raise QemuError("QEMU did not answer.", hint="Look at its log.")

    async def finish(self) -> None:
        self.script.log.append("finish")


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> Script:
    s = Script()
    monkeypatch.setattr(jobs_mod, "load_factory", lambda kind: lambda ctx, job: FakeMover(s, job))
    return s


def registry(tmp_path: Path) -> MoveJobs:
    ctx = MoveContext(supervisor=cast(Any, None), files=cast(Any, Files()), datastores=cast(Any, None))
    return MoveJobs(ctx, MoveStore(tmp_path))


def req(move_id: int = 1, nonce: str = "n1", vm: str = "j-1") -> DiskMoveRequest:
    return DiskMoveRequest(move_id=move_id, nonce=nonce, vm=vm, kind=MigrationKind.STORAGE,
                           target_spec=SPEC)


async def test_a_move_runs_to_completed_and_its_record_says_so(tmp_path: Path, script: Script) -> None:
    moves = registry(tmp_path)
    p = await moves.start(req())
    assert p.state is MoveState.RUNNING and p.phase is P.PREPARE
    script.gate.set()
    p = await moves.wait(1, 5)
    assert p.state is MoveState.COMPLETED and p.phase is P.COMPLETED and p.elapsed_s >= 0
    rec = json.loads((tmp_path / "moves" / "1.json").read_text())
    assert rec["progress"]["state"] == "completed" and rec["committed"]
    assert rec["detail"] == {"done": ["created"]}
    assert script.log == ["run"]


async def test_start_is_idempotent_and_refuses_a_second_move(tmp_path: Path, script: Script) -> None:
    moves = registry(tmp_path)
    await moves.start(req())
    assert (await moves.start(req())).move_id == 1
    with pytest.raises(ConflictError, match="already being moved"):
        await moves.start(req(move_id=2, nonce="n2"))
    with pytest.raises(ConflictError, match="already runs"):
        await moves.start(req(nonce="other"))
    with pytest.raises(NotFoundError):
        await moves.start(req(move_id=3, nonce="n3", vm="nope"))
    with pytest.raises(NotFoundError):
        moves.get(42)
    await moves.cancel(1)


async def test_cancel_rolls_back_from_the_record(tmp_path: Path, script: Script) -> None:
    moves = registry(tmp_path)
    await moves.start(req())
    await asyncio.sleep(0.05)
    p = await moves.cancel(1)
    assert p.state is MoveState.CANCELLED and p.phase is P.CANCELLED and p.error is None
    assert script.log == ["run", "rollback:['created']:None"]
    assert (await moves.cancel(1)).state is MoveState.CANCELLED  # again: the same answer


async def test_a_failure_rolls_back_and_ends_failed_with_its_error(tmp_path: Path, script: Script) -> None:
    moves = registry(tmp_path)
    script.fail = QemuError("No space left on device.", hint="Free some.")
    await moves.start(req())
    script.gate.set()
    p = await moves.wait(1, 5)
    assert p.state is MoveState.FAILED and p.phase is P.FAILED
    assert p.error is not None and p.error.message == "No space left on device."
    assert script.log[-1] == "rollback:['created']:qemu_error"


async def test_a_rollback_that_fails_says_so(tmp_path: Path, script: Script) -> None:
    moves = registry(tmp_path)
    script.fail, script.rollback_fails = QemuError("Mirror failed.", hint="Retry."), True
    await moves.start(req())
    script.gate.set()
    p = await moves.wait(1, 5)
    assert p.state is MoveState.FAILED and p.error is not None
    assert "Mirror failed." in p.error.message and "rollback failed" in p.error.message


async def test_no_cancel_and_no_rollback_after_the_point_of_no_return(tmp_path: Path, script: Script) -> None:
    moves = registry(tmp_path)
    script.commit_before_gate = True
    await moves.start(req())
    await asyncio.sleep(0.05)
    with pytest.raises(MoveCommittedError):
        await moves.cancel(1)
    script.fail = QemuError("The pivot failed half-way.", hint="Look.")
    script.gate.set()
    p = await moves.wait(1, 5)
    assert p.state is MoveState.FAILED and p.error is not None
    assert p.error.message.startswith("After the point of no return: ")
    assert script.log == ["run"], "never rolled back"


def stored(tmp_path: Path, *, committed: bool, phase: P = P.COPY) -> None:
    progress = MoveProgress(move_id=7, nonce="n7", vm="j-1", kind=MigrationKind.STORAGE,
                            state=MoveState.RUNNING, phase=phase)
    MoveStore(tmp_path).save(StoredMove(request=req(7, "n7"), progress=progress, committed=committed,
                                        detail={"done": ["created", "mirrored"]}))


async def test_start_up_rolls_back_an_uncommitted_move(tmp_path: Path, script: Script) -> None:
    stored(tmp_path, committed=False)
    moves = registry(tmp_path)
    await moves.resume_all()
    p = await moves.wait(7, 5)
    assert p.state is MoveState.FAILED and p.error is not None and "restarted" in p.error.message
    assert script.log == ["rollback:['created', 'mirrored']:conflict"]


async def test_start_up_finishes_a_committed_move(tmp_path: Path, script: Script) -> None:
    stored(tmp_path, committed=True, phase=P.PIVOT)
    moves = registry(tmp_path)
    await moves.resume_all()
    p = await moves.wait(7, 5)
    assert p.state is MoveState.COMPLETED and p.phase is P.COMPLETED
    assert script.log == ["finish"]


async def test_close_leaves_the_record_running_for_the_next_start(tmp_path: Path, script: Script) -> None:
    moves = registry(tmp_path)
    await moves.start(req())
    await asyncio.sleep(0.05)
    await moves.close()
    rec = MoveStore(tmp_path).load(1)
    assert rec is not None and rec.progress.state is MoveState.RUNNING and rec.progress.phase is P.COPY


def test_store_ignores_unreadable_records(tmp_path: Path) -> None:
    store = MoveStore(tmp_path)
    (tmp_path / "moves").mkdir()
    (tmp_path / "moves" / "3.json").write_text("{not json")
    (tmp_path / "moves" / "notes.json").write_text("{}")
    assert store.load(3) is None and store.all() == [] and store.load(4) is None


def test_kinds_without_a_mover_are_refused_clearly() -> None:
    with pytest.raises(VmshiftError, match="not something an agent runs"):
        load_factory(MigrationKind.LIVE)
    assert callable(load_factory(MigrationKind.STORAGE))


async def test_retention_may_release_a_finished_move_only(tmp_path: Path, script: Script) -> None:
    moves = registry(tmp_path)
    await moves.start(req())
    assert not moves.release(1)  # running: retention leaves it (and its file) alone
    assert moves.get(1).state is MoveState.RUNNING
    script.gate.set()
    assert (await moves.wait(1, 5)).state is MoveState.COMPLETED
    assert moves.release(1)
    moves.store.remove(1)
    with pytest.raises(NotFoundError):
        moves.get(1)  # gone from memory and disk: the agent answers 404 as for any unknown move
