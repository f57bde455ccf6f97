"""Request and response bodies of the server REST API (see docs/design/contracts.md, "Server")."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, Field, model_validator

from vmshift.model.addressing import check_pool
from vmshift.model.base import RequestModel
from vmshift.model.enums import (
    CloneMode,
    ConnectionState,
    DatastoreKind,
    EventSeverity,
    PowerAction,
    PowerState,
    TaskState,
)
from vmshift.model.host import HostFacts
from vmshift.model.inputs import (
    ADDRESS_PATTERN,
    CIDR_PATTERN,
    IPV4_PATTERN,
    MAX_CPUS,
    MAX_DISK_MIB,
    MAX_DISKS,
    MAX_KERNEL_ARGS,
    MAX_MEMORY_MIB,
    MAX_NICS,
    MAX_SSH_KEY,
    MAX_SSH_KEYS,
    MIN_MEMORY_MIB,
    SSH_KEY_PATTERN,
    TEXT_PATTERN,
    ClusterName,
    DatacenterName,
    DatastoreName,
    HostName,
    ImageName,
    Name,
    NetworkName,
    VmName,
)
from vmshift.model.vm import DiskSpec


class DatabaseKind(StrEnum):
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


class TaskKind(StrEnum):
    VM_CREATE = "vm.create"
    VM_POWER = "vm.power"
    VM_DELETE = "vm.delete"
    VM_SUSPEND = "vm.suspend"  # save the state to the VM's folder, stop QEMU (docs/suspend.md)
    VM_MIGRATE = "vm.migrate"
    VM_RELOCATE = "vm.relocate"
    MIGRATION_FINALIZE = "migration.finalize"
    IMAGE_IMPORT = "image.import"  # qemu-img convert of a file onto a datastore (docs/images.md)
    # maintenance mode (server/maintenance.py): one parent task, a vm.migrate child per VM
    HOST_MAINTENANCE_ENTER = "host.maintenance_enter"
    HOST_MAINTENANCE_EXIT = "host.maintenance_exit"
    DRS_RUN = "drs.run"  # one DRS pass over a cluster, on demand (docs/drs.md)
    VM_IMPORT = "vm.import"  # an OVA's or libvirt domain's disks imported, then its VM (docs/images.md)


class EventKind(StrEnum):
    HOST_ADDED = "host.added"
    HOST_REMOVED = "host.removed"
    HOST_CONNECTED = "host.connected"
    HOST_DISCONNECTED = "host.disconnected"
    HOST_MAINTENANCE = "host.maintenance"
    HOST_CERT_ROTATED = "host.cert_rotated"
    HOST_POLLED = "host.polled"  # the agent cannot stream its changes: the server polls it instead
    HOST_STREAM_RESYNCED = "host.stream_resynced"  # the server lost its place in the stream: snapshot
    DATASTORE_ADDED = "datastore.added"
    DATASTORE_REMOVED = "datastore.removed"  # `datastore remove`: no host has it any more
    DATASTORE_NOT_SHARED = "datastore.not_shared"  # same marker UUID, another directory (a copied marker)
    NETWORK_ADDED = "network.added"
    NETWORK_POOL_SET = "network.pool_set"
    DATACENTER_CREATED = "datacenter.created"
    CLUSTER_CREATED = "cluster.created"
    VM_CREATED = "vm.created"
    VM_DELETED = "vm.deleted"
    VM_POWER_CHANGED = "vm.power_changed"
    VM_DIED = "vm.died"
    VM_MIGRATED = "vm.migrated"
    # reconcile findings (server/reconcile.py): critical when they appear, info when they clear
    VM_RUNNING_ELSEWHERE = "vm.running_elsewhere"
    VM_MISSING = "vm.missing"
    VM_DUPLICATE = "vm.duplicate"
    VM_ORPHAN_QEMU = "vm.orphan_qemu"
    VM_FINDING_CLEARED = "vm.finding_cleared"
    MIGRATION_STARTED = "migration.started"
    MIGRATION_FAILED = "migration.failed"
    MIGRATION_NEEDS_FINALIZE = "migration.needs_finalize"
    MIGRATION_CANCEL_REFUSED = "migration.cancel_refused"
    MIGRATION_UNENCRYPTED = "migration.unencrypted"  # opportunistic encryption fell back to plain
    VM_LOST = "vm.lost"
    TASK_STARTED = "task.started"
    TASK_FINISHED = "task.finished"
    TASK_FAILED = "task.failed"
    TASK_CANCELLED = "task.cancelled"
    SERVER_STARTED = "server.started"
    # scheduled migrations (server/schedules.py)
    SCHEDULE_CREATED = "schedule.created"
    SCHEDULE_DELETED = "schedule.deleted"
    SCHEDULE_RUN_STARTED = "schedule.run_started"
    SCHEDULE_RUN_SKIPPED = "schedule.run_skipped"
    # placement (server/api/routes_rules.py, server/maintenance.py)
    RULE_CREATED = "rule.created"
    RULE_DELETED = "rule.deleted"
    RETENTION_PURGED = "retention.purged"  # server/retention.py: one per purge that removed something
    # DRS (server/drs/service.py, docs/drs.md)
    DRS_PASS = "drs.pass"  # a pass that recommended or applied a move
    DRS_APPLIED = "drs.applied"  # a recommendation started as a migration
    DRS_APPLY_FAILED = "drs.apply_failed"  # an automatic recommendation the migration checks refused


class ErrorInfo(BaseModel):
    code: str = Field(description="stable machine-readable reason, e.g. not_found, conflict, invalid_input")
    message: str = Field(description="one sentence saying what is wrong")
    hint: str | None = Field(default=None, description="what to do about it")


class ErrorBody(BaseModel):
    """Every refusal of the server's and the agents' APIs (docs/design/contracts.md, "Error body")."""

    error: ErrorInfo


class FingerprintBody(ErrorBody):
    """``POST /hosts`` refused because the agent's certificate fingerprint was not confirmed."""

    fingerprint: str | None = Field(
        default=None, description="the fingerprint of the certificate the agent serves: compare, then confirm"
    )


