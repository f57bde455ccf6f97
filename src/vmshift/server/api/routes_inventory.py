"""About, datacenters, clusters, hosts, datastores, networks.

Routes that only touch the database are plain ``def``: FastAPI runs them in its thread pool, so a
slow query never stalls the event loop. Those that also talk to an agent stay ``async`` and do their
database work in that pool (``run_in_threadpool``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import TypeAdapter
from sqlalchemy import Select, select
from sqlalchemy.orm import selectinload
from starlette.concurrency import run_in_threadpool

from vmshift.errors import ConflictError
from vmshift.model.api import (
    About,
    Cluster,
    ClusterCreate,
    Datacenter,
    DatacenterCreate,
    Datastore,
    EventKind,
    FingerprintBody,
    Host,
    HostAdd,
    IpPool,
    MaintenanceRequest,
    Network,
)
from vmshift.model.enums import ConnectionState
from vmshift.model.inputs import ClusterName, DatastoreName, HostName, Name, NetworkName
from vmshift.model.iscsi import IscsiDatastoreAdd
from vmshift.model.paging import ListName
from vmshift.server.api.deps import core_of
from vmshift.server.api.json_pieces import JsonPieces, json_list
from vmshift.server.api.openapi import BODY, PARAMS, Responses, errors
from vmshift.server.api.paging import (
    Page,
    PageRequest,
    answer,
    answer_json,
    cached_page,
    cut,
    keyset,
    list_answers,
    page,
)
from vmshift.server.core import ServerCore
from vmshift.server.datastore_add import add_iscsi_datastore, remove_iscsi_datastore
from vmshift.server.db.schema import (
    ClusterRow,
    DatacenterRow,
    DatastoreRow,
    HostDatastoreRow,
    HostNetworkRow,
    HostRow,
    NetworkRow,
)
from vmshift.server.db.setup import DEFAULT_CLUSTER
from vmshift.server.events import record_event
from vmshift.server.host_enroll import FingerprintError, enroll, rotate
from vmshift.server.inventory import (
    add_host,
    get_cluster,
    get_datacenter,
    get_host,
    get_network,
    unproven_hosts,
)
from vmshift.server.views import (
    HOST_LIST_COLUMNS,
    cluster_view,
    datacenter_view,
    datastore_view,
    host_list_view,
    host_view,
    network_view,
)

router = APIRouter()


@router.get("/about")
async def about(core: ServerCore = Depends(core_of)) -> About:
    return About(version="0.1.0", database=core.settings.database_kind())


_DATACENTERS = TypeAdapter(list[Datacenter])
_CLUSTERS = TypeAdapter(list[Cluster])
_HOST = TypeAdapter(Host)
_HOST_PIECES: JsonPieces[int] = JsonPieces(max_kept=2_000)  # by host id (vSphere: 96 hosts a cluster)


def _host_piece(row: Sequence[Any], vm_names: list[str]) -> bytes:
    """A host's JSON in a list, made again when its row or its VMs' names change."""
    return _HOST_PIECES.get(row[0], (tuple(row), vm_names),
                            lambda: _HOST.dump_json(host_list_view(row, vm_names)))


_DATASTORES = TypeAdapter(list[Datastore])
_NETWORKS = TypeAdapter(list[Network])


@router.get("/datacenters", response_model=list[Datacenter], responses=list_answers(list[Datacenter]))
def list_datacenters(
    request: Request, paging: PageRequest = Depends(page), core: ServerCore = Depends(core_of)
) -> Response:
    """Datacenters by name, a page at a time (docs/api.md, "Paging")."""
    q = keyset(select(DatacenterRow).options(selectinload(DatacenterRow.clusters)), DatacenterRow.name,
               paging.after(ListName.DATACENTERS), paging.limit)
    with core.sessions() as s:
        got = cut(s.scalars(q).all(), paging.limit, ListName.DATACENTERS, lambda d: d.name)
        views = Page([datacenter_view(d) for d in got.items], got.next_cursor)
    return answer(request, views, _DATACENTERS)


@router.post("/datacenters", status_code=201, responses=errors(*BODY, 409))
def create_datacenter(body: DatacenterCreate, core: ServerCore = Depends(core_of)) -> Datacenter:
    with core.sessions.begin() as s:
        if s.scalar(select(DatacenterRow).where(DatacenterRow.name == body.name)) is not None:
            raise ConflictError(f"Datacenter {body.name!r} already exists.", hint="Choose another name.")
        row = DatacenterRow(name=body.name)
        s.add(row)
        record_event(s, EventKind.DATACENTER_CREATED, body.name, f"Datacenter {body.name} created.")
        s.flush()
        return datacenter_view(row)


@router.get("/clusters", response_model=list[Cluster], responses=list_answers(list[Cluster]))
def list_clusters(
    request: Request, paging: PageRequest = Depends(page), core: ServerCore = Depends(core_of)
) -> Response:
    """Clusters by name, a page at a time."""
    q = keyset(select(ClusterRow), ClusterRow.name, paging.after(ListName.CLUSTERS), paging.limit)
    with core.sessions() as s:
        got = cut(s.scalars(q).all(), paging.limit, ListName.CLUSTERS, lambda c: c.name)
        views = Page([cluster_view(s, c) for c in got.items], got.next_cursor)
    return answer(request, views, _CLUSTERS)


@router.post("/clusters", status_code=201, responses=errors(*BODY, 404, 409))
def create_cluster(body: ClusterCreate, core: ServerCore = Depends(core_of)) -> Cluster:
    with core.sessions.begin() as s:
        dc = get_datacenter(s, body.datacenter)
        if s.scalar(select(ClusterRow).where(ClusterRow.name == body.name)) is not None:
            raise ConflictError(f"Cluster {body.name!r} already exists.", hint="Choose another name.")
        row = ClusterRow(name=body.name, datacenter=dc)
        s.add(row)
        record_event(s, EventKind.CLUSTER_CREATED, body.name, f"Cluster {body.name} created in {dc.name}.")
        s.flush()
        return cluster_view(s, row)


@router.get("/hosts", response_model=list[Host], responses=list_answers(list[Host], etag=True))
def list_hosts(
    request: Request,
    cluster: ClusterName | None = Query(None, description="only the hosts of this cluster"),
    connection_state: ConnectionState | None = Query(None, description="only hosts in this state"),
    name_prefix: Name | None = Query(None, description="only hosts whose name starts with this"),
    paging: PageRequest = Depends(cached_page),
    core: ServerCore = Depends(core_of),
) -> Response:
    """Hosts by name, a page at a time; filters combine. The ETag changes with anything the page
    shows (docs/api.md, "Incremental reads")."""
    q = cast("Select[Any]", select(*HOST_LIST_COLUMNS).join(HostRow.cluster))
    if cluster is not None:
        q = q.where(ClusterRow.name == cluster)
    if connection_state is not None:
        q = q.where(HostRow.connection_state == connection_state)
    if name_prefix is not None:
        q = q.where(HostRow.name.startswith(name_prefix, autoescape=True))
    q = keyset(q, HostRow.name, paging.after(ListName.HOSTS), paging.limit)
    with core.sessions() as s:
        got = cut(s.execute(q).all(), paging.limit, ListName.HOSTS, lambda r: str(r[1]))
        names = core.vm_names.of(s, [r[0] for r in got.items])
    pieces = [_host_piece(r, names[r[0]]) for r in got.items]
    return answer_json(request, json_list(pieces), got.next_cursor, if_none_match=paging.if_none_match,
                       etag=True)


_HOST_ADD_ANSWERS: Responses = {
    201: {"model": Host, "description": "the host is registered with the certificate it was issued"},
    409: {"model": FingerprintBody, "description": "The agent's fingerprint was not confirmed or differs "
          "(the body carries it), or the host is already in the inventory: nothing was registered."},
}


@router.post("/hosts", status_code=201, response_model=None,
             responses=errors(*BODY, 404, 409, 502, extra=_HOST_ADD_ANSWERS))
async def create_host(body: HostAdd, core: ServerCore = Depends(core_of)) -> Host | JSONResponse:
    """Confirm the agent's certificate fingerprint, issue it a certificate, register it
    (docs/agent-tls.md). Unconfirmed or different fingerprint: 409 carrying the agent's one."""

    def check_address() -> None:  # fail fast on an unknown cluster or a known address before the agent
        with core.sessions() as s:
            get_cluster(s, body.cluster or DEFAULT_CLUSTER)
            if s.scalar(select(HostRow).where(HostRow.address == body.address)) is not None:
                raise ConflictError(f"A host with address {body.address} is already in the inventory.",
                                    hint="Each agent is added once; 'vmshift host rotate-cert' renews its "
                                    "certificate.")

    await run_in_threadpool(check_address)

    def check_new(name: str) -> None:
        with core.sessions() as s:
            if s.scalar(select(HostRow).where(HostRow.name == name)) is not None:
                raise ConflictError(f"A host named {name!r} is already in the inventory.",
                                    hint="Remove it first, or give the agent another name.")

    try:
        got = await enroll(body.address, body.fingerprint, core.settings.state_dir,
                           core.settings.agent_timeout_s, check_new)
    except FingerprintError as e:
        refused = {"error": e.to_dict(), "fingerprint": e.fingerprint}
        return JSONResponse(status_code=e.status, content=refused)

    def register() -> Host:
        with core.sessions.begin() as s:
            host = add_host(s, body.address, get_cluster(s, body.cluster or DEFAULT_CLUSTER), got.facts)
            host.cert_fingerprint, host.cert_not_after = got.fingerprint, got.not_after
            s.flush()
            return host_view(host)

    return await run_in_threadpool(register)


