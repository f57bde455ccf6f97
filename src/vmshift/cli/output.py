"""Rendering for the CLI: JSON, tables, errors and task progress."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from vmshift.client import VmshiftClient
from vmshift.errors import VmshiftError
from vmshift.model.enums import TaskState

# emoji codes off: a fingerprint like SHA256:..:CD:.. must print as it is, not as ":cd:" (a CD emoji)
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c)
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    console.print(t)


def fields(title: str, data: dict[str, Any]) -> None:
    t = Table(title=title, title_justify="left", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    for k, v in data.items():
        if isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
        t.add_row(k, "" if v is None else str(v))
    console.print(t)


def show_error(exc: VmshiftError) -> None:
    err_console.print(f"[bold red]Error:[/] {exc.message}", highlight=False)
    if exc.hint:
        err_console.print(f"[yellow]Hint:[/] {exc.hint}", highlight=False)


def wait_with_progress(client: VmshiftClient, task: dict[str, Any], *, quiet: bool) -> dict[str, Any]:
    """Follow a task to its end, drawing a progress bar unless quiet; raise if it did not succeed."""
    if quiet:
        final = client.wait_task(task["id"])
    else:
        with Progress(
            TextColumn("[bold]{task.fields[kind]}[/] {task.fields[target]}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[phase]}"),
            TimeElapsedColumn(),
            console=err_console,
            transient=False,
        ) as progress:
            bar = progress.add_task(
                "task", total=100, kind=task["kind"], target=task.get("target") or "", phase=""
            )

            def update(t: dict[str, Any]) -> None:
                progress.update(bar, completed=t.get("percent") or 0, phase=t.get("phase") or t["state"])

            final = client.wait_task(task["id"], on_update=update)
    state = TaskState(final["state"])
    if state is not TaskState.SUCCESS:
        err = final.get("error") or {}
        raise VmshiftError(
            f"Task {final['kind']} on {final.get('target')} ended {state.value}: "
            f"{err.get('message') or 'no reason given'}",
            hint=err.get("hint"),
        )
    return final
