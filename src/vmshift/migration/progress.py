"""How a running migration or disk move is shown as a task: its phase label and its percent. No I/O."""

from __future__ import annotations

from vmshift.model.agent_migration import MigrationProgress
from vmshift.model.migration import MigrationLive, MigrationPhase
from vmshift.model.moves import MoveProgress

MIB = 1 << 20


def phase_label(p: MigrationProgress) -> str:
    if p.phase is MigrationPhase.PRECOPY:
        return f"precopy round {p.round}"
    if p.phase is MigrationPhase.COPY and p.total_bytes > 0:  # a relocate's disk mirrors
        parts = [f"copy {100 * min(p.transferred_bytes, p.total_bytes) // p.total_bytes}%",
                 f"{p.throughput_bps / MIB:.0f} MiB/s"]
        if p.eta_s is not None:
            parts.append(f"ETA {p.eta_s:.0f} s")
        if p.write_blocking:
            parts.append("write-blocking")
        return " ".join(parts)
    return p.phase.value


def percent_of(p: MigrationProgress) -> int:
    """Prepare is 5 %, pre-copy 10-95 % by bytes sent against bytes sent plus bytes left, then 97-99 %.
    A relocate copies its disks first: the copy is 10-50 % by bytes, its pre-copy 50-95 %."""
    if p.phase in (MigrationPhase.SWITCHOVER, MigrationPhase.POSTCOPY):
        return 97
    if p.phase in (MigrationPhase.FINISH, MigrationPhase.COMPLETED):
        return 99
    done, left = p.transferred_bytes, p.remaining_bytes
    if done + left <= 0:
        return 50 if p.mirror_bytes and p.phase is MigrationPhase.PRECOPY else 5
    share = done / (done + left)
    if p.phase is MigrationPhase.COPY:
        return 10 + int(40 * share)
    if p.mirror_bytes:
        return 50 + int(45 * share)
    return 10 + int(85 * share)


def move_label(p: MoveProgress) -> str:
    """``copy 42% 118 MiB/s ETA 9 s`` while disks copy, else the phase."""
    if p.phase is not MigrationPhase.COPY or p.total_bytes <= 0:
        return p.phase.value
    parts = [f"copy {100 * p.done_bytes // p.total_bytes}%", f"{p.rate_bps / MIB:.0f} MiB/s"]
    if p.eta_s is not None:
        parts.append(f"ETA {p.eta_s:.0f} s")
    if any(d.write_blocking for d in p.disks):
        parts.append("write-blocking")
    return " ".join(parts)


def move_percent(p: MoveProgress) -> int:
    """Prepare is 5 %, the copy 10-90 % by bytes, pivot or verify 95 %, finish 99 %."""
    if p.phase in (MigrationPhase.PIVOT, MigrationPhase.VERIFY):
        return 95
    if p.phase in (MigrationPhase.FINISH, MigrationPhase.COMPLETED):
        return 99
    if p.phase is not MigrationPhase.COPY or p.total_bytes <= 0:
        return 5
    return 10 + int(80 * min(p.done_bytes, p.total_bytes) / p.total_bytes)


def move_live(p: MoveProgress) -> MigrationLive:
    """A disk move's sample in the shape the migration row keeps for progress displays."""
    return MigrationLive(transferred_bytes=p.done_bytes, total_bytes=p.total_bytes,
                         remaining_bytes=max(0, p.total_bytes - p.done_bytes), throughput_bps=p.rate_bps,
                         eta_s=p.eta_s, write_blocking=any(d.write_blocking for d in p.disks))
