"""Pre-copy estimator checked against hand-computed numbers and FACTS.md baselines."""

from __future__ import annotations

import math

import pytest

from vmshift.errors import InvalidInputError
from vmshift.migration.estimator import (
    SWITCHOVER_COST_S,
    estimate,
    throttle_for,
    zero_fraction_from_resident,
)

MIB = 1 << 20
GIB = 1 << 30


def test_idle_guest_is_one_pass_plus_nothing() -> None:
    e = estimate(512 * MIB, 0, 100 * MIB, 0.3)
    assert e.rounds == 1 and e.converges_unaided and e.throttle_percent == 0
    assert e.total_s == pytest.approx(5.12 + SWITCHOVER_COST_S)
    assert e.downtime_s == SWITCHOVER_COST_S  # nothing left to send: only the switchover itself
    assert e.bytes_sent == 512 * MIB


def test_geometric_rounds_by_hand() -> None:
    # 1000 MiB at 100 MiB/s, dirtying 50 MiB/s: rounds of 10 s, 5 s, 2.5 s, ... (ratio 1/2).
    # Round k+1 carries 1000/2^k MiB; it fits 0.3 s (30 MiB) once 1000/2^k <= 30 -> k = 6 (15.6 MiB).
    e = estimate(1000 * MIB, 50 * MIB, 100 * MIB, 0.3, switchover_s=0)
    assert e.converges_unaided and e.rounds == 6
    assert e.downtime_s == pytest.approx(1000 / 2**6 / 100)
    sent_rounds = sum(1000 / 2**k for k in range(6))  # rounds 1..6
    assert e.total_s == pytest.approx(sent_rounds / 100 + e.downtime_s)
    assert e.bytes_sent == pytest.approx((sent_rounds + 1000 / 2**6) * MIB, rel=1e-6)


def test_zero_pages_are_almost_free() -> None:
    full = estimate(1 * GIB, 0, 100 * MIB, 0.3, switchover_s=0)
    mostly_zero = estimate(1 * GIB, 0, 100 * MIB, 0.3, zero_fraction=0.75, switchover_s=0)
    assert mostly_zero.total_s == pytest.approx(full.total_s * (0.25 + 0.75 * 9 / 4096))


def test_untouched_memory_counts_as_zero_pages() -> None:
    assert zero_fraction_from_resident(1 * GIB, 256 * MIB) == pytest.approx(0.75)
    assert zero_fraction_from_resident(1 * GIB, 2 * GIB) == 0.0  # QEMU's own memory on top of a full guest
    assert zero_fraction_from_resident(1 * GIB, None) == 0.0  # unknown: assume every page is data


def test_working_set_caps_each_round() -> None:
    # 12 MiB working set re-dirtied every round over a 32 MiB/s link: 375 ms per round forever.
    stuck = estimate(192 * MIB, 48 * MIB, 32 * MIB, 0.3, working_set_bytes=12 * MIB)
    assert not stuck.converges_unaided
    fits = estimate(192 * MIB, 48 * MIB, 32 * MIB, 0.4, working_set_bytes=12 * MIB)
    assert fits.converges_unaided and fits.downtime_s == pytest.approx(0.375 + SWITCHOVER_COST_S)
    assert fits.rounds == 1  # one full pass, then the 12 MiB go in the stop-copy phase


def test_a_low_initial_limit_costs_rounds_and_is_raised_when_rounds_stop_shrinking() -> None:
    # 1000 MiB at 100 MiB/s, dirtying 50 MiB/s: halving rounds reach 30 ms (3 MiB) of data in 9 rounds
    low = estimate(1000 * MIB, 50 * MIB, 100 * MIB, 0.5, initial_limit_s=0.03, switchover_s=0)
    assert low.converges_unaided and low.rounds == 9
    assert low.downtime_s == pytest.approx(1000 / 2**9 / 100)
    # the 12 MiB working set never shrinks: the limit goes up to the 375 ms it needs, within 500 ms
    stuck = estimate(192 * MIB, 48 * MIB, 32 * MIB, 0.5, working_set_bytes=12 * MIB, initial_limit_s=0.03)
    assert stuck.converges_unaided and stuck.rounds == 2
    assert stuck.downtime_s == pytest.approx(0.375 + SWITCHOVER_COST_S)


def test_over_link_speed_needs_a_throttle_then_converges() -> None:
    # FACTS.md: 1 GiB guest dirtying 512 MiB flat out (~3x) a 1 Gbit/s link does not converge alone.
    link = 1e9 / 8
    dirty = 3 * link
    e = estimate(GIB, dirty, link, 0.5)
    assert not e.converges_unaided and e.converges
    assert e.throttle_percent == math.ceil(100 * (1 - 0.5 / 3))  # 84: dirtying falls to half the link
    assert e.downtime_s <= 0.5
    # Round 1 (8.6 s) then rounds shrinking by half: a bit more than twice the first pass.
    assert GIB / link < e.total_s < 3 * GIB / link


def test_exactly_at_link_speed_does_not_converge_unaided() -> None:
    e = estimate(256 * MIB, 40 * MIB, 40 * MIB, 0.3)
    assert not e.converges_unaided and e.throttle_percent == 50


def test_slow_convergence_counts_as_not_unaided() -> None:
    e = estimate(GIB, 0.97 * 100 * MIB, 100 * MIB, 0.3, max_rounds=30)
    assert not e.converges_unaided and e.converges and e.throttle_percent == 49


@pytest.mark.parametrize(
    ("dirty", "bw", "current", "expected"),
    [
        (100, 100, 0, 50),
        (300, 100, 0, 84),
        (40, 100, 0, 0),
        (50, 100, 50, 50),  # 50 measured under 50% = 100 unthrottled
        (10_000, 100, 0, 99),  # capped
    ],
)
def test_throttle_for(dirty: float, bw: float, current: int, expected: int) -> None:
    assert throttle_for(dirty, bw, current_percent=current) == expected


def test_prediction_record() -> None:
    e = estimate(1000 * MIB, 50 * MIB, 100 * MIB, 0.3)
    p = e.to_prediction(1000 * MIB, 50 * MIB, 100 * MIB, 0.3)
    assert p.downtime_limit_ms == 300 and p.rounds == 6 and p.total_ms == round(e.total_s * 1000)


@pytest.mark.parametrize("args", [(0, 1, 1, 0.3), (1, 1, 0, 0.3), (1, -1, 1, 0.3), (1, 1, 1, 0)])
def test_rejects_nonsense(args: tuple[int, int, int, float]) -> None:
    with pytest.raises(InvalidInputError):
        estimate(*args)
