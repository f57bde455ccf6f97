"""HTTP routes of the live-migration roles (docs/design/contracts.md, "Live migration")."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from vmshift.agent.migration_source import OutgoingMigrations
from vmshift.agent.migration_target import IncomingMigrations
from vmshift.agent.netperf import NetperfSinks, measure
from vmshift.agent.supervisor import Supervisor
from vmshift.model.agent_migration import (
    DirtyRate,
    DirtyRateRequest,
    FinalizeRequest,
    Incoming,
    IncomingRequest,
    IncomingState,
    Measurement,
    MeasureRequest,
    MigrationProgress,
    OutgoingMigration,
    Sink,
    SinkRequest,
)
from vmshift.model.inputs import ObjectId, VmName
from vmshift.model.vm import VmRuntime
from vmshift.qemu.migration_qmp import measure_dirty_rate


class MigrationRoles:
    """The migration parts of the agent's state (built in the app's lifespan)."""

    def __init__(self, supervisor: Supervisor, outgoing: OutgoingMigrations, incoming: IncomingMigrations,
                 sinks: NetperfSinks, migration_address: str) -> None:
        self.supervisor = supervisor
        self.outgoing = outgoing
        self.incoming = incoming
        self.sinks = sinks
        self.migration_address = migration_address

    async def close(self) -> None:
        await self.outgoing.close()
        await self.sinks.close()


def _roles(request: Request) -> MigrationRoles:
    roles: MigrationRoles = request.app.state.migration
    return roles


Roles = Annotated[MigrationRoles, Depends(_roles)]
router = APIRouter(prefix="/api/v1")


@router.post("/vms/{name}/dirty-rate")
async def dirty_rate(name: VmName, body: DirtyRateRequest, roles: Roles) -> DirtyRate:
    qmp = roles.supervisor.qmp_session(name)
    rate = await measure_dirty_rate(qmp, body.seconds)
    zeros = await asyncio.to_thread(roles.supervisor.guest_ram_zero_fraction, name)
    return DirtyRate(dirty_rate_bps=rate, seconds=body.seconds,
                     resident_bytes=roles.supervisor.guest_ram_resident_bytes(name), zero_fraction=zeros)


@router.post("/netperf/sink")
async def netperf_sink(body: SinkRequest, roles: Roles) -> Sink:
    return await roles.sinks.open(body.seconds)


@router.post("/netperf/measure")
async def netperf_measure(body: MeasureRequest, roles: Roles) -> Measurement:
    return await measure(roles.migration_address, body.address, body.port, body.seconds)


@router.post("/migrations/incoming")
async def incoming(body: IncomingRequest, roles: Roles) -> Incoming:
    return await roles.incoming.prepare(body)


@router.get("/migrations/{migration_id}/incoming")
async def incoming_state(migration_id: ObjectId, roles: Roles) -> IncomingState:
    return await roles.incoming.state(migration_id)


@router.post("/migrations/{migration_id}/activate")
async def activate(migration_id: ObjectId, roles: Roles) -> VmRuntime:
    return await roles.incoming.activate(migration_id)


@router.delete("/migrations/{migration_id}")
async def rollback(migration_id: ObjectId, roles: Roles) -> dict[str, int]:
    await roles.incoming.rollback(migration_id)
    return {"rolled_back": migration_id}


@router.post("/migrations")
async def outgoing(body: OutgoingMigration, roles: Roles) -> MigrationProgress:
    return await roles.outgoing.start(body)


@router.get("/migrations/{migration_id}")
async def progress(migration_id: ObjectId, roles: Roles) -> MigrationProgress:
    return roles.outgoing.get(migration_id)


@router.post("/migrations/{migration_id}/finalize")
async def finalize(migration_id: ObjectId, body: FinalizeRequest, roles: Roles) -> MigrationProgress:
    return await roles.outgoing.finalize(migration_id, body)


@router.post("/migrations/{migration_id}/cancel")
async def cancel(migration_id: ObjectId, roles: Roles) -> MigrationProgress:
    return await roles.outgoing.cancel(migration_id)


@router.delete("/migrations/{migration_id}/grant")
async def revoke_grant(migration_id: int, roles: Roles) -> dict[str, bool]:
    """The server: the migration ended, its source host may call this agent no more."""
    return {"revoked": roles.incoming.revoke_grant(migration_id)}
