"""The names of every host's VMs, kept in memory for host lists.

``GET /hosts`` shows each host's VM names: read from the database for every request, that is 10,000
rows per request at vSphere's cluster maximum. Which host has which VMs changes only when a VM is
created, deleted or moved, and the change feed (server/db/change_feed.py) counts those commits; the
names are read again after one, and at least every ``MAX_AGE_S`` (a write behind the server's back).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Collection

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmshift.server.db.change_feed import ChangeFeed
from vmshift.server.db.schema import VmRow

MAX_AGE_S = 30.0


class VmNamesByHost:
    def __init__(self, feed: ChangeFeed) -> None:
        self._feed = feed
        self._lock = threading.Lock()
        self._names: dict[int, list[str]] = {}
        self._generation: int | None = None
        self._read_at = 0.0

    def of(self, s: Session, host_ids: Collection[int]) -> dict[int, list[str]]:
        """Host id -> its VMs' names, sorted (an empty list for a host with none); read in the caller's
        session (a second one would wait for the first's lock on SQLite)."""
        with self._lock:
            generation = self._feed.placement_generation  # read first: a commit meanwhile reads again
            if generation != self._generation or time.monotonic() - self._read_at > MAX_AGE_S:
                self._names = self._read(s)
                self._generation, self._read_at = generation, time.monotonic()
            return {h: self._names.get(h, []) for h in host_ids}

    @staticmethod
    def _read(s: Session) -> dict[int, list[str]]:
        names: dict[int, list[str]] = defaultdict(list)
        for host_id, name in s.execute(select(VmRow.host_id, VmRow.name).order_by(VmRow.name)):
            names[host_id].append(name)
        return dict(names)
