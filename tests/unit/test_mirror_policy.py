"""The mirror policy with plain numbers: when a disk turns write-blocking, when disks pivot, rate and ETA."""

from __future__ import annotations

from vmshift.migration.mirror_policy import (
    DiskView,
    MirrorPolicySettings,
    MirrorSample,
    SwitchReason,
    decide_switch,
    may_pivot,
    rates,
    totals,
)

MIB = 1 << 20
S = MirrorSample


def series(*points: tuple[float, int, int]) -> list[MirrorSample]:
    """(time s, offset MiB, len MiB) -> samples."""
    return [S(t, o * MIB, n * MIB) for t, o, n in points]


def test_no_samples_and_nothing_left_never_switch() -> None:
    assert not decide_switch([]).switch
    assert not decide_switch(series((0, 64, 64), (1, 64, 64))).switch


def test_a_first_pass_that_drains_stays_background() -> None:
    # 512 MiB disk copied at 20 MiB/s, the guest dirties 2 MiB/s of copied data
    samples = series(*[(t, 20 * t, 512 + 2 * t) for t in range(0, 5)])
    d = decide_switch(samples)
    assert not d.switch and d.reason is None
    assert d.rates.copy_rate_bps == 20 * MIB
    assert d.rates.drain_rate_bps == 18 * MIB


def test_a_guest_that_outruns_the_copy_turns_it_write_blocking() -> None:
    # copied 30 MiB/s, dirtied 30 MiB/s of what was copied: remaining stays at 100 MiB
    samples = series(*[(t * 0.5, 400 + 15 * t, 500 + 15 * t) for t in range(0, 8)])
    d = decide_switch(samples)
    assert d.switch and d.reason is SwitchReason.NOT_DRAINING
    assert d.rates.eta_s is None


def test_not_draining_needs_a_full_window() -> None:
    samples = series((0, 400, 500), (1, 430, 530))  # flat, but only 1 s of a 3 s window
    assert not decide_switch(samples).switch


def test_remaining_that_grows_switches_too() -> None:
    samples = series(*[(t, 100 + 10 * t, 200 + 20 * t) for t in range(0, 4)])
    assert decide_switch(samples).reason is SwitchReason.NOT_DRAINING


def test_less_than_a_second_left_switches_nearly_done() -> None:
    # 50 MiB/s, 30 MiB remain: 0.6 s
    samples = series((0, 400, 480), (0.5, 425, 480), (1.0, 450, 480))
    d = decide_switch(samples)
    assert d.switch and d.reason is SwitchReason.NEARLY_DONE


def test_settings_change_the_window_and_the_threshold() -> None:
    samples = series((0, 400, 480), (0.5, 425, 480), (1.0, 450, 480))
    assert not decide_switch(samples, MirrorPolicySettings(nearly_done_s=0.5)).switch
    slow = series(*[(t, 100 + t, 400 + t) for t in range(0, 3)])  # not draining for 2 s
    assert decide_switch(slow, MirrorPolicySettings(window_s=2.0)).reason is SwitchReason.NOT_DRAINING


def test_rates_use_only_the_window_and_need_a_span() -> None:
    samples = series((0, 0, 100), (10, 10, 100), (11, 30, 100), (12, 50, 100))
    r = rates(samples, window_s=2.0)
    assert r.copy_rate_bps == 20 * MIB and r.remaining_bytes == 50 * MIB
    assert r.eta_s == 2.5
    assert rates(series((0, 0, 100), (0.1, 5, 100))).copy_rate_bps == 0.0


def test_pivot_only_when_every_disk_is_ready_and_none_failed() -> None:
    assert not may_pivot([])
    assert may_pivot([DiskView(ready=True), DiskView(ready=True)])
    assert not may_pivot([DiskView(ready=True), DiskView(ready=False)])
    assert not may_pivot([DiskView(ready=True), DiskView(ready=True, failed=True)])


def test_totals_add_disks_and_say_no_eta_while_not_draining() -> None:
    a = series((0, 0, 100), (1, 20, 100))
    b = series((0, 50, 60), (1, 60, 70))
    t = totals([a[-1], b[-1]], [rates(a), rates(b)])
    assert t.total_bytes == 170 * MIB and t.done_bytes == 80 * MIB
    assert t.rate_bps == 30 * MIB
    assert t.eta_s == 90 / 20  # b's remaining stayed at 10 MiB; a drains 20 MiB/s
    stuck = series((0, 50, 60), (1, 60, 70))
    assert totals([stuck[-1]], [rates(stuck)]).eta_s is None
    assert totals([S(1, 64, 64)], [rates([S(1, 64, 64)])]).eta_s == 0.0
