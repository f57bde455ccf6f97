"""Ending a migration that waits paused on both hosts (status ``needs_finalize``).

The source's stream completed but the target could not be told to run, so the VM is paused on both
hosts. Only the target's own QEMU can say what is safe (``GET /migrations/{id}/incoming``):

- it holds the whole stream or runs the VM → ``vmshift migration finalize ID`` activates it (the
  server calls the target over the management network, so a cut migration link does not matter)
  and tells the source agent to stop its copy;
- it provably never got the whole VM → both ``finalize`` and ``vmshift vm resume VM`` discard the
  target's QEMU and resume the source;
- it cannot be reached → nothing is guessed; ``vm resume --force`` resumes the source on the
  operator's word that the target host is down and its QEMU gone.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from vmshift.client.agent import AgentPool
from vmshift.errors import ConflictError, VmshiftError
from vmshift.model.agent_migration import IncomingState, MigrationProgress
from vmshift.model.api import ErrorInfo, TaskKind
from vmshift.model.enums import PowerState
from vmshift.model.migration import FinalizeResolution, MigrationStatus
from vmshift.server.db.schema import HostRow, MigrationRow, TaskRow, VmRow
from vmshift.server.migration_store import complete, fail, get_migration_row, lost
from vmshift.server.tasks import TaskContext, TaskEngine


class Intent(StrEnum):
    FINISH = "finish"  # migration finalize: finish the move if the target holds the VM
    RESUME = "resume"  # vm resume: go back to the source if the target never ran the VM


def waiting_migration(s: Session, vm: str) -> MigrationRow | None:
    waiting = MigrationRow.status == MigrationStatus.NEEDS_FINALIZE
    return s.scalar(select(MigrationRow).where(MigrationRow.vm == vm, waiting))


def holds_vm(proof: IncomingState) -> bool:
    """The target's QEMU received the whole VM or already runs it."""
    return proof.qemu_alive and (proof.stream == "completed" or proof.qemu_status == "running")


class Finalizer:
    def __init__(self, sessions: sessionmaker[Session], agents: AgentPool, tasks: TaskEngine) -> None:
        self._sessions = sessions
        self._agents = agents
        self._tasks = tasks

    def start(self, migration_id: int, intent: Intent, *, force: bool = False) -> TaskRow:
        """Create and start the task; ConflictError if the migration does not wait for this."""
        with self._sessions.begin() as s:
            row = get_migration_row(s, migration_id)
            if row.status is not MigrationStatus.NEEDS_FINALIZE:
                raise ConflictError(
                    f"Migration {migration_id} is {row.status.value}; only a migration that waits paused on "
                    "both hosts (needs_finalize) can be finalized.",
                    hint=f"See it with 'vmshift migration show {migration_id}'.",
                )
            task = TaskEngine.create(
                s, TaskKind.MIGRATION_FINALIZE, row.vm,
                {"migration_id": migration_id, "intent": intent.value, "force": force},
            )  # fmt: skip
            s.flush()
            vm = row.vm

        async def body(ctx: TaskContext) -> dict[str, Any]:
            return await self._run(ctx, migration_id, intent, force)

        self._tasks.start(task.id, vm, body)
        return task

    def _addresses(self, mid: int) -> tuple[str, str, str, str]:
        with self._sessions() as s:
            row = get_migration_row(s, mid)
            hosts = {h.name: h.address for h in s.scalars(select(HostRow))}
            if row.source_host not in hosts or row.target_host not in hosts:
                raise ConflictError(
                    f"Host {row.source_host} or {row.target_host} left the inventory.",
                    hint="Add the host again, then finalize.",
                )
            return row.source_host, hosts[row.source_host], row.target_host, hosts[row.target_host]

    async def _run(self, ctx: TaskContext, mid: int, intent: Intent, force: bool) -> dict[str, Any]:
        src_name, src_addr, dst_name, dst_addr = self._addresses(mid)
        src, dst = self._agents.get(src_addr), self._agents.get(dst_addr)
        ctx.progress(f"reading the proof of {dst_name}", 10)
        proof: IncomingState | None
        try:
            proof = await dst.migration_incoming_state(mid)
        except VmshiftError as e:
            if not (intent is Intent.RESUME and force):
                why = "has no record of it" if e.not_found else f"cannot be reached ({e.message.rstrip('.')})"
                raise ConflictError(
                    f"Host {dst_name} {why}, so nobody can tell whether it holds the VM; nothing was "
                    "changed.",
                    hint=f"Fix the connection and run it again; if {dst_name} is down for good and its QEMU "
                    "is gone, 'vmshift vm resume VM --force' resumes the source.",
                ) from e
            proof = None
        if proof is not None and holds_vm(proof):
            if intent is Intent.RESUME:
                raise ConflictError(
                    f"Host {dst_name} holds the whole VM (its stream completed), so resuming {src_name} "
                    "could run it twice; nothing was changed.",
                    hint=f"Finish the move with 'vmshift migration finalize {mid}'.",
                )
            if proof.qemu_status != "running":
                ctx.progress(f"running the VM on {dst_name}", 40)
                await dst.migration_activate(mid)
            ctx.progress(f"stopping the paused copy on {src_name}", 80)
            done = {"resolution": FinalizeResolution.TARGET_ACTIVATED.value}
            try:
                p = await src.migration_finalize(mid, done)
            except VmshiftError as e:
                raise ConflictError(
                    f"VM runs on {dst_name} now, but {src_name} could not be told to stop its paused copy "
                    f"({e.message.rstrip('.')}).",
                    hint=f"Run 'vmshift migration finalize {mid}' again once {src_name} answers.",
                ) from e
        else:
            if proof is not None:
                ctx.progress(f"discarding the incomplete copy on {dst_name}", 40)
                await dst.migration_rollback(mid)
            ctx.progress(f"resuming the VM on {src_name}", 80)
            p = await src.migration_finalize(mid, {"resolution": FinalizeResolution.RESUME_SOURCE.value})
        return self._record(mid, p)

    def _record(self, mid: int, p: MigrationProgress) -> dict[str, Any]:
        err = p.error or ErrorInfo(code="migration_failed", message="The source agent gave no reason.")
        if p.status is MigrationStatus.COMPLETED:
            complete(self._sessions, mid, p)
        elif p.status is MigrationStatus.LOST:
            lost(self._sessions, mid, p)
        elif p.status.finished:
            fail(self._sessions, mid, err, progress=p)
            with self._sessions.begin() as s:
                row = get_migration_row(s, mid)
                vm = s.scalar(select(VmRow).where(VmRow.name == row.vm))
                if vm is not None:
                    vm.power_state = PowerState.POWERED_ON
        else:
            raise ConflictError(
                f"The source agent still reports migration {mid} as {p.status.value}.",
                hint="Run the command again in a moment.",
            )
        return {"migration_id": mid, "status": p.status.value}
