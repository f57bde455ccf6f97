"""The DRS pass on the server (issue 11, item 3): inputs read, the pure recommender run, its
answer stored, and in fully automated clusters its moves started as ordinary migrations.

Each pass of a cluster, in order:

1. a fresh load sample of every host (server/load_history.py), so the window ends now;
2. the cluster snapshot (maint's server/placement_inputs.py) with each VM's load history over the
   window and the end of its last move (the cooldown counts from there);
3. ``placement.recommend`` with the cluster's automation level and threshold, and the memory of the
   cluster's previous pass (how many passes in a row each host was out of balance);
4. the recommendations stored (server/drs/store.py); the automatic ones started through
   ``start_migration``, the one path every migration takes, so its checks, switchover safety and
   the hosts' concurrency limits apply to DRS's moves as to a user's;
5. an event when the pass recommended or applied anything, and one per move applied.

Passes run every ``DrsServiceSettings.interval_s`` over every cluster, and on demand
(``vmshift drs run CLUSTER``, a task). Passes of one cluster never overlap (a lock per cluster).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmshift.errors import ConflictError, VmshiftError
from vmshift.model.api import EventKind
from vmshift.model.migration import MigrationCreate
from vmshift.placement.recommendation import DrsMemory, DrsPass, Recommendation, RecommendationState
from vmshift.placement.recommender import recommend
from vmshift.placement.settings import DrsSettings
from vmshift.placement.snapshot import ClusterSnapshot, DrsAutomation
from vmshift.server.db.schema import ClusterRow, DrsRecommendationRow, HostRow, VmRow
from vmshift.server.drs.store import decide, pending_recommendation, recommendation_view, record_pass
from vmshift.server.drs.views import DrsPassView, DrsRecommendationView
from vmshift.server.events import record_event
from vmshift.server.inventory import get_cluster
from vmshift.server.load_history import LoadHistorySettings, vm_histories
from vmshift.server.placement_inputs import LiveStats, cluster_snapshot

if TYPE_CHECKING:
    from vmshift.server.core import ServerCore

log = logging.getLogger("vmshift.server.drs")


@dataclass(frozen=True, slots=True)
class DrsServiceSettings:
    interval_s: float = 60.0  # a pass over every cluster this often (0: only on demand)


def drs_settings(cluster: ClusterRow, interval_s: float) -> DrsSettings:
    """The recommender's settings for this cluster (its level and threshold; the rest defaults)."""
    return DrsSettings(automation=DrsAutomation(cluster.drs_automation), threshold=cluster.drs_threshold,
                       pass_interval_s=interval_s or DrsSettings().pass_interval_s)


def cluster_inputs(s: Session, cluster: ClusterRow, loads: LoadHistorySettings,
                   live: LiveStats) -> ClusterSnapshot:
    """The cluster's snapshot with each VM's load history over the window (a VM without one: its
    latest report's memory). The builder adds the end of each VM's last move (the cooldown)."""
    host_ids = [h.id for h in cluster.hosts]
    return cluster_snapshot(s, cluster, loads=vm_histories(s, host_ids, loads), live=live,
                            now_s=time.time(), history_step_s=loads.step_s)