@router.post("/hosts/{name}/rotate-cert", responses=errors(*PARAMS, 404, 502))
async def rotate_host_cert(name: HostName, core: ServerCore = Depends(core_of)) -> Host:
    """A new key on the host, a new certificate from the cluster CA; the old one is not served again."""

    def address_of() -> str:
        with core.sessions() as s:
            return get_host(s, name).address

    address = await run_in_threadpool(address_of)
    fingerprint, not_after = await rotate(name, address, core.settings.state_dir,
                                          core.settings.agent_timeout_s)

    def record() -> Host:
        with core.sessions.begin() as s:
            host = get_host(s, name)
            host.cert_fingerprint, host.cert_not_after = fingerprint, not_after
            record_event(s, EventKind.HOST_CERT_ROTATED, name,
                         f"Host {name} got a new certificate ({fingerprint}).")
            s.flush()
            return host_view(host)

    return await run_in_threadpool(record)


@router.get("/hosts/{name}", responses=errors(*PARAMS, 404))
def get_host_route(name: HostName, core: ServerCore = Depends(core_of)) -> Host:
    with core.sessions() as s:
        return host_view(get_host(s, name), core.heartbeat.stream_state(name))


@router.delete("/hosts/{name}", status_code=204, responses=errors(*PARAMS, 404, 409))
def delete_host(name: HostName, core: ServerCore = Depends(core_of)) -> None:
    with core.sessions.begin() as s:
        host = get_host(s, name)
        if host.vms:
            raise ConflictError(
                f"Host {name} still has {len(host.vms)} VM(s) registered.",
                hint="Delete or migrate its VMs first: " + ", ".join(sorted(v.name for v in host.vms)),
            )
        s.delete(host)
        record_event(s, EventKind.HOST_REMOVED, name, f"Host {name} removed from the inventory.")


