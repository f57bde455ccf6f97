"""`vmshift host|datastore|network ...`"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from vmshift.cli import context
from vmshift.cli.output import emit_json, fields, table, wait_with_progress
from vmshift.client.sdk import FingerprintUnconfirmedError
from vmshift.errors import CapacityError, InvalidInputError
from vmshift.model.enums import ConnectionState

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

host_app = typer.Typer(help="Hypervisor hosts (one vmshift-agent each).", no_args_is_help=True)
datastore_app = typer.Typer(help="Datastores seen by the hosts.", no_args_is_help=True)
network_app = typer.Typer(help="VM networks (label -> bridge on each host).", no_args_is_help=True)


def _host_row(h: dict[str, Any]) -> list[Any]:
    facts = h.get("facts") or {}
    return [
        h["name"],
        h.get("address"),
        h.get("cluster"),
        h.get("connection_state"),
        "yes" if h.get("maintenance") else "no",
        facts.get("accelerator"),
        facts.get("qemu_version"),
        f"{facts.get('memory_free_mib', '?')}/{facts.get('memory_total_mib', '?')}",
    ]


@host_app.command("list")
def host_list(
    cluster: Annotated[str | None, typer.Option(help="Only hosts of this cluster.")] = None,
    connection_state: Annotated[
        ConnectionState | None, typer.Option(help="Only hosts in this state.")
    ] = None,
    name_prefix: Annotated[str | None, typer.Option(help="Only hosts whose name starts with this.")] = None,
    json_: JsonOpt = False,
) -> None:
    """List hosts with connection state and capacity (all that match, fetched page by page)."""
    with context.client() as c:
        hosts = c.list_hosts(cluster=cluster, connection_state=connection_state, name_prefix=name_prefix)
    if json_:
        emit_json(hosts)
        return
    cols = ["name", "address", "cluster", "state", "maint.", "accel", "qemu", "mem free/total MiB"]
    table("Hosts", cols, (_host_row(h) for h in hosts))


@host_app.command("show")
def host_show(name: str, json_: JsonOpt = False) -> None:
    """Show one host and its facts."""
    with context.client() as c:
        h = c.get_host(name)
    if json_:
        emit_json(h)
        return
    facts = h.get("facts") or {}
    summary = {k: v for k, v in h.items() if k != "facts"}
    summary.update(
        {
            "cpu": f"{facts.get('cpu_vendor')} {facts.get('cpu_model')} x{facts.get('cpus')}",
            "accelerator": facts.get("accelerator"),
            "qemu": facts.get("qemu_version"),
            "machine types": len(facts.get("machine_types") or []),
            "runnable cpu models": sum(
                1 for m in facts.get("cpu_models") or [] if not m.get("unavailable_features")
            ),
            "datastores": ", ".join(d["name"] for d in facts.get("datastores") or []),
            "networks": ", ".join(f"{k}->{v}" for k, v in (facts.get("networks") or {}).items()),
            "migration address": facts.get("migration_address"),
        }
    )
    fields(f"Host {name}", summary)


@host_app.command("add")
def host_add(
    address: Annotated[str, typer.Argument(help="Agent address HOST:PORT, e.g. 10.213.0.11:8101")],
    cluster: Annotated[str | None, typer.Option(help="Cluster to join (default: the only one).")] = None,
    fingerprint: Annotated[str | None, typer.Option(
        help="The agent's certificate fingerprint, as 'vmshift-agent --config FILE fingerprint' prints "
        "it on the host; without it you confirm the one shown.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Add a host by the address of its agent, after confirming its certificate fingerprint; the
    server then issues the host its certificate from the cluster CA."""
    with context.client() as c:
        try:
            h = c.add_host(address, cluster, fingerprint)
        except FingerprintUnconfirmedError as exc:
            if fingerprint is not None or json_ or not sys.stdin.isatty():
                if fingerprint is None:
                    raise InvalidInputError(
                        f"The agent at {address} presents certificate {exc.fingerprint}: confirm it.",
                        hint=f"Compare it with 'vmshift-agent --config FILE fingerprint' on the host, "
                        f"then pass --fingerprint {exc.fingerprint}.") from None
                raise
            typer.echo(f"The agent at {address} presents a certificate with fingerprint\n  {exc.fingerprint}")
            typer.echo("Compare it with 'vmshift-agent --config FILE fingerprint' on that host.")
            if not typer.confirm("Is it the same?", default=False):
                raise InvalidInputError("The host was not added: its fingerprint was not confirmed.",
                                        hint="Add it again once you have checked the fingerprint.") from None
            h = c.add_host(address, cluster, exc.fingerprint)
    if json_:
        emit_json(h)
    else:
        table("Host added", ["name", "address", "cluster", "state"], [_host_row(h)[:4]])


