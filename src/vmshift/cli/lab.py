"""`vmshift lab ...`: a local lab of network-namespace hosts with a server and agents."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.table import Table

from vmshift.cli.output import console, emit_json, err_console, show_error
from vmshift.errors import VmshiftError
from vmshift.lab.context import lab_name

lab_app = typer.Typer(help="A local lab: network namespaces as hosts, one server, one agent per host.")

NameOpt = Annotated[str, typer.Option("--name", help="Lab name.")]
CtxNameOpt = Annotated[
    str | None,
    typer.Option("--name", help="Lab name; default: the lab of the CLI context (the last 'lab up')."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@contextmanager
def _errors(as_json: bool) -> Iterator[None]:
    """Show a VmshiftError as one sentence (+ hint), or as a JSON error body, and exit 1."""
    try:
        yield
    except VmshiftError as e:
        if as_json:
            emit_json({"error": e.to_dict()})
        else:
            show_error(e)
        raise typer.Exit(1) from None


@lab_app.command("up")
def up_cmd(
    name: NameOpt = "lab",
    hosts: Annotated[int, typer.Option("--hosts", help="Number of hypervisor hosts.")] = 2,
    migration_link_rate: Annotated[
        str | None, typer.Option("--migration-link-rate", help="Shape migration links, e.g. 1gbit.")
    ] = None,
    iscsi: Annotated[
        bool, typer.Option("--iscsi", help="Add a storage box running tgtd and the datastore iscsi-1.")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Build the lab network, start a server and agents, register the hosts."""
    from vmshift.lab import lab

    with _errors(json_):
        if json_:
            rec = lab.up(name, hosts, migration_link_rate, iscsi=iscsi)
        else:
            with console.status("starting lab") as status:

                def step(msg: str) -> None:
                    console.print(f"[green]•[/] {msg}", highlight=False)
                    status.update(msg)

                rec = lab.up(name, hosts, migration_link_rate, progress=step, iscsi=iscsi)
        summary = {
            "name": rec.name,
            "index": rec.index,
            "server": rec.server_url,
            "ca_file": str(rec.ca_file),
            "hosts": [rec.layout.agent_address(k) for k in rec.layout.host_numbers],
            "client_namespace": rec.layout.client_ns,
            "vm_network": rec.layout.vm_cidr,
        }
        if rec.iscsi:
            summary["storage_namespace"] = rec.layout.storage_ns
            summary["iscsi_portal"] = rec.layout.iscsi_portal
        if json_:
            emit_json(summary)
        else:
            console.print(f"Lab [bold]{rec.name}[/] is up: server {rec.server_url}, {rec.hosts} hosts.")
            console.print(f"The vmshift CLI now talks to it; for other shells: vmshift lab env --name {name}")


@lab_app.command("down")
def down_cmd(name: CtxNameOpt = None, json_: JsonOpt = False) -> None:
    """Stop every process of the lab and delete its namespaces, links and state."""
    from vmshift.lab import lab

    with _errors(json_):
        name = lab_name(name)
        problems = lab.down(name)
        if json_:
            emit_json({"name": name, "problems": problems})
        elif problems:
            for p in problems:
                err_console.print(f"[yellow]Left over:[/] {p}", highlight=False)
        else:
            console.print(f"Lab [bold]{name}[/] is down.")
        if problems:
            raise typer.Exit(1)


@lab_app.command("env")
def env_cmd(name: CtxNameOpt = None, json_: JsonOpt = False) -> None:
    """Print `export` lines that point the CLI at this lab (eval "$(vmshift lab env)")."""
    from vmshift.lab import lab

    with _errors(json_):
        name = lab_name(name)
        if json_:
            rec = lab.get(name)
            emit_json({"VMSHIFT_SERVER": rec.server_url, "VMSHIFT_TOKEN": rec.token,
                       "VMSHIFT_CA_FILE": str(rec.ca_file)})
        else:
            sys.stdout.write(lab.env(name))


@lab_app.command("list")
def list_cmd(json_: JsonOpt = False) -> None:
    """List the labs on this machine."""
    from vmshift.lab import lab, topology

    with _errors(json_):
        rows = [
            {
                "name": r.name,
                "index": r.index,
                "state": r.state,
                "hosts": r.hosts,
                "server": r.server_url,
                "namespaces": len(topology.existing_namespaces(r.layout)),
                "migration_link_rate": r.migration_link_rate,
            }
            for r in lab.labs()
        ]
        if json_:
            emit_json(rows)
            return
        t = Table(title="Labs", title_justify="left")
        for col in ("name", "index", "state", "hosts", "server", "namespaces", "migration link"):
            t.add_column(col)
        for row in rows:
            t.add_row(*("" if v is None else str(v) for v in row.values()))
        console.print(t)


def _run_probe(json_: bool, fn: Callable[[], dict[str, Any]], ok: Callable[[dict[str, Any]], bool]) -> None:
    with _errors(json_):
        result = fn()
    if json_:
        emit_json(result)
    else:
        for k, v in result.items():
            console.print(f"[bold]{k}[/]: {json.dumps(v)}", highlight=False)
    if not ok(result):
        raise typer.Exit(1)


@lab_app.command("check")
def check_cmd(
    vm: str,
    name: CtxNameOpt = None,
    wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for a booting guest.")] = 60.0,
    json_: JsonOpt = False,
) -> None:
    """Echo over TCP and read the guest's memtest/disklog status, from the lab's client namespace."""
    from vmshift.lab import lab

    _run_probe(
        json_, lambda: lab.check(lab_name(name), vm, wait), lambda r: bool(r.get("echo")) and "error" not in r
    )


@lab_app.command("probe")
def probe_cmd(
    vm: str,
    name: CtxNameOpt = None,
    seconds: Annotated[float, typer.Option("--seconds", help="How long to probe.")] = 5.0,
    json_: JsonOpt = False,
) -> None:
    """1 ms UDP echo probe from the client namespace: sent, lost, longest gap between replies."""
    from vmshift.lab import lab

    _run_probe(json_, lambda: lab.probe(lab_name(name), vm, seconds), lambda r: int(r.get("received", 0)) > 0)


@lab_app.command("vmotion-demo")
def vmotion_demo_cmd(vm: str, name: CtxNameOpt = None, json_: JsonOpt = False) -> None:
    """Migrate VM to another host and back while TCP and 1 ms UDP probes run; print what it felt."""
    from vmshift.lab import showcase

    def progress(msg: str) -> None:
        if not json_:
            err_console.print(f"[dim]vmotion:[/] {msg}", highlight=False)

    with _errors(json_):
        rows = showcase.round_trip(lab_name(name), vm, progress)
    if json_:
        emit_json(rows)
        return
    table = Table(title=f"vMotion of {vm}, measured from the client namespace", title_justify="left")
    for col in ("leg", "total ms", "downtime ms", "predicted total / downtime ms", "rounds",
                "longest UDP gap ms", "UDP lost", "TCP kept", "memtest mismatches"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            f"{r['source']} -> {r['target']}", str(r["total_ms"]), str(r["downtime_ms"]),
            f"{r['predicted_total_ms']} / {r['predicted_downtime_ms']}", str(r["rounds"]),
            str(r["udp_max_gap_ms"]), str(r["udp_lost"]), "yes" if r["tcp_kept"] else "NO",
            str(r["memtest_mismatches"]),
        )
    console.print(table)
    if any(not r["tcp_kept"] or r["memtest_mismatches"] for r in rows):
        raise typer.Exit(1)
