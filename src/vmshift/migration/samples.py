"""Typed view of QMP ``query-migrate`` answers (QEMU's ``MigrationInfo``), and metrics from a series.

QEMU reports ``mbps`` in megabits (10^6) per second, ``dirty-pages-rate`` in pages per second
(refreshed only at each dirty-bitmap sync, so it is 0 during the first round), and times in ms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from vmshift.errors import InvalidInputError
from vmshift.model.migration import MigrationMetrics, SampleRecord


class QemuMigrationStatus(StrEnum):
    """QEMU's ``MigrationStatus`` (qapi/migration.json) plus UNKNOWN for values newer than this list."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, value: str) -> QemuMigrationStatus:
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN

    @property
    def finished(self) -> bool:
        return self in (
            QemuMigrationStatus.COMPLETED,
            QemuMigrationStatus.FAILED,
            QemuMigrationStatus.CANCELLED,
        )

    @property
    def postcopy(self) -> bool:
        return self.value.startswith("postcopy")


@dataclass(frozen=True, slots=True)
class MigrationSample:
    """One ``query-migrate`` answer at ``time_s`` seconds after the migration started."""

    time_s: float
    status: QemuMigrationStatus
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    total_bytes: int = 0
    dirty_pages_rate: int = 0
    page_size: int = 4096
    mbps: float = 0.0
    dirty_sync_count: int = 0
    expected_downtime_ms: int | None = None
    throttle_percent: int = 0
    duplicate_pages: int = 0
    normal_pages: int = 0
    normal_bytes: int = 0
    downtime_ms: int | None = None
    total_time_ms: int | None = None
    setup_time_ms: int | None = None
    error: str | None = None

    @classmethod
    def from_qmp(cls, answer: Mapping[str, Any], t: float) -> MigrationSample:
        """Parse the ``return`` value of ``query-migrate`` (a dict); ``t`` = seconds since start."""
        if not isinstance(answer, Mapping):
            raise InvalidInputError(
                "A query-migrate answer must be a JSON object.",
                hint="Pass the 'return' member of the QMP reply.",
            )
        ram = answer.get("ram") or {}
        if not isinstance(ram, Mapping):
            raise InvalidInputError("The 'ram' member of a query-migrate answer must be an object.")

        def num(src: Mapping[str, Any], key: str, default: int = 0) -> int:
            value = src.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInputError(f"query-migrate field {key!r} is {value!r}, not a number.")
            return int(value)

        def opt(key: str) -> int | None:
            return num(answer, key) if answer.get(key) is not None else None

        mbps = ram.get("mbps", 0.0)
        if isinstance(mbps, bool) or not isinstance(mbps, int | float):
            raise InvalidInputError(f"query-migrate field 'mbps' is {mbps!r}, not a number.")
        error = answer.get("error-desc")
        return cls(
            time_s=float(t),
            status=QemuMigrationStatus.parse(str(answer.get("status", "none"))),
            transferred_bytes=num(ram, "transferred"),
            remaining_bytes=num(ram, "remaining"),
            total_bytes=num(ram, "total"),
            dirty_pages_rate=num(ram, "dirty-pages-rate"),
            page_size=num(ram, "page-size", 4096) or 4096,
            mbps=float(mbps),
            dirty_sync_count=num(ram, "dirty-sync-count"),
            expected_downtime_ms=opt("expected-downtime"),
            throttle_percent=num(answer, "cpu-throttle-percentage"),
            duplicate_pages=num(ram, "duplicate"),
            normal_pages=num(ram, "normal"),
            normal_bytes=num(ram, "normal-bytes"),
            downtime_ms=opt("downtime"),
            total_time_ms=opt("total-time"),
            setup_time_ms=opt("setup-time"),
            error=str(error) if error is not None else None,
        )

    @property
    def round(self) -> int:
        """Pre-copy round: QEMU's dirty-bitmap sync count (1 during the first full pass)."""
        return self.dirty_sync_count

    @property
    def dirty_rate_bps(self) -> float:
        """Bytes the guest dirties per second, as QEMU measured it over the last round."""
        return float(self.dirty_pages_rate * self.page_size)

    @property
    def throughput_bps(self) -> float:
        """Bytes per second QEMU sent over the last period."""
        return self.mbps * 1e6 / 8

    @property
    def synced_dirty_bytes(self) -> int | None:
        """Dirty data found at the last bitmap sync (the start of this round), if QEMU told.

        QEMU reports ``expected-downtime`` as that amount divided by its current throughput, once
        it has measured a dirty rate; before that it echoes the downtime limit.
        """
        if self.expected_downtime_ms is None or self.dirty_pages_rate <= 0 or self.mbps <= 0:
            return None
        return round(self.expected_downtime_ms / 1000 * self.throughput_bps)

    def to_record(self) -> SampleRecord:
        return SampleRecord(
            time_s=round(self.time_s, 3),
            qemu_status=self.status.value,
            round=self.round,
            transferred_bytes=self.transferred_bytes,
            remaining_bytes=self.remaining_bytes,
            total_bytes=self.total_bytes,
            dirty_rate_bps=self.dirty_rate_bps,
            throughput_bps=round(self.throughput_bps, 1),
            throttle_percent=self.throttle_percent,
            expected_downtime_ms=self.expected_downtime_ms,
        )


def summarize(samples: Sequence[MigrationSample]) -> MigrationMetrics:
    """Metrics of a migration from its samples; the last one should be the final answer."""
    if not samples:
        return MigrationMetrics()
    last = samples[-1]
    running = [
        s for s in samples if s.status in (QemuMigrationStatus.ACTIVE, QemuMigrationStatus.POSTCOPY_ACTIVE)
    ]
    speeds = [s.throughput_bps for s in running if s.mbps > 0] or ([last.throughput_bps] if last.mbps else [])
    dirty = [s.dirty_rate_bps for s in running if s.dirty_pages_rate > 0]
    return MigrationMetrics(
        total_ms=last.total_time_ms,
        setup_ms=last.setup_time_ms,
        downtime_ms=last.downtime_ms,
        bytes_sent=max(s.transferred_bytes for s in samples),
        zero_pages=max(s.duplicate_pages for s in samples),
        normal_pages=max(s.normal_pages for s in samples),
        rounds=max(s.dirty_sync_count for s in samples),
        mean_throughput_bps=sum(speeds) / len(speeds) if speeds else 0.0,
        peak_throughput_bps=max(speeds, default=0.0),
        mean_dirty_rate_bps=sum(dirty) / len(dirty) if dirty else 0.0,
        peak_dirty_rate_bps=max(dirty, default=0.0),
        max_throttle_percent=max(s.throttle_percent for s in samples),
        postcopy=any(s.status.postcopy for s in samples),
    )
