"""Maintenance mode: evacuate a host under the rules, then mark it (issue 11, item 5).

The plan comes from ``placement.evacuation`` over a snapshot of the host's cluster; a refused plan
is answered up front (422) with nothing moved. Otherwise one parent task starts a move per VM
through the one migration start path (``migration_start.start_migration``: its checks, the
switchover safety and the hosts' concurrency queue apply), follows the child tasks, and puts the
host in maintenance mode only once no VM is registered on it. While the parent runs, placement
treats the host as in maintenance (``placement_inputs``), so no new VM lands there.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from vmshift.errors import CapacityError, ConflictError, VmshiftError
from vmshift.model.api import EventKind, Task, TaskKind
from vmshift.model.enums import TaskState
from vmshift.model.maintenance import EvacuationMove, EvacuationPlanView
from vmshift.model.migration import MigrationCreate
from vmshift.placement.evacuation import EvacuationPlan, plan_evacuation
from vmshift.server.core import ServerCore
from vmshift.server.db.schema import HostRow, TaskRow, VmRow
from vmshift.server.events import record_event
from vmshift.server.inventory import get_host
from vmshift.server.migration_start import start_migration
from vmshift.server.placement_inputs import cluster_snapshot
from vmshift.server.tasks import TaskContext, TaskEngine
from vmshift.server.views import task_view

log = logging.getLogger("vmshift.server.maintenance")

FOLLOW_INTERVAL_S = 0.5  # how often the parent task reads its children's progress


def plan_for(core: ServerCore, host_name: str) -> EvacuationPlan:
    with core.sessions() as s:
        host = get_host(s, host_name)
        snapshot = cluster_snapshot(s, host.cluster, live=core.heartbeat.live_stats)
    return plan_evacuation(snapshot, host_name)


def plan_view(plan: EvacuationPlan) -> EvacuationPlanView:
    return EvacuationPlanView(
        host=plan.host, predicted_total_s=plan.predicted_total_s, refused=plan.refused,
        moves=[EvacuationMove(vm=m.vm, target=m.target, live=m.live, predicted_s=m.predicted_s,
                              downtime_ms=m.downtime_ms, ends_at_s=m.ends_at_s, warning=m.warning)
               for m in plan.steps],
    )  # fmt: skip


def _busy(s: Session, kind: TaskKind, host: str) -> TaskRow | None:
    return s.scalar(select(TaskRow).where(TaskRow.kind == kind.value, TaskRow.target == host,
                                          TaskRow.state.in_([TaskState.QUEUED, TaskState.RUNNING])))


async def enter(core: ServerCore, host_name: str) -> Task:
    """Refuse (422, nothing moved) when the plan is refused; else start the parent task."""
    view = await run_in_threadpool(_enter_task, core, host_name)
    core.tasks.start(view.id, host_name, lambda ctx: _evacuate(core, ctx, host_name))
    return view


def _enter_task(core: ServerCore, host_name: str) -> Task:
    plan = plan_for(core, host_name)
    plan.raise_if_refused()
    with core.sessions.begin() as s:
        host = get_host(s, host_name)
        if host.maintenance:
            raise ConflictError(f"Host {host_name} is in maintenance mode already.",
                                hint=f"Take it out with 'vmshift host maintenance exit {host_name}'.")
        if _busy(s, TaskKind.HOST_MAINTENANCE_ENTER, host_name) is not None:
            raise ConflictError(f"Host {host_name} is entering maintenance mode already.",
                                hint="Follow its task with 'vmshift task list'.")
        task = TaskEngine.create(s, TaskKind.HOST_MAINTENANCE_ENTER, host_name,
                                 {"plan": plan_view(plan).model_dump(mode="json")})
        return task_view(task)


async def _move_all(core: ServerCore, ctx: TaskContext, moves: list[tuple[str, str]],
                    predicted_s: float, what: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Start a move per (VM, target) and follow the child tasks to their end: (done, failures)."""
    children: dict[int, tuple[str, str]] = {}
    failed: list[str] = []
    for vm, target in moves:
        try:
            started = await start_migration(core, vm, MigrationCreate(host=target))
        except VmshiftError as e:
            failed.append(f"VM {vm} to {target}: {e.message}")
            continue
        children[started.id] = (vm, target)
    with core.sessions.begin() as s:
        row = s.get(TaskRow, ctx.task_id)
        if row is not None:
            row.params = {**row.params, "children": sorted(children)}
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while True:
        with core.sessions() as s:
            rows = s.scalars(select(TaskRow).where(TaskRow.id.in_(children))).all()
        finished = [r for r in rows if r.state.finished]
        percent = round(sum(100 if r.state.finished else r.percent for r in rows) / max(1, len(rows)))
        left = max(0.0, predicted_s - (loop.time() - t0))
        ctx.progress(f"{what}: {len(finished)} of {len(rows)} VMs moved, ETA {left:.0f} s", percent)
        if len(finished) == len(rows):
            break
        await asyncio.sleep(FOLLOW_INTERVAL_S)
    done = []
    for r in rows:
        vm, target = children[r.id]
        if r.state is TaskState.SUCCESS:
            done.append({"vm": vm, "target": target, "task_id": r.id})
        else:
            failed.append(f"VM {vm} to {target}: {(r.error or {}).get('message') or r.state.value}")
    return done, failed


