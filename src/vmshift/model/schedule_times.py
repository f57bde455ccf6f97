"""Due times of scheduled migrations: parsing ``--at``, cron expressions, what to do when one is due.

Pure (no I/O, no clock: ``now`` is always passed in); cron arithmetic is croniter's. Every time
returned is timezone-aware UTC. The server's loop (server/schedules.py) stores the next due time of each
schedule and asks ``decide`` what to do once it has passed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from vmshift.errors import InvalidInputError

GRACE_S = 300.0
"""A due time that passed while the server was down still fires if it is at most this late."""

COLLISION_WINDOW_S = 60.0
"""``schedule add`` refuses a time this close to another schedule's time for the same VM."""

MAX_MISSED_COUNTED = 10_000  # bounds the count of missed cron times (a '* * * * * *' down for days)

_OFFSET = re.compile(r"^\+(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_AT_HINT = (
    "Use ISO 8601 (2026-12-01T02:00, with +01:00 or Z for a zone; none = local time) or +10m / +2h / +1d."
)


def parse_at(text: str, now: datetime, local: tzinfo) -> datetime:
    """``--at``: an ISO 8601 time (``local`` when it names no zone) or an offset from ``now``
    (``+90s``, ``+10m``, ``+2h``, ``+1d``, ``+1h30m``)."""
    raw = text.strip()
    if raw.startswith("+"):
        m = _OFFSET.match(raw)
        if m is None or not any(m.groups()):
            raise InvalidInputError(f"Time offset {text!r} is not valid.", hint=_AT_HINT)
        d, h, mi, s = (int(g or 0) for g in m.groups())
        return (now + timedelta(days=d, hours=h, minutes=mi, seconds=s)).astimezone(UTC)
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidInputError(f"Time {text!r} is not an ISO 8601 time.", hint=_AT_HINT) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=local)
    return when.astimezone(UTC)


def zone(name: str) -> ZoneInfo:
    """An IANA time zone by name (``UTC``, ``Europe/Paris``)."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInputError(
            f"Time zone {name!r} is not known.", hint="Use an IANA name such as UTC or Europe/Paris."
        ) from None


def check_cron(expr: str) -> str:
    """A cron expression croniter accepts: five fields (minute hour day month weekday), a sixth for
    seconds, or a nickname such as ``@daily``."""
    expr = " ".join(expr.split())
    if not expr or not croniter.is_valid(expr):
        raise InvalidInputError(
            f"Cron expression {expr!r} is not valid.",
            hint="Use five fields 'minute hour day month weekday', e.g. '0 2 * * *' for 02:00 every day.",
        )
    return expr


def cron_next(expr: str, after: datetime, tz: str) -> datetime:
    """The first time of ``expr`` (read in zone ``tz``) strictly after ``after``."""
    nxt: datetime = croniter(expr, after.astimezone(zone(tz))).get_next(datetime)
    return nxt.astimezone(UTC)


def cron_latest(expr: str, at_or_before: datetime, tz: str) -> datetime:
    """The last time of ``expr`` at or before ``at_or_before``."""
    # croniter's get_prev is strict and works in whole seconds (a sixth field is seconds)
    start = at_or_before.replace(microsecond=0) + timedelta(seconds=1)
    prev: datetime = croniter(expr, start.astimezone(zone(tz))).get_prev(datetime)
    return prev.astimezone(UTC)


@dataclass(frozen=True)
class When:
    """A schedule's times: once at ``at``, or every time of ``cron`` read in ``timezone``."""

    at: datetime | None = None
    cron: str | None = None
    timezone: str = "UTC"

    def first_due(self, now: datetime) -> datetime:
        """The first due time of a new schedule."""
        if self.at is not None:
            return self.at.astimezone(UTC)
        assert self.cron is not None
        return cron_next(self.cron, now, self.timezone)

    def describe(self) -> str:
        if self.at is not None:
            return f"at {self.at.astimezone(UTC).isoformat()}"
        return f"cron '{self.cron}' ({self.timezone})"


class Action(StrEnum):
    WAIT = "wait"  # not due yet
    FIRE = "fire"  # start the migration for ``due_at``
    SKIP = "skip"  # ``due_at`` passed longer ago than the grace window: record it skipped


@dataclass(frozen=True)
class Decision:
    action: Action
    due_at: datetime  # the due time this decision is about
    next_due_at: datetime | None  # what the schedule's next due time becomes once this one is claimed
    late_s: float = 0.0  # how long after due_at the decision was taken
    missed: int = 0  # earlier due times that passed unrun while the server was down (cron only)


def decide(when: When, next_due: datetime | None, now: datetime, grace_s: float = GRACE_S) -> Decision | None:
    """What to do with a schedule whose stored next due time is ``next_due`` (None: nothing, done).

    A cron schedule whose due times passed while the server was down fires once, for the latest of
    them, if that is within ``grace_s``; the earlier ones are counted as missed, not run."""
    if next_due is None:
        return None
    if next_due > now:
        return Decision(Action.WAIT, next_due, next_due)
    if when.cron is None:
        late = (now - next_due).total_seconds()
        return Decision(Action.FIRE if late <= grace_s else Action.SKIP, next_due, None, late)
    latest = max(cron_latest(when.cron, now, when.timezone), next_due)
    missed = _count(when, next_due, latest)
    late = (now - latest).total_seconds()
    nxt = cron_next(when.cron, max(latest, now), when.timezone)
    return Decision(Action.FIRE if late <= grace_s else Action.SKIP, latest, nxt, late, missed)


def _count(when: When, first: datetime, latest: datetime) -> int:
    """How many times of the cron schedule lie in [first, latest)."""
    assert when.cron is not None
    n, t = 0, first
    while t < latest and n < MAX_MISSED_COUNTED:
        n += 1
        t = cron_next(when.cron, t, when.timezone)
    return n


def near(
    when: When, next_due: datetime | None, t: datetime, window_s: float = COLLISION_WINDOW_S
) -> datetime | None:
    """A due time of ``when`` (from ``next_due`` on) within ``window_s`` of ``t``, or None."""
    if next_due is None:
        return None
    window = timedelta(seconds=window_s)
    if when.cron is None:
        return next_due if abs(next_due - t) <= window else None
    start = max(next_due, t - window)
    candidate = cron_latest(when.cron, start, when.timezone)
    if candidate != start:
        candidate = cron_next(when.cron, start, when.timezone)
    return candidate if candidate <= t + window else None


def clash(new: When, new_first: datetime, other: When, other_next: datetime | None) -> datetime | None:
    """The time at which ``new`` and ``other`` (same VM) would start within a minute of each other.

    Single times are compared: a new ``at`` with every other schedule's times, a new cron with other
    ``at`` schedules. Two cron schedules are not compared (they may meet on some days only); a run
    that finds its VM busy is skipped then."""
    if new.cron is None:
        return near(other, other_next, new_first)
    if other.cron is None and other_next is not None:
        return other_next if near(new, new_first, other_next) is not None else None
    return None


__all__ = [
    "COLLISION_WINDOW_S",
    "GRACE_S",
    "Action",
    "Decision",
    "When",
    "check_cron",
    "clash",
    "cron_latest",
    "cron_next",
    "decide",
    "near",
    "parse_at",
    "zone",
]
