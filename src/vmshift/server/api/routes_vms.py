"""VMs: list, create (task), power (task), suspend (task), delete (task).

Reads are plain ``def`` routes (FastAPI's thread pool); the routes that start a task stay ``async``,
because a task starts on the event loop, and do their database work in the thread pool.
"""

from __future__ import annotations

from typing import Any, cast

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import TypeAdapter
from sqlalchemy import Select, select
from starlette.concurrency import run_in_threadpool

from vmshift.errors import ConflictError
from vmshift.model.api import PowerRequest, Task, TaskKind, Vm, VmCreate, VmStats
from vmshift.model.enums import ConnectionState, PowerState
from vmshift.model.images import VmImportRequest
from vmshift.model.inputs import ClusterName, HostName, Name, VmName
from vmshift.model.paging import ListName
from vmshift.server.api.deps import core_of
from vmshift.server.api.json_pieces import JsonPieces, json_list
from vmshift.server.api.openapi import BODY, PARAMS, errors
from vmshift.server.api.paging import PageRequest, answer_json, cached_page, cut, keyset, list_answers
from vmshift.server.core import ServerCore
from vmshift.server.db.schema import ClusterRow, HostRow, VmRow
from vmshift.server.inventory import get_vm, vm_not_found
from vmshift.server.tasks import TaskEngine
from vmshift.server.views import task_view
from vmshift.server.vm_create import create_vm_row
from vmshift.server.vm_import import ImportPlan, import_host, import_vm_body, plan, read_descriptor
from vmshift.server.vm_tasks import (
    create_body,
    delete_body,
    power_body,
    refuse_delete_while_a_qemu_runs,
    suspend_body,
)
from vmshift.server.vm_views import MAX_KEPT

router = APIRouter()




@router.get("/vms", response_model=list[Vm], responses=list_answers(list[Vm], etag=True))
def list_vms(
    request: Request,
    host: HostName | None = Query(None, description="only the VMs registered on this host"),
    cluster: ClusterName | None = Query(None, description="only the VMs on the hosts of this cluster"),
    power_state: PowerState | None = Query(None, description="only VMs in this power state"),
    name_prefix: Name | None = Query(None, description="only VMs whose name starts with this"),
    paging: PageRequest = Depends(cached_page),
    core: ServerCore = Depends(core_of),
) -> Response:
    """VMs by name, a page at a time; filters combine. The ETag changes with anything the page shows,
    a power state or stats included (docs/api.md, "Incremental reads")."""
    # the page's ids and keys only: the views themselves are kept (server/vm_views.py)
    q = cast("Select[Any]", select(VmRow.id, VmRow.name, VmRow.uuid, HostRow.name).join(VmRow.host))
    if host is not None:
        q = q.where(HostRow.name == host)
    if cluster is not None:
        q = q.join(HostRow.cluster).where(ClusterRow.name == cluster)
    if power_state is not None:
        q = q.where(VmRow.power_state == power_state)
    if name_prefix is not None:
        q = q.where(VmRow.name.startswith(name_prefix, autoescape=True))
    q = keyset(q, VmRow.name, paging.after(ListName.VMS), paging.limit)
    token = core.vm_views.token()
    with core.sessions() as s:
        got = cut(s.execute(q).all(), paging.limit, ListName.VMS, lambda r: str(r[1]))
        views = core.vm_views.of(s, [r[0] for r in got.items], since=token)
    live = core.heartbeat.live_stats
    shown = [_vm_piece(vm_id, views[vm_id], live(host_name, name, uuid))
             for vm_id, name, uuid, host_name in got.items if vm_id in views]  # fmt: skip
    return answer_json(request, json_list(shown), got.next_cursor, if_none_match=paging.if_none_match,
                       etag=True)


@router.get("/vms/{name}", response_model=Vm, responses=errors(*PARAMS, 404))
def get_vm_route(name: VmName, core: ServerCore = Depends(core_of)) -> Response:
    token = core.vm_views.token()
    with core.sessions() as s:
        # its keys only (the ORM row would load its host, and the host's facts, for the host's name)
        found = s.execute(select(VmRow.id, VmRow.uuid, HostRow.name).join(VmRow.host)
                          .where(VmRow.name == name)).first()  # fmt: skip
        if found is None:
            raise vm_not_found(s, name)
        vm_id, uuid, host_name = found
        view = core.vm_views.of(s, [vm_id], since=token)[vm_id]
    piece = _vm_piece(vm_id, view, core.heartbeat.live_stats(host_name, name, uuid))
    return Response(piece, media_type="application/json")


_VM = TypeAdapter(Vm)
_STATS = TypeAdapter(VmStats)
_VM_PIECES: JsonPieces[int] = JsonPieces(max_kept=MAX_KEPT)  # by VM id, beside the kept views


def _vm_piece(vm_id: int, view: Vm, live: VmStats | None) -> bytes:
    """A VM's JSON: its kept view's, made again when the view is, with the VM's numbers from its
    host's report spliced in (without a report: those of its row)."""
    base = _VM_PIECES.get(vm_id, view, lambda: _VM.dump_json(view, exclude={"stats"}))
    return base[:-1] + b',"stats":' + _STATS.dump_json(view.stats if live is None else live) + b"}"


