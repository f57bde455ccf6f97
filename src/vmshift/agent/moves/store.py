"""Persisted records of this agent's disk moves: ``state_dir/moves/ID.json``.

A record is written before every step that changes files or QEMU, so an agent that restarts in the
middle of a move knows what it had done and can roll it back or finish it (``jobs.py``). Writes
are atomic (temp file + rename). ``detail`` belongs to the kind's mover: it keeps its own typed
model there (``MoveJob.detail_as`` / ``MoveJob.set_detail``), so this file knows no kind.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from vmshift.model.moves import DiskMoveRequest, MoveProgress

log = logging.getLogger(__name__)


class StoredMove(BaseModel):
    request: DiskMoveRequest
    progress: MoveProgress
    started_at: float = Field(default_factory=time.time, description="wall clock (s) at the start")
    ended_at: float | None = None
    cancel_requested: bool = False
    committed: bool = Field(
        default=False,
        description="past the point of no return (e.g. job-complete sent): never rolled back, only finished",
    )
    detail: dict[str, Any] = Field(default_factory=dict, description="the mover's own state (its model)")


class MoveStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "moves"

    def path(self, move_id: int) -> Path:
        return self.dir / f"{move_id}.json"

    def save(self, rec: StoredMove) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(rec.progress.move_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(rec.model_dump_json(indent=1))
        tmp.replace(path)

    def remove(self, move_id: int) -> None:
        """Retention (agent/record_retention.py) drops a finished record."""
        self.path(move_id).unlink(missing_ok=True)

    def load(self, move_id: int) -> StoredMove | None:
        path = self.path(move_id)
        try:
            return StoredMove.model_validate_json(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            log.warning("ignoring unreadable move record %s: %s", path, exc)
            return None

    def all(self) -> list[StoredMove]:
        if not self.dir.is_dir():
            return []
        out = []
        for path in sorted(self.dir.glob("*.json"), key=lambda p: (len(p.stem), p.stem)):
            if path.stem.isdigit() and (rec := self.load(int(path.stem))) is not None:
                out.append(rec)
        return out
