"""What the engine answers: each move with its reason, benefit, cost and predicted time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from vmshift.model.migration import CheckResult


class MoveReason(StrEnum):
    MUST_RULE = "must_rule"  # mends a broken must rule (made at every threshold)
    SHOULD_RULE = "should_rule"  # mends a broken should rule
    BALANCE = "balance"  # evens out host load
    EVACUATE = "evacuate"  # the host goes into maintenance


class RecommendationState(StrEnum):
    """What became of a stored recommendation (the server keeps them: server/drs_service.py)."""

    PENDING = "pending"  # listed, waiting for ``drs apply`` or ``drs dismiss``
    APPLIED = "applied"  # a migration task was started for it
    DISMISSED = "dismissed"  # a user said no
    EXPIRED = "expired"  # a later pass no longer recommends it, or its VM or hosts changed


@dataclass(frozen=True, slots=True)
class Recommendation:
    vm: str
    source: str
    target: str
    reason: MoveReason
    why: str  # one sentence for the user
    benefit: float  # objective units: how much lower the objective gets over the history window
    cost: float  # objective units, from the predicted time and downtime
    predicted_s: float
    downtime_ms: int
    automatic: bool  # applied as a migration task (fully automated) or only listed
    checks: tuple[CheckResult, ...] = ()


@dataclass(frozen=True, slots=True)
class DrsMemory:
    """What one pass hands to the next: how many passes in a row each host was out of balance."""

    out_of_balance: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DrsPass:
    recommendations: tuple[Recommendation, ...]
    imbalance_before: float
    imbalance_after: float
    objective_before: float
    objective_after: float
    tolerance: float
    notes: tuple[str, ...]  # why moves were or were not made
    memory: DrsMemory
