"""`vmshift rule add|list|delete`: affinity rules of a cluster (docs/drs.md, "Rules")."""

from __future__ import annotations

from typing import Annotated

import typer

from vmshift.cli import context
from vmshift.cli.hosts import JsonOpt
from vmshift.cli.output import emit_json, table
from vmshift.model.placement import RuleKind, RuleStrength

rule_app = typer.Typer(help="Affinity rules: VM-VM and VM-host, must or should.", no_args_is_help=True)

_KINDS = ", ".join(k.value for k in RuleKind)


def _split(values: list[str]) -> list[str]:
    """``--vm a,b --vm c`` -> [a, b, c]."""
    return [n for v in values for n in v.split(",") if n]


@rule_app.command("add")
def rule_add(
    name: str,
    cluster: Annotated[str, typer.Option(help="The cluster the rule belongs to.")],
    kind: Annotated[RuleKind, typer.Option(help=f"One of {_KINDS}.")],
    vm: Annotated[list[str], typer.Option("--vm", help="A VM of the rule (repeat, or a,b,c).")],
    host: Annotated[
        list[str] | None, typer.Option("--host", help="A host of a VM-host rule (repeat, or a,b).")
    ] = None,
    strength: Annotated[
        RuleStrength, typer.Option(help="must: never broken; should: broken only when nothing else fits.")
    ] = RuleStrength.MUST,
    json_: JsonOpt = False,
) -> None:
    """Add a rule, e.g. vmshift rule add db-on-1 --cluster c1 --kind vm_host_affinity --vm db --host host-1"""
    with context.client() as c:
        r = c.add_rule(name, cluster, kind.value, _split(vm), strength=strength.value,
                       hosts=_split(host or []))
    if json_:
        emit_json(r)
        return
    hosts = f" on {', '.join(r['hosts'])}" if r["hosts"] else ""
    typer.echo(f"Rule {r['name']} added to cluster {r['cluster']}: {r['strength']} {r['kind']} of "
               f"{', '.join(r['vms'])}{hosts}.")


@rule_app.command("list")
def rule_list(
    cluster: Annotated[str | None, typer.Option(help="Only this cluster's rules.")] = None,
    json_: JsonOpt = False,
) -> None:
    """List rules by cluster and name."""
    with context.client() as c:
        items = c.list_rules(cluster)
    if json_:
        emit_json(items)
        return
    table("Rules", ["cluster", "name", "kind", "strength", "vms", "hosts"],
          ([r["cluster"], r["name"], r["kind"], r["strength"], ", ".join(r["vms"]),
            ", ".join(r["hosts"]) or "-"] for r in items))


@rule_app.command("delete")
def rule_delete(
    name: str,
    cluster: Annotated[
        str | None, typer.Option(help="The rule's cluster (when two clusters use the name).")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Delete a rule (nothing moves)."""
    with context.client() as c:
        r = c.delete_rule(name, cluster)
    if json_:
        emit_json(r)
    else:
        typer.echo(f"Rule {r['name']} deleted from cluster {r['cluster']}.")


__all__ = ["rule_app"]
