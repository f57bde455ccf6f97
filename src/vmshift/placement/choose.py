"""Choosing a host for one VM that is not placed yet: initial placement and evacuation share it.

Among the hosts that pass every filter, the one whose objective ends lowest wins; a host that
breaks a should rule is taken only when no other fits, with a warning. When none fits, the answer
names each host's first reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vmshift.model.migration import CheckId, CheckResult, CheckSeverity
from vmshift.placement.filters import Filters
from vmshift.placement.snapshot import VmState


@dataclass(frozen=True, slots=True)
class Choice:
    host: str | None
    checks: tuple[CheckResult, ...]  # the chosen host's filter results
    warning: str | None  # a should rule broken because nothing else fits
    refused: str | None  # why no host fits


def choose_host(filters: Filters, vm: VmState) -> Choice:
    state = filters.state
    if not state.balanced:
        return Choice(None, (), None, f"No host can run VM '{vm.name}': none is connected and out of "
                                      "maintenance mode.")
    deltas = state.spread_deltas(vm.name)
    scored = sorted(((float(deltas[i]) + state.penalty_delta(vm.name, h), h)
                     for i, h in enumerate(state.balanced) if np.isfinite(deltas[i])))
    fallback: str | None = None
    for _, host in scored:
        if not filters.fits(vm, host):
            continue
        if not filters.breaks_should(vm, host):
            return Choice(host, tuple(filters.checks(vm, host)), None, None)
        fallback = fallback or host
    if fallback is not None:
        checks = tuple(filters.checks(vm, fallback))
        warn = next(r.message for r in checks if r.check is CheckId.RULES)
        return Choice(fallback, checks, warn + " No host that keeps the rule has room.", None)
    reasons = []
    for _, host in scored[:8]:
        first = next(r for r in filters.checks(vm, host) if r.severity is CheckSeverity.ERROR)
        reasons.append(first.message)
    more = f" (and {len(scored) - 8} more host(s))" if len(scored) > 8 else ""
    return Choice(None, (), None, f"No host can run VM '{vm.name}': {' '.join(reasons)}{more}")