@router.post("/vms", status_code=202, responses=errors(*BODY, 404, 409))
async def create_vm(body: VmCreate, core: ServerCore = Depends(core_of)) -> Task:
    def write() -> Task:
        with core.sessions.begin() as s:
            create_vm_row(s, body)
            return task_view(TaskEngine.create(s, TaskKind.VM_CREATE, body.name, {"start": body.start}))

    view = await run_in_threadpool(write)
    core.tasks.start(view.id, body.name, create_body(core.sessions, core.agents, body.name, body.start))
    return view


@router.post("/vm-imports", status_code=202, responses=errors(*BODY, 404, 409, 502))
async def import_vm(body: VmImportRequest, core: ServerCore = Depends(core_of)) -> Task:
    """Make the VM an OVA (a path on ``host``) or a libvirt domain XML describes: what cannot be
    mapped is refused here, all of it listed, and so is a damaged first disk; nothing is written
    then. The task imports the disks as images and creates the VM on them (docs/images.md)."""

    def address() -> str:
        with core.sessions() as s:
            return import_host(s, body)

    agent_address = await run_in_threadpool(address)
    foreign = await read_descriptor(core.agents, agent_address, body)

    def dry_run() -> ImportPlan:
        with core.sessions() as s:
            try:
                return plan(s, body, foreign)
            finally:
                s.rollback()

    p = await run_in_threadpool(dry_run)
    p.host, p.address = body.host, agent_address
    await core.agents.get(agent_address).import_image(p.images[0])

    def write() -> Task:
        with core.sessions.begin() as s:
            params = {"source": body.source.value, "host": body.host, "datastore": body.datastore,
                      "file": body.file}
            return task_view(TaskEngine.create(s, TaskKind.VM_IMPORT, p.create.name, params))

    view = await run_in_threadpool(write)
    core.tasks.start(view.id, p.create.name, import_vm_body(core.sessions, core.agents, p))
    return view


@router.post("/vms/{name}/power", status_code=202, responses=errors(*BODY, 404, 409))
async def power_vm(name: VmName, body: PowerRequest, core: ServerCore = Depends(core_of)) -> Task:
    def write() -> Task:
        with core.sessions.begin() as s:
            _refuse_disconnected(get_vm(s, name))
            return task_view(TaskEngine.create(s, TaskKind.VM_POWER, name, {"action": body.action.value}))

    view = await run_in_threadpool(write)
    core.tasks.start(view.id, name, power_body(core.sessions, core.agents, name, body.action))
    return view


@router.post("/vms/{name}/suspend", status_code=202, responses=errors(*PARAMS, 404, 409))
async def suspend_vm(name: VmName, core: ServerCore = Depends(core_of)) -> Task:
    """Save a running or paused VM's state to its folder and stop it; resume it with power 'resume'
    or 'start' (POST /vms/NAME/resume does that too). docs/suspend.md."""

    def write() -> Task:
        with core.sessions.begin() as s:
            vm = get_vm(s, name)
            _refuse_disconnected(vm)
            if vm.power_state not in (PowerState.POWERED_ON, PowerState.PAUSED):
                raise ConflictError(
                    f"VM {name} is {vm.power_state.value}; only a running or paused VM can be suspended.",
                    hint="Nothing to do." if vm.power_state is PowerState.SUSPENDED else "Start it first.",
                )
            return task_view(TaskEngine.create(s, TaskKind.VM_SUSPEND, name))

    view = await run_in_threadpool(write)
    core.tasks.start(view.id, name, suspend_body(core.sessions, core.agents, name))
    return view


@router.delete("/vms/{name}", status_code=202, responses=errors(*PARAMS, 404, 409, 502))
async def delete_vm(name: VmName, core: ServerCore = Depends(core_of)) -> Task:
    def refuse_running() -> None:
        with core.sessions() as s:
            vm = get_vm(s, name)
            if vm.power_state in (PowerState.POWERED_ON, PowerState.PAUSED):
                raise ConflictError(
                    f"VM {name} is {vm.power_state.value}; it cannot be deleted while running.",
                    hint="Power it off first (action 'stop' or 'shutdown').",
                )

    def write() -> Task:
        with core.sessions.begin() as s:
            get_vm(s, name)
            return task_view(TaskEngine.create(s, TaskKind.VM_DELETE, name))

    await run_in_threadpool(refuse_running)
    # Refused before a task exists, so nothing changes; the task checks again before it deletes.
    await refuse_delete_while_a_qemu_runs(core.sessions, core.agents, name, core.settings.agent_timeout_s)
    view = await run_in_threadpool(write)
    core.tasks.start(view.id, name, delete_body(core.sessions, core.agents, name))
    return view


def _refuse_disconnected(vm: VmRow) -> None:
    if vm.host.connection_state is not ConnectionState.CONNECTED:
        raise ConflictError(
            f"Host {vm.host.name} of VM {vm.name} is disconnected.",
            hint="Wait until the host is connected again.",
        )
