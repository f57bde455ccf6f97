"""`vmshift drs ...`, `vmshift cluster set` and `vmshift vm set --drs` (docs/drs.md)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from vmshift.cli import context
from vmshift.cli.hosts import JsonOpt
from vmshift.cli.output import console, emit_json, fields, table, wait_with_progress
from vmshift.errors import InvalidInputError
from vmshift.placement.recommendation import RecommendationState
from vmshift.placement.snapshot import DrsAutomation, VmDrs

drs_app = typer.Typer(help="DRS: balance the cluster's hosts (docs/drs.md).", no_args_is_help=True)
cluster_app = typer.Typer(help="Clusters of hosts.", no_args_is_help=True)


def _moves(title: str, recs: list[dict[str, Any]]) -> None:
    table(title, ["id", "vm", "from", "to", "reason", "benefit", "cost", "time", "downtime", "state", "why"],
          [(r.get("id", ""), r["vm"], r["source_host"], r["target_host"], r["reason"], f"{r['benefit']:.4g}",
            f"{r['cost']:.4g}", f"{r['predicted_s']:.1f} s", f"{r['downtime_ms']} ms", r.get("state", ""),
            r["why"]) for r in recs])


@cluster_app.command("set")
def cluster_set(
    cluster: str,
    drs: Annotated[DrsAutomation | None, typer.Option(
        "--drs", help="manual: list moves; partially: place new VMs, list moves; fully: make them.")] = None,
    threshold: Annotated[int | None, typer.Option(
        "--drs-threshold", min=1, max=5, help="1 = only moves that mend must rules .. 5 = balance the most.")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Set a cluster's DRS automation level and migration threshold (no option: show them)."""
    with context.client() as c:
        if drs is None and threshold is None:
            got = c.get_cluster_drs(cluster)
        else:
            got = c.set_cluster_drs(cluster, automation=drs.value if drs else None, threshold=threshold)
    if json_:
        emit_json(got)
    else:
        fields(f"DRS of cluster {cluster}", got)


def vm_set(
    vm: str,
    drs: Annotated[VmDrs, typer.Option(
        "--drs", help="cluster: as the cluster; disabled: never moved by DRS; manual, fully: for it alone.")],
    json_: JsonOpt = False,
) -> None:
    """Set a VM's own DRS setting."""
    with context.client() as c:
        got = c.set_vm_drs(vm, drs.value)
    if json_:
        emit_json(got)
    else:
        fields(f"DRS of VM {vm}", got)


@drs_app.command("run")
def drs_run(
    cluster: str,
    json_: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """One DRS pass over CLUSTER now: what it recommended or applied, or why it made no move."""
    with context.client() as c:
        task = c.run_drs(cluster)
        final = wait_with_progress(c, task, quiet=quiet or json_)
    result: dict[str, Any] = final.get("result") or {}
    if json_:
        emit_json(result)
        return
    recs = result.get("recommendations", [])
    console.print(f"DRS pass of cluster [bold]{cluster}[/] ({result.get('automation')}, threshold "
                  f"{result.get('threshold')}): imbalance {result.get('imbalance_before', 0):.3f} -> "
                  f"{result.get('imbalance_after', 0):.3f} (tolerance {result.get('tolerance', 0):g}).",
                  highlight=False)
    if recs:
        applied = set(result.get("applied", []))
        _moves("Moves", [r | {"state": "applied" if r["id"] in applied else r["state"]} for r in recs])
    else:
        console.print("No move.")
    for note in result.get("notes", []):
        console.print(f"  {note}", highlight=False)


@drs_app.command("recommendations")
def drs_recommendations(
    cluster: Annotated[str | None, typer.Argument(help="Only this cluster's.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Applied, dismissed and expired ones too.")] = False,
    json_: JsonOpt = False,
) -> None:
    """The DRS recommendations waiting for 'drs apply ID' or 'drs dismiss ID'."""
    states = [s.value for s in RecommendationState] if all_ else None
    with context.client() as c:
        recs = c.drs_recommendations(cluster, states)
    if json_:
        emit_json(recs)
    elif not recs:
        console.print("No pending recommendations." if not all_ else "No recommendations.")
    else:
        _moves("DRS recommendations", recs)


@drs_app.command("apply")
def drs_apply(rid: int, json_: JsonOpt = False) -> None:
    """Start recommendation ID's move as a migration (follow it with 'vmshift task wait')."""
    with context.client() as c:
        got = c.apply_recommendation(rid)
    if json_:
        emit_json(got)
    else:
        console.print(f"Recommendation {rid}: migration {got.get('migration_id')} of VM {got['vm']} to "
                      f"{got['target_host']} started (task {got.get('task_id')}).", highlight=False)


@drs_app.command("dismiss")
def drs_dismiss(rid: int, json_: JsonOpt = False) -> None:
    """Dismiss recommendation ID (a later pass may recommend the move again)."""
    with context.client() as c:
        got = c.dismiss_recommendation(rid)
    if json_:
        emit_json(got)
    else:
        console.print(f"Recommendation {rid} dismissed.")


@drs_app.command("simulate")
def drs_simulate(
    cluster: str,
    remove_host: Annotated[str | None, typer.Option(help="What DRS would do without this host.")] = None,
    add_vm: Annotated[str | None, typer.Option(
        help="What DRS would do with this VM added: NAME:CPUS:MEMORY_MIB[:CORES_BUSY].")] = None,
    json_: JsonOpt = False,
) -> None:
    """What DRS would do after a change (nothing is moved or stored)."""
    if (remove_host is None) == (add_vm is None):
        raise InvalidInputError("Give exactly one of --remove-host and --add-vm.",
                                hint="e.g. 'vmshift drs simulate CLUSTER --remove-host host-1'.")
    with context.client() as c:
        got = c.simulate_drs(cluster, remove_host=remove_host, add_vm=add_vm)
    if json_:
        emit_json(got)
        return
    if got.get("refused"):
        console.print(f"Refused: {got['refused']}", highlight=False)
        raise typer.Exit(1)
    for vm, host in got.get("placed", {}).items():
        console.print(f"{vm} -> {host}", highlight=False)
    if got.get("recommendations"):
        _moves("Then DRS would move", got["recommendations"])
    else:
        console.print("Then DRS would make no move.")
    for note in got.get("notes", []):
        console.print(f"  {note}", highlight=False)
