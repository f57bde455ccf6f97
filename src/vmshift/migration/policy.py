"""Convergence policy: turns a stream of ``query-migrate`` samples into explained actions. No I/O.

The control loop (source agent) samples QEMU every few hundred ms, calls
``ConvergencePolicy.decide(sample)`` and applies the returned actions through QMP. Rules, in order:

1. First sample: set the initial downtime limit, far below the VM's budget. QEMU switches over by
   itself as soon as the data left fits it; the policy only moves the limit.
2. Completion timeout (per GiB of guest memory, with a minimum): abort.
3. Post-copy by age, if the VM allows it and ``postcopy_after_s`` is set.
4. Stalled within budget: the data left at the start of a round stopped shrinking, but sending it
   would fit the VM's maximum downtime: raise the limit to the step that covers it.
5. Over link speed: the guest dirties at least ``over_link_ratio`` x what the link drains and the
   data left does not fit the budget: throttle the vCPUs at once to the percent that brings
   dirtying down to ``throttle_target_ratio`` x bandwidth (not QEMU's +10% per round).
6. Stalled over budget: raise the limit to the VM's maximum at once and, in the same decision,
   post-copy if the VM allows it, else throttle in proportion (each further stall halves the target).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from vmshift.errors import InvalidInputError
from vmshift.migration.estimator import MAX_THROTTLE_PERCENT, throttle_for
from vmshift.migration.samples import MigrationSample, QemuMigrationStatus
from vmshift.model.migration import ActionKind, MigrationAction, MigrationSettings

GIB = 1 << 30
MIB = 1 << 20
#: a throttle "did not bite" when the measured dirty rate under it is still this share of the rate
#: measured when it was set
PACED_NO_EFFECT = 0.85


@dataclass(frozen=True, slots=True)
class PolicySettings:
    max_downtime_s: float = 0.5  # the VM's budget; no action ever sets more
    # Low at first: QEMU switches over once the rest fits this, and what clients feel is the downtime
    # plus ~50 ms (FACTS.md); a guest whose rounds stop shrinking gets it raised to what it needs.
    # 30 ms kept the longest UDP gap near 100 ms in `make bench` where QEMU's 300 ms gave 200-340 ms.
    initial_downtime_s: float = 0.03
    downtime_step_s: float = 0.1
    stall_rounds: int = 2  # rounds in a row without progress = stalled
    min_shrink: float = 0.2  # progress = the round's data is at least 20% below the best so far
    bandwidth_bps: float | None = None  # configured link rate; None = QEMU's measured throughput
    dirty_rate_hint_bps: float | None = None  # guest dirty rate from calc-dirty-rate before the start
    over_link_ratio: float = (
        0.9  # dirty / bandwidth at which to throttle at once (QEMU's figure saturates near 1)
    )
    throttle_target_ratio: float = 0.5  # dirty rate after throttling, as a fraction of bandwidth
    max_throttle_percent: int = MAX_THROTTLE_PERCENT
    throttle_hysteresis: int = 5  # ignore throttle raises smaller than this (percent points)
    allow_postcopy: bool = False
    postcopy_after_s: float | None = None  # if allowed: switch to post-copy at this age anyway
    timeout_s_per_gib: float = 60.0
    timeout_min_s: float = 60.0
    bandwidth_window: int = 5  # samples in the throughput median

    def __post_init__(self) -> None:
        if self.max_downtime_s <= 0 or self.initial_downtime_s <= 0 or self.downtime_step_s <= 0:
            raise InvalidInputError("Downtime limits and the downtime step must be positive.")
        if self.stall_rounds < 1 or not 0 < self.min_shrink < 1:
            raise InvalidInputError("stall_rounds must be >= 1 and min_shrink between 0 and 1.")
        if not 0 < self.throttle_target_ratio < 1 or not 1 <= self.max_throttle_percent <= 99:
            raise InvalidInputError("The throttle target ratio must be in (0, 1) and the cap in 1..99.")
        if (self.bandwidth_bps is not None and self.bandwidth_bps <= 0) or (
            self.dirty_rate_hint_bps or 0
        ) < 0:
            raise InvalidInputError("A configured bandwidth must be positive and a dirty rate not negative.")
        if self.timeout_s_per_gib <= 0 or self.timeout_min_s <= 0:
            raise InvalidInputError("The completion timeout must be positive.")

    @classmethod
    def from_migration(
        cls,
        settings: MigrationSettings,
        *,
        bandwidth_bps: float | None = None,
        **overrides: float | int | bool | None,
    ) -> PolicySettings:
        """Policy settings from a migration record's settings (plus any field override)."""
        base = cls(
            max_downtime_s=settings.max_downtime_ms / 1000,
            allow_postcopy=settings.allow_postcopy,
            postcopy_after_s=settings.postcopy_after_s,
            timeout_s_per_gib=settings.timeout_s_per_gib,
            timeout_min_s=settings.timeout_min_s,
            bandwidth_bps=bandwidth_bps or settings.bandwidth_limit_bps,
        )
        values = {f: getattr(base, f) for f in cls.__dataclass_fields__}
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    value: float | None  # seconds (downtime limit), percent (throttle), None otherwise
    reason: str
    sample: MigrationSample

    def to_record(self) -> MigrationAction:
        return MigrationAction(
            kind=self.kind,
            value=self.value,
            reason=self.reason,
            time_s=round(self.sample.time_s, 3),
            sample=self.sample.to_record(),
        )