@router.post("/hosts/{name}/maintenance", responses=errors(*BODY, 404, 409))
def host_maintenance(
    name: HostName, body: MaintenanceRequest, core: ServerCore = Depends(core_of)
) -> Host:
    with core.sessions.begin() as s:
        host = get_host(s, name)
        if body.enter and not host.maintenance and host.vms:
            raise ConflictError(
                f"Host {name} still has {len(host.vms)} VM(s), and a host enters maintenance mode only "
                "when empty.",
                hint=f"Evacuate it with 'vmshift host maintenance enter {name}' (--dry-run shows the plan).",
            )
        if host.maintenance != body.enter:
            host.maintenance = body.enter
            record_event(
                s,
                EventKind.HOST_MAINTENANCE,
                name,
                f"Host {name} {'entered' if body.enter else 'left'} maintenance mode.",
            )
        s.flush()
        return host_view(host)


@router.get("/datastores", response_model=list[Datastore], responses=list_answers(list[Datastore]))
def list_datastores(
    request: Request, paging: PageRequest = Depends(page), core: ServerCore = Depends(core_of)
) -> Response:
    """Datastores by name, a page at a time."""
    hosts = selectinload(DatastoreRow.hosts).joinedload(HostDatastoreRow.host)
    q = keyset(select(DatastoreRow).options(hosts), DatastoreRow.name, paging.after(ListName.DATASTORES),
               paging.limit)
    with core.sessions() as s:
        got = cut(s.scalars(q).all(), paging.limit, ListName.DATASTORES, lambda d: d.name)
        unproven = unproven_hosts(s)
        views = Page([datastore_view(d, unproven.get(d.uuid, ())) for d in got.items], got.next_cursor)
    return answer(request, views, _DATASTORES)


