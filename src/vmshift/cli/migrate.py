"""`vmshift vm migrate ...` (live migration) and `vmshift migration list|show`."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from vmshift.cli import context
from vmshift.cli.hosts import JsonOpt
from vmshift.cli.output import console, emit_json, err_console, table
from vmshift.client import VmshiftClient
from vmshift.errors import InvalidInputError, VmshiftError
from vmshift.model.enums import DiskFormat, MigrationEncryption, MigrationKind, TaskState

migration_app = typer.Typer(
    help="Live migrations (vMotion): records, metrics, predictions.", no_args_is_help=True
)

_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(bit|bps|b/s|b|ib/s|ib)?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
POLL_S = 0.3


def parse_rate(text: str) -> float:
    """A link rate in bytes per second: '1gbit' / '100mbit' (bits), '50MB/s' / '50M' (bytes), '125000000'."""
    m = _RATE.match(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise InvalidInputError(
            f"Bandwidth {text!r} is not valid.",
            hint="Use e.g. 1gbit, 300mbit, 50MB/s or a byte count per second.",
        )
    value, prefix, unit = float(m.group(1)), m.group(2).lower(), (m.group(3) or "").lower()
    if unit.startswith("i"):
        scaled = value * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[prefix]
    else:
        scaled = value * _UNITS[prefix]
    return scaled / 8 if unit in ("bit", "bps") else scaled


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_rate(bps: float | None) -> str:
    return "-" if not bps else f"{bps / 2**20:.1f} MiB/s ({bps * 8 / 1e6:.0f} Mbit/s)"


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v} ms"


def show_report(report: dict[str, Any]) -> bool:
    """Print a check report as a table; True if it has no error."""
    rows = [[r["check"], r["severity"], r["message"], r.get("hint")] for r in report.get("results", [])]
    table("Pre-migration checks", ["check", "result", "message", "hint"], rows)
    return not any(r["severity"] == "error" for r in report.get("results", []))


def show_prediction(preview: dict[str, Any]) -> None:
    p = preview["prediction"]
    rows = [
        ["memory", human_bytes(p["memory_bytes"])],
        ["dirty rate", human_rate(p["dirty_rate_bps"])],
        ["bandwidth", human_rate(p["bandwidth_bps"])],
        ["downtime limit", _ms(p["downtime_limit_ms"])],
        ["predicted total", _ms(p["total_ms"])],
        ["predicted downtime", _ms(p["downtime_ms"])],
        ["rounds", p["rounds"]],
        ["converges unaided", p["converges_unaided"]],
        ["expected throttle", f"{p['throttle_percent']} %"],
        ["bytes to send", human_bytes(p["bytes_sent"])],
    ]
    table("Prediction (nothing was started)", ["", "value"], rows)


def _what(kind: str | None) -> str:
    return "Migration" if kind in (None, MigrationKind.LIVE.value) else f"{str(kind).capitalize()} move"


def _where(m: dict[str, Any], side: str) -> str:
    host, ds = m[f"{side}_host"], m.get(f"{side}_datastore")
    return f"{host}/{ds}" if ds else host


def show_disk_plan(preview: dict[str, Any]) -> None:
    spec = preview["target_spec"]
    rows = [["kind", preview["kind"]], ["target", f"{preview['target_host']}/{preview['target_datastore']}"]]
    for d in spec["disks"]:
        rows.append([f"disk {d['file']}", f"{d['datastore']} · {d['format']} · {d['size_mib']} MiB"])
    table("Plan (nothing was started)", ["", "value"], rows)


def show_disk_move(m: dict[str, Any]) -> None:
    met, live = m.get("metrics") or {}, m.get("progress") or {}
    rows: list[list[Any]] = [
        ["total", _ms(met.get("total_ms"))],
        ["copied", human_bytes(met.get("bytes_sent") or live.get("transferred_bytes"))],
        ["mean rate", human_rate(met.get("mean_throughput_bps"))],
        ["pivot (guest I/O paused at most)", _ms(met.get("downtime_ms"))],
        ["copies identical (qemu-img compare)", met.get("copies_identical")],
    ]
    table("Copy", ["", "value"], rows)


def _encrypted(m: dict[str, Any]) -> str:
    """The memory stream's TLS as the migration JSON's ``encrypted`` says, with the setting asked."""
    setting = (m.get("settings") or {}).get("encryption", MigrationEncryption.OPPORTUNISTIC.value)
    if m.get("kind", "live") not in (MigrationKind.LIVE.value, MigrationKind.RELOCATE.value):
        return "no memory stream (disk move)"
    if m.get("encrypted") is None:
        return f"not decided yet ({setting})"
    return f"{'yes (TLS)' if m['encrypted'] else 'no (plain)'}, setting {setting}"


def show_migration(m: dict[str, Any]) -> None:
    """Metrics, predicted vs actual, policy actions."""
    met, pred = m.get("metrics") or {}, m.get("prediction") or {}
    err = (m.get("error") or {}).get("message")
    head = [
        ["migration", m["id"]],
        ["kind", m.get("kind", "live")],
        ["vm", m["vm"]],
        ["from → to", f"{_where(m, 'source')} → {_where(m, 'target')}"],
        ["status", m["status"]],
        ["phase", m["phase"]],
        ["encrypted", _encrypted(m)],
        ["task", m.get("task_id")],
        ["created", m.get("created_at")],
        ["finished", m.get("finished_at")],
        ["error", err],
    ]
    table(f"{_what(m.get('kind'))} {m['id']}", ["", "value"], head)
    if m.get("kind", "live") != MigrationKind.LIVE.value:
        show_disk_move(m)
        return
    rows: list[list[Any]] = [
        ["total", _ms(met.get("total_ms")), _ms(pred.get("total_ms"))],
        ["downtime", _ms(met.get("downtime_ms")), _ms(pred.get("downtime_ms"))],
        ["setup", _ms(met.get("setup_ms")), ""],
        ["bytes sent", human_bytes(met.get("bytes_sent")), human_bytes(pred.get("bytes_sent"))],
        ["rounds", met.get("rounds"), pred.get("rounds")],
        ["zero / normal pages", f"{met.get('zero_pages', 0)} / {met.get('normal_pages', 0)}", ""],
        [
            "throughput mean / peak",
            f"{human_rate(met.get('mean_throughput_bps'))} / {human_rate(met.get('peak_throughput_bps'))}",
            human_rate(pred.get("bandwidth_bps")),
        ],
        [
            "dirty rate mean / peak",
            f"{human_rate(met.get('mean_dirty_rate_bps'))} / {human_rate(met.get('peak_dirty_rate_bps'))}",
            human_rate(pred.get("dirty_rate_bps")),
        ],
        ["max throttle", f"{met.get('max_throttle_percent', 0)} %", f"{pred.get('throttle_percent', 0)} %"],
        ["post-copy", met.get("postcopy", False), ""],
    ]
    table("Actual vs predicted", ["metric", "actual", "predicted"], rows)
    show_timeline(m)
    actions = m.get("actions") or []
    if actions:
        table(
            "Policy actions",
            ["t (s)", "action", "value", "round", "reason"],
            (
                [f"{a['time_s']:.2f}", a["kind"], a.get("value"), a["sample"]["round"], a["reason"]]
                for a in actions
            ),
        )


TIMELINE_LABELS = {
    "source_stopped": "source vCPUs stopped",
    "last_byte_sent": "last byte sent (source completed)",
    "confirm_sent": "source asked the target to run",
    "target_loaded": "target loaded the stream",
    "first_announce": "target's first RARP (QEMU)",
    "target_cont": "target vCPUs running",
}


def show_timeline(m: dict[str, Any]) -> None:
    """The switchover as milliseconds after the source stopped (docs/migration.md)."""
    marks = m.get("timeline") or {}
    origin = marks.get("source_stopped")
    if origin is None:
        return
    ordered = sorted(marks.items(), key=lambda kv: kv[1])
    table(
        "Switchover timeline",
        ["event", "ms after the source stopped"],
        ([TIMELINE_LABELS.get(k, k), f"{(v - origin) * 1000:.1f}"] for k, v in ordered),
    )


def _bar_fields(m: dict[str, Any], task: dict[str, Any]) -> dict[str, str]:
    live = m.get("progress") or {}
    phase = task.get("phase") or m["phase"]
    if not live:
        return {"phase": phase, "detail": ""}
    if m.get("kind", "live") != MigrationKind.LIVE.value:
        eta = live.get("eta_s")
        detail = (f"{human_bytes(live.get('transferred_bytes'))} of {human_bytes(live.get('total_bytes'))} · "
                  f"{human_rate(live.get('throughput_bps'))}")
        if eta is not None:
            detail += f" · ETA {eta:.0f} s"
        return {"phase": phase, "detail": detail}
    detail = (
        f"left {human_bytes(live.get('remaining_bytes'))} · "
        f"{human_rate(live.get('throughput_bps'))} · dirty {human_rate(live.get('dirty_rate_bps'))}"
    )
    if live.get("throttle_percent"):
        detail += f" · throttle {live['throttle_percent']} %"
    return {"phase": phase, "detail": detail}


def wait_migration(
    c: VmshiftClient, task: dict[str, Any], migration_id: int, *, quiet: bool
) -> dict[str, Any]:
    """Follow a migration to its end (with a live bar unless quiet); return the migration record."""

    def poll() -> tuple[dict[str, Any], dict[str, Any]]:
        return c.get_task(task["id"]), c.get_migration(migration_id)

    if quiet:
        while True:
            t, m = poll()
            if TaskState(t["state"]).finished:
                return c.get_migration(migration_id)
            time.sleep(POLL_S)
    with Progress(
        TextColumn("[bold]{task.fields[vm]}[/] {task.fields[phase]}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=err_console,
    ) as progress:
        bar = progress.add_task("migrate", total=100, vm=task.get("target") or "", phase="", detail="")
        while True:
            t, m = poll()
            f = _bar_fields(m, t)
            progress.update(bar, completed=t.get("percent") or 0, phase=f["phase"], detail=f["detail"])
            if TaskState(t["state"]).finished:
                return c.get_migration(migration_id)
            time.sleep(POLL_S)


def vm_migrate(
    name: str,
    host: Annotated[str | None, typer.Option(help="Target host (default: stay on the VM's host).")] = None,
    datastore: Annotated[
        str | None, typer.Option(help="Target datastore for all the VM's files (default: keep them).")
    ] = None,
    disk_format: Annotated[
        DiskFormat | None, typer.Option(help="Format of the copied disks (default: keep each disk's).")
    ] = None,
    check_only: Annotated[
        bool, typer.Option("--check-only", help="Run the checks, print them, stop.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Checks and prediction only; start nothing.")
    ] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return the task at once.")] = False,
    max_downtime: Annotated[
        int | None, typer.Option(help="Downtime budget in ms (default: the VM's).")
    ] = None,
    allow_postcopy: Annotated[
        bool | None,
        typer.Option("--allow-postcopy/--no-postcopy", help="Allow post-copy (default: the VM's)."),
    ] = None,
    postcopy_after: Annotated[
        float | None,
        typer.Option(min=0.1, help="With post-copy allowed: switch to it after this many seconds."),
    ] = None,
    bandwidth_limit: Annotated[
        str | None, typer.Option(help="Cap the migration's bandwidth, e.g. 1gbit or 100MB/s.")
    ] = None,
    encryption: Annotated[
        MigrationEncryption | None,
        typer.Option(help="Encrypt the memory stream: disabled, opportunistic or required "
                          "(default: the VM's)."),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Move a VM: to another host (--host), its files to another datastore (--datastore), or both.

    A running VM moves live (vMotion, or Storage vMotion for --datastore alone); a powered-off or
    suspended VM moves cold, its files copied and verified."""
    if host is None and datastore is None:
        raise InvalidInputError("Nothing to move: no target was named.",
                                hint="Give --host HOST, --datastore DATASTORE, or both.")
    limit = parse_rate(bandwidth_limit) if bandwidth_limit else None
    with context.client() as c:
        answer = c.migrate_vm(
            name,
            host,
            datastore=datastore,
            disk_format=disk_format.value if disk_format else None,
            check_only=check_only,
            dry_run=dry_run and not check_only,
            max_downtime_ms=max_downtime,
            allow_postcopy=allow_postcopy,
            postcopy_after_s=postcopy_after,
            bandwidth_limit_bps=limit,
            encryption=encryption.value if encryption else None,
        )
        if check_only:
            ok = not any(r["severity"] == "error" for r in answer.get("results", []))
            if json_:
                emit_json(answer)
            else:
                show_report(answer)
            raise typer.Exit(0 if ok else 1)
        if dry_run:
            if json_:
                emit_json(answer)
            else:
                show_report(answer["checks"])
                if "prediction" in answer:
                    show_prediction(answer)
                else:
                    show_disk_plan(answer)
            return
        mid = answer["migration_id"]
        if no_wait:
            if json_:
                emit_json(answer)
            else:
                typer.echo(
                    f"{_what(answer.get('migration_kind'))} {mid} started as task {answer['id']}; "
                    "follow it with "
                    f"'vmshift task watch {answer['id']}' or 'vmshift migration show {mid}'."
                )
            return
        final = wait_migration(c, answer, mid, quiet=json_)
    if json_:
        emit_json(final)
    else:
        show_migration(final)
    if final["status"] != "completed":
        err = final.get("error") or {}
        raise VmshiftError(
            f"{_what(final.get('kind'))} {mid} of {name} ended {final['status']}: "
            f"{err.get('message') or 'no reason given'}",
            hint=err.get("hint"),
        )


