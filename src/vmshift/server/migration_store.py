"""Migration rows: create, mirror the agent's progress, finish (the VM moves in the same transaction)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from vmshift.errors import ConflictError, NotFoundError
from vmshift.migration.phases import can_reach, check_transition
from vmshift.model.agent_migration import MigrationProgress
from vmshift.model.api import ErrorInfo, EventKind
from vmshift.model.enums import EventSeverity, MigrationKind, PowerState
from vmshift.model.migration import (
    CheckReport,
    Migration,
    MigrationAction,
    MigrationLive,
    MigrationMetrics,
    MigrationPhase,
    MigrationPrediction,
    MigrationSettings,
    MigrationStatus,
)
from vmshift.server.db.schema import HostRow, MigrationRow, VmRow, utcnow
from vmshift.server.events import record_event

Sessions = sessionmaker[Session]

# Phases in which the source agent owns the migration (its control loop runs).
AGENT_PHASES = frozenset(
    {MigrationPhase.COPY, MigrationPhase.PRECOPY, MigrationPhase.POSTCOPY, MigrationPhase.SWITCHOVER,
     MigrationPhase.FINISH, MigrationPhase.ROLLBACK}
)  # fmt: skip  (COPY: a relocate's disk mirrors, run by the source agent before its pre-copy)


def _end_phase(current: MigrationPhase, new: MigrationPhase) -> MigrationPhase:
    """The server may have missed phases in between (it polls), but never moves one backwards."""
    if current is new or can_reach(current, new):
        return new
    return check_transition(current, new)  # raises ConflictError naming the allowed phases


def migration_view(m: MigrationRow) -> Migration:
    return Migration(
        id=m.id,
        vm=m.vm,
        kind=m.kind,
        source_host=m.source_host,
        target_host=m.target_host,
        source_datastore=m.source_datastore,
        target_datastore=m.target_datastore,
        status=m.status,
        phase=m.phase,
        task_id=m.task_id,
        created_at=m.created_at,
        started_at=m.started_at,
        finished_at=m.finished_at,
        settings=MigrationSettings.model_validate(m.settings or {}),
        checks=CheckReport.model_validate(m.checks) if m.checks else None,
        prediction=MigrationPrediction.model_validate(m.prediction) if m.prediction else None,
        metrics=MigrationMetrics.model_validate(m.metrics or {}),
        actions=[MigrationAction.model_validate(a) for a in m.actions or []],
        error=ErrorInfo.model_validate(m.error) if m.error else None,
        progress=MigrationLive.model_validate(m.progress) if m.progress else None,
        encrypted=m.encrypted,
    )


def get_migration_row(s: Session, migration_id: int) -> MigrationRow:
    row = s.get(MigrationRow, migration_id)
    if row is None:
        raise NotFoundError(
            f"Migration {migration_id} does not exist.", hint="List migrations with 'vmshift migration list'."
        )
    return row


def migration_parties(
    s: Session, row: MigrationRow, what: str = "migration"
) -> tuple[VmRow, HostRow, HostRow]:
    """The migration's VM, source host and target host rows; ConflictError when one left the inventory
    while the migration waited (``what`` names it in the hint: "migration", "move")."""
    vm = s.scalar(select(VmRow).where(VmRow.name == row.vm))
    src = s.scalar(select(HostRow).where(HostRow.name == row.source_host))
    dst = s.scalar(select(HostRow).where(HostRow.name == row.target_host))
    if vm is None or src is None or dst is None:
        raise ConflictError(
            f"VM {row.vm}, host {row.source_host} or host {row.target_host} left the inventory.",
            hint=f"Check the inventory and start the {what} again.",
        )
    return vm, src, dst


#: Statuses of a migration that still holds its VM (no other move may start).
UNFINISHED = (MigrationStatus.QUEUED, MigrationStatus.RUNNING, MigrationStatus.NEEDS_FINALIZE)


def unfinished_for_vm(s: Session, vm: str) -> MigrationRow | None:
    return s.scalar(select(MigrationRow).where(MigrationRow.vm == vm, MigrationRow.status.in_(UNFINISHED)))


def set_phase(sessions: Sessions, migration_id: int, phase: MigrationPhase) -> None:
    with sessions.begin() as s:
        row = get_migration_row(s, migration_id)
        if row.phase is not phase:
            row.phase = check_transition(row.phase, phase)


def store_prediction(sessions: Sessions, migration_id: int, prediction: MigrationPrediction) -> None:
    with sessions.begin() as s:
        get_migration_row(s, migration_id).prediction = prediction.model_dump(mode="json")


def mirror(sessions: Sessions, migration_id: int, p: MigrationProgress) -> None:
    """Copy an agent sample into the row (phase, metrics, actions, last sample for the CLI's bar)."""
    with sessions.begin() as s:
        row = get_migration_row(s, migration_id)
        if row.status.finished:
            return
        if p.phase in AGENT_PHASES and p.phase is not row.phase and can_reach(row.phase, p.phase):
            row.phase = p.phase
        row.metrics = p.metrics.model_dump(mode="json")
        row.actions = [a.model_dump(mode="json") for a in p.actions]
        if p.encrypted is not None:  # what the source's QEMU does replaces the server's decision
            row.encrypted = p.encrypted
        row.progress = p.model_dump(
            mode="json",
            include=set(MigrationLive.model_fields),
        )  # fmt: skip


def complete(sessions: Sessions, migration_id: int, p: MigrationProgress) -> None:
    """The VM now runs on the target: move it in the inventory in the same transaction as the record."""
    with sessions.begin() as s:
        row = get_migration_row(s, migration_id)
        if row.status.finished:
            return
        vm = s.scalar(select(VmRow).where(VmRow.name == row.vm))
        target = s.scalar(select(HostRow).where(HostRow.name == row.target_host))
        if vm is not None and target is not None:
            vm.host = target
            vm.power_state = PowerState.POWERED_ON
            if row.kind is MigrationKind.RELOCATE and row.target_spec is not None:
                vm.spec = row.target_spec  # its disks moved with it: host and files in one transaction
        row.status, row.finished_at = MigrationStatus.COMPLETED, utcnow()
        row.phase = _end_phase(row.phase, MigrationPhase.COMPLETED)
        row.metrics = p.metrics.model_dump(mode="json")
        row.actions = [a.model_dump(mode="json") for a in p.actions]
        m = p.metrics
        where = (f"{row.source_host} to {row.target_host}" if row.kind is not MigrationKind.RELOCATE else
                 f"{row.source_host}/{row.source_datastore} to {row.target_host}/{row.target_datastore}")
        record_event(
            s,
            EventKind.VM_MIGRATED,
            row.vm,
            f"VM {row.vm} migrated from {where} (migration {row.id}: "
            f"{m.total_ms} ms total, {m.downtime_ms} ms downtime, {m.rounds} rounds).",
        )


def needs_finalize(sessions: Sessions, migration_id: int, p: MigrationProgress) -> None:
    """The stream completed but the target could not be activated: the VM waits paused on both."""
    with sessions.begin() as s:
        row = get_migration_row(s, migration_id)
        if row.status.finished or row.status is MigrationStatus.NEEDS_FINALIZE:
            return
        row.status = MigrationStatus.NEEDS_FINALIZE
        row.phase = _end_phase(row.phase, MigrationPhase.FINISH)
        row.metrics = p.metrics.model_dump(mode="json")
        row.error = p.error.model_dump(mode="json") if p.error else None
        vm = s.scalar(select(VmRow).where(VmRow.name == row.vm))
        if vm is not None:
            vm.power_state = PowerState.PAUSED
        why = p.error.message if p.error else "the target could not be activated."
        record_event(
            s,
            EventKind.MIGRATION_NEEDS_FINALIZE,
            row.vm,
            f"VM {row.vm} is paused on both {row.source_host} and {row.target_host} (migration {row.id}): "
            f"{why} Run 'vmshift migration finalize {row.id}' to finish the move once "
            f"{row.target_host} answers, or 'vmshift vm resume {row.vm}' if {row.target_host} provably "
            "never ran it.",
            EventSeverity.CRITICAL,
        )


def lost(sessions: Sessions, migration_id: int, p: MigrationProgress) -> None:
    """Neither host holds the whole VM: report it (the agents proved it), keep its files."""
    with sessions.begin() as s:
        row = get_migration_row(s, migration_id)
        if row.status.finished:
            return
        row.status, row.finished_at = MigrationStatus.LOST, utcnow()
        row.phase = _end_phase(row.phase, MigrationPhase.LOST)
        row.metrics = p.metrics.model_dump(mode="json")
        row.error = p.error.model_dump(mode="json") if p.error else None
        vm = s.scalar(select(VmRow).where(VmRow.name == row.vm))
        if vm is not None:
            vm.power_state = PowerState.POWERED_OFF
        why = p.error.message if p.error else "the source QEMU vanished."
        record_event(
            s,
            EventKind.VM_LOST,
            row.vm,
            f"VM {row.vm} was lost in migration {row.id} from {row.source_host} to {row.target_host}: "
            f"{why} Start it again from its disks with 'vmshift vm start {row.vm}'.",
            EventSeverity.CRITICAL,
        )


def fail(
    sessions: Sessions,
    migration_id: int,
    error: ErrorInfo,
    *,
    cancelled: bool = False,
    progress: MigrationProgress | None = None,
) -> None:
    """The migration ended before switchover: the VM stays on the source."""
    with sessions.begin() as s:
        row = get_migration_row(s, migration_id)
        if row.status.finished:
            return
        row.status = MigrationStatus.CANCELLED if cancelled else MigrationStatus.FAILED
        row.phase = _end_phase(row.phase, MigrationPhase.CANCELLED if cancelled else MigrationPhase.FAILED)
        row.finished_at, row.error = utcnow(), error.model_dump(mode="json")
        if progress is not None:
            row.metrics = progress.metrics.model_dump(mode="json")
            row.actions = [a.model_dump(mode="json") for a in progress.actions]
        record_event(
            s,
            EventKind.MIGRATION_FAILED,
            row.vm,
            f"Migration {row.id} of VM {row.vm} to {row.target_host} "
            f"{'was cancelled' if cancelled else 'failed'}: {error.message} "
            f"The VM stays on {row.source_host}.",
            EventSeverity.WARNING if cancelled else EventSeverity.ERROR,
        )
