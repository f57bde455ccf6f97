"""How a running migration is shown as a task: its phase label and its percent. No I/O."""

from __future__ import annotations

from vmshift.model.agent_migration import MigrationProgress
from vmshift.model.migration import MigrationPhase


def phase_label(p: MigrationProgress) -> str:
    if p.phase is MigrationPhase.PRECOPY:
        return f"precopy round {p.round}"
    return p.phase.value


def percent_of(p: MigrationProgress) -> int:
    """Prepare is 5 %, pre-copy 10-95 % by bytes sent against bytes sent plus bytes left, then 97-99 %."""
    if p.phase in (MigrationPhase.SWITCHOVER, MigrationPhase.POSTCOPY):
        return 97
    if p.phase in (MigrationPhase.FINISH, MigrationPhase.COMPLETED):
        return 99
    done, left = p.transferred_bytes, p.remaining_bytes
    if done + left <= 0:
        return 5
    return 10 + int(85 * done / (done + left))
