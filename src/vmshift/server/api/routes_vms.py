"""VMs: list, create (task), power (task), suspend (task), delete (task)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from sqlalchemy import select

from vmshift.errors import ConflictError
from vmshift.model.api import PowerRequest, Task, TaskKind, Vm, VmCreate
from vmshift.model.enums import ConnectionState, PowerState
from vmshift.model.inputs import VmName
from vmshift.server.api.deps import core_of
from vmshift.server.api.openapi import BODY, PARAMS, errors
from vmshift.server.core import ServerCore
from vmshift.server.db.schema import VmRow
from vmshift.server.inventory import get_vm
from vmshift.server.tasks import TaskEngine
from vmshift.server.views import task_view, vm_view
from vmshift.server.vm_create import create_vm_row
from vmshift.server.vm_tasks import (
    create_body,
    delete_body,
    power_body,
    refuse_delete_while_a_qemu_runs,
    suspend_body,
)

router = APIRouter()


@router.get("/vms")
async def list_vms(core: ServerCore = Depends(core_of)) -> list[Vm]:
    with core.sessions() as s:
        return [vm_view(v) for v in s.scalars(select(VmRow).order_by(VmRow.name))]


@router.get("/vms/{name}", responses=errors(*PARAMS, 404))
async def get_vm_route(name: VmName, core: ServerCore = Depends(core_of)) -> Vm:
    with core.sessions() as s:
        return vm_view(get_vm(s, name))


@router.post("/vms", status_code=202, responses=errors(*BODY, 404, 409))
async def create_vm(body: VmCreate, core: ServerCore = Depends(core_of)) -> Task:
    with core.sessions.begin() as s:
        create_vm_row(s, body)
        task = TaskEngine.create(s, TaskKind.VM_CREATE, body.name, {"start": body.start})
        view = task_view(task)
    core.tasks.start(view.id, body.name, create_body(core.sessions, core.agents, body.name, body.start))
    return view


@router.post("/vms/{name}/power", status_code=202, responses=errors(*BODY, 404, 409))
async def power_vm(name: VmName, body: PowerRequest, core: ServerCore = Depends(core_of)) -> Task:
    with core.sessions.begin() as s:
        vm = get_vm(s, name)
        if vm.host.connection_state is not ConnectionState.CONNECTED:
            raise ConflictError(
                f"Host {vm.host.name} of VM {name} is disconnected.",
                hint="Wait until the host is connected again.",
            )
        task = TaskEngine.create(s, TaskKind.VM_POWER, name, {"action": body.action.value})
        view = task_view(task)
    core.tasks.start(view.id, name, power_body(core.sessions, core.agents, name, body.action))
    return view


@router.post("/vms/{name}/suspend", status_code=202, responses=errors(*PARAMS, 404, 409))
async def suspend_vm(name: VmName, core: ServerCore = Depends(core_of)) -> Task:
    """Save a running or paused VM's state to its folder and stop it; resume it with power 'resume'
    or 'start' (POST /vms/NAME/resume does that too). docs/suspend.md."""
    with core.sessions.begin() as s:
        vm = get_vm(s, name)
        if vm.host.connection_state is not ConnectionState.CONNECTED:
            raise ConflictError(
                f"Host {vm.host.name} of VM {name} is disconnected.",
                hint="Wait until the host is connected again.",
            )
        if vm.power_state not in (PowerState.POWERED_ON, PowerState.PAUSED):
            raise ConflictError(
                f"VM {name} is {vm.power_state.value}; only a running or paused VM can be suspended.",
                hint="Start it first." if vm.power_state is not PowerState.SUSPENDED else "Nothing to do.",
            )
        task = TaskEngine.create(s, TaskKind.VM_SUSPEND, name)
        view = task_view(task)
    core.tasks.start(view.id, name, suspend_body(core.sessions, core.agents, name))
    return view


@router.delete("/vms/{name}", status_code=202, responses=errors(*PARAMS, 404, 409, 502))
async def delete_vm(name: VmName, core: ServerCore = Depends(core_of)) -> Task:
    with core.sessions() as s:
        vm = get_vm(s, name)
        if vm.power_state in (PowerState.POWERED_ON, PowerState.PAUSED):
            raise ConflictError(
                f"VM {name} is {vm.power_state.value}; it cannot be deleted while running.",
                hint="Power it off first (action 'stop' or 'shutdown').",
            )
    # Refused before a task exists, so nothing changes; the task checks again before it deletes.
    await refuse_delete_while_a_qemu_runs(core.sessions, core.agents, name, core.settings.agent_timeout_s)
    with core.sessions.begin() as s:
        get_vm(s, name)
        task = TaskEngine.create(s, TaskKind.VM_DELETE, name)
        view = task_view(task)
    core.tasks.start(view.id, name, delete_body(core.sessions, core.agents, name))
    return view