async def _evacuate(core: ServerCore, ctx: TaskContext, host_name: str) -> dict[str, Any]:
    plan = await asyncio.to_thread(plan_for, core, host_name)  # again: the cluster may have changed
    plan.raise_if_refused()
    done, failed = await _move_all(core, ctx, [(m.vm, m.target) for m in plan.steps],
                                   plan.predicted_total_s, "evacuating")
    result = {"moved": [{**d, "source": host_name} for d in done],
              "warnings": [m.warning for m in plan.steps if m.warning]}
    with core.sessions.begin() as s:
        host = get_host(s, host_name)
        left = sorted(s.scalars(select(VmRow.name).where(VmRow.host_id == host.id)))
        if failed or left:
            why = "; ".join(failed) or f"VM {', '.join(left)} is still registered on it"
            raise CapacityError(f"Host {host_name} did not enter maintenance mode: {why}.",
                                hint="Fix what stopped the move and enter maintenance mode again; "
                                     "the VMs that moved stay where they went.")
        host.maintenance = True
        record_event(s, EventKind.HOST_MAINTENANCE, host_name,
                     f"Host {host_name} entered maintenance mode after {len(done)} VM(s) moved away.")
    return result


def _last_evacuation(s: Session, host: str) -> list[dict[str, Any]]:
    row = s.scalar(select(TaskRow).where(TaskRow.kind == TaskKind.HOST_MAINTENANCE_ENTER.value,
                                         TaskRow.target == host, TaskRow.state == TaskState.SUCCESS)
                   .order_by(TaskRow.id.desc()).limit(1))
    moved: list[dict[str, Any]] = (row.result or {}).get("moved", []) if row is not None else []
    return moved


async def leave(core: ServerCore, host_name: str, return_vms: bool) -> Task:
    """Take the host out of maintenance now; with ``return_vms`` a task moves back the VMs its last
    evacuation moved away (those still where it put them)."""
    view, back = await run_in_threadpool(_exit_task, core, host_name, return_vms)

    async def body(ctx: TaskContext) -> dict[str, Any]:
        if not back:
            return {"moved": []}
        done, failed = await _move_all(core, ctx, back, 0.0, "returning")
        if failed:
            raise CapacityError(f"Host {host_name} left maintenance mode, but not every VM came back: "
                                f"{'; '.join(failed)}.", hint="Move them with 'vmshift vm migrate'.")
        return {"moved": [{**d, "source": None} for d in done]}

    core.tasks.start(view.id, host_name, body)
    return view


def _exit_task(core: ServerCore, host_name: str, return_vms: bool) -> tuple[Task, list[tuple[str, str]]]:
    with core.sessions.begin() as s:
        host = get_host(s, host_name)
        if _busy(s, TaskKind.HOST_MAINTENANCE_ENTER, host_name) is not None:
            raise ConflictError(f"Host {host_name} is still entering maintenance mode.",
                                hint="Cancel that task first, or wait for it.")
        if host.maintenance:
            host.maintenance = False
            record_event(s, EventKind.HOST_MAINTENANCE, host_name, f"Host {host_name} left maintenance mode.")
        back: list[tuple[str, str]] = []
        if return_vms:
            where = dict(s.execute(select(VmRow.name, HostRow.name).join(HostRow)).all())
            back = [(m["vm"], host_name) for m in _last_evacuation(s, host_name)
                    if where.get(m["vm"]) == m["target"]]
        task = TaskEngine.create(s, TaskKind.HOST_MAINTENANCE_EXIT, host_name,
                                 {"return": [vm for vm, _ in back]})
        return task_view(task), back