@host_app.command("rotate-cert")
def host_rotate_cert(name: str, json_: JsonOpt = False) -> None:
    """Give a host a new key and certificate from the cluster CA; the old one is not served again."""
    with context.client() as c:
        h = c.rotate_host_cert(name)
    if json_:
        emit_json(h)
    else:
        fields(f"Host {name}: new certificate", {"fingerprint": h.get("cert_fingerprint"),
                                                  "valid until": h.get("cert_not_after")})


@host_app.command("remove")
def host_remove(name: str, json_: JsonOpt = False) -> None:
    """Remove a host from the inventory (refused while VMs are registered on it)."""
    with context.client() as c:
        c.remove_host(name)
    _said_removed(f"Host {name}", name, json_)


def _said_removed(what: str, name: str, json_: bool) -> None:
    """What a remove command prints once the server removed ``name``."""
    if json_:
        emit_json({"removed": name})
    else:
        typer.echo(f"{what} removed.")


maintenance_app = typer.Typer(help="Maintenance mode: evacuate a host, then keep VMs off it.",
                               no_args_is_help=True)
host_app.add_typer(maintenance_app, name="maintenance")


def _plan_table(plan: dict[str, Any]) -> None:
    moves = plan.get("moves") or []
    table(f"Evacuation of {plan['host']} (predicted {plan['predicted_total_s']:.1f} s in all)",
          ["vm", "target", "move", "predicted s", "downtime ms", "ends at s", "warning"],
          ([m["vm"], m["target"], "live" if m["live"] else "cold", f"{m['predicted_s']:.1f}",
            m["downtime_ms"], f"{m['ends_at_s']:.1f}", m.get("warning") or ""] for m in moves))
    if not moves:
        typer.echo(f"Host {plan['host']} runs no VM: it enters maintenance mode at once.")


