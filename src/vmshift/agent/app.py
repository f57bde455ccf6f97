"""The agent's HTTP API (FastAPI). See docs/design/contracts.md, section "Agent"."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import Field
from starlette.types import ASGIApp, Receive, Scope, Send

from vmshift.agent.config import AgentConfig
from vmshift.agent.datastores import Datastores
from vmshift.agent.facts import HostProbe, host_facts, probe_host
from vmshift.agent.guard import require_allowed
from vmshift.agent.host_stream import HostStream
from vmshift.agent.image_import import ImageImports
from vmshift.agent.image_import import router as image_import_router
from vmshift.agent.iscsi_disks import IscsiDisks
from vmshift.agent.iscsi_registry import IscsiRegistry
from vmshift.agent.migration_source import OutgoingMigrations
from vmshift.agent.migration_store import MigrationStore
from vmshift.agent.migration_target import IncomingMigrations
from vmshift.agent.netperf import NetperfSinks
from vmshift.agent.record_retention import RecordRetention
from vmshift.agent.routes_datastores import router as datastores_router
from vmshift.agent.routes_disk_exports import router as disk_exports_router
from vmshift.agent.routes_migration import MigrationRoles
from vmshift.agent.routes_migration import router as migration_router
from vmshift.agent.routes_moves import router as moves_router
from vmshift.agent.routes_moves import start_moves
from vmshift.agent.routes_suspend import router as suspend_router
from vmshift.agent.routes_tls import router as tls_router
from vmshift.agent.serial_log import DRAIN_INTERVAL_S
from vmshift.agent.storage_watch import StorageWatch
from vmshift.agent.supervisor import Supervisor
from vmshift.agent.tls_server import AgentTls
from vmshift.agent.vmfiles import VmFiles
from vmshift.errors import InvalidInputError
from vmshift.http_edge import install_error_handlers
from vmshift.model.base import RequestModel
from vmshift.model.enums import PowerAction
from vmshift.model.host import HostFacts
from vmshift.model.host_stream import STREAM_MEDIA_TYPE, STREAM_PATH
from vmshift.model.inputs import VmName
from vmshift.model.vm import VmRuntime, VmSpec
from vmshift.tls.files import private_dir

log = logging.getLogger(__name__)
REFRESH_INTERVAL_S = 1.0


class AgentPowerRequest(RequestModel):
    action: PowerAction
    timeout_s: float = Field(default=30.0, gt=0, le=3600)


class AgentState:
    """Everything the request handlers use; built in the app's lifespan."""

    def __init__(self, config: AgentConfig, probe: HostProbe, datastores: Datastores,
                 supervisor: Supervisor) -> None:
        self.config = config
        self.probe = probe
        self.datastores = datastores
        self.supervisor = supervisor
        self.stream = HostStream(supervisor.list_vms, self.facts, config.stats_interval_s)
        supervisor.publish_now = self.stream.look_now

    async def facts(self) -> HostFacts:
        return await asyncio.to_thread(host_facts, self.config, self.probe, self.datastores,
                                       self.supervisor.qemu_identity)