class About(BaseModel):
    version: str
    database: DatabaseKind


class DatacenterCreate(RequestModel):
    name: DatacenterName


class Datacenter(BaseModel):
    name: str
    clusters: list[str] = Field(default_factory=list)


class ClusterCreate(RequestModel):
    name: ClusterName
    datacenter: DatacenterName = "Datacenter"


class Cluster(BaseModel):
    name: str
    datacenter: str
    hosts: list[str] = Field(default_factory=list)
    cpu_baseline: str | None = Field(default=None, description="newest CPU model all connected hosts run")


class HostAdd(RequestModel):
    address: str = Field(
        description="HOST:PORT of the agent (an IPv4 address or DNS name, or [IPv6])",
        min_length=3, max_length=262, pattern=ADDRESS_PATTERN,
    )
    cluster: ClusterName | None = Field(default=None, description="cluster name; None = the default cluster")
    fingerprint: str | None = Field(
        default=None,
        max_length=200,
        description="the agent's certificate fingerprint as the operator confirmed it "
        "(vmshift-agent --config FILE fingerprint); missing or different: 409 with the agent's fingerprint",
    )


class StreamMode(StrEnum):
    STREAM = "stream"  # the agent streams its changes (model/host_stream.py)
    POLLING = "polling"  # an agent that cannot stream: polled every heartbeat interval


class HostStream(BaseModel):
    """How the server hears from a host now (this server process; a restart begins again)."""

    mode: StreamMode
    epoch: str | None = Field(description="the agent's change log the server follows (None: none yet)")
    seq: int = Field(description="the last change the server applied")
    reconnects: int = Field(description="streams opened again after the first one")
    live: bool = Field(description="the server's view of the host is complete and current (the "
                                   "inventory follows within a tenth of a second)")


class Host(BaseModel):
    name: str
    address: str
    cluster: str
    connection_state: ConnectionState
    maintenance: bool
    last_heartbeat: datetime | None
    facts: HostFacts
    vms: list[str] = Field(default_factory=list)
    cert_fingerprint: str | None = Field(
        default=None, description="of the certificate the cluster CA issued it (vmshift host rotate-cert)"
    )
    cert_not_after: datetime | None = None
    stream: HostStream | None = Field(default=None, description="how the server hears from the host "
                                      "(GET /hosts/{name} only)")


class MaintenanceRequest(RequestModel):
    enter: bool


