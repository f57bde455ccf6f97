"""A VM's CPU load from its QEMU process's CPU time: cores busy between two looks. Pure.

QEMU reports no load of its own; the agent reads the process's cumulative CPU time (user + system,
psutil) each stats interval, and the load is the growth over the wall time between two reads. A
process that restarted (its time went down) or a first look has no load yet: 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def cores_busy(cpu_s_before: float, t_before: float, cpu_s: float, t: float) -> float:
    """Cores busy on average between two reads (1.5 = one and a half vCPUs flat out)."""
    elapsed = t - t_before
    if elapsed <= 0 or cpu_s < cpu_s_before:
        return 0.0
    return round((cpu_s - cpu_s_before) / elapsed, 3)


@dataclass
class CpuMeter:
    """The last read of each VM's CPU time, keyed by VM name and process id (a new QEMU of the same
    VM starts again from nothing)."""

    _last: dict[str, tuple[int | None, float, float]] = field(default_factory=dict)

    def read(self, name: str, pid: int | None, cpu_s: float, t: float) -> float:
        before = self._last.get(name)
        self._last[name] = (pid, cpu_s, t)
        if before is None or before[0] != pid:
            return 0.0
        return cores_busy(before[1], before[2], cpu_s, t)

    def forget_all_but(self, names: set[str]) -> None:
        for gone in set(self._last) - names:
            del self._last[gone]
