"""Tasks and events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select

from vmshift.errors import NotFoundError
from vmshift.model.api import Event, Task
from vmshift.model.inputs import MAX_LIST, NAME_MAX, ObjectId
from vmshift.server.api.deps import core_of
from vmshift.server.api.openapi import PARAMS, errors
from vmshift.server.core import ServerCore
from vmshift.server.db.schema import EventRow, TaskRow
from vmshift.server.views import event_view, task_view

router = APIRouter()


@router.get("/tasks", responses=errors(*PARAMS))
async def list_tasks(
    limit: int = Query(50, ge=1, le=1000, description="newest first"), core: ServerCore = Depends(core_of)
) -> list[Task]:
    with core.sessions() as s:
        return [task_view(t) for t in s.scalars(select(TaskRow).order_by(TaskRow.id.desc()).limit(limit))]


def _task(core: ServerCore, task_id: int) -> Task:
    with core.sessions() as s:
        row = s.get(TaskRow, task_id)
        if row is None:
            raise NotFoundError(f"Task {task_id} does not exist.", hint="List tasks with GET /api/v1/tasks.")
        return task_view(row)


@router.get("/tasks/{task_id}", responses=errors(*PARAMS, 404))
async def get_task(task_id: ObjectId, core: ServerCore = Depends(core_of)) -> Task:
    return _task(core, task_id)


@router.post("/tasks/{task_id}/cancel", responses=errors(*PARAMS, 404, 409))
async def cancel_task(task_id: ObjectId, core: ServerCore = Depends(core_of)) -> Task:
    await core.tasks.cancel(task_id)
    return _task(core, task_id)


@router.get("/events", responses=errors(*PARAMS))
async def list_events(
    limit: int = Query(100, ge=1, le=MAX_LIST, description="newest first"),
    target: Annotated[
        str | None, Query(min_length=1, max_length=NAME_MAX, description="only events about this object")
    ] = None,
    core: ServerCore = Depends(core_of),
) -> list[Event]:
    q = select(EventRow).order_by(EventRow.id.desc()).limit(limit)
    if target is not None:
        q = q.where(EventRow.target == target)
    with core.sessions() as s:
        return [event_view(e) for e in s.scalars(q)]
