"""What the engine answers: each move with its reason, benefit, cost and predicted time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from vmshift.model.migration import CheckResult
from vmshift.model.placement import MoveReason as MoveReason
from vmshift.model.placement import RecommendationState as RecommendationState


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
