"""The agent's record retention (agent/record_retention.py): finished and old records go, nothing else."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from vmshift.agent.config import config_from_dict
from vmshift.agent.migration_store import MigrationRole, MigrationStore, StoredMigration, TargetState
from vmshift.agent.moves.store import MoveStore, StoredMove
from vmshift.agent.record_retention import DAY_S, RecordRetention
from vmshift.errors import InvalidInputError
from vmshift.model.agent_migration import MigrationProgress
from vmshift.model.enums import BootKind, MigrationKind
from vmshift.model.migration import MigrationPhase, MigrationStatus
from vmshift.model.moves import DiskMoveRequest, MoveProgress, MoveState
from vmshift.model.vm import BootSpec, VmSpec

NOW = time.time()
OLD = NOW - 40 * DAY_S
SPEC = VmSpec(name="vm-1", uuid="u-1", cpus=1, memory_mib=64, cpu_model="qemu64", machine_type="pc",
              datastore="a", boot=BootSpec(kind=BootKind.DISK))


def _source(store: MigrationStore, mid: int, status: MigrationStatus, mtime: float) -> None:
    progress = MigrationProgress(migration_id=mid, vm="vm-1", phase=MigrationPhase.PRECOPY, status=status)
    store.save(StoredMigration(role=MigrationRole.SOURCE, migration_id=mid, vm="vm-1", progress=progress))
    os.utime(store.path(mid), (mtime, mtime))


def _target(store: MigrationStore, mid: int, state: TargetState | None, mtime: float,
            created_paths: list[str] | None = None) -> None:
    store.save(StoredMigration(role=MigrationRole.TARGET, migration_id=mid, vm="vm-1", target_state=state,
                               created_paths=created_paths or []))
    os.utime(store.path(mid), (mtime, mtime))


def _move(store: MoveStore, move_id: int, state: MoveState, ended_at: float | None) -> None:
    req = DiskMoveRequest(move_id=move_id, nonce="n", vm="vm-1", kind=MigrationKind.STORAGE, target_spec=SPEC)
    progress = MoveProgress(move_id=move_id, vm="vm-1", kind=MigrationKind.STORAGE, state=state,
                            phase=MigrationPhase.PRECOPY)
    store.save(StoredMove(request=req, progress=progress, started_at=OLD, ended_at=ended_at))
    os.utime(store.path(move_id), (OLD, OLD))  # an unfinished move's file may be old too


def _ids(path: Path) -> list[int]:
    return sorted(int(p.stem) for p in path.glob("*.json"))


def test_old_finished_records_go_and_unfinished_ones_stay(tmp_path: Path) -> None:
    migrations, moves = MigrationStore(tmp_path), MoveStore(tmp_path)
    _source(migrations, 1, MigrationStatus.COMPLETED, OLD)  # goes
    _source(migrations, 2, MigrationStatus.FAILED, NOW - 5 * DAY_S)  # young: stays
    _source(migrations, 3, MigrationStatus.RUNNING, OLD)  # unfinished: stays
    _source(migrations, 4, MigrationStatus.NEEDS_FINALIZE, OLD)  # waits for finalize: stays
    _target(migrations, 5, TargetState.ACTIVATED, OLD)  # goes
    _target(migrations, 6, TargetState.LISTENING, OLD)  # still receiving: stays
    _target(migrations, 7, TargetState.ROLLED_BACK, OLD)  # goes
    _target(migrations, 8, TargetState.ROLLED_BACK, OLD, ["/ds/vm-1/disk0.qcow2"])  # leftovers: stays
    _target(migrations, 9, None, OLD)  # being prepared: stays
    _move(moves, 1, MoveState.COMPLETED, OLD)  # goes
    _move(moves, 2, MoveState.RUNNING, None)  # stays
    _move(moves, 3, MoveState.CANCELLED, NOW - DAY_S)  # young: stays

    purged = RecordRetention(migrations, moves, 30, clock=lambda: NOW).purge()

    assert (purged.migrations, purged.moves) == ([1, 5, 7], [1])
    assert _ids(migrations.dir) == [2, 3, 4, 6, 8, 9]
    assert _ids(moves.dir) == [2, 3]


def test_zero_days_keeps_everything_and_a_record_in_use_stays(tmp_path: Path) -> None:
    migrations, moves = MigrationStore(tmp_path), MoveStore(tmp_path)
    _source(migrations, 1, MigrationStatus.COMPLETED, OLD)
    _source(migrations, 2, MigrationStatus.CANCELLED, OLD)
    _move(moves, 1, MoveState.FAILED, OLD)

    assert RecordRetention(migrations, moves, 0, clock=lambda: NOW).purge().migrations == []
    assert _ids(migrations.dir) == [1, 2] and _ids(moves.dir) == [1]

    asked: list[int] = []

    def release(mid: int) -> bool:
        asked.append(mid)
        return mid != 2  # the owner still uses record 2

    purged = RecordRetention(migrations, moves, 30, release_migration=release, release_move=lambda _: False,
                             clock=lambda: NOW).purge()
    assert asked == [1, 2] and purged.migrations == [1] and purged.moves == []
    assert _ids(migrations.dir) == [2] and _ids(moves.dir) == [1]


BASE = {"name": "h", "listen": "127.0.0.1:1", "ca_file": "/ca.pem", "state_dir": "/s"}


def test_agent_config_record_retention_days() -> None:
    assert config_from_dict(BASE).record_retention_days == 30
    assert config_from_dict({**BASE, "record_retention_days": 0}).record_retention_days == 0
    for bad in (-1, "7", 1.5, True):
        with pytest.raises(InvalidInputError, match="'record_retention_days' must be a whole number of days"):
            config_from_dict({**BASE, "record_retention_days": bad})
