"""Agent API: iSCSI datastores registered and unregistered at run time (agent/iscsi_registry.py)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request

from vmshift.agent.iscsi_registry import IscsiRegistry, check_target
from vmshift.errors import ConflictError
from vmshift.model.host import DatastoreInfo
from vmshift.model.inputs import DatastoreName
from vmshift.model.iscsi import AgentIscsiDatastore

if TYPE_CHECKING:
    from vmshift.agent.app import AgentState

router = APIRouter(prefix="/api/v1")


def _agent(request: Request) -> AgentState:
    agent: AgentState = request.app.state.agent
    return agent


def _registry(request: Request) -> IscsiRegistry:
    registry: IscsiRegistry = request.app.state.iscsi_registry
    return registry


@router.post("/datastores/iscsi", status_code=201)
async def register_iscsi(body: AgentIscsiDatastore, request: Request) -> DatastoreInfo:
    """Check that the portal answers and the storage role serves the target, then make the folder
    with the marker and the token (400 and nothing made when a check fails)."""
    agent, registry = _agent(request), _registry(request)
    if any(ds.name == body.name or ds.uuid == body.uuid for ds in agent.datastores.all()):
        raise ConflictError(f"Host {agent.config.name} already has a datastore named {body.name!r}.",
                            hint="Pick another name.")
    await check_target(agent.config.name, body)
    folder = await asyncio.to_thread(registry.add, body)
    agent.datastores.add_path(folder)
    agent.supervisor.files.iscsi.token_files[body.name] = registry.token_file(body.name)
    return agent.datastores.get(body.name).info()


@router.delete("/datastores/{name}")
async def unregister(name: DatastoreName, request: Request) -> dict[str, str]:
    """Undo ``register_iscsi`` (refused while a VM of this host is in it)."""
    agent, registry = _agent(request), _registry(request)
    await asyncio.to_thread(registry.remove, name)
    agent.datastores.remove_path(registry.folder(name))
    agent.supervisor.files.iscsi.token_files.pop(name, None)
    return {"removed": name}
