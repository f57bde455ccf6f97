"""DRS: a cluster's automation level and threshold, a VM's override, passes on demand (a task),
recommendations (list, apply, dismiss) and what-ifs (docs/drs.md)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends, Query
from starlette.concurrency import run_in_threadpool

from vmshift.errors import InvalidInputError
from vmshift.model.api import Task, TaskKind
from vmshift.model.inputs import ClusterName, ObjectId, VmName
from vmshift.placement.recommendation import RecommendationState
from vmshift.placement.simulate import with_vm, without_host
from vmshift.placement.snapshot import ClusterSnapshot, VmDrs, VmState
from vmshift.server.api.deps import core_of
from vmshift.server.api.openapi import BODY, PARAMS, errors
from vmshift.server.core import ServerCore
from vmshift.server.drs.service import cluster_inputs, drs_settings, pass_result
from vmshift.server.drs.store import list_recommendations
from vmshift.server.drs.views import (
    ClusterDrsUpdate,
    ClusterDrsView,
    DrsRecommendationView,
    DrsSimulateRequest,
    SimulateRemoveHost,
    VmDrsUpdate,
    VmDrsView,
    WhatIfView,
)
from vmshift.server.drs.what_if import parse_vm_spec, what_if_view
from vmshift.server.inventory import get_cluster, get_vm
from vmshift.server.tasks import TaskContext, TaskEngine
from vmshift.server.views import task_view

router = APIRouter()


@router.patch("/clusters/{name}/drs", responses=errors(*BODY, 404))
def set_cluster_drs(name: ClusterName, body: ClusterDrsUpdate,
                    core: ServerCore = Depends(core_of)) -> ClusterDrsView:
    """The cluster's DRS automation level and migration threshold (only the fields sent change)."""
    with core.sessions.begin() as s:
        row = get_cluster(s, name)
        if body.automation is not None:
            row.drs_automation = body.automation
        if body.threshold is not None:
            row.drs_threshold = body.threshold
        settings = drs_settings(row, core.drs.settings.interval_s)
        return ClusterDrsView(cluster=row.name, automation=settings.automation, threshold=settings.threshold)


@router.get("/clusters/{name}/drs", responses=errors(*PARAMS, 404))
def get_cluster_drs(name: ClusterName, core: ServerCore = Depends(core_of)) -> ClusterDrsView:
    with core.sessions() as s:
        settings = drs_settings(row := get_cluster(s, name), core.drs.settings.interval_s)
        return ClusterDrsView(cluster=row.name, automation=settings.automation, threshold=settings.threshold)


@router.patch("/vms/{name}/drs", responses=errors(*BODY, 404))
def set_vm_drs(name: VmName, body: VmDrsUpdate, core: ServerCore = Depends(core_of)) -> VmDrsView:
    """The VM's own DRS setting: follow the cluster, never move it, or manual / fully for it alone."""
    with core.sessions.begin() as s:
        vm = get_vm(s, name)
        vm.drs = body.drs
        return VmDrsView(vm=vm.name, drs=VmDrs(vm.drs))


@router.post("/clusters/{name}/drs/run", status_code=202, responses=errors(*PARAMS, 404))
async def run_drs(name: ClusterName, core: ServerCore = Depends(core_of)) -> Task:
    """One DRS pass now (a task; its result lists what was recommended or applied, and why)."""

    def write() -> Task:
        with core.sessions.begin() as s:
            get_cluster(s, name)
            return task_view(TaskEngine.create(s, TaskKind.DRS_RUN, name))

    view = await run_in_threadpool(write)

    async def body(ctx: TaskContext) -> dict[str, Any]:
        ctx.progress("pass", 10)
        return pass_result(await core.drs.run_pass(core, name))

    core.tasks.start(view.id, name, body)
    return view


@router.get("/drs/recommendations", responses=errors(*PARAMS, 404))
def recommendations(
    cluster: ClusterName | None = Query(None, description="only this cluster's"),
    state: list[RecommendationState] = Query([RecommendationState.PENDING], description="only these states"),
    core: ServerCore = Depends(core_of),
) -> list[DrsRecommendationView]:
    with core.sessions() as s:
        if cluster is not None:
            get_cluster(s, cluster)
        return list_recommendations(s, cluster, state)


@router.post("/drs/recommendations/{rid}/apply", responses=errors(*PARAMS, 404, 409))
async def apply_recommendation(rid: ObjectId, core: ServerCore = Depends(core_of)) -> DrsRecommendationView:
    """Start the recommended move as a migration (its checks run again now); 409 when it is no longer
    pending or its VM is no longer on the source."""
    return await core.drs.apply(core, rid)


@router.post("/drs/recommendations/{rid}/dismiss", responses=errors(*PARAMS, 404, 409))
def dismiss_recommendation(rid: ObjectId, core: ServerCore = Depends(core_of)) -> DrsRecommendationView:
    return core.drs.dismiss(core, rid)


@router.post("/clusters/{name}/drs/simulate", responses=errors(*BODY, 404))
async def simulate(name: ClusterName, body: DrsSimulateRequest,
                   core: ServerCore = Depends(core_of)) -> WhatIfView:
    """What DRS would do without a host (its VMs evacuated) or with one more VM (placed first), on
    the loads of the moment (the hosts are sampled first, as a pass does)."""
    await core.load_sampler.sample_now()
    return await run_in_threadpool(_simulate, core, name, body)


def _simulate(core: ServerCore, name: str, body: DrsSimulateRequest) -> WhatIfView:
    with core.sessions() as s:
        row = get_cluster(s, name)
        settings = drs_settings(row, core.drs.settings.interval_s)
        snap = cluster_inputs(s, row, core.drs.loads, core.heartbeat.live_stats)
    if isinstance(body, SimulateRemoveHost):
        if not snap.has_host(body.remove_host):
            # 400, not 404: the cluster exists; the body names a host it does not have
            raise InvalidInputError(f"Host {body.remove_host} is not in cluster {name}.",
                                    hint="List its hosts with 'vmshift host list --cluster CLUSTER'.")
        return what_if_view(name, without_host(snap, body.remove_host, settings))
    return what_if_view(name, with_vm(snap, _like_the_cluster(parse_vm_spec(body.add_vm), snap), settings))


def _like_the_cluster(vm: VmState, snap: ClusterSnapshot) -> VmState:
    """A simulated VM runs on what the cluster's VMs (else its first host) use: CPU model, machine
    type, accelerator, datastores and networks."""
    if snap.vms:
        like = snap.vms[0]
        return replace(vm, cpu_model=like.cpu_model, machine_type=like.machine_type,
                       accelerator=like.accelerator, datastores=like.datastores, networks=like.networks)
    if snap.hosts:
        h = snap.hosts[0]
        machine = min(h.machine_types) if h.machine_types else vm.machine_type
        model = h.cpu_models[0].name if h.cpu_models else vm.cpu_model
        return replace(vm, cpu_model=model, machine_type=machine, accelerator=h.accelerator,
                       datastores=frozenset(sorted(h.datastores)[:1]), networks=h.networks)
    return vm
