"""Live migration: migrate (checks, dry run, start), list and show migrations, migration settings."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from vmshift.errors import ConflictError
from vmshift.model.api import EventKind, Task, TaskKind
from vmshift.model.enums import PowerAction
from vmshift.model.migration import (
    CheckReport,
    Migration,
    MigrationCreate,
    MigrationPhase,
    MigrationPrediction,
    MigrationSettings,
    MigrationStatus,
)
from vmshift.server.api.deps import core_of
from vmshift.server.core import ServerCore
from vmshift.server.db.schema import MigrationRow
from vmshift.server.events import record_event
from vmshift.server.inventory import get_host, get_vm
from vmshift.server.migration_checks import plan_migration, predict_plan, status_for
from vmshift.server.migration_finalize import Intent, waiting_migration
from vmshift.server.migration_store import get_migration_row, migration_view, unfinished_for_vm
from vmshift.server.tasks import TaskEngine
from vmshift.server.views import task_view
from vmshift.server.vm_tasks import power_body

router = APIRouter()


class MigrationStarted(Task):
    """202 answer of a migrate request: the ``vm.migrate`` task plus the migration's id."""

    migration_id: int


class MigrationPreview(BaseModel):
    """200 answer of a dry run: the checks, the settings that would apply, the prediction."""

    checks: CheckReport
    settings: MigrationSettings
    prediction: MigrationPrediction


class VmMigrationSettings(BaseModel):
    """A VM's migration SLA (PATCH: only the fields sent change)."""

    max_downtime_ms: int = Field(default=500, gt=0)
    allow_postcopy: bool = False


class HostMigrationSettings(BaseModel):
    """A host's migration settings (PATCH: only the fields sent change; null = none)."""

    bandwidth_limit_bps: float | None = Field(default=None, gt=0)
    link_rate_bps: float | None = Field(default=None, gt=0)
    migration_limit: int = Field(default=4, ge=1, le=64)


def _busy(core: ServerCore, name: str) -> None:
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


@router.post("/vms/{name}/migrate", response_model=None)
async def migrate_vm(name: str, body: MigrationCreate, core: ServerCore = Depends(core_of)) -> Any:
    """Checks (always), then: the report (check_only), a prediction (dry_run), or a started task (202)."""
    _busy(core, name)
    plan = await plan_migration(core.sessions, core.agents, name, body)
    report = plan.report
    if body.check_only:
        return report.model_dump(mode="json")
    if report.errors:
        first = report.errors[0]
        return JSONResponse(
            status_code=status_for(first),
            content={
                "error": {"code": "migration_check_failed", "message": first.message, "hint": first.hint},
                "report": report.model_dump(mode="json"),
            },
        )
    if body.dry_run:
        prediction = await predict_plan(core.agents, plan)
        return MigrationPreview(checks=report, settings=plan.settings, prediction=prediction).model_dump(
            mode="json"
        )
    _busy(core, name)  # a second request may have won while this one measured the link
    with core.sessions.begin() as s:
        row = MigrationRow(
            vm=name,
            source_host=plan.source,
            target_host=plan.target,
            status=MigrationStatus.QUEUED,
            phase=MigrationPhase.QUEUED,
            settings=plan.settings.model_dump(mode="json"),
            checks=report.model_dump(mode="json"),
            metrics={},
            actions=[],
            measured_bandwidth_bps=plan.bandwidth_bps,
            nonce=secrets.token_hex(16),
        )
        s.add(row)
        s.flush()
        task = TaskEngine.create(s, TaskKind.VM_MIGRATE, name, {"migration_id": row.id, "host": plan.target})
        row.task_id = task.id
        queued = " (queued: a host is at its migration limit)" if report.must_queue else ""
        record_event(
            s,
            EventKind.MIGRATION_STARTED,
            name,
            f"Migration {row.id} of VM {name} from {plan.source} to {plan.target} requested{queued}.",
        )
        started = MigrationStarted(**task_view(task).model_dump(), migration_id=row.id)
    core.migrations.start(started.migration_id, started.id, name)
    return JSONResponse(status_code=202, content=started.model_dump(mode="json"))


@router.get("/migrations")
async def list_migrations(
    limit: int = Query(50, ge=1, le=1000),
    vm: str | None = None,
    core: ServerCore = Depends(core_of),
) -> list[Migration]:
    q = select(MigrationRow).order_by(MigrationRow.id.desc()).limit(limit)
    if vm is not None:
        q = q.where(MigrationRow.vm == vm)
    with core.sessions() as s:
        return [migration_view(m) for m in s.scalars(q)]


@router.get("/migrations/{migration_id}")
async def get_migration(migration_id: int, core: ServerCore = Depends(core_of)) -> Migration:
    with core.sessions() as s:
        return migration_view(get_migration_row(s, migration_id))


@router.post("/migrations/{migration_id}/finalize", status_code=202)
async def finalize_migration(migration_id: int, core: ServerCore = Depends(core_of)) -> Task:
    """Finish a migration that waits paused on both hosts, from the target's proof (a task)."""
    return task_view(core.finalizer.start(migration_id, Intent.FINISH))


class ResumeRequest(BaseModel):
    force: bool = Field(
        default=False,
        description="resume the source although the target cannot be reached (only when it is down for good)",
    )


@router.post("/vms/{name}/resume", status_code=202)
async def resume_vm(name: str, body: ResumeRequest, core: ServerCore = Depends(core_of)) -> Task:
    """Resume a paused VM; one that waits for a migration's finalize only if the target never ran it."""
    with core.sessions() as s:
        get_vm(s, name)
        waiting = waiting_migration(s, name)
        waiting_id = waiting.id if waiting is not None else None
    if waiting_id is not None:
        return task_view(core.finalizer.start(waiting_id, Intent.RESUME, force=body.force))
    with core.sessions.begin() as s:
        task = TaskEngine.create(s, TaskKind.VM_POWER, name, {"action": PowerAction.RESUME.value})
        s.flush()
        view = task_view(task)
    core.tasks.start(view.id, name, power_body(core.sessions, core.agents, name, PowerAction.RESUME))
    return view


@router.patch("/vms/{name}/migration-settings")
async def set_vm_migration_settings(
    name: str, body: VmMigrationSettings, core: ServerCore = Depends(core_of)
) -> VmMigrationSettings:
    with core.sessions.begin() as s:
        vm = get_vm(s, name)
        for field in body.model_fields_set:
            setattr(vm, field, getattr(body, field))
        return VmMigrationSettings(max_downtime_ms=vm.max_downtime_ms, allow_postcopy=vm.allow_postcopy)


@router.patch("/hosts/{name}/migration-settings")
async def set_host_migration_settings(
    name: str, body: HostMigrationSettings, core: ServerCore = Depends(core_of)
) -> HostMigrationSettings:
    columns = {
        "bandwidth_limit_bps": "migration_bandwidth_limit_bps",
        "link_rate_bps": "migration_link_rate_bps",
        "migration_limit": "migration_limit",
    }
    with core.sessions.begin() as s:
        host = get_host(s, name)
        for field in body.model_fields_set:
            setattr(host, columns[field], getattr(body, field))
        return HostMigrationSettings(
            bandwidth_limit_bps=host.migration_bandwidth_limit_bps,
            link_rate_bps=host.migration_link_rate_bps,
            migration_limit=host.migration_limit,
        )
