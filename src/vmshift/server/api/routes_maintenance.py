"""Maintenance mode: the evacuation plan, enter (evacuate, then mark) and exit (docs/drs.md)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from vmshift.model.api import Task
from vmshift.model.inputs import HostName
from vmshift.model.maintenance import EvacuationPlanView, MaintenanceExit
from vmshift.server import maintenance
from vmshift.server.api.deps import core_of
from vmshift.server.api.openapi import BODY, PARAMS, errors
from vmshift.server.core import ServerCore

router = APIRouter()


@router.get("/hosts/{name}/maintenance/plan", responses=errors(*PARAMS, 404))
async def maintenance_plan(name: HostName, core: ServerCore = Depends(core_of)) -> EvacuationPlanView:
    """Where each VM would go and how long each move should take; ``refused`` says why it cannot."""
    plan = await run_in_threadpool(maintenance.plan_for, core, name)
    return maintenance.plan_view(plan)


@router.post("/hosts/{name}/maintenance/enter", status_code=202, responses=errors(*PARAMS, 404, 409, 422))
async def maintenance_enter(name: HostName, core: ServerCore = Depends(core_of)) -> Task:
    """Evacuate the host (a parent task with a vm.migrate child per VM), then put it in maintenance
    mode. A plan the cluster cannot take is refused with its reason (422) and nothing moves."""
    return await maintenance.enter(core, name)


@router.post("/hosts/{name}/maintenance/exit", status_code=202, responses=errors(*BODY, 404, 409))
async def maintenance_exit(
    name: HostName, body: MaintenanceExit | None = None, core: ServerCore = Depends(core_of)
) -> Task:
    """Take the host out of maintenance mode; ``return_vms`` moves back what its evacuation moved."""
    return await maintenance.leave(core, name, body.return_vms if body is not None else False)
