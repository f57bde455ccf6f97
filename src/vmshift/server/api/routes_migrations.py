"""Live migration: migrate (checks, dry run, start), list and show migrations, migration settings."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, TypeAdapter
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from vmshift.model.api import ErrorBody, Task, TaskKind
from vmshift.model.base import RequestModel
from vmshift.model.enums import MigrationEncryption, PowerAction
from vmshift.model.inputs import (
    MAX_DOWNTIME_MS,
    MAX_MIGRATION_LIMIT,
    MAX_RATE_BPS,
    HostName,
    ObjectId,
    VmName,
)
from vmshift.model.migration import (
    CheckReport,
    Migration,
    MigrationCreate,
)
from vmshift.model.paging import ListName
from vmshift.server.api.deps import core_of
from vmshift.server.api.openapi import BODY, PARAMS, Responses, errors
from vmshift.server.api.paging import Page, PageRequest, Since, answer, cut, keyset, list_answers, page
from vmshift.server.core import ServerCore
from vmshift.server.db.schema import MigrationRow
from vmshift.server.inventory import get_host, get_vm
from vmshift.server.migration_finalize import Intent, waiting_migration
from vmshift.server.migration_start import (
    DiskMovePreview,
    MigrationCheckFailedError,
    MigrationPreview,
    MigrationStarted,
    migrate,
)
from vmshift.server.migration_store import get_migration_row, migration_view
from vmshift.server.tasks import TaskEngine
from vmshift.server.views import task_view
from vmshift.server.vm_tasks import power_body

router = APIRouter()


class VmMigrationSettings(RequestModel):
    """A VM's migration SLA (PATCH: only the fields sent change)."""

    max_downtime_ms: int = Field(default=500, gt=0, le=MAX_DOWNTIME_MS)
    allow_postcopy: bool = False
    encryption: MigrationEncryption = Field(
        default=MigrationEncryption.OPPORTUNISTIC, description="encrypted vMotion (docs/encrypted-vmotion.md)"
    )


class HostMigrationSettings(RequestModel):
    """A host's migration settings (PATCH: only the fields sent change; null = none)."""

    bandwidth_limit_bps: float | None = Field(default=None, gt=0, le=MAX_RATE_BPS)
    link_rate_bps: float | None = Field(default=None, gt=0, le=MAX_RATE_BPS)
    migration_limit: int = Field(default=4, ge=1, le=MAX_MIGRATION_LIMIT)
    encryption: MigrationEncryption = Field(
        default=MigrationEncryption.OPPORTUNISTIC,
        description="encrypted vMotion of every migration from or to this host (docs/encrypted-vmotion.md)",
    )


class CheckFailedBody(ErrorBody):
    """A refused migrate request; when a pre-migration check refused it, every check's result."""

    report: CheckReport | None = Field(
        default=None, description="present when a check failed: the result of every check"
    )


_MIGRATE_ANSWERS: Responses = {
    200: {"model": CheckReport | MigrationPreview | DiskMovePreview,
          "description": "check_only: the report; dry_run: the preview of the move"},
    202: {"model": MigrationStarted, "description": "the move started: its task and migration id"},
    409: {"model": CheckFailedBody, "description": "The VM is busy with another move, or a check found "
          "the state in the way (the report says which): nothing was started."},
    422: {"model": CheckFailedBody, "description": "A field is invalid, or a check found the target "
          "lacking what the VM needs (the report says which): nothing was started."},
}  # fmt: skip


@router.post("/vms/{name}/migrate", response_model=None, responses=errors(*BODY, 404, extra=_MIGRATE_ANSWERS))
async def migrate_vm(name: VmName, body: MigrationCreate, core: ServerCore = Depends(core_of)) -> Any:
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


_MIGRATIONS = TypeAdapter(list[Migration])


@router.get("/migrations", response_model=list[Migration], responses=list_answers(list[Migration]))
def list_migrations(
    request: Request,
    vm: VmName | None = Query(None, description="only this VM's migrations"),
    since: Since = None,
    paging: PageRequest = Depends(page),
    core: ServerCore = Depends(core_of),
) -> Response:
    """Migrations (every kind of move) newest first, a page at a time."""
    q = select(MigrationRow)
    if vm is not None:
        q = q.where(MigrationRow.vm == vm)
    if since is not None:
        q = q.where(MigrationRow.id > since)
    q = keyset(q, MigrationRow.id, paging.after(ListName.MIGRATIONS), paging.limit, descending=True)
    with core.sessions() as s:
        got = cut(s.scalars(q).all(), paging.limit, ListName.MIGRATIONS, lambda m: m.id)
        views = Page([migration_view(m) for m in got.items], got.next_cursor)
    return answer(request, views, _MIGRATIONS)


@router.get("/migrations/{migration_id}", responses=errors(*PARAMS, 404))
def get_migration(migration_id: ObjectId, core: ServerCore = Depends(core_of)) -> Migration:
    with core.sessions() as s:
        return migration_view(get_migration_row(s, migration_id))


@router.post("/migrations/{migration_id}/finalize", status_code=202, responses=errors(*PARAMS, 404, 409))
async def finalize_migration(migration_id: ObjectId, core: ServerCore = Depends(core_of)) -> Task:
    """Finish a migration that waits paused on both hosts, from the target's proof (a task)."""
    return task_view(core.finalizer.start(migration_id, Intent.FINISH))


class ResumeRequest(RequestModel):
    force: bool = Field(
        default=False,
        description="resume the source although the target cannot be reached (only when it is down for good)",
    )


@router.post("/vms/{name}/resume", status_code=202, responses=errors(*BODY, 404, 409))
async def resume_vm(name: VmName, body: ResumeRequest, core: ServerCore = Depends(core_of)) -> Task:
    """Resume a paused VM; one that waits for a migration's finalize only if the target never ran it."""

    def waiting_id() -> int | None:
        with core.sessions() as s:
            get_vm(s, name)
            waiting = waiting_migration(s, name)
            return waiting.id if waiting is not None else None

    def write() -> Task:
        with core.sessions.begin() as s:
            task = TaskEngine.create(s, TaskKind.VM_POWER, name, {"action": PowerAction.RESUME.value})
            s.flush()
            return task_view(task)

    waiting = await run_in_threadpool(waiting_id)
    if waiting is not None:
        return task_view(core.finalizer.start(waiting, Intent.RESUME, force=body.force))
    view = await run_in_threadpool(write)
    core.tasks.start(view.id, name, power_body(core.sessions, core.agents, name, PowerAction.RESUME))
    return view


@router.patch("/vms/{name}/migration-settings", responses=errors(*BODY, 404))
def set_vm_migration_settings(
    name: VmName, body: VmMigrationSettings, core: ServerCore = Depends(core_of)
) -> VmMigrationSettings:
    columns = {"max_downtime_ms": "max_downtime_ms", "allow_postcopy": "allow_postcopy",
               "encryption": "migration_encryption"}
    with core.sessions.begin() as s:
        vm = get_vm(s, name)
        for field in body.model_fields_set:
            setattr(vm, columns[field], getattr(body, field))
        return VmMigrationSettings(max_downtime_ms=vm.max_downtime_ms, allow_postcopy=vm.allow_postcopy,
                                   encryption=vm.migration_encryption)


@router.patch("/hosts/{name}/migration-settings", responses=errors(*BODY, 404))
def set_host_migration_settings(
    name: HostName, body: HostMigrationSettings, core: ServerCore = Depends(core_of)
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