@maintenance_app.command("enter")
def maintenance_enter(
    name: str,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan; move nothing.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Evacuate a host (live-migrate running VMs, cold-move the others), then put it in maintenance mode.
    Refused, with nothing moved, when the other hosts cannot take its VMs under the rules."""
    with context.client() as c:
        plan = c.maintenance_plan(name)
        if dry_run or plan.get("refused"):
            if json_:
                emit_json(plan)
            else:
                _plan_table(plan)
            if plan.get("refused"):
                raise CapacityError(plan["refused"], hint="Add room on the other hosts or change the rules, "
                                                          "then try again; nothing was moved.")
            return
        if not json_:
            _plan_table(plan)
        task = c.enter_maintenance(name)
        final = wait_with_progress(c, task, quiet=json_)
        h = c.get_host(name)
    if json_:
        emit_json({"plan": plan, "task": final, "host": h})
        return
    for w in (final.get("result") or {}).get("warnings") or []:
        typer.echo(f"Warning: {w}")
    typer.echo(f"Host {name} is in maintenance mode "
               f"({len((final.get('result') or {}).get('moved') or [])} VM(s) moved away).")


@maintenance_app.command("exit")
def maintenance_exit(
    name: str,
    return_vms: Annotated[bool, typer.Option(
        "--return", help="Move back the VMs its last evacuation moved away.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Take a host out of maintenance mode (with --return, its VMs come back)."""
    with context.client() as c:
        task = c.exit_maintenance(name, return_vms=return_vms)
        final = wait_with_progress(c, task, quiet=json_)
    if json_:
        emit_json(final)
        return
    moved = (final.get("result") or {}).get("moved") or []
    back = f"; {len(moved)} VM(s) moved back" if return_vms else ""
    typer.echo(f"Host {name} left maintenance mode{back}.")


@datastore_app.command("add")
def datastore_add(
    name: Annotated[str, typer.Argument(help="The datastore's name, e.g. iscsi-2.")],
    iscsi: Annotated[str, typer.Option("--iscsi", help="The target's portal, ADDRESS:PORT.")],
    target: Annotated[str, typer.Option(help="The target's IQN.")],
    storage_role: Annotated[str, typer.Option(help="The URL of the storage role beside tgtd, e.g. "
                                              "http://10.0.3.2:8102 (it makes the LUNs).")],
    token_file: Annotated[Path, typer.Option(help="A file holding the storage role's token.")],
    host: Annotated[list[str] | None, typer.Option("--host", help="A host that gets it (repeat); "
                                                   "default: every host.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Register an existing iSCSI target as a datastore: each host checks that the portal answers and
    the storage role serves the target, all hosts or none (docs/datastores.md)."""
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise InvalidInputError(f"The token file {token_file} cannot be read ({exc.strerror}).",
                                hint="Give the storage role's token_file, or a copy of it.") from exc
    with context.client() as c:
        ds = c.add_iscsi_datastore(name, portal=iscsi, target=target, storage_role=storage_role,
                                   token=token, hosts=host)
    if json_:
        emit_json(ds)
    else:
        fields(f"Datastore {name}", {k: ds.get(k) for k in ("name", "kind", "uuid", "hosts", "capacity_mib",
                                                           "free_mib")})


@datastore_app.command("remove")
def datastore_remove(
    name: Annotated[str, typer.Argument(help="A datastore that 'datastore add' registered.")],
    json_: JsonOpt = False,
) -> None:
    """Unregister a datastore on every host that has it (refused while a VM is on it; its LUNs and
    the target stay as they are)."""
    with context.client() as c:
        c.remove_datastore(name)
    _said_removed(f"Datastore {name}", name, json_)


@datastore_app.command("list")
def datastore_list(json_: JsonOpt = False) -> None:
    """List datastores and which hosts see them."""
    with context.client() as c:
        items = c.list_datastores()
    if json_:
        emit_json(items)
        return
    def seen_by(d: dict[str, Any]) -> str:
        hosts = ", ".join(d.get("hosts") or [])
        unproven = d.get("unproven_on") or []
        return hosts + (f" (not proven on {', '.join(unproven)})" if unproven else "")

    rows = (
        [d["name"], d.get("kind", "directory"), d["uuid"], "yes" if d.get("shared") else "no",
         seen_by(d), d.get("free_mib"), d.get("capacity_mib")]
        for d in items
    )
    table("Datastores", ["name", "type", "uuid", "shared", "hosts", "free MiB", "capacity MiB"], rows)


@network_app.command("list")
def network_list(json_: JsonOpt = False) -> None:
    """List networks, their bridge on each host and their IP pool."""
    with context.client() as c:
        items = c.list_networks()
    if json_:
        emit_json(items)
        return

    def pool(n: dict[str, Any]) -> str:
        p = n.get("ip_pool")
        return f"{p['first']}-{p['last']}" if p else ""

    rows = (
        [n["name"], ", ".join(f"{h}:{b}" for h, b in (n.get("hosts") or {}).items()), pool(n)]
        for n in items
    )
    table("Networks", ["name", "host:bridge", "ip pool"], rows)
