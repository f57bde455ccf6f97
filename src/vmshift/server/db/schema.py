"""The inventory schema (SQLAlchemy 2 typed ORM). Alembic's revisions in server/alembic/ create it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy import Enum as SaEnum
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from vmshift.model.enums import (
    ConnectionState,
    DatastoreKind,
    DiskFormat,
    EventSeverity,
    MigrationEncryption,
    MigrationKind,
    PowerState,
    TaskState,
)
from vmshift.model.migration import MigrationPhase, MigrationStatus
from vmshift.model.placement import (
    DrsAutomation,
    MoveReason,
    RecommendationState,
    RuleKind,
    RuleStrength,
    VmDrs,
)
from vmshift.model.schedule import ScheduleRunOutcome
from vmshift.placement.settings import DEFAULT_THRESHOLD

TASK_PHASE_CHARS = 128  # a task's phase label; longer labels are cut (PostgreSQL refuses them)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite drops the zone; this puts it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def _enum(cls: type[Any]) -> SaEnum:
    return SaEnum(cls, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class Base(DeclarativeBase):
    pass


class DatacenterRow(Base):
    __tablename__ = "datacenter"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    clusters: Mapped[list[ClusterRow]] = relationship(back_populates="datacenter")


class ClusterRow(Base):
    __tablename__ = "cluster"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    datacenter_id: Mapped[int] = mapped_column(ForeignKey("datacenter.id"))
    datacenter: Mapped[DatacenterRow] = relationship(back_populates="clusters")
    hosts: Mapped[list[HostRow]] = relationship(back_populates="cluster")
    drs_automation: Mapped[DrsAutomation] = mapped_column(
        _enum(DrsAutomation), default=DrsAutomation.PARTIALLY, server_default=DrsAutomation.PARTIALLY.value
    )
    drs_threshold: Mapped[int] = mapped_column(
        Integer, default=DEFAULT_THRESHOLD, server_default=text(str(DEFAULT_THRESHOLD))
    )
    rules: Mapped[list[RuleRow]] = relationship(
        back_populates="cluster", cascade="all, delete-orphan", order_by="RuleRow.name"
    )


class HostRow(Base):
    __tablename__ = "host"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    address: Mapped[str] = mapped_column(String(255), unique=True)
    cluster_id: Mapped[int] = mapped_column(ForeignKey("cluster.id"), index=True)
    connection_state: Mapped[ConnectionState] = mapped_column(_enum(ConnectionState), index=True)
    maintenance: Mapped[bool] = mapped_column(Boolean, default=False)
    last_heartbeat: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    facts: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # live migration (vMotion) settings of this host
    migration_bandwidth_limit_bps: Mapped[float | None] = mapped_column(Float, nullable=True)
    migration_link_rate_bps: Mapped[float | None] = mapped_column(Float, nullable=True)
    migration_limit: Mapped[int] = mapped_column(Integer, default=4, server_default=text("4"))
    migration_encryption: Mapped[MigrationEncryption] = mapped_column(
        _enum(MigrationEncryption), default=MigrationEncryption.OPPORTUNISTIC,
        server_default=MigrationEncryption.OPPORTUNISTIC.value,
    )
    # the certificate the server issued this host (None: not issued yet, e.g. an old agent)
    cert_fingerprint: Mapped[str | None] = mapped_column(String(128), nullable=True)
    cert_not_after: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    cluster: Mapped[ClusterRow] = relationship(back_populates="hosts")
    datastores: Mapped[list[HostDatastoreRow]] = relationship(
        back_populates="host", cascade="all, delete-orphan"
    )
    networks: Mapped[list[HostNetworkRow]] = relationship(back_populates="host", cascade="all, delete-orphan")
    vms: Mapped[list[VmRow]] = relationship(back_populates="host")


class DatastoreRow(Base):
    __tablename__ = "datastore"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uuid: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    capacity_mib: Mapped[int] = mapped_column(Integer, default=0)
    free_mib: Mapped[int] = mapped_column(Integer, default=0)
    kind: Mapped[DatastoreKind] = mapped_column(
        _enum(DatastoreKind), default=DatastoreKind.DIRECTORY, server_default=DatastoreKind.DIRECTORY.value
    )
    hosts: Mapped[list[HostDatastoreRow]] = relationship(
        back_populates="datastore", cascade="all, delete-orphan"
    )


class HostDatastoreRow(Base):
    """A host sees a datastore at a path; a datastore seen by several hosts is shared."""

    __tablename__ = "host_datastore"
    host_id: Mapped[int] = mapped_column(ForeignKey("host.id", ondelete="CASCADE"), primary_key=True)
    datastore_id: Mapped[int] = mapped_column(
        ForeignKey("datastore.id", ondelete="CASCADE"), primary_key=True
    )
    path: Mapped[str] = mapped_column(String(1024))
    images: Mapped[list[str]] = mapped_column(JSON, default=list)
    host: Mapped[HostRow] = relationship(back_populates="datastores")
    datastore: Mapped[DatastoreRow] = relationship(back_populates="hosts")


class NetworkRow(Base):
    __tablename__ = "network"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    pool_cidr: Mapped[str | None] = mapped_column(String(64), nullable=True)
    pool_first: Mapped[str | None] = mapped_column(String(64), nullable=True)
    pool_last: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hosts: Mapped[list[HostNetworkRow]] = relationship(back_populates="network", cascade="all, delete-orphan")


class HostNetworkRow(Base):
    __tablename__ = "host_network"
    host_id: Mapped[int] = mapped_column(ForeignKey("host.id", ondelete="CASCADE"), primary_key=True)
    network_id: Mapped[int] = mapped_column(ForeignKey("network.id", ondelete="CASCADE"), primary_key=True)
    bridge: Mapped[str] = mapped_column(String(64))
    host: Mapped[HostRow] = relationship(back_populates="networks")
    network: Mapped[NetworkRow] = relationship(back_populates="hosts")


class VmRow(Base):
    __tablename__ = "vm"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    uuid: Mapped[str] = mapped_column(String(64), unique=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("host.id"), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, doc="model.vm.VmSpec as JSON")
    power_state: Mapped[PowerState] = mapped_column(_enum(PowerState), index=True)
    ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    image: Mapped[str | None] = mapped_column(String(64), nullable=True)
    kernel_args: Mapped[str] = mapped_column(Text, default="")
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # live migration SLA of this VM
    max_downtime_ms: Mapped[int] = mapped_column(Integer, default=500, server_default=text("500"))
    allow_postcopy: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    migration_encryption: Mapped[MigrationEncryption] = mapped_column(
        _enum(MigrationEncryption), default=MigrationEncryption.OPPORTUNISTIC,
        server_default=MigrationEncryption.OPPORTUNISTIC.value,
    )
    drs: Mapped[VmDrs] = mapped_column(
        _enum(VmDrs), default=VmDrs.CLUSTER, server_default=VmDrs.CLUSTER.value, doc="its DRS override"
    )
    host: Mapped[HostRow] = relationship(back_populates="vms")
    macs: Mapped[list[MacAllocationRow]] = relationship(cascade="all, delete-orphan")
    ips: Mapped[list[IpAllocationRow]] = relationship(cascade="all, delete-orphan")


class RuleRow(Base):
    """An affinity rule of one cluster (placement.snapshot.Rule); VMs and hosts are kept by name."""

    __tablename__ = "rule"
    __table_args__ = (UniqueConstraint("cluster_id", "name", name="uq_rule_cluster_name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    cluster_id: Mapped[int] = mapped_column(ForeignKey("cluster.id", ondelete="CASCADE"), index=True)
    kind: Mapped[RuleKind] = mapped_column(_enum(RuleKind))
    strength: Mapped[RuleStrength] = mapped_column(_enum(RuleStrength))
    vms: Mapped[list[str]] = mapped_column(JSON)
    hosts: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    cluster: Mapped[ClusterRow] = relationship(back_populates="rules")


class MacAllocationRow(Base):
    __tablename__ = "mac_allocation"
    mac: Mapped[str] = mapped_column(String(17), primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vm.id", ondelete="CASCADE"))


class IpAllocationRow(Base):
    __tablename__ = "ip_allocation"
    __table_args__ = (UniqueConstraint("network_id", "address", name="uq_ip_allocation_network_address"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    network_id: Mapped[int] = mapped_column(ForeignKey("network.id"))
    address: Mapped[str] = mapped_column(String(64))
    vm_id: Mapped[int] = mapped_column(ForeignKey("vm.id", ondelete="CASCADE"))


class TaskRow(Base):
    __tablename__ = "task"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(128), index=True)
    state: Mapped[TaskState] = mapped_column(_enum(TaskState), index=True)
    phase: Mapped[str] = mapped_column(String(TASK_PHASE_CHARS), default="")
    percent: Mapped[int] = mapped_column(Integer, default=0)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class EventRow(Base):
    __tablename__ = "event"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    severity: Mapped[EventSeverity] = mapped_column(_enum(EventSeverity))
    kind: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(128), index=True)
    message: Mapped[str] = mapped_column(Text)


class ServerIdentityRow(Base):
    """One row: this database's server id (made by Alembic revision 0003 when the schema is created)."""

    __tablename__ = "server_identity"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class MigrationRow(Base):
    """One move of a VM (any kind): what was asked, checked, predicted, what happened (model.migration)."""

    __tablename__ = "migration"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[MigrationKind] = mapped_column(
        _enum(MigrationKind), default=MigrationKind.LIVE, server_default=MigrationKind.LIVE.value
    )
    source_host: Mapped[str] = mapped_column(String(64))
    target_host: Mapped[str] = mapped_column(String(64))
    source_datastore: Mapped[str | None] = mapped_column(String(64), nullable=True)
    target_datastore: Mapped[str | None] = mapped_column(String(64), nullable=True)
    target_spec: Mapped[dict[str, Any] | None] = mapped_column(
        JSON, nullable=True, doc="disk moves: the VM's spec after the move (model.vm.VmSpec)"
    )
    disk_format: Mapped[DiskFormat | None] = mapped_column(_enum(DiskFormat), nullable=True)
    status: Mapped[MigrationStatus] = mapped_column(_enum(MigrationStatus), index=True)
    phase: Mapped[MigrationPhase] = mapped_column(_enum(MigrationPhase))
    task_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    checks: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    prediction: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    actions: Mapped[list[Any]] = mapped_column(JSON, default=list)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True, doc="last agent sample")
    measured_bandwidth_bps: Mapped[float | None] = mapped_column(Float, nullable=True)
    encrypted: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    nonce: Mapped[str | None] = mapped_column(String(32), nullable=True, doc="sent to the agents")


