"""Persisted state of the live migrations this agent takes part in: ``state_dir/migrations/ID.json``.

Records are private (0600 in a 0700 directory): a source's record holds the migration's capability.
A record survives agent restarts: the source resumes its control loop from it, the target knows
which QEMU waits for a stream and for which migration. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import logging
import time
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from vmshift.model.agent_migration import MigrationProgress, OutgoingMigration, PeerGrant
from vmshift.model.migration import SwitchoverTimeline
from vmshift.model.moves import NbdTarget
from vmshift.model.vm import VmSpec
from vmshift.tls.files import write_private

log = logging.getLogger(__name__)


class MigrationRole(StrEnum):
    SOURCE = "source"
    TARGET = "target"


class TargetState(StrEnum):
    """Where an incoming migration stands on the target host."""

    LISTENING = "listening"  # QEMU waits (-incoming defer + migrate-incoming)
    ACTIVATED = "activated"  # the VM runs here and is a normal VM of this host
    ROLLED_BACK = "rolled_back"  # QEMU killed, registration removed
    LOAD_FAILED = "load_failed"  # the stream did not load, so the VM never ran here; cleaned up as above

    @property
    def finished(self) -> bool:
        return self is not TargetState.LISTENING


class StoredMigration(BaseModel):
    role: MigrationRole
    migration_id: int
    vm: str
    started_at: float = Field(default_factory=time.time, description="wall clock (s) at the start")
    # source
    request: OutgoingMigration | None = None
    progress: MigrationProgress | None = None
    migrate_sent: bool = False  # QEMU accepted `migrate`
    cancel_requested: bool = False
    # target
    spec: VmSpec | None = None
    uri: str | None = None
    target_state: TargetState | None = None
    timeline: SwitchoverTimeline = Field(default_factory=SwitchoverTimeline)
    nonce: str | None = None  # the server's nonce of this migration (target records)
    grant: PeerGrant | None = None  # target: who may call this migration's routes; None once it ended
    # target of a relocate (shared-nothing): the paths it created (a rollback removes exactly these)
    # and the NBD exports of its receiving QEMU
    relocate: bool = False
    created_paths: list[str] = Field(default_factory=list)
    exports: list[NbdTarget] = Field(default_factory=list)


class MigrationStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "migrations"

    def path(self, migration_id: int) -> Path:
        return self.dir / f"{migration_id}.json"

    def save(self, rec: StoredMigration) -> None:
        # 0600 in a 0700 directory: a source record holds its migration's capability
        write_private(self.path(rec.migration_id), rec.model_dump_json(indent=1).encode(), fsync=False)

    def remove(self, migration_id: int) -> None:
        """Retention (agent/record_retention.py) drops a finished record."""
        self.path(migration_id).unlink(missing_ok=True)

    def load(self, migration_id: int) -> StoredMigration | None:
        path = self.path(migration_id)
        try:
            return StoredMigration.model_validate_json(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            log.warning("ignoring unreadable migration record %s: %s", path, exc)
            return None

    def all(self) -> list[StoredMigration]:
        if not self.dir.is_dir():
            return []
        out = []
        for path in sorted(self.dir.glob("*.json")):
            if path.stem.isdigit() and (rec := self.load(int(path.stem))) is not None:
                out.append(rec)
        return out
