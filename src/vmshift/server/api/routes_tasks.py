"""Tasks and events: paged newest first, filtered by time, target and (tasks) state.

``since`` reads only what is new: the items with an id greater than the newest one a client has
seen (docs/api.md, "Incremental reads"). Database-only routes are plain ``def`` (thread pool).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import TypeAdapter
from sqlalchemy import Select, select
from starlette.concurrency import run_in_threadpool

from vmshift.errors import NotFoundError
from vmshift.model.api import Event, Task
from vmshift.model.enums import TaskState
from vmshift.model.inputs import NAME_MAX, ObjectId
from vmshift.model.paging import ListName
from vmshift.server.api.deps import core_of
from vmshift.server.api.json_pieces import JsonPieces, json_list
from vmshift.server.api.openapi import PARAMS, errors
from vmshift.server.api.paging import (
    After,
    Before,
    Page,
    PageRequest,
    Since,
    answer,
    answer_json,
    cut,
    keyset,
    list_answers,
    newer,
    page,
)
from vmshift.server.core import ServerCore
from vmshift.server.db.schema import EventRow, TaskRow
from vmshift.server.views import EVENT_COLUMNS, event_view, task_view

router = APIRouter()
_TASKS = TypeAdapter(list[Task])

Target = Annotated[
    str | None, Query(min_length=1, max_length=NAME_MAX, description="only those about this object")
]
@router.get("/tasks", response_model=list[Task], responses=list_answers(list[Task]))
def list_tasks(
    request: Request,
    target: Target = None,
    state: TaskState | None = Query(None, description="only tasks in this state"),
    since: Since = None,
    after: After = None,
    before: Before = None,
    paging: PageRequest = Depends(page),
    core: ServerCore = Depends(core_of),
) -> Response:
    """Tasks newest first, a page at a time; ``after`` and ``before`` compare the creation time."""
    q = newer(select(TaskRow), TaskRow.id, TaskRow.created_at, since, after, before)
    if target is not None:
        q = q.where(TaskRow.target == target)
    if state is not None:
        q = q.where(TaskRow.state == state)
    q = keyset(q, TaskRow.id, paging.after(ListName.TASKS), paging.limit, descending=True)
    with core.sessions() as s:
        got = cut(s.scalars(q).all(), paging.limit, ListName.TASKS, lambda t: t.id)
        views = Page([task_view(t) for t in got.items], got.next_cursor)
    return answer(request, views, _TASKS)


def _task(core: ServerCore, task_id: int) -> Task:
    with core.sessions() as s:
        row = s.get(TaskRow, task_id)
        if row is None:
            raise NotFoundError(f"Task {task_id} does not exist.", hint="List tasks with GET /api/v1/tasks.")
        return task_view(row)


@router.get("/tasks/{task_id}", responses=errors(*PARAMS, 404))
def get_task(task_id: ObjectId, core: ServerCore = Depends(core_of)) -> Task:
    return _task(core, task_id)


@router.post("/tasks/{task_id}/cancel", responses=errors(*PARAMS, 404, 409))
async def cancel_task(task_id: ObjectId, core: ServerCore = Depends(core_of)) -> Task:
    await core.tasks.cancel(task_id)
    return await run_in_threadpool(_task, core, task_id)


@router.get("/events", response_model=list[Event], responses=list_answers(list[Event]))
def list_events(
    request: Request,
    target: Target = None,
    since: Since = None,
    after: After = None,
    before: Before = None,
    paging: PageRequest = Depends(page),
    core: ServerCore = Depends(core_of),
) -> Response:
    """Events newest first, a page at a time."""
    q = newer(cast("Select[Any]", select(*EVENT_COLUMNS)), EventRow.id, EventRow.time, since, after, before)
    if target is not None:
        q = q.where(EventRow.target == target)
    q = keyset(q, EventRow.id, paging.after(ListName.EVENTS), paging.limit, descending=True)
    with core.sessions() as s:
        got = cut(s.execute(q).all(), paging.limit, ListName.EVENTS, lambda e: int(e[0]))
    return answer_json(request, json_list([_event_piece(e) for e in got.items]), got.next_cursor)


_EVENT = TypeAdapter(Event)
_EVENT_PIECES: JsonPieces[int] = JsonPieces(max_kept=20_000)  # by id: an event row is never changed


def _event_piece(row: Sequence[Any]) -> bytes:
    return _EVENT_PIECES.get(row[0], tuple(row), lambda: _EVENT.dump_json(event_view(row)))
