"""Database rows → API models (model/api.py)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from vmshift.model.api import (
    Cluster,
    Datacenter,
    Datastore,
    ErrorInfo,
    Event,
    Host,
    HostStream,
    IpPool,
    Network,
    Nic,
    Task,
    TaskKind,
    Vm,
    VmStats,
)
from vmshift.model.vm import VmSpec
from vmshift.server.db.schema import (
    ClusterRow,
    DatacenterRow,
    DatastoreRow,
    EventRow,
    HostRow,
    NetworkRow,
    TaskRow,
    VmRow,
)
from vmshift.server.inventory import cluster_baseline, host_facts


def host_view(h: HostRow, stream: HostStream | None = None, vm_names: list[str] | None = None) -> Host:
    """``vm_names``: the host's VMs when the caller read only their names (a list of many hosts
    would otherwise load every VM row of the inventory)."""
    return Host(
        name=h.name,
        address=h.address,
        cluster=h.cluster.name,
        connection_state=h.connection_state,
        maintenance=h.maintenance,
        last_heartbeat=h.last_heartbeat,
        facts=host_facts(h),
        vms=sorted(vm_names if vm_names is not None else (v.name for v in h.vms)),
        cert_fingerprint=h.cert_fingerprint,
        cert_not_after=h.cert_not_after,
        stream=stream,
    )


def datacenter_view(d: DatacenterRow) -> Datacenter:
    return Datacenter(name=d.name, clusters=sorted(c.name for c in d.clusters))


def cluster_view(s: Session, c: ClusterRow) -> Cluster:
    return Cluster(
        name=c.name,
        datacenter=c.datacenter.name,
        hosts=sorted(h.name for h in c.hosts),
        cpu_baseline=cluster_baseline(s, c),
    )


def datastore_view(d: DatastoreRow) -> Datastore:
    hosts = sorted(link.host.name for link in d.hosts)
    return Datastore(
        name=d.name,
        uuid=d.uuid,
        hosts=hosts,
        shared=len(hosts) > 1,
        capacity_mib=d.capacity_mib,
        free_mib=d.free_mib,
    )


def network_view(n: NetworkRow) -> Network:
    pool = None
    if n.pool_cidr and n.pool_first and n.pool_last:
        pool = IpPool(cidr=n.pool_cidr, first=n.pool_first, last=n.pool_last)
    return Network(name=n.name, hosts={link.host.name: link.bridge for link in n.hosts}, ip_pool=pool)


def vm_view(v: VmRow) -> Vm:
    spec = VmSpec.model_validate(v.spec)
    ips = {ip.network_id: ip.address for ip in v.ips}
    nets = {link.network.name: link.network_id for link in v.host.networks}
    nics = [Nic(network=n.network, mac=n.mac, ip=ips.get(nets.get(n.network, -1))) for n in spec.nics]
    return Vm(
        name=v.name,
        uuid=v.uuid,
        host=v.host.name,
        power_state=v.power_state,
        datastore=spec.datastore,
        ip=v.ip,
        cpus=spec.cpus,
        memory_mib=spec.memory_mib,
        cpu_model=spec.cpu_model,
        machine_type=spec.machine_type,
        nics=nics,
        disks=spec.disks,
        image=v.image,
        kernel_args=v.kernel_args,
        stats=VmStats.model_validate(v.stats or {}),
        created_at=v.created_at,
    )


def task_view(t: TaskRow) -> Task:
    return Task(
        id=t.id,
        kind=TaskKind(t.kind),
        target=t.target,
        state=t.state,
        phase=t.phase,
        percent=t.percent,
        created_at=t.created_at,
        started_at=t.started_at,
        finished_at=t.finished_at,
        result=t.result,
        error=ErrorInfo.model_validate(t.error) if t.error else None,
    )


def event_view(e: EventRow) -> Event:
    return Event(id=e.id, time=e.time, severity=e.severity, kind=e.kind, target=e.target, message=e.message)
