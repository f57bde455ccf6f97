"""`vmshift task ...` and `vmshift event list`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from vmshift.cli import context
from vmshift.cli.hosts import JsonOpt
from vmshift.cli.output import emit_json, fields, table, wait_with_progress
from vmshift.model.enums import TaskState

task_app = typer.Typer(help="Long-running operations.", no_args_is_help=True)
event_app = typer.Typer(help="The audit log.", no_args_is_help=True)


def _task_row(t: dict[str, Any]) -> list[Any]:
    err = (t.get("error") or {}).get("message")
    return [t["id"], t["kind"], t.get("target"), t["state"], t.get("phase"), t.get("percent"),
            t.get("created_at"), err]


Limit = Annotated[int, typer.Option(help="How many, newest first (0: all that match).")]
Since = Annotated[int | None, typer.Option(help="Only those with an id greater than this (the newest "
                                            "one already seen).")]
After = Annotated[str | None, typer.Option(help="Only those after this time (ISO 8601, e.g. "
                                            "2026-12-01T10:00:00Z).")]
Before = Annotated[str | None, typer.Option(help="Only those before this time (ISO 8601).")]


@task_app.command("list")
def task_list(
    limit: Limit = 20,
    target: Annotated[str | None, typer.Option(help="Only tasks about this object.")] = None,
    state: Annotated[TaskState | None, typer.Option(help="Only tasks in this state.")] = None,
    since: Since = None,
    after: After = None,
    before: Before = None,
    json_: JsonOpt = False,
) -> None:
    """List recent tasks (fetched page by page)."""
    with context.client() as c:
        items = c.list_tasks(limit or None, target=target, state=state, since=since, after=after,
                             before=before)
    if json_:
        emit_json(items)
    else:
        table("Tasks", ["id", "kind", "target", "state", "phase", "%", "created", "error"],
              (_task_row(t) for t in items))


@task_app.command("show")
def task_show(task_id: str, json_: JsonOpt = False) -> None:
    """Show one task."""
    with context.client() as c:
        t = c.get_task(task_id)
    if json_:
        emit_json(t)
    else:
        fields(f"Task {task_id}", t)


@task_app.command("watch")
def task_watch(task_id: str, json_: JsonOpt = False) -> None:
    """Follow a task with a progress bar until it ends."""
    with context.client() as c:
        t = wait_with_progress(c, c.get_task(task_id), quiet=json_)
    if json_:
        emit_json(t)
    else:
        typer.echo(f"Task {task_id}: {t['state']}")


@task_app.command("cancel")
def task_cancel(task_id: str, json_: JsonOpt = False) -> None:
    """Cancel a queued or running task."""
    with context.client() as c:
        t = c.cancel_task(task_id)
    if json_:
        emit_json(t)
    else:
        typer.echo(f"Task {task_id}: {t['state']}")


@event_app.command("list")
def event_list(
    limit: Limit = 30,
    target: Annotated[str | None, typer.Option(help="Only events about this object.")] = None,
    since: Since = None,
    after: After = None,
    before: Before = None,
    json_: JsonOpt = False,
) -> None:
    """List recent events (fetched page by page)."""
    with context.client() as c:
        items = c.list_events(limit or None, target, since=since, after=after, before=before)
    if json_:
        emit_json(items)
    else:
        table("Events", ["id", "time", "severity", "kind", "target", "message"],
              ([e.get(k) for k in ("id", "time", "severity", "kind", "target", "message")] for e in items))
