"""About, datacenters, clusters, hosts, datastores, networks."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import select

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
from vmshift.model.inputs import HostName, NetworkName
from vmshift.server.api.deps import core_of
from vmshift.server.api.openapi import BODY, PARAMS, Responses, errors
from vmshift.server.core import ServerCore
from vmshift.server.db.schema import ClusterRow, DatacenterRow, DatastoreRow, HostRow, NetworkRow
from vmshift.server.db.setup import DEFAULT_CLUSTER
from vmshift.server.events import record_event
from vmshift.server.host_enroll import FingerprintError, enroll, rotate
from vmshift.server.inventory import add_host, get_cluster, get_datacenter, get_host, get_network
from vmshift.server.views import cluster_view, datacenter_view, datastore_view, host_view, network_view

router = APIRouter()


@router.get("/about")
async def about(core: ServerCore = Depends(core_of)) -> About:
    return About(version="0.1.0", database=core.settings.database_kind())


@router.get("/datacenters")
async def list_datacenters(core: ServerCore = Depends(core_of)) -> list[Datacenter]:
    with core.sessions() as s:
        return [datacenter_view(d) for d in s.scalars(select(DatacenterRow).order_by(DatacenterRow.name))]


@router.post("/datacenters", status_code=201, responses=errors(*BODY, 409))
async def create_datacenter(body: DatacenterCreate, core: ServerCore = Depends(core_of)) -> Datacenter:
    with core.sessions.begin() as s:
        if s.scalar(select(DatacenterRow).where(DatacenterRow.name == body.name)) is not None:
            raise ConflictError(f"Datacenter {body.name!r} already exists.", hint="Choose another name.")
        row = DatacenterRow(name=body.name)
        s.add(row)
        record_event(s, EventKind.DATACENTER_CREATED, body.name, f"Datacenter {body.name} created.")
        s.flush()
        return datacenter_view(row)


@router.get("/clusters")
async def list_clusters(core: ServerCore = Depends(core_of)) -> list[Cluster]:
    with core.sessions() as s:
        return [cluster_view(s, c) for c in s.scalars(select(ClusterRow).order_by(ClusterRow.name))]


@router.post("/clusters", status_code=201, responses=errors(*BODY, 404, 409))
async def create_cluster(body: ClusterCreate, core: ServerCore = Depends(core_of)) -> Cluster:
    with core.sessions.begin() as s:
        dc = get_datacenter(s, body.datacenter)
        if s.scalar(select(ClusterRow).where(ClusterRow.name == body.name)) is not None:
            raise ConflictError(f"Cluster {body.name!r} already exists.", hint="Choose another name.")
        row = ClusterRow(name=body.name, datacenter=dc)
        s.add(row)
        record_event(s, EventKind.CLUSTER_CREATED, body.name, f"Cluster {body.name} created in {dc.name}.")
        s.flush()
        return cluster_view(s, row)


@router.get("/hosts")
async def list_hosts(core: ServerCore = Depends(core_of)) -> list[Host]:
    with core.sessions() as s:
        return [host_view(h) for h in s.scalars(select(HostRow).order_by(HostRow.name))]


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
    with core.sessions() as s:  # fail fast on an unknown cluster or a known address before the agent
        get_cluster(s, body.cluster or DEFAULT_CLUSTER)
        if s.scalar(select(HostRow).where(HostRow.address == body.address)) is not None:
            raise ConflictError(f"A host with address {body.address} is already in the inventory.",
                                hint="Each agent is added once; 'vmshift host rotate-cert' renews its "
                                "certificate.")

    def check_new(name: str) -> None:
        with core.sessions() as s:
            if s.scalar(select(HostRow).where(HostRow.name == name)) is not None:
                raise ConflictError(f"A host named {name!r} is already in the inventory.",
                                    hint="Remove it first, or give the agent another name.")

    try:
        got = await enroll(body.address, body.fingerprint, core.settings.state_dir,
                           core.settings.agent_timeout_s, check_new)
    except FingerprintError as e:
        answer = {"error": e.to_dict(), "fingerprint": e.fingerprint}
        return JSONResponse(status_code=e.status, content=answer)
    with core.sessions.begin() as s:
        host = add_host(s, body.address, get_cluster(s, body.cluster or DEFAULT_CLUSTER), got.facts)
        host.cert_fingerprint, host.cert_not_after = got.fingerprint, got.not_after
        s.flush()
        return host_view(host)


@router.post("/hosts/{name}/rotate-cert", responses=errors(*PARAMS, 404, 502))
async def rotate_host_cert(name: HostName, core: ServerCore = Depends(core_of)) -> Host:
    """A new key on the host, a new certificate from the cluster CA; the old one is not served again."""
    with core.sessions() as s:
        address = get_host(s, name).address
    fingerprint, not_after = await rotate(name, address, core.settings.state_dir,
                                          core.settings.agent_timeout_s)
    with core.sessions.begin() as s:
        host = get_host(s, name)
        host.cert_fingerprint, host.cert_not_after = fingerprint, not_after
        record_event(s, EventKind.HOST_CERT_ROTATED, name,
                     f"Host {name} got a new certificate ({fingerprint}).")
        s.flush()
        return host_view(host)


@router.get("/hosts/{name}", responses=errors(*PARAMS, 404))
async def get_host_route(name: HostName, core: ServerCore = Depends(core_of)) -> Host:
    with core.sessions() as s:
        return host_view(get_host(s, name), core.heartbeat.stream_state(name))


@router.delete("/hosts/{name}", status_code=204, responses=errors(*PARAMS, 404, 409))
async def delete_host(name: HostName, core: ServerCore = Depends(core_of)) -> None:
    with core.sessions.begin() as s:
        host = get_host(s, name)
        if host.vms:
            raise ConflictError(
                f"Host {name} still has {len(host.vms)} VM(s) registered.",
                hint="Delete or migrate its VMs first: " + ", ".join(sorted(v.name for v in host.vms)),
            )
        s.delete(host)
        record_event(s, EventKind.HOST_REMOVED, name, f"Host {name} removed from the inventory.")


@router.post("/hosts/{name}/maintenance", responses=errors(*BODY, 404))
async def host_maintenance(
    name: HostName, body: MaintenanceRequest, core: ServerCore = Depends(core_of)
) -> Host:
    with core.sessions.begin() as s:
        host = get_host(s, name)
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


@router.get("/datastores")
async def list_datastores(core: ServerCore = Depends(core_of)) -> list[Datastore]:
    with core.sessions() as s:
        return [datastore_view(d) for d in s.scalars(select(DatastoreRow).order_by(DatastoreRow.name))]


@router.get("/networks")
async def list_networks(core: ServerCore = Depends(core_of)) -> list[Network]:
    with core.sessions() as s:
        return [network_view(n) for n in s.scalars(select(NetworkRow).order_by(NetworkRow.name))]


@router.put("/networks/{name}/ip-pool", responses=errors(*BODY, 404))
async def set_ip_pool(name: NetworkName, body: IpPool, core: ServerCore = Depends(core_of)) -> Network:
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
