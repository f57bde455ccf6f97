"""Due times of scheduled migrations (model/schedule_times.py): plain datetimes, no clock, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from vmshift.errors import InvalidInputError
from vmshift.model.schedule_times import (
    Action,
    When,
    check_cron,
    clash,
    cron_latest,
    cron_next,
    decide,
    near,
    parse_at,
)

NOW = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)
PARIS = ZoneInfo("Europe/Paris")


def t(h: int, m: int = 0, s: int = 0, day: int = 1) -> datetime:
    return datetime(2026, 12, day, h, m, s, tzinfo=UTC)


# -- --at ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("+10m", NOW + timedelta(minutes=10)),
        ("+2h", NOW + timedelta(hours=2)),
        ("+90s", NOW + timedelta(seconds=90)),
        ("+1d", NOW + timedelta(days=1)),
        ("+1h30m", NOW + timedelta(hours=1, minutes=30)),
        ("2026-12-01T12:00:00Z", t(12)),
        ("2026-12-01T12:00:00+01:00", t(11)),
        ("2026-12-01T12:00", t(11)),  # no zone: local (Paris is UTC+1 in December)
        ("2026-07-01T12:00", datetime(2026, 7, 1, 10, 0, tzinfo=UTC)),  # local in summer: UTC+2
        ("2026-12-01 12:00:30", t(11, 0, 30)),
    ],
)
def test_parse_at(text: str, expected: datetime) -> None:
    got = parse_at(text, NOW, PARIS)
    assert got == expected and got.tzinfo is UTC


@pytest.mark.parametrize("text", ["+", "+10x", "+m", "tomorrow", "2026-13-01T00:00", "10m", "+-5m"])
def test_parse_at_refuses_nonsense_with_a_hint(text: str) -> None:
    with pytest.raises(InvalidInputError) as e:
        parse_at(text, NOW, PARIS)
    assert e.value.hint and "ISO 8601" in e.value.hint


# -- cron ------------------------------------------------------------------------------------------
def test_check_cron() -> None:
    assert check_cron("  0  2 * * * ") == "0 2 * * *"
    assert check_cron("@daily") == "@daily"
    for bad in ("", "0 25 * * *", "every day", "* * *"):
        with pytest.raises(InvalidInputError):
            check_cron(bad)


def test_cron_next_and_latest_in_utc_and_in_a_zone() -> None:
    assert cron_next("0 2 * * *", NOW, "UTC") == t(2, day=2)
    assert cron_next("0 2 * * *", t(2), "UTC") == t(2, day=2)  # strictly after
    assert cron_latest("0 2 * * *", t(2), "UTC") == t(2)  # at or before
    assert cron_latest("0 2 * * *", t(2, 0, 0) + timedelta(microseconds=5), "UTC") == t(2)
    assert cron_latest("0 2 * * *", t(1, 59, 59), "UTC") == t(2, day=30).replace(month=11)
    assert cron_next("0 2 * * *", NOW, "Europe/Paris") == t(1, day=2)  # 02:00 Paris = 01:00 UTC
    assert cron_latest("* * * * * *", t(10, 0, 5) + timedelta(microseconds=500), "UTC") == t(10, 0, 5)


# -- decide ----------------------------------------------------------------------------------------
def test_not_due_yet_waits() -> None:
    d = decide(When(at=t(11)), t(11), NOW)
    assert d is not None and d.action is Action.WAIT and d.due_at == t(11)


def test_a_done_schedule_has_nothing_to_do() -> None:
    assert decide(When(at=t(9)), None, NOW) is None


def test_a_one_time_schedule_fires_once_within_grace_and_is_then_done() -> None:
    d = decide(When(at=t(9, 58)), t(9, 58), NOW, grace_s=300)
    assert d is not None and d.action is Action.FIRE
    assert (d.due_at, d.next_due_at, d.late_s) == (t(9, 58), None, 120)


def test_a_one_time_schedule_missed_beyond_grace_is_skipped() -> None:
    d = decide(When(at=t(9, 50)), t(9, 50), NOW, grace_s=300)
    assert d is not None and (d.action, d.next_due_at, d.late_s) == (Action.SKIP, None, 600)


def test_cron_due_now_fires_and_moves_to_the_next_time() -> None:
    when = When(cron="0 * * * *")
    d = decide(when, t(10), NOW + timedelta(seconds=1))
    assert d is not None and (d.action, d.due_at, d.next_due_at, d.missed) == (Action.FIRE, t(10), t(11), 0)


def test_cron_times_missed_while_down_fire_once_for_the_latest_within_grace() -> None:
    when = When(cron="*/10 * * * *")
    # down from 09:15 to 10:02: 09:20 ... 10:00 passed; 10:00 is 2 min old
    d = decide(when, t(9, 20), t(10, 2), grace_s=300)
    assert d is not None and d.action is Action.FIRE
    assert (d.due_at, d.next_due_at, d.missed) == (t(10), t(10, 10), 4)  # 09:20, 09:30, 09:40, 09:50


def test_cron_latest_missed_time_beyond_grace_is_skipped_and_the_next_kept() -> None:
    when = When(cron="0 2 * * *")
    d = decide(when, t(2), NOW, grace_s=300)  # 8 h late
    assert d is not None and d.action is Action.SKIP
    assert (d.due_at, d.next_due_at, d.late_s) == (t(2), t(2, day=2), 8 * 3600)


# -- collisions of schedule add --------------------------------------------------------------------
def test_two_times_within_a_minute_clash() -> None:
    a = When(at=t(11))
    assert clash(a, t(11), When(at=t(11, 0, 40)), t(11, 0, 40)) == t(11, 0, 40)
    assert clash(a, t(11), When(at=t(11, 1, 1)), t(11, 1, 1)) is None
    assert clash(a, t(11), When(at=t(9)), None) is None  # a done schedule clashes with nothing


def test_an_at_clashes_with_a_cron_time_near_it_and_back() -> None:
    cron = When(cron="0 11 * * *")
    assert clash(When(at=t(11, 0, 30)), t(11, 0, 30), cron, t(11)) == t(11)
    assert clash(When(at=t(10, 59, 30)), t(10, 59, 30), cron, t(11)) == t(11)
    assert clash(When(at=t(11, 5)), t(11, 5), cron, t(11)) is None
    assert clash(cron, t(11), When(at=t(11, 0, 20)), t(11, 0, 20)) == t(11, 0, 20)
    assert clash(cron, t(11), When(at=t(13)), t(13)) is None


def test_two_crons_are_not_compared() -> None:
    assert clash(When(cron="0 11 * * *"), t(11), When(cron="0 11 * * *"), t(11)) is None


def test_near_looks_from_the_next_due_time_on() -> None:
    cron = When(cron="0 * * * *")
    assert near(cron, t(12), t(11)) is None  # 11:00 is before the schedule's next due time
    assert near(cron, t(11), t(11, 0, 59)) == t(11)