class Datastore(BaseModel):
    name: str
    uuid: str
    hosts: list[str]
    shared: bool
    capacity_mib: int
    free_mib: int
    kind: DatastoreKind = Field(default=DatastoreKind.DIRECTORY,
                                description="directory, or iscsi (a LUN per disk)")
    unproven_on: list[str] = Field(
        default_factory=list, description="hosts whose directory carries this datastore's marker but "
        "not the proof that it is the same directory: ignored there (docs/datastores.md)")


class IpPool(RequestModel):
    """An IPv4 range inside a network for the VMs' addresses (first and last inside cidr, first <= last)."""

    cidr: str = Field(pattern=CIDR_PATTERN, max_length=18, description="IPv4 network, e.g. 10.0.0.0/24")
    first: str = Field(pattern=IPV4_PATTERN, max_length=15, description="first address of the pool")
    last: str = Field(pattern=IPV4_PATTERN, max_length=15, description="last address of the pool")

    @model_validator(mode="after")
    def _check(self) -> IpPool:
        try:
            check_pool(self.cidr, self.first, self.last)
        except Exception as e:  # surface as a pydantic validation error naming the pool
            raise ValueError(getattr(e, "message", str(e))) from e
        return self


class Network(BaseModel):
    name: str
    hosts: dict[str, str] = Field(description="host name -> bridge")
    ip_pool: IpPool | None = None


DiskSizeMib = Annotated[int, Field(ge=1, le=MAX_DISK_MIB)]


class VmCreate(RequestModel):
    name: VmName
    host: HostName | None = Field(default=None, description="None: initial placement chooses a host of "
                                  "'cluster' (docs/drs.md, 'Initial placement')")
    cluster: ClusterName | None = Field(default=None, description="without 'host': the cluster to place "
                                        "the VM in; None = the one whose hosts see the datastore")
    cpus: int = Field(default=1, ge=1, le=MAX_CPUS)
    memory_mib: int = Field(default=256, ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB)
    datastore: DatastoreName
    networks: list[NetworkName] = Field(default_factory=lambda: ["VM Network"], max_length=MAX_NICS,
                                        description="one NIC on each network, in order")
    disks_mib: list[DiskSizeMib] = Field(default_factory=lambda: [64], max_length=MAX_DISKS,
                                         description="size of each disk; with disk_image the first is made "
                                                     "from the image and is at least the image's size")
    image: ImageName = Field(default="lab-guest", description="kernel image on the datastore the VM boots")
    disk_image: ImageName | None = Field(
        default=None, description="boot from this disk image on the datastore (BIOS, no kernel image); "
                                  "the VM gets a cloud-init seed")
    clone: CloneMode = Field(default=CloneMode.LINKED, description="with disk_image: how the first disk "
                             "is made from it (a qcow2 overlay, or a whole copy)")
    ssh_keys: list[Annotated[str, Field(max_length=MAX_SSH_KEY, pattern=SSH_KEY_PATTERN)]] = Field(
        default_factory=list, max_length=MAX_SSH_KEYS,
        description="with disk_image: OpenSSH public keys the seed gives the guest's default user")
    kernel_args: str = Field(default="", max_length=MAX_KERNEL_ARGS, pattern=TEXT_PATTERN,
                             description="appended to the guest kernel's command line")
    cpu_model: Name | None = Field(default=None, description="QEMU CPU model; None = the cluster baseline")
    machine_type: Name | None = Field(default=None, description="QEMU machine type; None = the host's")
    start: bool = False


class Nic(BaseModel):
    network: str
    mac: str
    ip: str | None = None


class VmStats(BaseModel):
    cpu_seconds: float = 0.0
    rss_mib: float = 0.0
    cpu_cores: float = Field(default=0.0, description="cores busy over the host's last stats interval")


class Vm(BaseModel):
    name: str
    uuid: str
    host: str
    power_state: PowerState
    datastore: str
    ip: str | None
    cpus: int
    memory_mib: int
    cpu_model: str
    machine_type: str
    nics: list[Nic]
    disks: list[DiskSpec]
    image: str | None
    kernel_args: str
    stats: VmStats
    created_at: datetime


class PowerRequest(RequestModel):
    action: PowerAction


class Task(BaseModel):
    id: int
    kind: TaskKind
    target: str
    state: TaskState
    phase: str = ""
    percent: int = 0
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None


class Event(BaseModel):
    id: int
    time: datetime
    severity: EventSeverity
    kind: str = Field(description="an EventKind value (open set: other layers add kinds)")
    target: str
    message: str
