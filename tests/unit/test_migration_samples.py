"""query-migrate parsing, metrics and the phase machine."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from vmshift.errors import ConflictError, InvalidInputError
from vmshift.migration.phases import (
    MigrationPhase,
    can_transition,
    check_transition,
    phase_for_qemu,
    status_for_phase,
)
from vmshift.migration.samples import MigrationSample, QemuMigrationStatus, summarize
from vmshift.model.migration import MigrationStatus

TRACES = Path(__file__).parent / "traces"


def trace(name: str) -> list[MigrationSample]:
    data = json.loads((TRACES / f"{name}.json").read_text())
    return [MigrationSample.from_qmp(s["answer"], s["t"]) for s in data["samples"]]


def test_parses_an_active_answer() -> None:
    s = trace("stalled")[30]
    assert s.status is QemuMigrationStatus.ACTIVE
    assert s.page_size == 4096 and s.total_bytes > 190 * 2**20
    assert s.round == s.dirty_sync_count >= 2
    assert s.dirty_rate_bps == s.dirty_pages_rate * 4096 > 0
    assert s.throughput_bps == pytest.approx(s.mbps * 125_000)
    synced = s.synced_dirty_bytes
    assert synced is not None and 11 * 2**20 < synced < 14 * 2**20  # the 12 MiB working set


def test_parses_completed_answer_with_times() -> None:
    s = trace("converging")[-1]
    assert s.status is QemuMigrationStatus.COMPLETED and s.status.finished
    assert s.downtime_ms == 24 and s.total_time_ms == 1527 and s.setup_time_ms == 3
    assert s.remaining_bytes == 0 and s.normal_pages > 0 and s.duplicate_pages > 0
    assert s.expected_downtime_ms is None


def test_setup_answer_has_no_ram_yet() -> None:
    s = MigrationSample.from_qmp({"status": "setup"}, 0.0)
    assert s.status is QemuMigrationStatus.SETUP and s.total_bytes == 0 and s.synced_dirty_bytes is None


def test_unknown_status_and_bad_fields() -> None:
    assert MigrationSample.from_qmp({"status": "warp-speed"}, 1).status is QemuMigrationStatus.UNKNOWN
    with pytest.raises(InvalidInputError, match="transferred"):
        MigrationSample.from_qmp({"status": "active", "ram": {"transferred": "lots"}}, 1)
    with pytest.raises(InvalidInputError):
        MigrationSample.from_qmp({"status": "active", "ram": [1]}, 1)


def test_failed_answer_keeps_the_error() -> None:
    s = MigrationSample.from_qmp({"status": "failed", "error-desc": "Unable to write to socket"}, 3)
    assert s.status is QemuMigrationStatus.FAILED and s.error == "Unable to write to socket"


def test_summarize_converging() -> None:
    m = summarize(trace("converging"))
    assert m.total_ms == 1527 and m.downtime_ms == 24 and m.setup_ms == 3
    assert m.bytes_sent == 120239938 and m.rounds == 4
    assert 60e6 < m.mean_throughput_bps <= m.peak_throughput_bps < 90e6
    assert m.max_throttle_percent == 0 and not m.postcopy


def test_summarize_empty() -> None:
    assert summarize([]).bytes_sent == 0


def test_happy_path_phases() -> None:
    path = [
        MigrationPhase.QUEUED,
        MigrationPhase.CHECK,
        MigrationPhase.ESTIMATE,
        MigrationPhase.PREPARE,
        MigrationPhase.PRECOPY,
        MigrationPhase.SWITCHOVER,
        MigrationPhase.FINISH,
        MigrationPhase.COMPLETED,
    ]
    for a, b in itertools.pairwise(path):
        assert check_transition(a, b) is b


def test_no_rollback_after_postcopy_and_nothing_after_the_end() -> None:
    assert can_transition(MigrationPhase.PRECOPY, MigrationPhase.ROLLBACK)
    assert not can_transition(MigrationPhase.POSTCOPY, MigrationPhase.ROLLBACK)
    with pytest.raises(ConflictError, match="cannot move"):
        check_transition(MigrationPhase.COMPLETED, MigrationPhase.PRECOPY)


def test_phase_for_qemu_status() -> None:
    q = QemuMigrationStatus
    assert phase_for_qemu(q.ACTIVE) is MigrationPhase.PRECOPY
    assert phase_for_qemu(q.DEVICE) is MigrationPhase.SWITCHOVER
    assert phase_for_qemu(q.POSTCOPY_ACTIVE) is MigrationPhase.POSTCOPY
    assert phase_for_qemu(q.FAILED) is MigrationPhase.ROLLBACK
    assert phase_for_qemu(q.FAILED, MigrationPhase.POSTCOPY) is MigrationPhase.FAILED
    assert phase_for_qemu(q.NONE) is None


def test_status_for_phase() -> None:
    assert status_for_phase(MigrationPhase.QUEUED) is MigrationStatus.QUEUED
    assert status_for_phase(MigrationPhase.PRECOPY) is MigrationStatus.RUNNING
    assert status_for_phase(MigrationPhase.CANCELLED) is MigrationStatus.CANCELLED
