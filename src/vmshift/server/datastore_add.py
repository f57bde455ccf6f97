"""`vmshift datastore add NAME --iscsi PORTAL --target IQN`: an existing iSCSI target (with the
storage role that makes its LUNs) registered as one datastore on hosts.

Each chosen host's agent checks from its own network that the portal answers and that the storage
role serves the target, then makes the datastore's folder (agent/iscsi_registry.py). All or
nothing: when one host refuses, the hosts done before it unregister it again, and the error is the
refusing host's. The new datastore is then read from each host's facts, so it is listed at once.
Until then the heartbeat leaves it out of what hosts report: a report read between a host's
registration and its rollback would otherwise list a datastore that no longer exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from sqlalchemy import select
from sqlalchemy.orm import selectinload
from starlette.concurrency import run_in_threadpool

from vmshift.errors import ConflictError, NotFoundError, VmshiftError
from vmshift.model.api import Datastore
from vmshift.model.enums import ConnectionState
from vmshift.model.host import HostFacts
from vmshift.model.iscsi import AgentIscsiDatastore, IscsiDatastoreAdd
from vmshift.server.core import ServerCore
from vmshift.server.db.schema import DatastoreRow, HostDatastoreRow, HostRow
from vmshift.server.inventory import apply_facts
from vmshift.server.views import datastore_view

log = logging.getLogger(__name__)


def _chosen_hosts(core: ServerCore, body: IscsiDatastoreAdd) -> list[tuple[str, str]]:
    """(name, address) of the hosts that get the datastore; 404/409 before anything is asked."""
    with core.sessions() as s:
        if s.scalar(select(DatastoreRow).where(DatastoreRow.name == body.name)) is not None:
            raise ConflictError(f"A datastore named {body.name!r} is already in the inventory.",
                                hint="Pick another name.")
        rows = s.scalars(select(HostRow).order_by(HostRow.name)).all()
        if body.hosts:
            known = {h.name: h for h in rows}
            unknown = [n for n in body.hosts if n not in known]
            if unknown:
                raise NotFoundError(f"Host {', '.join(unknown)} is not in the inventory.",
                                    hint="See 'vmshift host list'.")
            rows = [known[n] for n in dict.fromkeys(body.hosts)]
        if not rows:
            raise ConflictError("There is no host to add the datastore to.", hint="Add a host first.")
        away = [h.name for h in rows if h.connection_state is not ConnectionState.CONNECTED]
        if away:
            raise ConflictError(f"Host {', '.join(away)} is not connected: it cannot check the target.",
                                hint="Wait until it is, or name the hosts with --host.")
        return [(h.name, h.address) for h in rows]


async def add_iscsi_datastore(core: ServerCore, body: IscsiDatastoreAdd) -> Datastore:
    hosts = await run_in_threadpool(_chosen_hosts, core, body)
    req = AgentIscsiDatastore(name=body.name, uuid=str(uuid.uuid4()), portal=body.portal,
                              target=body.target, storage_role=body.storage_role, token=body.token)
    with core.heartbeat.withholding_datastore(body.name):
        done: list[str] = []
        try:
            for _, address in hosts:
                await core.agents.get(address).register_iscsi_datastore(req)
                done.append(address)
        except BaseException:
            for address in done:  # all or nothing: the hosts done before the refusal forget it again
                with contextlib.suppress(VmshiftError):
                    await asyncio.shield(core.agents.get(address).unregister_datastore(body.name))
            raise
        for name, address in hosts:
            facts = await core.agents.get(address).facts()
            await run_in_threadpool(_apply, core, name, facts)
    return await run_in_threadpool(_view, core, body.name)


def _apply(core: ServerCore, name: str, facts: HostFacts) -> None:
    with core.sessions.begin() as s:
        host = s.scalar(select(HostRow).where(HostRow.name == name))
        if host is not None:
            apply_facts(s, host, facts)


def _view(core: ServerCore, name: str) -> Datastore:
    with core.sessions() as s:
        row = s.scalar(select(DatastoreRow).where(DatastoreRow.name == name)
                       .options(selectinload(DatastoreRow.hosts).joinedload(HostDatastoreRow.host)))
        if row is None:
            raise NotFoundError(f"Datastore {name!r} was registered but no host reports it.",
                                hint="See the agents' logs.")
        return datastore_view(row)
