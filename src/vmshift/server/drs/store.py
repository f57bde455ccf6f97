"""Stored DRS recommendations: a pass's answer written down, and the states they move through.

A pass replaces its cluster's pending recommendations: one it recommends again (same VM, same
target) stays as it was, with its id, so ``drs apply ID`` keeps working across passes; the others
expire (the cluster changed, so what they promised no longer holds). Applied, dismissed and
expired ones are history.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmshift.errors import ConflictError, NotFoundError
from vmshift.placement.recommendation import Recommendation, RecommendationState
from vmshift.server.db.schema import ClusterRow, DrsRecommendationRow, utcnow
from vmshift.server.drs.views import DrsRecommendationView


@dataclass(frozen=True, slots=True)
class PendingPlan:
    keep: dict[int, Recommendation]  # row id -> the same move recommended again
    expire: list[int]
    add: list[Recommendation]


def plan_pending(pending: Iterable[tuple[int, str, str]], moves: Sequence[Recommendation]) -> PendingPlan:
    """Which pending rows (id, VM, target) stay, which expire, which moves are new. Pure."""
    wanted = {(m.vm, m.target): m for m in moves}
    keep: dict[int, Recommendation] = {}
    expire: list[int] = []
    for rid, vm, target in pending:
        move = wanted.pop((vm, target), None)
        if move is None:
            expire.append(rid)
        else:
            keep[rid] = move
    return PendingPlan(keep, expire, [m for m in moves if (m.vm, m.target) in wanted])


def record_pass(s: Session, cluster: ClusterRow,
                moves: Sequence[Recommendation]) -> list[DrsRecommendationRow]:
    """The rows of the pass's moves (in its order), after expiring the pending ones it replaces."""
    pending = list(s.scalars(select(DrsRecommendationRow).where(
        DrsRecommendationRow.cluster_id == cluster.id,
        DrsRecommendationRow.state == RecommendationState.PENDING)))
    plan = plan_pending([(r.id, r.vm, r.target_host) for r in pending], moves)
    now = utcnow()
    by_move: dict[tuple[str, str], DrsRecommendationRow] = {}
    for row in pending:
        if row.id in plan.expire:
            row.state, row.decided_at = RecommendationState.EXPIRED, now
        else:
            m = plan.keep[row.id]
            row.why, row.benefit, row.cost = m.why, m.benefit, m.cost
            row.predicted_s, row.downtime_ms, row.source_host = m.predicted_s, m.downtime_ms, m.source
            by_move[(m.vm, m.target)] = row
    for m in plan.add:
        row = DrsRecommendationRow(
            cluster_id=cluster.id, vm=m.vm, source_host=m.source, target_host=m.target, reason=m.reason,
            why=m.why, benefit=m.benefit, cost=m.cost, predicted_s=m.predicted_s, downtime_ms=m.downtime_ms,
            state=RecommendationState.PENDING, created_at=now)
        s.add(row)
        by_move[(m.vm, m.target)] = row
    s.flush()
    return [by_move[(m.vm, m.target)] for m in moves]


def get_recommendation(s: Session, rid: int) -> DrsRecommendationRow:
    row = s.get(DrsRecommendationRow, rid)
    if row is None:
        raise NotFoundError(f"DRS recommendation {rid} does not exist.",
                            hint="List them with 'vmshift drs recommendations'.")
    return row


def pending_recommendation(s: Session, rid: int) -> DrsRecommendationRow:
    row = get_recommendation(s, rid)
    if row.state is not RecommendationState.PENDING:
        raise ConflictError(f"DRS recommendation {rid} is {row.state.value}, not pending.",
                            hint="Run 'vmshift drs run CLUSTER' for fresh recommendations.")
    return row


def decide(row: DrsRecommendationRow, state: RecommendationState, migration_id: int | None = None,
           task_id: int | None = None) -> None:
    row.state, row.decided_at = state, utcnow()
    row.migration_id, row.task_id = migration_id, task_id


def recommendation_view(row: DrsRecommendationRow, cluster: str) -> DrsRecommendationView:
    return DrsRecommendationView(
        id=row.id, cluster=cluster, vm=row.vm, source_host=row.source_host, target_host=row.target_host,
        reason=row.reason, why=row.why, benefit=row.benefit, cost=row.cost, predicted_s=row.predicted_s,
        downtime_ms=row.downtime_ms, state=row.state, created_at=row.created_at, decided_at=row.decided_at,
        migration_id=row.migration_id, task_id=row.task_id)


def list_recommendations(s: Session, cluster: str | None = None,
                         states: Sequence[RecommendationState] = (RecommendationState.PENDING,),
                         ) -> list[DrsRecommendationView]:
    q = (select(DrsRecommendationRow, ClusterRow.name)
         .join(ClusterRow, ClusterRow.id == DrsRecommendationRow.cluster_id)
         .where(DrsRecommendationRow.state.in_(list(states))).order_by(DrsRecommendationRow.id))
    if cluster is not None:
        q = q.where(ClusterRow.name == cluster)
    return [recommendation_view(row, name) for row, name in s.execute(q).all()]
