"""Affinity rules: add, list, delete (docs/drs.md, "Rules").

A rule is checked when it is added: its cluster, VMs and hosts exist, its hosts are in its cluster,
and the placement engine's ``Rule`` accepts the combination. A rule that the cluster breaks now is
still added (DRS and maintenance mode work towards it), as in vSphere.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from vmshift.errors import ConflictError, InvalidInputError, NotFoundError
from vmshift.model.api import EventKind
from vmshift.model.inputs import ClusterName, Name
from vmshift.model.rules import RuleCreate, RuleView
from vmshift.placement.snapshot import Rule
from vmshift.server.api.deps import core_of
from vmshift.server.api.openapi import BODY, PARAMS, errors
from vmshift.server.core import ServerCore
from vmshift.server.db.schema import ClusterRow, HostRow, RuleRow, VmRow, utcnow
from vmshift.server.events import record_event
from vmshift.server.inventory import get_cluster, names_hint

router = APIRouter()


def rule_view(row: RuleRow) -> RuleView:
    return RuleView(id=row.id, name=row.name, cluster=row.cluster.name, kind=row.kind, strength=row.strength,
                    vms=list(row.vms), hosts=list(row.hosts), created_at=row.created_at)


def _missing(s: Session, row: type[VmRow] | type[HostRow], names: list[str]) -> list[str]:
    known = set(s.scalars(select(row.name).where(row.name.in_(names))))
    return [n for n in names if n not in known]


def _check_members(s: Session, cluster: ClusterRow, body: RuleCreate) -> None:
    vms = _missing(s, VmRow, body.vms)
    if vms:
        raise NotFoundError(f"Rule {body.name!r} names VM {', '.join(vms)}, which does not exist.",
                            hint="List the VMs with 'vmshift vm list'.")
    hosts = _missing(s, HostRow, body.hosts)
    if hosts:
        raise NotFoundError(f"Rule {body.name!r} names host {', '.join(hosts)}, which does not exist.",
                            hint="List the hosts with 'vmshift host list'.")
    outside = [h.name for h in cluster.hosts]
    elsewhere = [h for h in body.hosts if h not in outside]
    if elsewhere:
        raise InvalidInputError(
            f"Host {', '.join(elsewhere)} is not in cluster {cluster.name}, so rule {body.name!r} "
            "cannot name it.",
            hint=names_hint(f"hosts of cluster {cluster.name}", outside))
    foreign = s.scalars(select(VmRow).join(HostRow).where(VmRow.name.in_(body.vms),
                                                          HostRow.cluster_id != cluster.id)).all()
    if foreign:
        raise InvalidInputError(
            f"VM {', '.join(v.name for v in foreign)} runs outside cluster {cluster.name}, so rule "
            f"{body.name!r} cannot name it.", hint="A rule names VMs of its own cluster.")


def _add_rule(body: RuleCreate, core: ServerCore) -> RuleView:
    rule = Rule(body.name, body.kind, body.strength, frozenset(body.vms), frozenset(body.hosts))  # validates
    with core.sessions.begin() as s:
        cluster = get_cluster(s, body.cluster)
        if s.scalar(select(RuleRow).where(RuleRow.cluster_id == cluster.id, RuleRow.name == body.name)):
            raise ConflictError(f"Cluster {cluster.name} has a rule named {body.name} already.",
                                hint=f"Pick another name, or delete it: 'vmshift rule delete {body.name}'.")
        _check_members(s, cluster, body)
        row = RuleRow(name=rule.name, cluster=cluster, kind=rule.kind, strength=rule.strength,
                      vms=sorted(rule.vms), hosts=sorted(rule.hosts), created_at=utcnow())
        s.add(row)
        s.flush()
        record_event(s, EventKind.RULE_CREATED, cluster.name,
                     f"Rule {row.name} ({row.strength.value} {row.kind.value}) added to cluster "
                     f"{cluster.name}.")
        return rule_view(row)


@router.post("/rules", status_code=201, responses=errors(*BODY, 404, 409))
async def add_rule(body: RuleCreate, core: ServerCore = Depends(core_of)) -> RuleView:
    """Add an affinity rule to a cluster."""
    return await run_in_threadpool(_add_rule, body, core)


@router.get("/rules", responses=errors(*PARAMS, 404))
def list_rules(
    cluster: ClusterName | None = Query(None, description="only this cluster's rules"),
    core: ServerCore = Depends(core_of),
) -> list[RuleView]:
    """Rules by cluster, then name."""
    with core.sessions() as s:
        q = select(RuleRow).join(ClusterRow).order_by(ClusterRow.name, RuleRow.name)
        if cluster is not None:
            q = q.where(RuleRow.cluster_id == get_cluster(s, cluster).id)
        return [rule_view(r) for r in s.scalars(q)]


def get_rule_row(s: Session, name: str, cluster: str | None) -> RuleRow:
    q = select(RuleRow).where(RuleRow.name == name)
    if cluster is not None:
        q = q.where(RuleRow.cluster_id == get_cluster(s, cluster).id)
    rows = s.scalars(q).all()
    if not rows:
        names = sorted({r for r in s.scalars(select(RuleRow.name))})
        where = f" in cluster {cluster}" if cluster else ""
        raise NotFoundError(f"Rule {name!r} does not exist{where}.", hint=names_hint("rules", names))
    if len(rows) > 1:
        clusters = ", ".join(sorted(r.cluster.name for r in rows))
        raise ConflictError(f"Clusters {clusters} each have a rule {name}.",
                            hint="Name the cluster with --cluster.")
    return rows[0]


@router.delete("/rules/{name}", responses=errors(*PARAMS, 404, 409))
async def delete_rule(
    name: Name,
    cluster: ClusterName | None = Query(None, description="the rule's cluster (when two have the name)"),
    core: ServerCore = Depends(core_of),
) -> RuleView:
    """Remove a rule; nothing moves (DRS simply stops enforcing it)."""

    def delete() -> RuleView:
        with core.sessions.begin() as s:
            row = get_rule_row(s, name, cluster)
            view = rule_view(row)
            s.delete(row)
            record_event(s, EventKind.RULE_DELETED, view.cluster, f"Rule {view.name} deleted from cluster "
                                                                  f"{view.cluster}.")
            return view

    return await run_in_threadpool(delete)
