"""`vmshift datastore add NAME --iscsi PORTAL --target IQN`: an existing iSCSI target (with the
storage role that makes its LUNs) registered as one datastore on hosts; `datastore remove NAME`
takes it back.

Each chosen host's agent checks from its own network that the portal answers and that the storage
role serves the target, then makes the datastore's folder (agent/iscsi_registry.py). All or
nothing: when one host refuses, the hosts done before it unregister it again, and the error is the
refusing host's. The new datastore is then read from each host's facts, so it is listed at once.
Until then the heartbeat leaves it out of what hosts report (server/withheld_datastores.py).

Removal is refused while a VM of the inventory has its home or a disk there; each host's agent
refuses too while a VM of its own is in it, and a datastore of an agent's config file is removed
there, not here. The hosts that said no keep it, and the error names them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload
from starlette.concurrency import run_in_threadpool

from vmshift.errors import ConflictError, NotFoundError, VmshiftError
from vmshift.model.api import Datastore, EventKind
from vmshift.model.enums import ConnectionState
from vmshift.model.host import HostFacts
from vmshift.model.iscsi import AgentIscsiDatastore, IscsiDatastoreAdd
from vmshift.server.core import ServerCore
from vmshift.server.db.schema import DatastoreRow, HostDatastoreRow, HostRow, VmRow
from vmshift.server.events import record_event
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
    with core.heartbeat.withheld.holding(body.name):
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


def _with_hosts(s: Session, name: str) -> DatastoreRow | None:
    """Datastore ``name`` with its hosts loaded (None: not in the inventory)."""
    return s.scalar(select(DatastoreRow).where(DatastoreRow.name == name)
                    .options(selectinload(DatastoreRow.hosts).joinedload(HostDatastoreRow.host)))


def _view(core: ServerCore, name: str) -> Datastore:
    with core.sessions() as s:
        row = _with_hosts(s, name)
        if row is None:
            raise NotFoundError(f"Datastore {name!r} was registered but no host reports it.",
                                hint="See the agents' logs.")
        return datastore_view(row)


def _holders(core: ServerCore, name: str) -> list[tuple[str, str]]:
    """(name, address) of the hosts that have datastore ``name``; 404, or 409 while a VM uses it."""
    with core.sessions() as s:
        row = _with_hosts(s, name)
        if row is None:
            raise NotFoundError(f"Datastore {name!r} is not in the inventory.",
                                hint="See 'vmshift datastore list'.")
        users = sorted(vm.name for vm in s.scalars(select(VmRow)).all()
                       if vm.spec.get("datastore") == name
                       or any(d.get("datastore") == name for d in vm.spec.get("disks") or []))
        if users:
            raise ConflictError(f"Datastore {name!r} holds VM {', '.join(users)}: it is not removed.",
                                hint="Move those VMs' files to another datastore (vm migrate --datastore) "
                                     "or delete them first.")
        return sorted((link.host.name, link.host.address) for link in row.hosts)


async def remove_iscsi_datastore(core: ServerCore, name: str) -> None:
    """Unregister a datastore that `datastore add` registered, on every host that has it."""
    hosts = await run_in_threadpool(_holders, core, name)
    with core.heartbeat.withheld.holding(name, [h for h, _ in hosts]):
        kept: list[str] = []
        first: VmshiftError | None = None
        for host, address in hosts:
            try:
                await core.agents.get(address).unregister_datastore(name)
            except VmshiftError as exc:
                kept.append(host)
                first = first or exc
        for host, address in hosts:
            with contextlib.suppress(VmshiftError):  # a host that is away sends its facts when back
                facts = await core.agents.get(address).facts()
                if host in kept:
                    await run_in_threadpool(_apply, core, host, facts)  # it still has it: as reported
                else:
                    await run_in_threadpool(_apply, core, host, _without(facts, name))
    await run_in_threadpool(_forget_if_unheld, core, name)
    if first is not None:
        gone = [h for h, _ in hosts if h not in kept]
        raise ConflictError(f"Host {', '.join(kept)} kept datastore {name!r}: {first.message}"
                            + (f" It was removed from {', '.join(gone)}." if gone else ""),
                            hint=first.hint or "Fix that on the host, then remove it again.")


def _without(facts: HostFacts, name: str) -> HostFacts:
    return facts.model_copy(update={"datastores": [d for d in facts.datastores if d.name != name]})


def _forget_if_unheld(core: ServerCore, name: str) -> None:
    with core.sessions.begin() as s:
        row = s.scalar(select(DatastoreRow).where(DatastoreRow.name == name)
                       .options(selectinload(DatastoreRow.hosts)))
        if row is not None and not row.hosts:
            s.delete(row)
            record_event(s, EventKind.DATASTORE_REMOVED, name, f"Datastore {name} ({row.uuid}) was removed.")
