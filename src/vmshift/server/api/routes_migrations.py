"""Live migration: migrate (checks, dry run, start), list and show migrations, migration settings."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from vmshift.model.api import Task, TaskKind
from vmshift.model.enums import MigrationEncryption, PowerAction
from vmshift.model.migration import (
    Migration,
    MigrationCreate,
)
from vmshift.server.api.deps import core_of
from vmshift.server.core import ServerCore
from vmshift.server.db.schema import MigrationRow
from vmshift.server.inventory import get_host, get_vm
from vmshift.server.migration_finalize import Intent, waiting_migration
from vmshift.server.migration_start import MigrationCheckFailedError, MigrationStarted, migrate
from vmshift.server.migration_store import get_migration_row, migration_view
from vmshift.server.tasks import TaskEngine
from vmshift.server.views import task_view
from vmshift.server.vm_tasks import power_body

router = APIRouter()


class VmMigrationSettings(BaseModel):
    """A VM's migration SLA (PATCH: only the fields sent change)."""

    max_downtime_ms: int = Field(default=500, gt=0)
    allow_postcopy: bool = False
    encryption: MigrationEncryption = Field(
        default=MigrationEncryption.OPPORTUNISTIC, description="encrypted vMotion (docs/encrypted-vmotion.md)"
    )


class HostMigrationSettings(BaseModel):
    """A host's migration settings (PATCH: only the fields sent change; null = none)."""

    bandwidth_limit_bps: float | None = Field(default=None, gt=0)
    link_rate_bps: float | None = Field(default=None, gt=0)
    migration_limit: int = Field(default=4, ge=1, le=64)
    encryption: MigrationEncryption = Field(
        default=MigrationEncryption.OPPORTUNISTIC,
        description="encrypted vMotion of every migration from or to this host (docs/encrypted-vmotion.md)",
    )


@router.post("/vms/{name}/migrate", response_model=None)
async def migrate_vm(name: str, body: MigrationCreate, core: ServerCore = Depends(core_of)) -> Any:
    """Checks (always), then: the report (check_only), a preview (dry_run), or a started task (202).

    The kind of move follows from the request and the VM's power state: a host for a running VM is a
    live migration, a datastore a Storage vMotion, either for a stopped or suspended VM a cold move."""
    try:
        answer = await migrate(core, name, body)
    except MigrationCheckFailedError as e:
        return JSONResponse(status_code=e.status,
                            content={"error": e.to_dict(), "report": e.report.model_dump(mode="json")})
    if isinstance(answer, MigrationStarted):
        return JSONResponse(status_code=202, content=answer.model_dump(mode="json"))
    return answer.model_dump(mode="json")


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
    columns = {"max_downtime_ms": "max_downtime_ms", "allow_postcopy": "allow_postcopy",
               "encryption": "migration_encryption"}
    with core.sessions.begin() as s:
        vm = get_vm(s, name)
        for field in body.model_fields_set:
            setattr(vm, columns[field], getattr(body, field))
        return VmMigrationSettings(max_downtime_ms=vm.max_downtime_ms, allow_postcopy=vm.allow_postcopy,
                                   encryption=vm.migration_encryption)


@router.patch("/hosts/{name}/migration-settings")
async def set_host_migration_settings(
    name: str, body: HostMigrationSettings, core: ServerCore = Depends(core_of)
) -> HostMigrationSettings:
    columns = {
        "bandwidth_limit_bps": "migration_bandwidth_limit_bps",
        "link_rate_bps": "migration_link_rate_bps",
        "migration_limit": "migration_limit",
        "encryption": "migration_encryption",
    }
    with core.sessions.begin() as s:
        host = get_host(s, name)
        for field in body.model_fields_set:
            setattr(host, columns[field], getattr(body, field))
        return HostMigrationSettings(
            bandwidth_limit_bps=host.migration_bandwidth_limit_bps,
            link_rate_bps=host.migration_link_rate_bps,
            migration_limit=host.migration_limit,
            encryption=host.migration_encryption,
        )