class PokeStreamOnChange:
    """ASGI middleware: after any request that may change a VM (every method but GET), the host
    stream looks at once, so the server hears of it without waiting for the next scan."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
        if scope["type"] == "http" and scope.get("method") not in ("GET", "HEAD"):
            agent: AgentState | None = getattr(scope["app"].state, "agent", None)
            if agent is not None:
                agent.stream.poke()


async def end_streams(app: FastAPI) -> None:
    """End the open host streams (the agent is shutting down)."""
    agent: AgentState | None = getattr(app.state, "agent", None)
    if agent is not None:
        await agent.stream.end_streams()


def _state(request: Request) -> AgentState:
    agent: AgentState = request.app.state.agent
    return agent


State = Annotated[AgentState, Depends(_state)]


async def _serial_loop(supervisor: Supervisor) -> None:
    while True:
        await asyncio.sleep(DRAIN_INTERVAL_S)
        try:
            await supervisor.drain_serial_all()
        except Exception:
            log.exception("draining the serial consoles failed")


async def _refresh_loop(supervisor: Supervisor) -> None:
    while True:
        await asyncio.sleep(REFRESH_INTERVAL_S)
        try:
            await supervisor.refresh()
        except Exception:
            log.exception("refreshing VM states failed")


def create_app(config: AgentConfig, tls: AgentTls | None = None) -> FastAPI:
    """``tls``: the agent's certificates and serving context (agent/tls_server.py); every route
    requires a caller the guard admits (agent/access.py)."""
    tls = tls or AgentTls(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        private_dir(config.state_dir)
        registry = app.state.iscsi_registry = IscsiRegistry(config.registered_dir)
        datastores = Datastores([*config.datastores, *registry.paths()], config.name,
                                config.state_dir / "share-proof.json")
        probe = await probe_host(config, datastores)
        iscsi_disks = IscsiDisks(config.name, {**config.storage_role_tokens, **registry.token_files()})
        supervisor = Supervisor(config, VmFiles(datastores, config.state_dir, config.qemu_img, iscsi_disks),
                                probe.accelerator)
        await supervisor.attach_all()
        agent = app.state.agent = AgentState(config, probe, datastores, supervisor)
        app.state.image_imports = image_imports = ImageImports(datastores, config.qemu_img)
        await agent.stream.start()
        store = MigrationStore(config.state_dir)
        roles = MigrationRoles(supervisor, OutgoingMigrations(supervisor, store),
                               IncomingMigrations(supervisor, store, config.migration_address),
                               NetperfSinks(config.migration_address), config.migration_address)
        app.state.migration = roles
        await roles.incoming.resume_all()
        await roles.outgoing.resume_all()
        moves = await start_moves(app, config, supervisor, datastores)
        retention = RecordRetention(store, moves.store, config.record_retention_days,
                                    roles.outgoing.release, moves.release)
        retention.start()  # after the resumes: what they picked up is unfinished, never removed
        refresher = asyncio.create_task(_refresh_loop(supervisor), name="agent-refresh")
        drainer = asyncio.create_task(_serial_loop(supervisor), name="agent-serial-drain")
        watcher = asyncio.create_task(StorageWatch(supervisor, datastores).run(), name="agent-storage-watch")
        log.info("agent %s ready on %s", config.name, config.listen)
        try:
            yield
        finally:
            for task in (refresher, drainer, watcher):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await retention.stop()
            await agent.stream.close()
            await roles.close()
            await moves.close()
            await image_imports.close()
            await supervisor.close()
            log.info("agent %s stopped; its VMs keep running", config.name)

    app = FastAPI(title="vmshift agent", version="1", lifespan=lifespan,
                  dependencies=[Depends(require_allowed)])
    app.state.tls = tls
    app.add_middleware(PokeStreamOnChange)

    install_error_handlers(app, what="agent", api_doc_hint="See docs/agent.md for the agent API.")

    @app.get("/api/v1/health")
    async def health(agent: State) -> dict[str, Any]:
        return {"name": agent.config.name, "time": time.time()}

    @app.get("/api/v1/facts")
    async def facts(agent: State) -> HostFacts:
        return await agent.facts()

    @app.get(f"/api/v1{STREAM_PATH}", response_class=StreamingResponse)
    async def stream(agent: State, epoch: Annotated[str | None, Query(max_length=64)] = None,
                     since: Annotated[int | None, Query(ge=0)] = None) -> StreamingResponse:
        """The host stream (model/host_stream.py): newline-delimited JSON messages, endless."""
        return StreamingResponse(agent.stream.lines(epoch, since), media_type=STREAM_MEDIA_TYPE)

    @app.get("/api/v1/vms")
    async def list_vms(agent: State) -> list[VmRuntime]:
        return await agent.supervisor.list_vms()

    @app.put("/api/v1/vms/{name}")
    async def define_vm(name: VmName, spec: VmSpec, agent: State) -> VmRuntime:
        if spec.name != name:
            raise InvalidInputError(f"The URL names VM {name!r} but the body names {spec.name!r}.",
                                    hint="Use the same name in both.")
        return await agent.supervisor.define(spec)

    @app.get("/api/v1/vms/{name}")
    async def get_vm(name: VmName, agent: State) -> VmRuntime:
        return await agent.supervisor.runtime(name)

    @app.post("/api/v1/vms/{name}/power")
    async def power_vm(name: VmName, body: AgentPowerRequest, agent: State) -> VmRuntime:
        return await agent.supervisor.power(name, body.action, body.timeout_s)

    @app.delete("/api/v1/vms/{name}")
    async def delete_vm(name: VmName, agent: State, keep_files: bool = False) -> dict[str, str]:
        """Delete the VM and its files; ``keep_files``: only forget it here (its files moved on)."""
        if keep_files:
            await agent.supervisor.unregister_stopped(name)
            return {"unregistered": name}
        await agent.supervisor.delete(name)
        return {"deleted": name}

    @app.get("/api/v1/vms/{name}/serial", response_class=PlainTextResponse)
    async def serial(name: VmName, agent: State,
                     tail_bytes: Annotated[int, Query(ge=0, le=16 << 20)] = 65536) -> str:
        return await agent.supervisor.serial_tail(name, tail_bytes)

    app.include_router(tls_router)
    app.include_router(migration_router)
    app.include_router(disk_exports_router)
    app.include_router(datastores_router)
    app.include_router(moves_router)
    app.include_router(suspend_router)
    app.include_router(image_import_router)
    return app
