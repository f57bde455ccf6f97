"""``POST /images/import``: the server picks a host that sees the datastore, has its agent check the
file (a bad file is the request's 4xx, nothing written), then follows the conversion as a task and
refreshes the host's facts at the end, so ``vm create --disk-image NAME`` finds the image at once."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from vmshift.client.agent import AgentPool
from vmshift.errors import ConflictError, NotFoundError, QemuError
from vmshift.model.enums import ConnectionState
from vmshift.model.images import ImageImportRequest, ImportState
from vmshift.server.db.schema import DatastoreRow, HostRow
from vmshift.server.inventory import apply_facts, get_host, names_hint
from vmshift.server.tasks import TaskBody, TaskContext

POLL_S = 0.5


def choose_host(s: Session, req: ImageImportRequest) -> tuple[str, str]:
    """(host name, agent address) of the host that imports: connected and seeing the datastore, and
    the image name not taken on that datastore."""
    ds = s.scalar(select(DatastoreRow).where(DatastoreRow.name == req.datastore))
    if ds is None:
        raise NotFoundError(f"Datastore {req.datastore!r} does not exist.",
                            hint=names_hint("datastores", list(s.scalars(select(DatastoreRow.name)))))
    seeing = sorted((link.host for link in ds.hosts), key=lambda h: h.name)
    if req.host is not None:
        host = get_host(s, req.host)
        if host not in seeing:
            raise NotFoundError(f"Host {host.name} does not see datastore {ds.name}.",
                                hint=names_hint(f"hosts that see {ds.name}", [h.name for h in seeing]))
        candidates = [host]
    else:
        candidates = seeing
    usable = [h for h in candidates if h.connection_state is ConnectionState.CONNECTED and not h.maintenance]
    if not usable:
        raise ConflictError(f"No connected host that sees datastore {ds.name} can import the image.",
                            hint="Wait until a host's agent answers again, or name one with --host.")
    host = usable[0]
    for link in ds.hosts:
        if req.name in link.images:
            raise ConflictError(f"Datastore {ds.name} already has an image {req.name!r}.",
                                hint="Pick another --name.")
    return host.name, host.address


def import_body(sessions: sessionmaker[Session], agents: AgentPool, req: ImageImportRequest,
                host_name: str, address: str) -> TaskBody:
    async def body(ctx: TaskContext) -> dict[str, Any]:
        agent = agents.get(address)
        while True:
            job = await agent.import_progress(req.name)
            if job.state is ImportState.FAILED:
                raise QemuError(job.error or f"The import of {req.name!r} failed.",
                                hint=job.hint or "See the agent's log.")
            if job.state is ImportState.DONE:
                break
            ctx.progress("converting", int(job.share * 95))
            await asyncio.sleep(POLL_S)
        ctx.progress("registering", 97)
        facts = await agent.facts()
        with sessions.begin() as s:
            host = s.scalar(select(HostRow).where(HostRow.name == host_name))
            if host is not None:
                apply_facts(s, host, facts)
        return {"image": req.name, "datastore": req.datastore, "host": host_name, "format": job.format.value,
                "virtual_size_mib": job.virtual_size_mib}

    return body