@migration_app.command("list")
def migration_list(
    limit: Annotated[int, typer.Option(help="How many, newest first (0: all that match).")] = 20,
    vm: Annotated[str | None, typer.Option(help="Only migrations of this VM.")] = None,
    json_: JsonOpt = False,
) -> None:
    """List migrations with their outcome and prediction."""
    with context.client() as c:
        items = c.list_migrations(limit or None, vm)
    if json_:
        emit_json(items)
        return
    table(
        "Migrations",
        [
            "id",
            "kind",
            "vm",
            "from",
            "to",
            "status",
            "phase",
            "total",
            "downtime",
            "pred. total",
            "pred. downtime",
            "rounds",
            "sent",
        ],
        (
            [
                m["id"],
                m.get("kind", "live"),
                m["vm"],
                _where(m, "source"),
                _where(m, "target"),
                m["status"],
                m["phase"],
                _ms(m["total_ms"]),
                _ms(m["downtime_ms"]),
                _ms(m["predicted_total_ms"]),
                _ms(m["predicted_downtime_ms"]),
                m["rounds"],
                human_bytes(m["bytes_sent"]),
            ]
            for m in items
        ),
    )


@migration_app.command("finalize")
def migration_finalize(migration_id: int, json_: JsonOpt = False) -> None:
    """Finish a migration that left the VM paused on both hosts (status needs_finalize).

    The target's own QEMU decides: if it holds the whole VM, the VM runs there and the source copy
    stops; if it never got all of it, the source resumes. Nothing is guessed."""
    from vmshift.cli.output import wait_with_progress

    with context.client() as c:
        task = c.finalize_migration(migration_id)
        wait_with_progress(c, task, quiet=json_)
        m = c.get_migration(migration_id)
    if json_:
        emit_json(m)
        return
    typer.echo(f"Migration {migration_id}: {m['status']}; VM {m['vm']} runs on "
               f"{m['target_host'] if m['status'] == 'completed' else m['source_host']}.")


@migration_app.command("show")
def migration_show(migration_id: int, json_: JsonOpt = False) -> None:
    """One migration: metrics, predicted vs actual, policy actions, checks."""
    with context.client() as c:
        m = c.get_migration(migration_id)
    if json_:
        emit_json(m)
        return
    show_migration(m)
    if m.get("checks"):
        show_report(m["checks"])


__all__ = ["console", "migration_app", "parse_rate", "vm_migrate", "wait_migration"]
