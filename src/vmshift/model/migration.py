"""A live migration as the API returns it: status, phase, checks, prediction, policy actions, metrics.

Pure pydantic types. The pure logic that fills them lives in ``vmshift.migration`` (checks,
estimator, convergence policy); this module only says what a record looks like on the wire.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field, computed_field

from vmshift.model.api import ErrorInfo
from vmshift.model.base import RequestModel
from vmshift.model.enums import DiskFormat, MigrationEncryption, MigrationKind
from vmshift.model.inputs import MAX_DOWNTIME_MS, MAX_DURATION_S, MAX_RATE_BPS, DatastoreName, HostName


class MigrationStatus(StrEnum):
    """Where the migration stands as a whole (the phase says which step runs)."""

    QUEUED = "queued"
    RUNNING = "running"
    #: The stream completed but the target could not be activated: the VM waits paused on both
    #: hosts until ``vmshift migration finalize ID`` (or ``vmshift vm resume VM``) decides.
    NEEDS_FINALIZE = "needs_finalize"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: Neither host holds the whole VM any more (the source QEMU vanished before the target had
    #: received all of it); the serial logs stay in the VM's folder.
    LOST = "lost"

    @property
    def finished(self) -> bool:
        return self in (MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED,
                        MigrationStatus.LOST)


class MigrationPhase(StrEnum):
    """Steps of a live migration (ARCHITECTURE.md "A live migration, phase by phase").

    Allowed transitions are in ``vmshift.migration.phases``.
    """

    QUEUED = "queued"
    CHECK = "check"
    ESTIMATE = "estimate"
    PREPARE = "prepare"
    COPY = "copy"  # disks (and a suspended VM's state) are copied; a mirror follows the guest's writes
    PIVOT = "pivot"  # Storage vMotion: the running VM switches to its new files
    VERIFY = "verify"  # cold and suspended moves: qemu-img compare of every copy with its source
    PRECOPY = "precopy"
    POSTCOPY = "postcopy"
    SWITCHOVER = "switchover"
    FINISH = "finish"
    ROLLBACK = "rollback"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"


class ActionKind(StrEnum):
    """A decision of the convergence policy that the control loop applies through QMP."""

    SET_DOWNTIME_LIMIT = "set_downtime_limit"  # value: seconds -> migrate-set-parameters downtime-limit
    SET_THROTTLE = "set_throttle"  # value: percent of vCPU time taken away (1-99)
    START_POSTCOPY = "start_postcopy"  # migrate-start-postcopy
    ABORT = "abort"  # migrate_cancel, then roll back


class FinalizeResolution(StrEnum):
    """How ``POST /migrations/{id}/finalize`` ends a migration that waits paused on both hosts."""

    RETRY = "retry"  # the source agent tries to activate the target again itself
    TARGET_ACTIVATED = "target_activated"  # the server activated the target: stop the source copy
    RESUME_SOURCE = "resume_source"  # the server proved the target never ran: resume the source


class CheckSeverity(StrEnum):
    OK = "ok"
    WARNING = "warning"
    ERROR = "error"


class CheckId(StrEnum):
    """One pre-migration check each (issue 3, item 2)."""

    POWER_STATE = "power_state"
    DIFFERENT_HOST = "different_host"
    SOURCE_CONNECTED = "source_connected"
    TARGET_CONNECTED = "target_connected"
    TARGET_MAINTENANCE = "target_maintenance"
    DATACENTER = "datacenter"
    CPU_MODEL = "cpu_model"
    ACCELERATOR = "accelerator"
    MACHINE_TYPE = "machine_type"
    MEMORY = "memory"
    DATASTORES = "datastores"
    NETWORKS = "networks"
    MIGRATION_ADDRESS = "migration_address"
    REACHABILITY = "reachability"
    ENCRYPTION = "encryption"  # encrypted vMotion: the stream's TLS as asked (migration/encryption.py)
    HOST_BOUND_DEVICES = "host_bound_devices"
    CONCURRENCY = "concurrency"
    RULES = "rules"  # placement: the cluster's affinity rules allow the host (vmshift.placement.rules)
    # disk moves (issue 8, item 7)
    KIND = "kind"  # the request names a move this VM's power state allows
    TARGET_DATASTORE = "target_datastore"  # the target host sees the target datastore
    DATASTORE_SPACE = "datastore_space"  # the target datastore has room for the copies
    DISK_FORMAT = "disk_format"  # the requested format can be written


class CheckResult(BaseModel):
    check: CheckId
    severity: CheckSeverity
    message: str = Field(description="one sentence saying what was found")
    hint: str | None = Field(default=None, description="what to do about it")


class CheckReport(BaseModel):
    results: list[CheckResult] = Field(default_factory=list)

    @property
    def errors(self) -> list[CheckResult]:
        return [r for r in self.results if r.severity is CheckSeverity.ERROR]

    @property
    def warnings(self) -> list[CheckResult]:
        return [r for r in self.results if r.severity is CheckSeverity.WARNING]

    @property
    def ok(self) -> bool:
        """No error (warnings allowed)."""
        return not self.errors

    @property
    def must_queue(self) -> bool:
        """A host is at its concurrent-migration limit: the migration waits in the queue."""
        return any(
            r.check is CheckId.CONCURRENCY and r.severity is CheckSeverity.WARNING for r in self.results
        )

    def result(self, check: CheckId) -> CheckResult | None:
        return next((r for r in self.results if r.check is check), None)


class SampleRecord(BaseModel):
    """The parts of one ``query-migrate`` answer that explain a policy action."""

    time_s: float
    qemu_status: str
    round: int
    transferred_bytes: int
    remaining_bytes: int
    total_bytes: int
    dirty_rate_bps: float
    throughput_bps: float
    throttle_percent: int
    expected_downtime_ms: int | None = None


class MigrationAction(BaseModel):
    """One recorded policy decision with the sample that caused it."""

    kind: ActionKind
    value: float | None = Field(default=None, description="seconds for downtime, percent for throttle")
    reason: str
    time_s: float = Field(description="seconds since the migration started")
    sample: SampleRecord


class MigrationPrediction(BaseModel):
    """What the estimator predicted before the migration started."""

    memory_bytes: int
    dirty_rate_bps: float
    bandwidth_bps: float
    downtime_limit_ms: int
    total_ms: int
    downtime_ms: int
    rounds: int
    converges_unaided: bool
    throttle_percent: int = Field(description="throttle the policy is expected to apply (0 = none)")
    bytes_sent: int
    zero_fraction: float = Field(
        default=0.0, description="share of memory taken as zero pages (never touched: not resident in QEMU)"
    )


class SwitchoverTimeline(BaseModel):
    """Wall-clock marks (epoch seconds) of one switchover, from QEMU's event timestamps where QEMU
    has an event (docs/migration.md, "Switchover timeline")."""

    source_stopped: float | None = Field(default=None, description="source vCPUs stopped (STOP event)")
    last_byte_sent: float | None = Field(default=None, description="source stream completed (MIGRATION)")
    confirm_sent: float | None = Field(default=None, description="source agent asked the target to run")
    target_loaded: float | None = Field(default=None, description="target stream loaded (MIGRATION)")
    target_cont: float | None = Field(default=None, description="target vCPUs running (RESUME event)")
    first_announce: float | None = Field(
        default=None, description="first RARP of the target: QEMU holds its own until `cont` sends it"
    )

    def offsets_ms(self) -> dict[str, float]:
        """Each mark as milliseconds after the source stopped (marks before it are negative)."""
        marks = self.model_dump(exclude_none=True)
        origin = self.source_stopped
        if origin is None:
            return {}
        return {k: round((v - origin) * 1000, 1) for k, v in marks.items()}


class MigrationMetrics(BaseModel):
    """What happened (QEMU's numbers plus what the control loop observed)."""

    total_ms: int | None = None
    setup_ms: int | None = None
    downtime_ms: int | None = None
    bytes_sent: int = 0
    zero_pages: int = 0
    normal_pages: int = 0
    rounds: int = 0
    mean_throughput_bps: float = 0.0
    peak_throughput_bps: float = 0.0
    mean_dirty_rate_bps: float = 0.0
    peak_dirty_rate_bps: float = 0.0
    max_throttle_percent: int = 0
    postcopy: bool = False
    timeline: SwitchoverTimeline = Field(default_factory=SwitchoverTimeline)
    copies_identical: bool | None = Field(
        default=None, description="disk moves: qemu-img compare found every copy equal to its source"
    )


class MigrationSettings(BaseModel):
    """Per-migration knobs (defaults from the VM and the hosts)."""

    max_downtime_ms: int = Field(default=500, gt=0, le=MAX_DOWNTIME_MS)
    allow_postcopy: bool = False
    postcopy_after_s: float | None = Field(
        default=None, gt=0, le=MAX_DURATION_S,
        description="with allow_postcopy: switch to post-copy after this long in pre-copy",
    )
    bandwidth_limit_bps: float | None = Field(
        default=None, gt=0, le=MAX_RATE_BPS, description="None = unlimited"
    )
    encryption: MigrationEncryption = Field(
        default=MigrationEncryption.OPPORTUNISTIC,
        description="what the VM, the hosts and the request asked for together (migration/encryption.py)",
    )
    timeout_s_per_gib: float = Field(default=60.0, gt=0, le=MAX_DURATION_S)
    # at least a minute: each throttle step needs two of QEMU's bitmap syncs (rounds) to take effect,
    # and a guest on a slow link needs several steps (make soak: 192 MiB over 100 Mbit/s took ~25 s)
    timeout_min_s: float = Field(default=60.0, gt=0, le=MAX_DURATION_S)


class MigrationCreate(RequestModel):
    """Body of a migrate request: a target host, a target datastore, or both (the kind follows)."""

    host: HostName | None = Field(
        default=None, description="target host name (default: stay on the VM's host)"
    )
    datastore: DatastoreName | None = Field(
        default=None, description="target datastore for all the VM's files (default: keep them)"
    )
    disk_format: DiskFormat | None = Field(default=None, description="format of the copies (default: keep)")
    check_only: bool = False
    dry_run: bool = False
    max_downtime_ms: int | None = Field(default=None, gt=0, le=MAX_DOWNTIME_MS)
    allow_postcopy: bool | None = None
    postcopy_after_s: float | None = Field(default=None, gt=0, le=MAX_DURATION_S)
    bandwidth_limit_bps: float | None = Field(default=None, gt=0, le=MAX_RATE_BPS)
    encryption: MigrationEncryption | None = Field(
        default=None, description="override the VM's setting for this migration (default: the VM's)"
    )


class MigrationLive(BaseModel):
    """The source agent's latest sample of a running migration (for progress displays)."""

    round: int = 0
    remaining_bytes: int = 0
    total_bytes: int = 0
    transferred_bytes: int = 0
    throughput_bps: float = 0.0
    dirty_rate_bps: float = 0.0
    throttle_percent: int = 0
    downtime_limit_ms: int = 0
    eta_s: float | None = Field(default=None, description="disk moves: seconds left at the current rate")
    write_blocking: bool = Field(default=False, description="disk moves: the mirrors copy each write at once")


class Migration(BaseModel):
    id: int
    vm: str
    kind: MigrationKind = MigrationKind.LIVE
    source_host: str
    target_host: str
    source_datastore: str | None = Field(default=None, description="the VM's home datastore before the move")
    target_datastore: str | None = Field(default=None, description="None: the files stay where they are")
    status: MigrationStatus
    phase: MigrationPhase
    task_id: int | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    settings: MigrationSettings = Field(default_factory=MigrationSettings)
    checks: CheckReport | None = None
    prediction: MigrationPrediction | None = None
    metrics: MigrationMetrics = Field(default_factory=MigrationMetrics)
    actions: list[MigrationAction] = Field(default_factory=list)
    error: ErrorInfo | None = None
    progress: MigrationLive | None = None
    encrypted: bool | None = Field(
        default=None, description="the memory stream went over TLS (None: no stream yet, or a disk-only move)"
    )

    # Flat fields for `vmshift vm migrate --json` (issue 3, item 7).
    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_ms(self) -> int | None:
        return self.metrics.total_ms

    @computed_field  # type: ignore[prop-decorator]
    @property
    def downtime_ms(self) -> int | None:
        return self.metrics.downtime_ms

    @computed_field  # type: ignore[prop-decorator]
    @property
    def timeline(self) -> dict[str, float]:
        return self.metrics.timeline.model_dump(exclude_none=True)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bytes_sent(self) -> int:
        return self.metrics.bytes_sent

    @computed_field  # type: ignore[prop-decorator]
    @property
    def rounds(self) -> int:
        return self.metrics.rounds

    @computed_field  # type: ignore[prop-decorator]
    @property
    def predicted_total_ms(self) -> int | None:
        return self.prediction.total_ms if self.prediction else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def predicted_downtime_ms(self) -> int | None:
        return self.prediction.downtime_ms if self.prediction else None