class DrsService:
    """Owns the periodic loop (``start`` / ``stop``) and the memory passes hand on."""

    def __init__(self, settings: DrsServiceSettings, loads: LoadHistorySettings) -> None:
        self.settings = settings
        self.loads = loads
        self._memory: dict[str, DrsMemory] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self, core: ServerCore) -> None:
        if self.settings.interval_s > 0:
            self._task = asyncio.create_task(self._loop(core), name="vmshift-drs")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self, core: ServerCore) -> None:
        while True:
            await asyncio.sleep(self.settings.interval_s)
            with core.sessions() as s:
                names = list(s.scalars(select(ClusterRow.name).order_by(ClusterRow.name)))
            for name in names:
                try:
                    await self.run_pass(core, name)
                except Exception:  # one cluster's failed pass must not stop the others
                    log.exception("DRS pass of cluster %s failed", name)

    # ----- one pass -------------------------------------------------------------------------------
    async def run_pass(self, core: ServerCore, cluster: str) -> DrsPassView:
        lock = self._locks.setdefault(cluster, asyncio.Lock())
        async with lock:
            await core.load_sampler.sample_now()
            settings, answer = await asyncio.to_thread(self._decide, core, cluster)
            rows = await asyncio.to_thread(self._record, core, cluster, answer)
            applied: list[int] = []
            for rec, view in zip(answer.recommendations, rows, strict=True):
                if rec.automatic and await self._apply(core, view.id, automatic=True):
                    applied.append(view.id)
            with core.sessions.begin() as s:
                views = [recommendation_view(s.get_one(DrsRecommendationRow, v.id), cluster) for v in rows]
                if views:
                    record_event(s, EventKind.DRS_PASS, cluster, _pass_message(cluster, answer, len(applied)))
            return DrsPassView(
                cluster=cluster, automation=settings.automation, threshold=settings.threshold,
                imbalance_before=answer.imbalance_before, imbalance_after=answer.imbalance_after,
                tolerance=answer.tolerance, recommendations=views, applied=applied, notes=list(answer.notes))

    def _decide(self, core: ServerCore, cluster: str) -> tuple[DrsSettings, DrsPass]:
        with core.sessions() as s:
            row = get_cluster(s, cluster)
            settings = drs_settings(row, self.settings.interval_s)
            snapshot = cluster_inputs(s, row, self.loads, core.heartbeat.live_stats)
        answer = recommend(snapshot, settings, self._memory.get(cluster))
        self._memory[cluster] = answer.memory
        return settings, answer

    def _record(self, core: ServerCore, cluster: str, answer: DrsPass) -> list[DrsRecommendationView]:
        with core.sessions.begin() as s:
            row = get_cluster(s, cluster)
            return [recommendation_view(r, cluster) for r in record_pass(s, row, answer.recommendations)]

    # ----- apply and dismiss --------------------------------------------------------------------
    async def apply(self, core: ServerCore, rid: int) -> DrsRecommendationView:
        """``drs apply ID``: start the pending recommendation's migration (errors as the migrate
        route's: its checks run again now)."""
        await self._apply(core, rid, automatic=False)
        with core.sessions() as s:
            row = s.get_one(DrsRecommendationRow, rid)
            return recommendation_view(row, s.get_one(ClusterRow, row.cluster_id).name)

    async def _apply(self, core: ServerCore, rid: int, automatic: bool) -> bool:
        from vmshift.server.migration_start import start_migration  # it imports the core (as schedules)

        with core.sessions() as s:
            row = pending_recommendation(s, rid)
            vm, source, target = row.vm, row.source_host, row.target_host
            on = _vm_host(s, vm)
        if on != source:
            with core.sessions.begin() as s:
                decide(s.get_one(DrsRecommendationRow, rid), RecommendationState.EXPIRED)
            if automatic:
                return False
            raise _moved(rid, vm, source, on)
        try:
            started = await start_migration(core, vm, MigrationCreate(host=target))
        except VmshiftError as e:
            if not automatic:
                raise
            log.info("DRS could not start recommendation %s (%s to %s): %s", rid, vm, target, e)
            with core.sessions.begin() as s:
                record_event(s, EventKind.DRS_APPLY_FAILED, vm,
                             f"DRS recommendation {rid} (VM {vm} to {target}) was not started: {e}")
            return False
        with core.sessions.begin() as s:
            decide(s.get_one(DrsRecommendationRow, rid), RecommendationState.APPLIED,
                   migration_id=started.migration_id, task_id=started.id)
            how = "automatically" if automatic else "on request"
            record_event(s, EventKind.DRS_APPLIED, vm,
                         f"DRS recommendation {rid} applied {how}: migration {started.migration_id} of VM "
                         f"{vm} from {source} to {target}.")
        return True

    def dismiss(self, core: ServerCore, rid: int) -> DrsRecommendationView:
        with core.sessions.begin() as s:
            row = pending_recommendation(s, rid)
            decide(row, RecommendationState.DISMISSED)
            return recommendation_view(row, s.get_one(ClusterRow, row.cluster_id).name)


def _vm_host(s: Session, vm: str) -> str | None:
    return s.scalar(select(HostRow.name).join(VmRow, VmRow.host_id == HostRow.id).where(VmRow.name == vm))


def _moved(rid: int, vm: str, source: str, on: str | None) -> VmshiftError:
    where = f"is on {on}" if on is not None else "no longer exists"
    return ConflictError(f"DRS recommendation {rid} expired: VM {vm} {where}, not on {source}.",
                         hint="Run 'vmshift drs run CLUSTER' for fresh recommendations.")


def _pass_message(cluster: str, answer: DrsPass, applied: int) -> str:
    n = len(answer.recommendations)
    listed = n - applied
    parts = [f"{applied} move(s) started"] if applied else []
    if listed:
        parts.append(f"{listed} recommendation(s) listed")
    moves = "; ".join(_short(r) for r in answer.recommendations)
    return (f"DRS pass of cluster {cluster}: {', '.join(parts)} (imbalance {answer.imbalance_before:.3f} -> "
            f"{answer.imbalance_after:.3f}): {moves}.")


def _short(r: Recommendation) -> str:
    return f"{r.vm} {r.source} -> {r.target} ({r.reason.value})"


def pass_result(view: DrsPassView) -> dict[str, Any]:
    """A pass as a task's result (JSON)."""
    return view.model_dump(mode="json")
