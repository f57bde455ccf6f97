"""The phase machine of a live migration: which phase may follow which.

The enum itself lives in ``vmshift.model.migration`` (the API returns it, and ``model`` may not
import this package); it is re-exported here. The one rule that matters most: before
SWITCHOVER every failure goes through ROLLBACK (VM keeps running on the source); once post-copy
has started the source no longer holds the whole VM, so there is no rollback from POSTCOPY.
"""

from __future__ import annotations

from vmshift.errors import ConflictError
from vmshift.migration.samples import QemuMigrationStatus
from vmshift.model.migration import MigrationPhase, MigrationStatus

__all__ = [
    "TRANSITIONS",
    "MigrationPhase",
    "can_reach",
    "can_transition",
    "check_transition",
    "phase_for_qemu",
    "status_for_phase",
]

P = MigrationPhase
TERMINAL = frozenset({P.COMPLETED, P.FAILED, P.CANCELLED, P.LOST})

# LOST: the source QEMU vanished and the target proves it never got the whole VM.
TRANSITIONS: dict[MigrationPhase, frozenset[MigrationPhase]] = {
    P.QUEUED: frozenset({P.CHECK, P.CANCELLED, P.FAILED}),
    # disk moves go from check straight to prepare (their estimate is the copy's own rate)
    P.CHECK: frozenset({P.ESTIMATE, P.PREPARE, P.QUEUED, P.FAILED, P.CANCELLED}),
    P.ESTIMATE: frozenset({P.PREPARE, P.FAILED, P.CANCELLED}),
    P.PREPARE: frozenset({P.PRECOPY, P.COPY, P.ROLLBACK, P.FAILED, P.CANCELLED}),
    # COPY -> PRECOPY: shared-nothing, memory follows once every disk mirror is ready
    P.COPY: frozenset({P.PIVOT, P.VERIFY, P.PRECOPY, P.FINISH, P.ROLLBACK}),
    P.PIVOT: frozenset({P.FINISH, P.ROLLBACK}),
    P.VERIFY: frozenset({P.FINISH, P.ROLLBACK}),
    # a switchover shorter than one sample goes from pre-copy straight to finish
    P.PRECOPY: frozenset({P.SWITCHOVER, P.POSTCOPY, P.FINISH, P.ROLLBACK, P.LOST}),
    # QEMU resumes the source if it fails; post-copy begins with a switchover of the device state
    P.SWITCHOVER: frozenset({P.FINISH, P.POSTCOPY, P.ROLLBACK, P.LOST}),
    P.POSTCOPY: frozenset({P.FINISH, P.FAILED, P.LOST}),
    # FINISH -> FAILED: the target proved it never ran, the source was resumed
    P.FINISH: frozenset({P.COMPLETED, P.FAILED, P.LOST}),
    # ROLLBACK -> FINISH: the stream completed before the cancel took hold
    P.ROLLBACK: frozenset({P.FAILED, P.CANCELLED, P.FINISH, P.LOST}),
    P.COMPLETED: frozenset(),
    P.FAILED: frozenset(),
    P.CANCELLED: frozenset(),
    P.LOST: frozenset(),
}


def can_transition(current: MigrationPhase, new: MigrationPhase) -> bool:
    return new in TRANSITIONS[current]


def check_transition(current: MigrationPhase, new: MigrationPhase) -> MigrationPhase:
    """Return ``new`` if allowed after ``current``, else raise ConflictError."""
    if not can_transition(current, new):
        allowed = ", ".join(sorted(p.value for p in TRANSITIONS[current])) or "nothing (it is final)"
        raise ConflictError(
            f"A migration in phase '{current.value}' cannot move to '{new.value}'.",
            hint=f"From '{current.value}' it may move to: {allowed}.",
        )
    return new


def can_reach(current: MigrationPhase, new: MigrationPhase) -> bool:
    """True if ``new`` follows ``current`` through zero or more transitions (an observer that polls,
    like the server, may miss phases in between but never sees one go backwards)."""
    seen, todo = {current}, [current]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return new in seen


def status_for_phase(phase: MigrationPhase) -> MigrationStatus:
    if phase is P.QUEUED:
        return MigrationStatus.QUEUED
    if phase in TERMINAL:
        return MigrationStatus(phase.value)
    return MigrationStatus.RUNNING


def phase_for_qemu(
    status: QemuMigrationStatus, current: MigrationPhase | None = None
) -> MigrationPhase | None:
    """The phase a source-side ``query-migrate`` status implies (None: no opinion).

    A failure after post-copy started cannot roll back: it maps to FAILED.
    """
    q = QemuMigrationStatus
    if status is q.FAILED and current is P.POSTCOPY:
        return P.FAILED
    if status in (q.SETUP, q.ACTIVE, q.WAIT_UNPLUG):
        return P.PRECOPY
    if status in (q.PRE_SWITCHOVER, q.DEVICE):
        return P.SWITCHOVER
    if status.postcopy:
        return P.POSTCOPY
    if status is q.COMPLETED:
        return P.FINISH
    if status in (q.FAILED, q.CANCELLING, q.CANCELLED):
        return P.ROLLBACK
    return None
