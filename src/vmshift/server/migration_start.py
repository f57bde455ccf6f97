"""Start a move of any kind: the one path the API and scheduled runs take (checks, row, task).

The kind follows from the request and the VM's power state (``migration.kinds``): a live migration
and a relocate (live, with its disks mirrored to the target) go to the orchestrator
(``server/migrations.py``), a disk move to ``server/moves/``.
"""

from __future__ import annotations

import secrets

from pydantic import BaseModel
from sqlalchemy.orm import Session

from vmshift.errors import ConflictError, VmshiftError
from vmshift.model.api import EventKind, Task, TaskKind
from vmshift.model.enums import MigrationKind
from vmshift.model.migration import (
    CheckReport,
    CheckResult,
    MigrationCreate,
    MigrationPhase,
    MigrationPrediction,
    MigrationSettings,
    MigrationStatus,
)
from vmshift.model.vm import VmSpec
from vmshift.server.core import ServerCore
from vmshift.server.db.schema import MigrationRow
from vmshift.server.events import record_event
from vmshift.server.inventory import get_vm
from vmshift.server.migration_checks import plan_migration, predict_plan, status_for
from vmshift.server.migration_store import unfinished_for_vm
from vmshift.server.moves.plan import DiskMovePlan, kind_for, plan_disk_move
from vmshift.server.tasks import TaskEngine
from vmshift.server.views import task_view


class MigrationStarted(Task):
    """202 answer of a migrate request: the ``vm.migrate`` task plus the migration's id."""

    migration_id: int
    migration_kind: MigrationKind = MigrationKind.LIVE


class MigrationPreview(BaseModel):
    """200 answer of a live migration's dry run: the checks, the settings that would apply, the prediction."""

    kind: MigrationKind = MigrationKind.LIVE
    checks: CheckReport
    settings: MigrationSettings
    prediction: MigrationPrediction


class DiskMovePreview(BaseModel):
    """200 answer of a disk move's dry run: the checks and the VM's spec after the move."""

    kind: MigrationKind
    checks: CheckReport
    target_host: str
    target_datastore: str
    target_spec: VmSpec


class MigrationCheckFailedError(VmshiftError):
    """A check failed: nothing was started. ``report`` holds every check's result."""

    code = "migration_check_failed"

    def __init__(self, report: CheckReport, first: CheckResult) -> None:
        super().__init__(first.message, hint=first.hint)
        self.report = report
        self.status = status_for(first)


Answer = CheckReport | MigrationPreview | DiskMovePreview | MigrationStarted


def ensure_not_busy(core: ServerCore, name: str) -> None:
    """Refuse (409) while another move of the VM is unfinished."""
    with core.sessions() as s:
        get_vm(s, name)
        other = unfinished_for_vm(s, name)
        if other is not None and other.status is MigrationStatus.NEEDS_FINALIZE:
            raise ConflictError(
                f"VM {name} waits paused on two hosts for migration {other.id} to be finalized.",
                hint=f"Run 'vmshift migration finalize {other.id}' first.",
            )
        if other is not None:
            raise ConflictError(
                f"VM {name} is already being migrated (migration {other.id}, {other.status.value}).",
                hint=f"Wait for it, or cancel task {other.task_id} with 'vmshift task cancel'.",
            )


async def start_migration(core: ServerCore, vm: str, body: MigrationCreate) -> MigrationStarted:
    """Check and start a move of ``vm`` (MigrationCheckFailedError when a check fails)."""
    answer = await migrate(core, vm, body.model_copy(update={"check_only": False, "dry_run": False}))
    assert isinstance(answer, MigrationStarted)
    return answer


