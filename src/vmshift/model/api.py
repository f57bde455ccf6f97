"""Request and response bodies of the server REST API (see docs/design/contracts.md, "Server")."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from vmshift.model.addressing import check_pool
from vmshift.model.enums import ConnectionState, EventSeverity, PowerAction, PowerState, TaskState
from vmshift.model.host import HostFacts
from vmshift.model.vm import DiskSpec, check_name


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


class EventKind(StrEnum):
    HOST_ADDED = "host.added"
    HOST_REMOVED = "host.removed"
    HOST_CONNECTED = "host.connected"
    HOST_DISCONNECTED = "host.disconnected"
    HOST_MAINTENANCE = "host.maintenance"
    HOST_CERT_ROTATED = "host.cert_rotated"
    DATASTORE_ADDED = "datastore.added"
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


class ErrorInfo(BaseModel):
    code: str
    message: str
    hint: str | None = None


class ErrorBody(BaseModel):
    error: ErrorInfo


class About(BaseModel):
    version: str
    database: DatabaseKind


class DatacenterCreate(BaseModel):
    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "Datacenter")


class Datacenter(BaseModel):
    name: str
    clusters: list[str] = Field(default_factory=list)


class ClusterCreate(BaseModel):
    name: str
    datacenter: str = "Datacenter"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "Cluster")


class Cluster(BaseModel):
    name: str
    datacenter: str
    hosts: list[str] = Field(default_factory=list)
    cpu_baseline: str | None = Field(default=None, description="newest CPU model all connected hosts run")


class HostAdd(BaseModel):
    address: str = Field(description="HOST:PORT of the agent")
    cluster: str | None = Field(default=None, description="cluster name; None = the default cluster")
    fingerprint: str | None = Field(
        default=None,
        max_length=200,
        description="the agent's certificate fingerprint as the operator confirmed it "
        "(vmshift-agent --config FILE fingerprint); missing or different: 409 with the agent's fingerprint",
    )

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"address {v!r} is not HOST:PORT")
        return v


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


class MaintenanceRequest(BaseModel):
    enter: bool


class Datastore(BaseModel):
    name: str
    uuid: str
    hosts: list[str]
    shared: bool
    capacity_mib: int
    free_mib: int


class IpPool(BaseModel):
    cidr: str
    first: str
    last: str

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


class VmCreate(BaseModel):
    name: str
    host: str
    cpus: int = Field(default=1, ge=1, le=64)
    memory_mib: int = Field(default=256, ge=16)
    datastore: str
    networks: list[str] = Field(default_factory=lambda: ["VM Network"])
    disks_mib: list[int] = Field(default_factory=lambda: [64])
    image: str = "lab-guest"
    kernel_args: str = ""
    cpu_model: str | None = None
    machine_type: str | None = None
    start: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("disks_mib")
    @classmethod
    def _disks(cls, v: list[int]) -> list[int]:
        if any(size <= 0 for size in v):
            raise ValueError("every disk size must be a positive number of MiB")
        return v


class Nic(BaseModel):
    network: str
    mac: str
    ip: str | None = None


class VmStats(BaseModel):
    cpu_seconds: float = 0.0
    rss_mib: float = 0.0


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


class PowerRequest(BaseModel):
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
