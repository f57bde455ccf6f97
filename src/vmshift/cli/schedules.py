"""`vmshift schedule add|list|show|delete`: scheduled migrations (docs/schedules.md).

``schedule add (--at TIME | --cron EXPR) -- vm migrate VM [options]``: the words after ``--`` are
parsed by ``vmshift vm migrate``'s own option definitions (cli/migrate.py), so a scheduled migration
takes exactly the options an immediate one does; the server stores the resulting migrate request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from enum import Enum
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import typer
from typer.exceptions import TyperException

from vmshift.cli import context
from vmshift.cli.hosts import JsonOpt
from vmshift.cli.migrate import parse_rate, vm_migrate
from vmshift.cli.output import emit_json, fields, table
from vmshift.errors import InvalidInputError
from vmshift.model.migration import MigrationCreate
from vmshift.model.schedule_times import parse_at

schedule_app = typer.Typer(
    help="Scheduled migrations: once at a time, or by a cron expression.", no_args_is_help=True
)

_EXAMPLE = "e.g. vmshift schedule add --at +10m -- vm migrate web-3 --host host-2"
# vm migrate's options that have no meaning in a schedule (the run always starts and never waits)
_NOT_SCHEDULABLE = {
    "check_only": "--check-only",
    "dry_run": "--dry-run",
    "no_wait": "--no-wait",
}
# vm migrate's parameter -> MigrationCreate field, where the names differ
_RENAMED = {"max_downtime": "max_downtime_ms", "postcopy_after": "postcopy_after_s"}

_migrate_app = typer.Typer()
_migrate_app.command(name="migrate")(vm_migrate)
_MIGRATE = typer.main.get_command(_migrate_app)  # `vm migrate` itself: its options, types and checks


@dataclass(frozen=True)
class MigrateWords:
    vm: str
    body: MigrationCreate
    json: bool  # `--json` written after the migrate command: it is schedule add's own


def migrate_request(words: list[str]) -> MigrateWords:
    """``vm migrate VM [options]`` as the VM's name and the migrate request it would send."""
    if words[:2] != ["vm", "migrate"]:
        got = " ".join(words[:2]) or "nothing"
        raise InvalidInputError(
            f"A schedule runs 'vm migrate', but the command after -- is {got!r}.",
            hint=f"Write it {_EXAMPLE}.",
        )
    try:
        ctx = _MIGRATE.make_context("vmshift vm migrate", list(words[2:]))
    except TyperException as e:  # Typer's own Click: a usage error (no such option, bad value, missing VM)
        raise InvalidInputError(
            f"The migrate command after -- is not valid: {e.format_message().rstrip('.')}.",
            hint=f"It takes the options of 'vmshift vm migrate' ({_EXAMPLE}).",
        ) from None
    params: dict[str, Any] = dict(ctx.params)
    for param, option in _NOT_SCHEDULABLE.items():
        if params.pop(param, False):
            raise InvalidInputError(
                f"{option} has no meaning in a schedule.",
                hint="Use it in 'vm migrate' itself, to try it now.",
            )
    json_ = bool(params.pop("json_", False))
    vm = params.pop("name")
    body: dict[str, Any] = {}
    for param, value in params.items():
        if value is None:
            continue
        if param == "bandwidth_limit":
            body["bandwidth_limit_bps"] = parse_rate(value)
            continue
        target = _RENAMED.get(param, param)
        if target not in MigrationCreate.model_fields:
            raise InvalidInputError(
                f"Option --{param.replace('_', '-')} of vm migrate cannot be scheduled yet.",
                hint="Leave it out of the schedule, or run the migration by hand.",
            )
        body[target] = value.value if isinstance(value, Enum) else value
    return MigrateWords(str(vm), MigrationCreate.model_validate(body), json_)


def local_zone() -> tzinfo:
    """This machine's zone, with its daylight-saving rules: $TZ, else /etc/localtime, else today's offset."""
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ValueError, OSError):
            pass
    try:
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f)
    except (OSError, ValueError):
        return datetime.now().astimezone().tzinfo or UTC


def _stamp(value: str | None) -> str:
    if not value:
        return "-"
    return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _when(s: dict[str, Any]) -> str:
    return f"at {_stamp(s['at'])}" if s.get("at") else f"cron '{s['cron']}' ({s.get('timezone', 'UTC')})"


