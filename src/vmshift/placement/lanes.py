"""How many moves fit in one pass: each host runs at most its limit of migrations at once (a
migration takes a lane on its source and on its target), and every move of a pass must end before
the next pass begins."""

from __future__ import annotations

from vmshift.placement.snapshot import ClusterSnapshot


class Lanes:
    def __init__(self, snapshot: ClusterSnapshot, horizon_s: float | None) -> None:
        """``horizon_s`` None: no time bound (an evacuation runs until it is done)."""
        self.horizon_s = horizon_s
        self._busy: dict[str, list[float]] = {
            h.name: [0.0] * max(0, h.migration_limit - h.migrations_running) for h in snapshot.hosts
        }

    def _lane(self, host: str, seconds: float) -> int | None:
        lanes = self._busy.get(host) or []
        if not lanes:
            return None
        i = min(range(len(lanes)), key=lanes.__getitem__)
        if self.horizon_s is not None and lanes[i] + seconds > self.horizon_s:
            return None
        return i

    def fits(self, src: str, dst: str, seconds: float) -> bool:
        return self._lane(src, seconds) is not None and self._lane(dst, seconds) is not None

    def take(self, src: str, dst: str, seconds: float) -> float:
        """Book the move; returns when it is expected to end (seconds from the start)."""
        a, b = self._lane(src, seconds), self._lane(dst, seconds)
        if a is None or b is None:
            raise ValueError("take() after fits() said no")
        start = max(self._busy[src][a], self._busy[dst][b])
        self._busy[src][a] = self._busy[dst][b] = start + seconds
        return start + seconds
