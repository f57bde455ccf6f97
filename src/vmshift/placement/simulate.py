"""Applying a pass's moves to a snapshot, as if each migration ended at once: for what-if answers,
the benchmark and the tests (the server applies moves by running migration tasks instead)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from vmshift.placement.recommendation import Recommendation
from vmshift.placement.snapshot import ClusterSnapshot


def applied(snapshot: ClusterSnapshot, moves: Iterable[Recommendation]) -> ClusterSnapshot:
    target = {m.vm: m.target for m in moves}
    if not target:
        return snapshot
    vms = tuple(replace(v, host=target[v.name], last_moved_s=snapshot.now_s) if v.name in target else v
                for v in snapshot.vms)
    return replace(snapshot, vms=vms)