def _target(s: dict[str, Any]) -> str:
    m = s.get("migrate") or {}
    parts = [
        f"host {m['host']}" if m.get("host") else "",
        f"datastore {m['datastore']}" if m.get("datastore") else "",
    ]
    return ", ".join(p for p in parts if p)


def _run_cells(r: dict[str, Any] | None) -> list[Any]:
    if r is None:
        return ["-", "-"]
    mid = r.get("migration_id")
    return [r["outcome"], f"{mid} ({r.get('migration_status') or '?'})" if mid is not None else "-"]


@schedule_app.command("add", context_settings={"allow_interspersed_args": False})
def schedule_add(
    command: Annotated[
        list[str],
        typer.Argument(
            help="After --: vm migrate VM and any options of 'vmshift vm migrate'.", show_default=False
        ),
    ],
    at: Annotated[
        str | None,
        typer.Option(help="Once, at this time: ISO 8601 (local time if it names no zone) or +10m, +2h, +1d."),
    ] = None,
    cron: Annotated[
        str | None, typer.Option(help="Repeat at the times of a cron expression, e.g. '0 2 * * *'.")
    ] = None,
    tz: Annotated[str, typer.Option("--tz", help="IANA zone the cron expression is read in.")] = "UTC",
    name: Annotated[str | None, typer.Option(help="Unique name (default: VM-ID).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Schedule a migration: schedule add (--at TIME | --cron EXPR) -- vm migrate VM --host H ..."""
    if (at is None) == (cron is None):
        raise InvalidInputError(
            "Give exactly one of --at (once) and --cron (repeating).", hint=f"{_EXAMPLE}."
        )
    words = migrate_request(command)
    json_ = json_ or words.json
    when = parse_at(at, datetime.now(UTC), local_zone()).isoformat() if at is not None else None
    with context.client() as c:
        s = c.add_schedule(
            words.vm,
            words.body.model_dump(mode="json", exclude_defaults=True),
            at=when,
            cron=cron,
            timezone=tz,
            name=name,
        )
    if json_:
        emit_json(s)
        return
    typer.echo(
        f"Schedule {s['name']}: migrate VM {s['vm']} to {_target(s)} {_when(s)}; "
        f"next run {_stamp(s.get('next_due_at'))}."
    )


@schedule_app.command("list")
def schedule_list(
    vm: Annotated[str | None, typer.Option(help="Only schedules of this VM.")] = None, json_: JsonOpt = False
) -> None:
    """List schedules with their next run and the outcome of their latest run."""
    with context.client() as c:
        items = c.list_schedules(vm)
    if json_:
        emit_json(items)
        return
    table(
        "Schedules",
        ["name", "vm", "to", "when", "next run", "last run", "migration"],
        (
            [s["name"], s["vm"], _target(s), _when(s), _stamp(s.get("next_due_at")),
             *_run_cells((s.get("runs") or [None])[0])]
            for s in items
        ),
    )  # fmt: skip


@schedule_app.command("show")
def schedule_show(name: str, json_: JsonOpt = False) -> None:
    """One schedule and its runs: each run's migration and its status, or why it was skipped."""
    with context.client() as c:
        s = c.get_schedule(name)
    if json_:
        emit_json(s)
        return
    migrate = {k: v for k, v in (s.get("migrate") or {}).items() if v not in (None, False)}
    fields(
        f"Schedule {s['name']}",
        {"vm": s["vm"], "when": _when(s), "next run": _stamp(s.get("next_due_at")), "migrate": migrate,
         "created": _stamp(s.get("created_at"))},
    )  # fmt: skip
    table(
        "Runs (newest first)",
        ["due", "outcome", "migration", "task", "message"],
        (
            [_stamp(r["due_at"]), *_run_cells(r), r.get("task_id"), r.get("message")]
            for r in s.get("runs") or []
        ),
    )


@schedule_app.command("delete")
def schedule_delete(name: str, json_: JsonOpt = False) -> None:
    """Delete a schedule (a migration it started goes on)."""
    with context.client() as c:
        s = c.delete_schedule(name)
    if json_:
        emit_json(s)
    else:
        typer.echo(f"Schedule {s['name']} deleted.")


__all__ = ["MigrateWords", "local_zone", "migrate_request", "schedule_app"]