@router.post("/datastores", status_code=201, responses=errors(*BODY, 404, 409, 502))
async def add_datastore(body: IscsiDatastoreAdd, core: ServerCore = Depends(core_of)) -> Datastore:
    """Register an existing iSCSI target as a datastore on hosts (server/datastore_add.py): each host
    checks that the portal answers and the storage role serves the target; all hosts or none."""
    return await add_iscsi_datastore(core, body)


@router.delete("/datastores/{name}", status_code=204, responses=errors(*PARAMS, 404, 409, 502))
async def remove_datastore(name: DatastoreName, core: ServerCore = Depends(core_of)) -> Response:
    """Unregister a datastore that `datastore add` registered, on every host that has it; refused
    while a VM of the inventory is on it (server/datastore_add.py)."""
    await remove_iscsi_datastore(core, name)
    return Response(status_code=204)


@router.get("/networks", response_model=list[Network], responses=list_answers(list[Network]))
def list_networks(
    request: Request, paging: PageRequest = Depends(page), core: ServerCore = Depends(core_of)
) -> Response:
    """Networks by name, a page at a time."""
    hosts = selectinload(NetworkRow.hosts).joinedload(HostNetworkRow.host)
    q = keyset(select(NetworkRow).options(hosts), NetworkRow.name, paging.after(ListName.NETWORKS),
               paging.limit)
    with core.sessions() as s:
        got = cut(s.scalars(q).all(), paging.limit, ListName.NETWORKS, lambda n: n.name)
        views = Page([network_view(n) for n in got.items], got.next_cursor)
    return answer(request, views, _NETWORKS)


@router.put("/networks/{name}/ip-pool", responses=errors(*BODY, 404))
def set_ip_pool(name: NetworkName, body: IpPool, core: ServerCore = Depends(core_of)) -> Network:
    with core.sessions.begin() as s:
        net = get_network(s, name)
        net.pool_cidr, net.pool_first, net.pool_last = body.cidr, body.first, body.last
        record_event(
            s,
            EventKind.NETWORK_POOL_SET,
            name,
            f"Network {name} IP pool set to {body.first}-{body.last} in {body.cidr}.",
        )
        s.flush()
        return network_view(net)
