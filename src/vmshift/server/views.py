"""Database rows → API models (model/api.py)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import Text, cast
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
from vmshift.model.host import HostFacts
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


#: what a host list reads of each host: its columns, the facts as the JSON text they are stored as
HOST_LIST_COLUMNS = (HostRow.id, HostRow.name, HostRow.address, ClusterRow.name, HostRow.connection_state,
                     HostRow.maintenance, HostRow.last_heartbeat, cast(HostRow.facts, Text),
                     HostRow.cert_fingerprint, HostRow.cert_not_after)  # fmt: skip


def host_list_view(row: Sequence[Any], vm_names: list[str]) -> Host:
    """A row of ``HOST_LIST_COLUMNS`` as the API shows it."""
    _, name, address, cluster, state, maintenance, heartbeat, facts, fingerprint, not_after = row
    return Host(name=name, address=address, cluster=cluster, connection_state=state, maintenance=maintenance,
                last_heartbeat=heartbeat, facts=facts_of(facts), vms=vm_names, cert_fingerprint=fingerprint,
                cert_not_after=not_after)  # fmt: skip


@lru_cache(maxsize=1024)
def facts_of(text: str) -> HostFacts:
    """Parsed facts, once per distinct text: a host's facts change only when its free memory or space
    does (every stats report at most), and a list of 96 hosts would parse them all at each request."""
    return HostFacts.model_validate_json(text)


def datacenter_view(d: DatacenterRow) -> Datacenter:
    return Datacenter(name=d.name, clusters=sorted(c.name for c in d.clusters))


def cluster_view(s: Session, c: ClusterRow) -> Cluster:
    return Cluster(
        name=c.name,
        datacenter=c.datacenter.name,
        hosts=sorted(h.name for h in c.hosts),
        cpu_baseline=cluster_baseline(s, c),
    )


def datastore_view(d: DatastoreRow, unproven_on: Sequence[str] = ()) -> Datastore:
    hosts = sorted(link.host.name for link in d.hosts)
    return Datastore(
        name=d.name,
        uuid=d.uuid,
        hosts=hosts,
        shared=len(hosts) > 1,
        capacity_mib=d.capacity_mib,
        free_mib=d.free_mib,
        kind=d.kind,
        unproven_on=sorted(unproven_on),
    )


def network_view(n: NetworkRow) -> Network:
    pool = None
    if n.pool_cidr and n.pool_first and n.pool_last:
        pool = IpPool(cidr=n.pool_cidr, first=n.pool_first, last=n.pool_last)
    return Network(name=n.name, hosts={link.host.name: link.bridge for link in n.hosts}, ip_pool=pool)


def vm_view(v: VmRow, live: VmStats | None = None) -> Vm:
    """``live``: the VM's numbers from its host's current report (the row has those of its last power
    change only: server/host_writes.py ``_stats``)."""
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
        stats=live if live is not None else VmStats.model_validate(v.stats or {}),
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


#: what an event list reads: the columns only (building ORM objects cost more than the rest)
EVENT_COLUMNS = (EventRow.id, EventRow.time, EventRow.severity, EventRow.kind, EventRow.target,
                 EventRow.message)  # fmt: skip


def event_view(row: Sequence[Any]) -> Event:
    """A row of ``EVENT_COLUMNS`` as the API shows it."""
    event_id, time, severity, kind, target, message = row
    return Event(id=event_id, time=time, severity=severity, kind=kind, target=target, message=message)