@dataclass
class PolicyState:
    """What the policy remembers between samples (and what it has commanded)."""

    downtime_limit_s: float | None = None
    throttle_percent: int = 0
    throttle_round: int = 0  # round in which the throttle was last set
    dirty_when_throttled: float = 0.0  # QEMU's measured dirty rate when the throttle was last set
    paced_steps: int = 0  # throttles that followed one which did not slow the guest
    round: int = 0
    round_peaks: dict[int, int] = field(default_factory=dict)  # round -> data left at its start
    best_peak: int | None = None
    rounds_without_progress: int = 0
    stall_escalations: int = 0  # stalls handled at the maximum downtime
    postcopy_started: bool = False
    aborted: bool = False
    throughputs: deque[float] = field(default_factory=deque)
    actions: list[Action] = field(default_factory=list)


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


def _ms(s: float) -> str:
    return f"{s * 1000:.0f} ms"


class ConvergencePolicy:
    """Stateful wrapper around the rules; feed it every sample of one migration, in order."""

    def __init__(self, settings: PolicySettings | None = None) -> None:
        self.settings = settings or PolicySettings()
        self.state = PolicyState(throughputs=deque(maxlen=self.settings.bandwidth_window))

    # --- derived numbers -------------------------------------------------------------------
    def bandwidth_bps(self) -> float | None:
        """Configured link rate, else the median of QEMU's recent throughput."""
        if self.settings.bandwidth_bps:
            return self.settings.bandwidth_bps
        return statistics.median(self.state.throughputs) if self.state.throughputs else None

    def timeout_s(self, total_bytes: int) -> float:
        return max(self.settings.timeout_min_s, self.settings.timeout_s_per_gib * total_bytes / GIB)

    def predicted_downtime_s(self, remaining_bytes: int) -> float | None:
        bw = self.bandwidth_bps()
        return remaining_bytes / bw if bw else None

    def fits(self, sample: MigrationSample) -> bool:
        """The data left at the start of the sample's round fits the current downtime limit.

        That is QEMU's own switchover test (it compares the dirty data after a bitmap sync with
        bandwidth x limit), so a True here means QEMU should be switching over now.
        """
        if sample.status is not QemuMigrationStatus.ACTIVE or sample.round < 2:
            return False
        peak = self.state.round_peaks.get(sample.round, sample.remaining_bytes)
        limit, predicted = self.state.downtime_limit_s, self.predicted_downtime_s(peak)
        return limit is not None and predicted is not None and predicted <= limit + 1e-3

    @property
    def actions(self) -> list[Action]:
        return list(self.state.actions)

    # --- the rules -------------------------------------------------------------------------
    def decide(self, sample: MigrationSample) -> list[Action]:
        """Actions to apply now because of ``sample`` (often none)."""
        st, cfg = self.state, self.settings
        if st.aborted or st.postcopy_started or sample.status.finished or sample.status.postcopy:
            return []
        out: list[Action] = []
        if st.downtime_limit_s is None:
            limit = min(cfg.initial_downtime_s, cfg.max_downtime_s)
            out.append(
                self._set_limit(
                    limit,
                    sample,
                    f"initial downtime limit {_ms(limit)} (VM budget {_ms(cfg.max_downtime_s)})",
                )
            )
        if sample.status is not QemuMigrationStatus.ACTIVE:
            return self._record(out)
        if sample.mbps > 0:
            st.throughputs.append(sample.throughput_bps)

        timeout = self.timeout_s(sample.total_bytes)
        if sample.time_s >= timeout:
            st.aborted = True
            out.append(
                Action(
                    ActionKind.ABORT,
                    None,
                    f"not complete after {sample.time_s:.1f} s: the completion "
                    f"timeout for {sample.total_bytes / GIB:.2f} GiB is {timeout:.0f} s",
                    sample,
                )
            )
            return self._record(out)

        if (
            cfg.allow_postcopy
            and cfg.postcopy_after_s is not None
            and sample.time_s >= cfg.postcopy_after_s
            and sample.round >= 2
        ):
            out.append(self._postcopy(sample, f"post-copy after {cfg.postcopy_after_s:.1f} s as configured"))
            return self._record(out)

        new_round = sample.round > st.round
        stalled = False
        if new_round:
            st.round = sample.round
            st.round_peaks[sample.round] = max(sample.remaining_bytes, sample.synced_dirty_bytes or 0)
            stalled = sample.round >= 2 and self._note_round(sample.remaining_bytes)
        bw = self.bandwidth_bps()
        if bw is None or sample.round < 2:
            return self._record(out)  # nothing measured yet: the first pass sends all of memory

        peak = st.round_peaks.get(sample.round, sample.remaining_bytes)
        needed = peak / bw  # downtime if QEMU switched over at the start of this round
        limit = st.downtime_limit_s or cfg.initial_downtime_s
        why = f"round {sample.round} started with {_mib(peak)} left, {_ms(needed)} of link at {_mib(bw)}/s"
        if stalled and needed <= cfg.max_downtime_s:
            if needed > limit:
                new = self._step_covering(limit, needed)
                out.append(
                    self._set_limit(
                        new,
                        sample,
                        f"{why}, no longer shrinking but within the VM's "
                        f"{_ms(cfg.max_downtime_s)} budget: raise the downtime limit "
                        f"{_ms(limit)} -> {_ms(new)} so QEMU switches over",
                    )
                )
            return self._record(out)

        throttle = self._over_link(sample, bw)
        if throttle is not None and needed > cfg.max_downtime_s:
            pct, _, cause = throttle
            if pct >= st.throttle_percent + cfg.throttle_hysteresis:
                out.append(
                    self._throttle(
                        pct,
                        sample,
                        f"{cause} and {why}: throttle the vCPUs "
                        f"to {pct}% at once so dirtying falls to about "
                        f"{cfg.throttle_target_ratio:.0%} of the link",
                    )
                )
                return self._record(out)

        if stalled:
            out.extend(self._escalate(sample, bw, limit, why))
        return self._record(out)

    def _note_round(self, peak: int) -> bool:
        """Track progress between round starts; True when the rounds stopped shrinking."""
        st, cfg = self.state, self.settings
        if st.best_peak is None or peak <= st.best_peak * (1 - cfg.min_shrink):
            st.best_peak = peak
            st.rounds_without_progress = 0
            return False
        st.rounds_without_progress += 1
        if st.rounds_without_progress < cfg.stall_rounds:
            return False
        st.rounds_without_progress = 0  # react once, then give the reaction time to show
        st.best_peak = peak
        return True

    def _step_covering(self, limit: float, needed: float) -> float:
        """The first point of the step grid (multiples of the step) that covers ``needed``."""
        cfg = self.settings
        steps = max(1, math.ceil(needed / cfg.downtime_step_s - 1e-9))
        return min(cfg.max_downtime_s, max(round(steps * cfg.downtime_step_s, 6), limit))

    def _over_link(self, sample: MigrationSample, bw: float) -> tuple[int, float, str] | None:
        """(throttle percent, guest dirty rate, why) when the guest dirties faster than the link drains.

        QEMU's dirty-pages-rate counts distinct pages per round, so it saturates near the link
        rate when the guest is faster; ``dirty_rate_hint_bps`` (calc-dirty-rate before the start)
        tells how far over it really is. A throttle is sized for a guest whose dirtying is bound by
        its CPU; when one has been in force for a round and the measured rate did not fall, the
        writer is paced by something else (a fixed-rate stream, a disk, the network) and only
        starts slowing once its CPU share is below what it needs: the next step then cuts the
        share left by the square of (target / measured) instead of in proportion, and a second
        such step goes to the cap (every step waits two rounds for QEMU to apply it).
        """
        st, cfg = self.state, self.settings
        if sample.round < st.throttle_round + 2:
            return None  # no full round measured under the last throttle yet
        measured = sample.dirty_rate_bps
        unthrottled = measured / max(0.01, 1 - sample.throttle_percent / 100)
        dirty = max(unthrottled, cfg.dirty_rate_hint_bps or 0.0)
        if dirty <= 0 or dirty < cfg.over_link_ratio * bw:
            return None
        target = cfg.throttle_target_ratio * bw
        if (
            st.throttle_percent
            and sample.throttle_percent >= st.throttle_percent
            and measured >= PACED_NO_EFFECT * st.dirty_when_throttled
            and measured > target
        ):
            share = (1 - sample.throttle_percent / 100) * (target / measured) ** 2
            pct = max(1, min(cfg.max_throttle_percent, math.ceil(100 * (1 - share) - 1e-9)))
            how = "its CPU share is cut by (target / measured)²"
            if st.paced_steps:  # that did not bite either: each step costs two rounds, go to the cap
                pct = cfg.max_throttle_percent
                how = "the step before did not bite either: straight to the cap"
            st.paced_steps += 1
            why = (
                f"the {sample.throttle_percent}% throttle did not slow the guest "
                f"({_mib(st.dirty_when_throttled)}/s before, {_mib(measured)}/s under it): its dirtying "
                f"is not bound by its CPU, so {how}"
            )
            return pct, measured, why
        pct = throttle_for(
            dirty, bw, target_ratio=cfg.throttle_target_ratio, max_percent=cfg.max_throttle_percent
        )
        why = f"the guest dirties {_mib(dirty)}/s, the link drains {_mib(bw)}/s ({dirty / bw:.2f}x)"
        return pct, dirty, why

    def _escalate(self, sample: MigrationSample, bw: float, limit: float, why: str) -> list[Action]:
        """Stalled with more left than the VM's budget: the limit straight to the budget (a step
        below it cannot make QEMU switch over, and each step would cost two more rounds) and, in
        the same decision, post-copy or a throttle."""
        st, cfg = self.state, self.settings
        why = f"{why}, not shrinking for {cfg.stall_rounds} rounds"
        out: list[Action] = []
        if limit < cfg.max_downtime_s - 1e-9:
            out.append(
                self._set_limit(
                    cfg.max_downtime_s,
                    sample,
                    f"{why}: raise the downtime limit {_ms(limit)} -> {_ms(cfg.max_downtime_s)} (the budget)",
                )
            )
        if cfg.allow_postcopy:
            return [
                *out,
                self._postcopy(
                    sample,
                    f"{why}, over the VM's {_ms(cfg.max_downtime_s)} budget even at the "
                    "maximum limit: switch to post-copy",
                ),
            ]
        st.stall_escalations += 1
        target = cfg.throttle_target_ratio / 2 ** (st.stall_escalations - 1)
        pct = throttle_for(
            sample.dirty_rate_bps,
            bw,
            target_ratio=target,
            current_percent=sample.throttle_percent,
            max_percent=cfg.max_throttle_percent,
        )
        if pct >= st.throttle_percent + cfg.throttle_hysteresis:
            out.append(
                self._throttle(
                    pct,
                    sample,
                    f"{why}, over the VM's {_ms(cfg.max_downtime_s)} budget even at "
                    f"the maximum limit: throttle the vCPUs to {pct}% (dirtying at about "
                    f"{target:.0%} of the link)",
                )
            )
        return out

    # --- action builders (they also update what the policy believes is in force) -----------
    def _set_limit(self, seconds: float, sample: MigrationSample, reason: str) -> Action:
        seconds = min(seconds, self.settings.max_downtime_s)
        self.state.downtime_limit_s = seconds
        return Action(ActionKind.SET_DOWNTIME_LIMIT, seconds, reason, sample)

    def _throttle(self, percent: int, sample: MigrationSample, reason: str) -> Action:
        self.state.throttle_percent = percent
        self.state.throttle_round = sample.round
        self.state.dirty_when_throttled = sample.dirty_rate_bps
        self.state.rounds_without_progress = 0
        return Action(ActionKind.SET_THROTTLE, float(percent), reason, sample)

    def _postcopy(self, sample: MigrationSample, reason: str) -> Action:
        self.state.postcopy_started = True
        return Action(ActionKind.START_POSTCOPY, None, reason, sample)

    def _record(self, actions: list[Action]) -> list[Action]:
        self.state.actions.extend(actions)
        return actions
