"""Every default of the DRS recommender in one place, and what the migration threshold means."""

from __future__ import annotations

from dataclasses import dataclass

from vmshift.errors import InvalidInputError
from vmshift.placement.snapshot import DrsAutomation

DEFAULT_THRESHOLD = 3


@dataclass(frozen=True, slots=True)
class ThresholdLevel:
    """One step of the migration threshold (1 = conservative .. 5 = aggressive, vSphere's scale).

    ``factor``: a balancing move is made only when its benefit is at least ``factor`` times its
    cost; None = no balancing moves at all, only those that mend a broken must rule.
    ``tolerance``: how far (in normalised load, 0..1) a host may sit above the cluster's mean before
    it counts as out of balance.
    """

    factor: float | None
    tolerance: float


THRESHOLDS: dict[int, ThresholdLevel] = {
    1: ThresholdLevel(None, 1.0),
    2: ThresholdLevel(4.0, 0.20),
    3: ThresholdLevel(2.0, 0.10),
    4: ThresholdLevel(1.5, 0.05),
    5: ThresholdLevel(1.0, 0.02),
}


def threshold_level(threshold: int) -> ThresholdLevel:
    if threshold not in THRESHOLDS:
        raise InvalidInputError(f"The DRS threshold must be 1 to 5, not {threshold}.",
                                hint="1 makes only moves that mend must rules; 5 balances the most.")
    return THRESHOLDS[threshold]


@dataclass(frozen=True, slots=True)
class DrsSettings:
    automation: DrsAutomation = DrsAutomation.PARTIALLY
    threshold: int = DEFAULT_THRESHOLD
    cpu_weight: float = 0.5  # the objective weighs normalised CPU and memory load
    memory_weight: float = 0.5
    pass_interval_s: float = 60.0  # the moves of a pass must finish before the next pass
    cooldown_s: float = 1800.0  # a VM is not moved again within this long of its last move
    #: a host must be out of balance this many passes in a row (2: the lab's three busy VMs on one
    #: host are spread within two passes, as issue 11 asks; a one-pass spike is never acted on)
    persist_passes: int = 2
    #: The cost of a move in objective units: per second the migration runs (the copy loads both
    #: hosts and the link) and per second of downtime (the guest stops).
    cost_per_migration_s: float = 0.0002
    cost_per_downtime_s: float = 0.05
    should_penalty: float = 0.05  # objective units per broken should rule member
    must_penalty: float = 1.0  # per broken must rule member (only ever found, never made)
    max_sources: int = 3  # hottest hosts looked at per step of a pass
    max_vms_per_source: int = 8  # busiest movable VMs looked at per source
    max_targets: int = 6  # best targets by objective whose filters are run per VM

    def __post_init__(self) -> None:
        threshold_level(self.threshold)
        if self.cpu_weight < 0 or self.memory_weight < 0 or self.cpu_weight + self.memory_weight <= 0:
            raise InvalidInputError("The CPU and memory weights must not be negative, and not both 0.")
        if self.pass_interval_s <= 0 or self.cooldown_s < 0 or self.persist_passes < 1:
            raise InvalidInputError("The pass interval must be positive, the cooldown not negative and "
                                    "the persistence at least one pass.")

    @property
    def level(self) -> ThresholdLevel:
        return threshold_level(self.threshold)
