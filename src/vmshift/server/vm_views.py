"""The VMs' API views, kept in memory between the commits that change them.

Building a VM's view reads its row, its host's network links and its IPs and validates its spec:
about 0.15 ms a VM, so 15 ms for a page of 100, most of a request's cost at 200 requests/s. A view
changes only when a commit changes its VM's row, IPs or MACs, or a network (the change feed says
which: server/db/change_feed.py); its live numbers (CPU, memory) come from the host's report at
each read (``Heartbeat.live_stats``) and are not part of what is kept.
"""

from __future__ import annotations

import threading
from collections.abc import Collection

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from vmshift.model.api import Vm
from vmshift.server.db.change_feed import ChangeFeed, Changes
from vmshift.server.db.schema import HostNetworkRow, HostRow, VmRow
from vmshift.server.views import vm_view

#: what vm_view reads of each VM, loaded for many VMs in a few queries rather than per VM; of its host
#: only the name and networks (a join would fetch, and parse, the host's facts once per VM)
VIEW_LOADS = (
    selectinload(VmRow.ips),
    selectinload(VmRow.host).load_only(HostRow.id, HostRow.name)
    .selectinload(HostRow.networks).joinedload(HostNetworkRow.network),
)
MAX_KEPT = 20_000  # views kept at most (twice vSphere's cluster maximum); beyond, all are dropped


class VmViews:
    def __init__(self, feed: ChangeFeed) -> None:
        self._lock = threading.Lock()
        self._views: dict[int, Vm] = {}
        self._generation = 0  # counts invalidations: a view read before one is not kept
        feed.subscribe(self._changed)

    def of(self, s: Session, ids: Collection[int]) -> dict[int, Vm]:
        """VM id -> its view without live numbers, for the ids that exist."""
        with self._lock:
            found = {i: self._views[i] for i in ids if i in self._views}
            generation = self._generation
        missing = [i for i in ids if i not in found]
        if missing:
            read = {v.id: vm_view(v) for v in s.scalars(select(VmRow).options(*VIEW_LOADS)
                                                         .where(VmRow.id.in_(missing))).unique()}  # fmt: skip
            found |= read
            with self._lock:
                if generation == self._generation:  # nothing changed meanwhile: keep them
                    if len(self._views) + len(read) > MAX_KEPT:
                        self._views.clear()
                    self._views |= read
        return found

    def warm(self, sessions: sessionmaker[Session], chunk: int = 500) -> int:
        """Build every VM's view ahead of the first list (a server just started would otherwise pay
        for 10,000 views in its first full listing); how many were built. Runs in a thread."""
        with sessions() as s:
            ids = list(s.scalars(select(VmRow.id).order_by(VmRow.name)))
        for start in range(0, min(len(ids), MAX_KEPT), chunk):
            with sessions() as s:  # one short transaction per chunk: never holds a lock for long
                self.of(s, ids[start:start + chunk])
        return len(ids)

    def _changed(self, changes: Changes) -> None:
        if not (changes.vm_ids or changes.networks):
            return
        with self._lock:
            self._generation += 1
            if changes.networks:
                self._views.clear()
            else:
                for i in changes.vm_ids:
                    self._views.pop(i, None)
