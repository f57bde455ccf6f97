"""When a disk mirror turns write-blocking, when the disks may pivot, and the copy's rate and ETA. Pure.

A background mirror copies dirty areas at its own pace while the guest keeps writing; QEMU's job
reports ``offset`` (bytes copied so far) and ``len`` (bytes to copy so far; it grows when the guest
dirties what was already copied), so ``len - offset`` is what remains. A guest writing faster than
the copy drains keeps that from shrinking, and the mirror never reaches READY. Write-blocking mode
makes every guest write wait until it is on the target too, so the guest can no longer outrun the
copy, at the price of slower guest writes: it is switched on only when needed, when

- **not draining**: over a window (``window_s``) the remaining bytes did not shrink by at least
  ``min_shrink_fraction`` of themselves, or
- **nearly done**: less than ``nearly_done_s`` of copy remains at the measured copy rate (so the
  last drain before READY and the pivot does not chase the guest).

A switch is final (QEMU allows only background → write-blocking).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class MirrorSample:
    """One ``query-block-jobs`` look at one disk's mirror."""

    time_s: float  # monotonic seconds
    offset_bytes: int
    len_bytes: int
    ready: bool = False

    @property
    def remaining_bytes(self) -> int:
        return max(0, self.len_bytes - self.offset_bytes)


@dataclass(frozen=True)
class MirrorPolicySettings:
    window_s: float = 3.0
    min_shrink_fraction: float = 0.05
    nearly_done_s: float = 1.0
    min_span_s: float = 0.4  # a rate needs samples at least this far apart


class SwitchReason(StrEnum):
    NOT_DRAINING = "not_draining"  # the guest writes at least as fast as the copy drains
    NEARLY_DONE = "nearly_done"  # less than nearly_done_s of copy remains


@dataclass(frozen=True)
class MirrorRates:
    copy_rate_bps: float  # bytes the mirror copies per second (offset growth)
    drain_rate_bps: float  # how fast what remains shrinks (copy rate minus the guest's new dirt)
    remaining_bytes: int

    @property
    def eta_s(self) -> float | None:
        """Seconds until nothing remains at the drain rate (None: not draining)."""
        if self.remaining_bytes == 0:
            return 0.0
        if self.drain_rate_bps <= 0:
            return None
        return self.remaining_bytes / self.drain_rate_bps


@dataclass(frozen=True)
class SwitchDecision:
    switch: bool
    reason: SwitchReason | None
    rates: MirrorRates
    detail: str = ""


def _window(samples: Sequence[MirrorSample], window_s: float) -> list[MirrorSample]:
    if not samples:
        return []
    newest = samples[-1].time_s
    return [s for s in samples if s.time_s >= newest - window_s]


def rates(samples: Sequence[MirrorSample], window_s: float = 3.0, min_span_s: float = 0.4) -> MirrorRates:
    """Copy and drain rates over the last ``window_s`` seconds of samples (oldest first)."""
    if not samples:
        return MirrorRates(0.0, 0.0, 0)
    win = _window(samples, window_s)
    first, last = win[0], win[-1]
    span = last.time_s - first.time_s
    if span < min_span_s:
        return MirrorRates(0.0, 0.0, last.remaining_bytes)
    copy = max(0.0, (last.offset_bytes - first.offset_bytes) / span)
    drain = (first.remaining_bytes - last.remaining_bytes) / span
    return MirrorRates(copy, drain, last.remaining_bytes)


def decide_switch(samples: Sequence[MirrorSample],
                  settings: MirrorPolicySettings = MirrorPolicySettings()) -> SwitchDecision:
    """Should this disk's mirror turn write-blocking now? ``samples`` oldest first, one disk."""
    r = rates(samples, settings.window_s, settings.min_span_s)
    if not samples:
        return SwitchDecision(False, None, r, "no sample yet")
    last = samples[-1]
    if last.remaining_bytes == 0:
        return SwitchDecision(False, None, r, "nothing remains")
    left_s = last.remaining_bytes / r.copy_rate_bps if r.copy_rate_bps > 0 else None
    if left_s is not None and left_s < settings.nearly_done_s:
        return SwitchDecision(True, SwitchReason.NEARLY_DONE, r,
                              f"{last.remaining_bytes} B remain, {left_s:.2f} s at {r.copy_rate_bps:.0f} B/s")
    win = _window(samples, settings.window_s)
    first = win[0]
    if last.time_s - first.time_s < settings.window_s * 0.9:
        return SwitchDecision(False, None, r, "window not full yet")
    shrunk = first.remaining_bytes - last.remaining_bytes
    if shrunk < settings.min_shrink_fraction * first.remaining_bytes:
        return SwitchDecision(True, SwitchReason.NOT_DRAINING, r,
                              f"remaining went {first.remaining_bytes} -> {last.remaining_bytes} B "
                              f"in {last.time_s - first.time_s:.1f} s")
    return SwitchDecision(False, None, r, "draining")


@dataclass(frozen=True)
class DiskView:
    """What the mover knows of one disk's mirror for the pivot rule and the totals."""

    ready: bool
    failed: bool = False


def may_pivot(disks: Sequence[DiskView]) -> bool:
    """Every disk's mirror holds a full copy and follows writes (none failed): pivot them all together."""
    return bool(disks) and all(d.ready and not d.failed for d in disks)


@dataclass(frozen=True)
class Totals:
    total_bytes: int
    done_bytes: int
    rate_bps: float
    eta_s: float | None


def totals(latest: Sequence[MirrorSample], disk_rates: Sequence[MirrorRates]) -> Totals:
    """Progress over all disks: bytes from the newest sample of each, rate the sum of copy rates,
    ETA what remains over the summed drain rate (None while it does not drain)."""
    total = sum(s.len_bytes for s in latest)
    done = sum(min(s.offset_bytes, s.len_bytes) for s in latest)
    remaining = total - done
    drain = sum(r.drain_rate_bps for r in disk_rates)
    eta: float | None
    if remaining <= 0:
        eta = 0.0
    elif drain > 0:
        eta = remaining / drain
    else:
        eta = None
    return Totals(total, done, sum(r.copy_rate_bps for r in disk_rates), eta)
