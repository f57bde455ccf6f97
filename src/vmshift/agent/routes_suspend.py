"""HTTP routes of suspend (docs/suspend.md). Resume is the power action ``resume`` (or ``start``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from vmshift.agent.supervisor import Supervisor
from vmshift.errors import NotFoundError
from vmshift.model.inputs import VmName
from vmshift.model.suspend import SuspendProgress, SuspendResult


def _supervisor(request: Request) -> Supervisor:
    supervisor: Supervisor = request.app.state.agent.supervisor
    return supervisor


Sup = Annotated[Supervisor, Depends(_supervisor)]
router = APIRouter(prefix="/api/v1")


@router.post("/vms/{name}/suspend")
async def suspend_vm(name: VmName, supervisor: Sup) -> SuspendResult:
    """Save the VM's state and stop its QEMU; answers when the VM is suspended (or runs on after a
    failure, which is the error answered)."""
    return await supervisor.suspend(name)


@router.get("/vms/{name}/suspend")
async def suspend_progress(name: VmName, supervisor: Sup) -> SuspendProgress:
    """The running (or the last) suspend of the VM on this host since the agent started."""
    progress = supervisor.suspends.get(name)
    if progress is None:
        raise NotFoundError(f"No suspend of VM {name!r} ran on this host since its agent started.",
                            hint="Start one with POST /api/v1/vms/NAME/suspend.")
    return progress
