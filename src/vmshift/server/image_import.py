"""``POST /images/import``: the server picks a host that sees the datastore, has its agent check the
file (a bad file is the request's 4xx, nothing written), then follows the conversion as a task and
refreshes the host's facts at the end, so ``vm create --disk-image NAME`` finds the image at once.
An OVA's disks are imported one after another, straight out of its tar (agent/image_import.py)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from vmshift.client.agent import AgentClient, AgentPool
from vmshift.errors import ConflictError, InvalidInputError, NotFoundError, QemuError
from vmshift.model.enums import ConnectionState
from vmshift.model.images import (
    AgentImageImport,
    ImageImportRequest,
    ImportFormat,
    ImportProgress,
    ImportState,
    OvaContents,
)
from vmshift.model.ovf import parse_ovf
from vmshift.server.db.schema import DatastoreRow, HostRow
from vmshift.server.inventory import apply_facts, get_host, names_hint
from vmshift.server.tasks import TaskBody, TaskContext

log = logging.getLogger(__name__)
POLL_S = 0.5


def choose_host(s: Session, req: ImageImportRequest, names: list[str] | None = None) -> tuple[str, str]:
    """(host name, agent address) of the host that imports: connected and seeing the datastore, and
    the image name (or each of ``names``) not taken on that datastore."""
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
        for name in names or [req.name]:
            if name in link.images:
                raise ConflictError(f"Datastore {ds.name} already has an image {name!r}.",
                                    hint="Pick another --name.")
    return host.name, host.address


async def import_all(agent: AgentClient, jobs: list[AgentImageImport], ctx: TaskContext,
                     span: int = 95) -> list[ImportProgress]:
    """Follow the imports of ``jobs`` one after another (the first was started by the request, which
    so refuses a bad first file with a 4xx), progress from 0 to ``span`` percent. If one fails or
    the task is cancelled, the images imported so far are removed before the error goes on."""
    done: list[ImportProgress] = []
    try:
        for i, job in enumerate(jobs):
            if i > 0:
                await agent.import_image(job)
            while True:
                progress = await agent.import_progress(job.name)
                if progress.state is ImportState.FAILED:
                    raise QemuError(progress.error or f"The import of {job.name!r} failed.",
                                    hint=progress.hint or "See the agent's log.")
                if progress.state is ImportState.DONE:
                    done.append(progress)
                    break
                phase = "converting" if len(jobs) == 1 else f"converting disk {i + 1} of {len(jobs)}"
                ctx.progress(phase, int((i + progress.share) / len(jobs) * span))
                await asyncio.sleep(POLL_S)
    except BaseException:
        await remove_images(agent, jobs[0].datastore, [p.name for p in done])
        raise
    return done


async def remove_images(agent: AgentClient, datastore: str, names: list[str]) -> None:
    for name in names:
        try:
            await asyncio.shield(agent.delete_image(datastore, name))
            log.info("removed image %s of an import that did not finish", name)
        except Exception as e:  # the host may be gone: say so, the rest of the undo still runs
            log.warning("could not remove image %s after a failed import: %s", name, e)


async def refresh_facts(sessions: sessionmaker[Session], agent: AgentClient, host_name: str) -> None:
    """Read the host's facts now, so its new images are in the inventory at once."""
    facts = await agent.facts()
    with sessions.begin() as s:
        host = s.scalar(select(HostRow).where(HostRow.name == host_name))
        if host is not None:
            apply_facts(s, host, facts)


def import_body(sessions: sessionmaker[Session], agents: AgentPool, jobs: list[AgentImageImport],
                host_name: str, address: str) -> TaskBody:
    async def body(ctx: TaskContext) -> dict[str, Any]:
        agent = agents.get(address)
        done = await import_all(agent, jobs, ctx)
        ctx.progress("registering", 97)
        await refresh_facts(sessions, agent, host_name)
        first = done[0]
        return {"image": first.name, "images": [p.name for p in done], "datastore": first.datastore,
                "host": host_name, "format": first.format.value, "virtual_size_mib": first.virtual_size_mib}

    return body


def ova_jobs(contents: OvaContents, req: ImageImportRequest) -> list[AgentImageImport]:
    """One image per disk file of the OVA: ``NAME`` for a lone disk, else ``NAME-diskN``."""
    vm = parse_ovf(contents.descriptor, f"The OVF descriptor {contents.descriptor_name} of {req.file}")
    files = [d.source for d in vm.disks if d.source is not None]
    missing = [f for f in files if f not in contents.files]
    if missing or not files:
        raise InvalidInputError(f"The OVA {req.file} " + (f"lacks the disk files {', '.join(missing)} its "
                                "descriptor names." if missing else "describes no disk file."),
                                hint="Export the VM again.")
    names = [req.name] if len(files) == 1 else [f"{req.name}-disk{i}" for i in range(len(files))]
    return [AgentImageImport(file=req.file, name=name, datastore=req.datastore, format=ImportFormat.VMDK,
                             member=member) for name, member in zip(names, files, strict=True)]
