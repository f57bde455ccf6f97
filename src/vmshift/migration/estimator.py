"""Pre-copy estimator: predicted total time, rounds and downtime from three numbers. Pure math.

Model (geometric pre-copy): round 1 sends all of memory (zero pages cost almost nothing); round k
sends the pages the guest dirtied while round k-1 was on the wire, capped by the working set. QEMU
switches over once the data left would take no longer than the downtime limit to send. With a dirty
rate ``D`` and a bandwidth ``B`` each round shrinks by ``D / B``: below 1 it converges by itself, at
or above 1 it never does. The limit starts low (the policy's initial limit) and is raised to what a
round needs, up to the VM's budget, once the rounds stop shrinking by a fifth, as the convergence
policy does. The downtime adds a fixed switchover cost to the last data (``SWITCHOVER_COST_S``).
The convergence policy then throttles the vCPUs by ``1 - r·B/D`` (``r`` =
target ratio), so the estimate for that case assumes that throttle from round 2 on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vmshift.errors import InvalidInputError
from vmshift.model.migration import MigrationPrediction

ZERO_PAGE_COST = 9 / 4096  # a zero page goes out as a header and a flag byte instead of 4 KiB
DEFAULT_TARGET_RATIO = 0.5  # dirty rate after throttling, as a fraction of bandwidth
MAX_THROTTLE_PERCENT = 99  # QEMU's cpu-throttle range is 1..99
#: What QEMU's downtime costs beyond sending the last dirty pages: stopping the vCPUs, saving and
#: loading the device state, the final sync. Measured with QEMU 10.0.2 under TCG on the project's
#: machines: idle 1 GiB guests with a 30 ms limit report 14-15 ms of downtime (`make bench`,
#: scenarios idle-1g and dirty-25, bench/results/latest.json).
SWITCHOVER_COST_S = 0.012
MIN_SHRINK = 0.2  # a round that is not a fifth smaller than the last one counts as stalled


@dataclass(frozen=True, slots=True)
class Estimate:
    total_s: float
    downtime_s: float
    rounds: int
    bytes_sent: int
    converges_unaided: bool  # QEMU gets there alone, within ``max_rounds``
    converges: bool  # with the throttle below (equal to converges_unaided when it is 0)
    throttle_percent: int  # what the policy is expected to apply; 0 = none

    def to_prediction(
        self,
        memory_bytes: int,
        dirty_rate_bps: float,
        bandwidth_bps: float,
        downtime_limit_s: float,
        zero_fraction: float = 0.0,
    ) -> MigrationPrediction:
        return MigrationPrediction(
            zero_fraction=zero_fraction,
            memory_bytes=memory_bytes,
            dirty_rate_bps=dirty_rate_bps,
            bandwidth_bps=bandwidth_bps,
            downtime_limit_ms=round(downtime_limit_s * 1000),
            total_ms=round(self.total_s * 1000),
            downtime_ms=round(self.downtime_s * 1000),
            rounds=self.rounds,
            converges_unaided=self.converges_unaided,
            throttle_percent=self.throttle_percent,
            bytes_sent=self.bytes_sent,
        )


def throttle_for(
    dirty_rate_bps: float,
    bandwidth_bps: float,
    *,
    target_ratio: float = DEFAULT_TARGET_RATIO,
    current_percent: int = 0,
    max_percent: int = MAX_THROTTLE_PERCENT,
) -> int:
    """vCPU throttle (percent) that brings the dirty rate down to ``target_ratio`` x bandwidth.

    ``dirty_rate_bps`` is what was measured under ``current_percent`` throttle; the guest's own rate
    is that divided by ``1 - current/100``. Returns 0 when no throttle is needed.
    """
    if bandwidth_bps <= 0:
        raise InvalidInputError("The migration bandwidth must be positive to compute a throttle.")
    if not 0 < target_ratio < 1:
        raise InvalidInputError(f"The throttle target ratio {target_ratio} must be between 0 and 1.")
    unthrottled = dirty_rate_bps / max(1e-9, 1 - current_percent / 100)
    if unthrottled <= target_ratio * bandwidth_bps:
        return 0
    percent = math.ceil(100 * (1 - target_ratio * bandwidth_bps / unthrottled) - 1e-9)
    return max(1, min(max_percent, percent))


def _simulate(
    first_bytes: float,
    memory_bytes: float,
    working_set: float,
    rates: tuple[float, float],
    bandwidth: float,
    limits: tuple[float, float],
    max_rounds: int,
    switchover_s: float,
) -> tuple[bool, float, float, int, float]:
    """Run the round model; ``rates`` = (dirty rate in round 1, dirty rate from round 2 on);
    ``limits`` = (the initial downtime limit, the most it may be raised to).

    Returns (converged, total_s, downtime_s, rounds, bytes_sent).
    """
    duration = first_bytes / bandwidth
    total, sent, rounds = duration, first_bytes, 1
    limit, budget = limits
    previous: float | None = None
    while True:
        rate = rates[0] if rounds == 1 else rates[1]
        pending = min(working_set, memory_bytes, rate * duration)
        needed = pending / bandwidth
        if previous is not None and pending > previous * (1 - MIN_SHRINK) and limit < budget:
            limit = min(budget, max(limit, needed))  # stalled: the policy raises the limit to cover it
        if needed <= limit or rounds >= max_rounds:
            downtime = needed + switchover_s
            return needed <= limit, total + downtime, downtime, rounds, sent + pending
        previous = pending
        duration = needed
        total += duration
        sent += pending
        rounds += 1


def zero_fraction_from_resident(memory_bytes: int, resident_bytes: int | None) -> float:
    """Pages the guest never touched are not resident in QEMU and go out as zero pages (touched
    pages that hold zeros again are missed, so this errs on the side of sending more)."""
    if not resident_bytes or memory_bytes <= 0:
        return 0.0
    return max(0.0, 1.0 - resident_bytes / memory_bytes)


def estimate(
    memory_bytes: int,
    dirty_rate_bps: float,
    bandwidth_bps: float,
    downtime_limit_s: float,
    *,
    zero_fraction: float = 0.0,
    working_set_bytes: int | None = None,
    max_rounds: int = 30,
    target_ratio: float = DEFAULT_TARGET_RATIO,
    max_throttle_percent: int = MAX_THROTTLE_PERCENT,
    initial_limit_s: float | None = None,
    switchover_s: float = SWITCHOVER_COST_S,
) -> Estimate:
    """Predict a pre-copy migration.

    ``downtime_limit_s`` is the VM's budget (the most the limit is raised to); ``initial_limit_s``
    the limit the migration starts with (default: the budget).
    ``zero_fraction``: share of memory that is zero pages (cheap to send). ``working_set_bytes``:
    the most the guest can dirty between two rounds (default: all of memory). ``max_rounds``: a
    migration that needs more rounds than this counts as not converging by itself.
    """
    if memory_bytes <= 0:
        raise InvalidInputError(f"The memory size must be positive, not {memory_bytes} bytes.")
    if bandwidth_bps <= 0:
        raise InvalidInputError(
            f"The migration bandwidth must be positive, not {bandwidth_bps} B/s.",
            hint="Measure the link between the hosts or configure its rate.",
        )
    if dirty_rate_bps < 0 or downtime_limit_s <= 0:
        raise InvalidInputError(
            "The dirty rate must not be negative and the downtime limit must be positive."
        )
    if not 0 <= zero_fraction <= 1:
        raise InvalidInputError(f"The zero-page fraction {zero_fraction} must be between 0 and 1.")
    first = memory_bytes * ((1 - zero_fraction) + zero_fraction * ZERO_PAGE_COST)
    working_set = float(working_set_bytes if working_set_bytes is not None else memory_bytes)
    limits = (min(initial_limit_s or downtime_limit_s, downtime_limit_s), downtime_limit_s)
    ok, total, downtime, rounds, sent = _simulate(
        first,
        memory_bytes,
        working_set,
        (dirty_rate_bps, dirty_rate_bps),
        bandwidth_bps,
        limits,
        max_rounds,
        switchover_s,
    )
    if ok:
        return Estimate(total, downtime, rounds, round(sent), True, True, 0)
    throttle = throttle_for(
        dirty_rate_bps, bandwidth_bps, target_ratio=target_ratio, max_percent=max_throttle_percent
    )
    throttled_rate = dirty_rate_bps * (1 - throttle / 100)
    ok, total, downtime, rounds, sent = _simulate(
        first,
        memory_bytes,
        working_set,
        (dirty_rate_bps, throttled_rate),
        bandwidth_bps,
        limits,
        max_rounds,
        switchover_s,
    )
    return Estimate(total, downtime, rounds, round(sent), False, ok, throttle)