async def migrate(core: ServerCore, name: str, body: MigrationCreate) -> Answer:
    """Checks (always), then: the report (check_only), a preview (dry_run), or a started task."""
    ensure_not_busy(core, name)
    with core.sessions() as s:
        kind = kind_for(s, name, body)
    if not isinstance(kind, MigrationKind):
        report = CheckReport(results=[kind])
        if body.check_only:
            return report
        raise MigrationCheckFailedError(report, kind)
    if kind in (MigrationKind.LIVE, MigrationKind.RELOCATE):
        return await _live(core, name, body, kind)  # a relocate is a live migration with disk mirrors
    with core.sessions() as s:
        plan = plan_disk_move(s, name, body, kind)
    if body.check_only:
        return plan.report
    if plan.report.errors:
        raise MigrationCheckFailedError(plan.report, plan.report.errors[0])
    if body.dry_run:
        return DiskMovePreview(kind=kind, checks=plan.report, target_host=plan.target,
                               target_datastore=plan.target_datastore, target_spec=plan.target_spec)
    return _start_disk_move(core, plan)


async def _live(core: ServerCore, name: str, body: MigrationCreate, kind: MigrationKind) -> Answer:
    plan = await plan_migration(core.sessions, core.agents, name, body, kind)
    report = plan.report
    if body.check_only:
        return report
    if report.errors:
        raise MigrationCheckFailedError(report, report.errors[0])
    if body.dry_run:
        prediction = await predict_plan(core.agents, plan)
        return MigrationPreview(kind=plan.kind, checks=report, settings=plan.settings, prediction=prediction)
    ensure_not_busy(core, name)  # a second request may have won while this one measured the link
    target_spec = plan.target_spec.model_dump(mode="json") if plan.target_spec is not None else None
    with core.sessions.begin() as s:
        row = MigrationRow(
            vm=name, kind=plan.kind, source_host=plan.source, target_host=plan.target,
            source_datastore=plan.spec.datastore, target_datastore=plan.target_datastore,
            target_spec=target_spec, disk_format=plan.disk_format,
            status=MigrationStatus.QUEUED, phase=MigrationPhase.QUEUED,
            settings=plan.settings.model_dump(mode="json"), checks=report.model_dump(mode="json"), metrics={},
            actions=[], measured_bandwidth_bps=plan.bandwidth_bps, nonce=secrets.token_hex(16),
        )
        started = _record_start(s, row, report)
    core.migrations.start(started.migration_id, started.id, name)
    return started


def _start_disk_move(core: ServerCore, plan: DiskMovePlan) -> MigrationStarted:
    with core.sessions.begin() as s:
        row = MigrationRow(
            vm=plan.vm, kind=plan.kind, source_host=plan.source, target_host=plan.target,
            source_datastore=plan.source_datastore, target_datastore=plan.target_datastore,
            target_spec=plan.target_spec.model_dump(mode="json"), disk_format=plan.disk_format,
            status=MigrationStatus.QUEUED, phase=MigrationPhase.QUEUED,
            settings=MigrationSettings(bandwidth_limit_bps=plan.bandwidth_limit_bps).model_dump(mode="json"),
            checks=plan.report.model_dump(mode="json"), metrics={}, actions=[], nonce=secrets.token_hex(16),
        )
        started = _record_start(s, row, plan.report)
    core.moves.start(started.migration_id, started.id, plan.vm)
    return started


def _record_start(s: Session, row: MigrationRow, report: CheckReport) -> MigrationStarted:
    s.add(row)
    s.flush()
    task = TaskEngine.create(s, TaskKind.VM_MIGRATE, row.vm,
                             {"migration_id": row.id, "host": row.target_host, "kind": row.kind.value,
                              "datastore": row.target_datastore})
    row.task_id = task.id
    queued = " (queued: a host is at its migration limit)" if report.must_queue else ""
    where = row.target_host if row.target_datastore is None else f"{row.target_host}/{row.target_datastore}"
    what = "Migration" if row.kind is MigrationKind.LIVE else f"{row.kind.value.capitalize()} move"
    record_event(s, EventKind.MIGRATION_STARTED, row.vm,
                 f"{what} {row.id} of VM {row.vm} from {row.source_host} to {where} requested{queued}.")
    return MigrationStarted(**task_view(task).model_dump(), migration_id=row.id, migration_kind=row.kind)
