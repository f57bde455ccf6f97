"""Datastores whose inventory entries `datastore add` and `datastore remove` own while they run.

A host's report read before its agent registered a datastore (or unregistered it), and written
after the add (or remove) recorded the outcome, is stale: it would take away a datastore just added,
or bring back one just removed, or one whose failed add was rolled back. So while a datastore is
held, and for every report read before the hold ended, the host's entry for that datastore is left
as it is in the database (server/inventory.py ``apply_facts(frozen=...)``); the add or remove writes
each host's entry itself from facts it reads once the agents are done (server/datastore_add.py).
Reports read after the hold ended are current and apply as usual.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

KEEP_ENDED_S = 300.0  # an ended hold still covers reports read before its end that arrive this late


@dataclass
class _Hold:
    name: str
    hosts: frozenset[str] | None  # None: every host
    ended: float | None = None  # time.monotonic() (the event loop's clock)


class WithheldDatastores:
    def __init__(self) -> None:
        self._holds: list[_Hold] = []
        self._lock = threading.Lock()  # the listeners' database threads read while the loop changes it

    @contextlib.contextmanager
    def holding(self, name: str, hosts: Collection[str] | None = None) -> Iterator[None]:
        """Own datastore ``name``'s entries of ``hosts`` (every host: None) while inside."""
        hold = _Hold(name, None if hosts is None else frozenset(hosts))
        with self._lock:
            now = time.monotonic()
            self._holds = [h for h in self._holds if h.ended is None or now - h.ended < KEEP_ENDED_S]
            self._holds.append(hold)
        try:
            yield
        finally:
            hold.ended = time.monotonic()

    def frozen_for(self, host: str, read_at: float) -> set[str]:
        """The datastores whose entries a report of ``host`` read at ``read_at`` (monotonic) must
        leave as they are."""
        with self._lock:
            return {h.name for h in self._holds
                    if (h.hosts is None or host in h.hosts) and (h.ended is None or read_at <= h.ended)}
