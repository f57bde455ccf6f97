"""Bodies of the agent's live-migration endpoints (docs/design/contracts.md, "Live migration")."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from vmshift.model.api import ErrorInfo
from vmshift.model.base import RequestModel
from vmshift.model.migration import (
    FinalizeResolution,
    MigrationAction,
    MigrationLive,
    MigrationMetrics,
    MigrationPhase,
    MigrationSettings,
    MigrationStatus,
    SwitchoverTimeline,
)
from vmshift.model.moves import NbdTarget
from vmshift.model.vm import VmSpec


class DirtyRateRequest(RequestModel):
    seconds: int = Field(default=1, ge=1, le=60)


class DirtyRate(BaseModel):
    dirty_rate_bps: float
    seconds: int
    resident_bytes: int | None = Field(
        default=None,
        description="guest RAM resident in QEMU = what the guest ever touched; the rest is zero pages",
    )
    zero_fraction: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="share of the guest's RAM holding only zeros, sampled from QEMU's memory",
    )


class SinkRequest(RequestModel):
    seconds: float = Field(default=5.0, gt=0, le=60)


class Sink(BaseModel):
    address: str
    port: int


class MeasureRequest(RequestModel):
    address: str = Field(max_length=255)
    port: int = Field(ge=1, le=65535)
    seconds: float = Field(default=0.5, gt=0, le=10)


class Measurement(BaseModel):
    reachable: bool
    bandwidth_bps: float | None = None
    error: str | None = None


class MigrationIdentity(RequestModel):
    """Which server's which migration a request belongs to: migration ids restart with a new
    database, so an agent tells records apart by the server's id and a nonce per migration."""

    server_id: str | None = None
    nonce: str | None = None


class MigrationTls(BaseModel):
    """Encrypt the memory stream with both hosts' cluster certificates (QEMU ``tls-creds-x509``).

    On the target ``peer`` is the source host's name: only a client whose certificate has that common
    name may connect (``tls-authz``). On the source it is the target host's name, checked against
    the target's certificate."""

    peer: str


class PeerGrant(BaseModel):
    """The server's authorisation for one migration: the peer host (by its certificate's common
    name) may call this agent's migration endpoints for ``migration_id``, with ``capability`` in the
    ``X-Vmshift-Capability`` header, until ``expires_at`` or the migration ends."""

    peer: str
    capability: str = Field(min_length=32, max_length=128)
    expires_at: datetime


class IncomingRequest(MigrationIdentity):
    migration_id: int
    spec: VmSpec = Field(description="the VM's spec on the target (for a relocate: its new datastore)")
    relocate: bool = Field(
        default=False,
        description="shared-nothing (kind relocate): create the spec's disks here and export them over NBD "
        "from the receiving QEMU for the source's mirrors",
    )
    grant: PeerGrant | None = Field(default=None, description="who may call this migration's endpoints")
    tls: MigrationTls | None = Field(default=None, description="None: the stream is not encrypted")


class Incoming(BaseModel):
    port: int | None = Field(
        default=None, ge=1, le=65535, description="where the receiving QEMU listens on the migration address"
    )
    uri: str = Field(
        default="", description="the target's own view; the server builds the URI from port and checks it"
    )
    nbd: list[NbdTarget] = Field(
        default_factory=list, description="a relocate: one writable NBD export per disk of the spec"
    )


class IncomingState(BaseModel):
    """The target's proof of where an incoming migration stands, read from its QEMU, not only its
    record: the source decides from it whether the target may run (``stream == "completed"``)."""

    migration_id: int
    vm: str
    state: str = Field(description="the target record's state")
    qemu_alive: bool
    qemu_status: str | None = Field(default=None, description='QEMU run state: "inmigrate", "paused", ...')
    stream: str | None = Field(
        default=None, description="the incoming side's query-migrate status: \"active\", \"completed\", ..."
    )
    timeline: SwitchoverTimeline = Field(default_factory=SwitchoverTimeline)
    encrypted: bool | None = Field(
        default=None, description="the receiving QEMU takes the stream over TLS only (None: QEMU not read)")


class AgentRef(BaseModel):
    """How one agent reaches another (the server hands this to the source agent): the source calls
    ``address`` with its own host certificate and ``capability`` in ``X-Vmshift-Capability``."""

    address: str
    capability: str = Field(min_length=32, max_length=128, description="the migration's PeerGrant capability")


class OutgoingMigration(MigrationIdentity):
    migration_id: int
    vm: str
    uri: str = Field(description="tcp:ADDRESS:PORT, built by the server; anything else is refused (400)")
    target_migration_address: str = Field(
        default="", description="the target's registered migration address: the only address uri may name"
    )
    target_agent: AgentRef
    settings: MigrationSettings = Field(default_factory=MigrationSettings)
    bandwidth_bps: float | None = None
    dirty_rate_bps: float | None = None
    mirror_targets: list[NbdTarget] = Field(
        default_factory=list,
        description="a relocate: mirror each disk into its NBD export on the target before memory moves",
    )
    tls: MigrationTls | None = Field(default=None, description="None: the stream is not encrypted")


class FinalizeRequest(RequestModel):
    resolution: FinalizeResolution = FinalizeResolution.RETRY


class MigrationProgress(MigrationLive):
    """The source agent's view of one migration: the latest sample plus phase, actions and outcome."""

    migration_id: int
    vm: str
    phase: MigrationPhase
    status: MigrationStatus
    actions: list[MigrationAction] = Field(default_factory=list)
    metrics: MigrationMetrics = Field(default_factory=MigrationMetrics)
    error: ErrorInfo | None = None
    updated_at: datetime | None = None
    nonce: str | None = None
    encrypted: bool | None = Field(default=None, description="the stream runs over TLS (None: not started)")
    mirror_bytes: int = Field(
        default=0, description="a relocate: bytes the disk mirrors copied (the COPY phase before pre-copy)"
    )
