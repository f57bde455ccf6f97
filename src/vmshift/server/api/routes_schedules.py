"""Scheduled migrations: add, list, show (with their runs), delete (docs/schedules.md)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import TypeAdapter
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from vmshift.errors import ConflictError, InvalidInputError, NotFoundError
from vmshift.model.api import EventKind
from vmshift.model.inputs import ScheduleName, VmName
from vmshift.model.paging import ListName
from vmshift.model.schedule import Schedule, ScheduleCreate, ScheduleRun
from vmshift.model.schedule_times import COLLISION_WINDOW_S, When, check_cron, clash, zone
from vmshift.server.api.deps import core_of
from vmshift.server.api.openapi import BODY, PARAMS, errors
from vmshift.server.api.paging import Page, PageRequest, answer, cut, keyset, list_answers, page
from vmshift.server.core import ServerCore
from vmshift.server.db.schema import DatastoreRow, MigrationRow, ScheduleRow, utcnow
from vmshift.server.events import record_event
from vmshift.server.inventory import get_host, get_vm, names_hint
from vmshift.server.schedules import when_of

router = APIRouter()
RUNS_SHOWN = 100


def _stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def schedule_view(s: Session, row: ScheduleRow, runs: int = RUNS_SHOWN) -> Schedule:
    shown = row.runs[:runs]
    ids = [r.migration_id for r in shown if r.migration_id is not None]
    status = {m.id: m.status for m in s.scalars(select(MigrationRow).where(MigrationRow.id.in_(ids)))}
    return Schedule(
        id=row.id, name=row.name, vm=row.vm, at=row.at, cron=row.cron, timezone=row.timezone,
        next_due_at=row.next_due_at, created_at=row.created_at, migrate=row.request,
        runs=[
            ScheduleRun(
                id=r.id, due_at=r.due_at, claimed_at=r.claimed_at, outcome=r.outcome, message=r.message,
                migration_id=r.migration_id, task_id=r.task_id,
                migration_status=status.get(r.migration_id) if r.migration_id is not None else None,
            )
            for r in shown
        ],
    )  # fmt: skip


def get_schedule_row(s: Session, name: str) -> ScheduleRow:
    row = s.scalar(select(ScheduleRow).where(ScheduleRow.name == name))
    if row is None and name.isdigit():
        row = s.get(ScheduleRow, int(name))
    if row is None:
        names = list(s.scalars(select(ScheduleRow.name).order_by(ScheduleRow.name)))
        raise NotFoundError(f"Schedule {name!r} does not exist.", hint=names_hint("schedules", names))
    return row


def _when(body: ScheduleCreate, now: datetime) -> When:
    if body.cron is not None:
        zone(body.timezone)
        return When(cron=check_cron(body.cron), timezone=body.timezone)
    assert body.at is not None
    if body.at < now:
        raise InvalidInputError(
            f"Time {_stamp(body.at)} is in the past (the server's time is {_stamp(now)}).",
            hint="Give a later time, e.g. --at +10m.",
        )
    return When(at=body.at, timezone=body.timezone)


def _check_targets(s: Session, body: ScheduleCreate) -> None:
    """The VM and the names it moves to exist now (whether the move is possible is checked at each run)."""
    get_vm(s, body.vm)
    if body.migrate.host is not None:
        get_host(s, body.migrate.host)
    ds = body.migrate.datastore
    if ds is not None and s.scalar(select(DatastoreRow).where(DatastoreRow.name == ds)) is None:
        names = list(s.scalars(select(DatastoreRow.name).order_by(DatastoreRow.name)))
        raise NotFoundError(f"Datastore {ds!r} does not exist.", hint=names_hint("datastores", names))


def _refuse_clash(s: Session, vm: str, when: When, first: datetime) -> None:
    others = s.scalars(select(ScheduleRow).where(ScheduleRow.vm == vm, ScheduleRow.next_due_at.is_not(None)))
    for other in others:
        hit = clash(when, first, when_of(other), other.next_due_at)
        if hit is not None:
            raise ConflictError(
                f"Schedule {other.name} already migrates VM {vm} at {_stamp(hit)}, within "
                f"{COLLISION_WINDOW_S:.0f} s of {_stamp(first)}.",
                hint=f"Pick a time a minute apart, or delete it: 'vmshift schedule delete {other.name}'.",
            )


@router.post("/schedules", status_code=201, responses=errors(*BODY, 404, 409))
async def add_schedule(body: ScheduleCreate, core: ServerCore = Depends(core_of)) -> Schedule:
    view = await run_in_threadpool(_add_schedule, body, core)
    core.schedules.wake()  # the scheduler's event lives on the event loop
    return view


def _add_schedule(body: ScheduleCreate, core: ServerCore) -> Schedule:
    now = utcnow()
    when = _when(body, now)
    first = when.first_due(now)
    with core.sessions.begin() as s:
        _check_targets(s, body)
        if body.name is not None and s.scalar(select(ScheduleRow).where(ScheduleRow.name == body.name)):
            raise ConflictError(
                f"A schedule named {body.name} exists already.",
                hint=f"Pick another --name, or delete it with 'vmshift schedule delete {body.name}'.",
            )
        _refuse_clash(s, body.vm, when, first)
        row = ScheduleRow(
            name=body.name or f"{body.vm}-new-{now.timestamp()}", vm=body.vm, at=when.at, cron=when.cron,
            timezone=when.timezone, next_due_at=first, request=body.migrate.model_dump(mode="json"),
            created_at=now,
        )  # fmt: skip
        s.add(row)
        s.flush()
        if body.name is None:
            row.name = f"{body.vm}-{row.id}"
        record_event(
            s,
            EventKind.SCHEDULE_CREATED,
            body.vm,
            f"Schedule {row.name} will migrate VM {body.vm} {when.describe()}; first run {_stamp(first)}.",
        )
        s.flush()
        return schedule_view(s, row)


_SCHEDULES = TypeAdapter(list[Schedule])


@router.get("/schedules", response_model=list[Schedule], responses=list_answers(list[Schedule]))
def list_schedules(
    request: Request,
    vm: VmName | None = Query(None, description="only this VM's schedules"),
    paging: PageRequest = Depends(page),
    core: ServerCore = Depends(core_of),
) -> Response:
    """Schedules oldest first (by id), each with its latest run, a page at a time."""
    q = select(ScheduleRow)
    if vm is not None:
        q = q.where(ScheduleRow.vm == vm)
    q = keyset(q, ScheduleRow.id, paging.after(ListName.SCHEDULES), paging.limit)
    with core.sessions() as s:
        got = cut(s.scalars(q).all(), paging.limit, ListName.SCHEDULES, lambda r: r.id)
        views = Page([schedule_view(s, row, runs=1) for row in got.items], got.next_cursor)
    return answer(request, views, _SCHEDULES)


@router.get("/schedules/{name}", responses=errors(*PARAMS, 404))
def get_schedule(
    name: ScheduleName, runs: int = Query(RUNS_SHOWN, ge=0, le=1000), core: ServerCore = Depends(core_of)
) -> Schedule:
    """One schedule with its runs, newest first (each names its migration and that migration's status)."""
    with core.sessions() as s:
        return schedule_view(s, get_schedule_row(s, name), runs)


@router.delete("/schedules/{name}", responses=errors(*PARAMS, 404))
async def delete_schedule(name: ScheduleName, core: ServerCore = Depends(core_of)) -> Schedule:
    """Remove a schedule and its run records; migrations it started are left alone."""

    def delete() -> Schedule:
        with core.sessions.begin() as s:
            row = get_schedule_row(s, name)
            view = schedule_view(s, row)
            s.delete(row)
            record_event(s, EventKind.SCHEDULE_DELETED, row.vm, f"Schedule {row.name} was deleted.")
            return view

    view = await run_in_threadpool(delete)
    core.schedules.wake()
    return view