class ScheduleRow(Base):
    """A scheduled migration (model.schedule): once at ``at``, or at every time of ``cron``.

    ``next_due_at`` is the one due time the server fires next (None: a one-time schedule that is done);
    a run is claimed by advancing it in the same transaction that inserts the run (server/schedules.py).
    """

    __tablename__ = "schedule"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    vm: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    cron: Mapped[str | None] = mapped_column(String(128), nullable=True)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    next_due_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True, index=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON, doc="model.migration.MigrationCreate as JSON")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    runs: Mapped[list[ScheduleRunRow]] = relationship(
        back_populates="schedule", cascade="all, delete-orphan", order_by="ScheduleRunRow.id.desc()"
    )


class ScheduleRunRow(Base):
    """One due time of a schedule; unique per (schedule, due time), so no due time fires twice."""

    __tablename__ = "schedule_run"
    __table_args__ = (UniqueConstraint("schedule_id", "due_at", name="uq_schedule_run_due"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    schedule_id: Mapped[int] = mapped_column(ForeignKey("schedule.id", ondelete="CASCADE"), index=True)
    due_at: Mapped[datetime] = mapped_column(UtcDateTime)
    claimed_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    outcome: Mapped[ScheduleRunOutcome] = mapped_column(_enum(ScheduleRunOutcome))
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    migration_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    task_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    schedule: Mapped[ScheduleRow] = relationship(back_populates="runs")


__all__ = [
    "Base",
    "ClusterRow",
    "DatacenterRow",
    "DatastoreRow",
    "DrsRecommendationRow",
    "EventRow",
    "HostDatastoreRow",
    "HostLoadRow",
    "HostNetworkRow",
    "HostRow",
    "IpAllocationRow",
    "MacAllocationRow",
    "MigrationRow",
    "NetworkRow",
    "RuleRow",
    "ScheduleRow",
    "ScheduleRunRow",
    "ServerIdentityRow",
    "TaskRow",
    "VmRow",
    "utcnow",
]


class HostLoadRow(Base):
    """One load sample of a host (server/load_history.py): its capacity and each VM's use then.

    ``vms`` maps a VM's name to ``[cores busy, MiB in use]``; one row per host per history step
    keeps the history at hosts x steps rows whatever the number of VMs."""

    __tablename__ = "host_load"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("host.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    cpus: Mapped[int] = mapped_column(Integer)
    memory_total_mib: Mapped[int] = mapped_column(Integer)
    vms: Mapped[dict[str, list[float]]] = mapped_column(JSON, default=dict)


class DrsRecommendationRow(Base):
    """One move a DRS pass recommended (server/drs/service.py) and what became of it."""

    __tablename__ = "drs_recommendation"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cluster_id: Mapped[int] = mapped_column(ForeignKey("cluster.id", ondelete="CASCADE"), index=True)
    vm: Mapped[str] = mapped_column(String(64), index=True)
    source_host: Mapped[str] = mapped_column(String(64))
    target_host: Mapped[str] = mapped_column(String(64))
    reason: Mapped[MoveReason] = mapped_column(_enum(MoveReason))
    why: Mapped[str] = mapped_column(Text)
    benefit: Mapped[float] = mapped_column(Float)
    cost: Mapped[float] = mapped_column(Float)
    predicted_s: Mapped[float] = mapped_column(Float)
    downtime_ms: Mapped[int] = mapped_column(Integer)
    state: Mapped[RecommendationState] = mapped_column(_enum(RecommendationState), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    migration_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    task_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
