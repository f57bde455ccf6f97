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
REFRESH_S = 5.0  # how often the views invalidated since are built again in the background


class VmViews:
    """Views by VM id. A view read from the database is kept unless its VM (or every view) was
    invalidated after the read began: each invalidation is stamped with a sequence number, so a
    change to one VM drops only the reads that might have seen that VM's old row."""

    def __init__(self, feed: ChangeFeed) -> None:
        self._lock = threading.Lock()
        self._views: dict[int, Vm] = {}
        self._seq = 0  # counts invalidations
        self._changed_at: dict[int, int] = {}  # VM id -> the sequence number of its last invalidation
        self._cleared_at = 0  # the sequence number of the last invalidation of every view
        self._stale: set[int] = set()  # invalidated since the last refresh
        self._all_stale = False
        feed.subscribe(self._changed)

    def token(self) -> int:
        """Take before the transaction that reads views begins: on SQLite a read transaction sees
        the database as of its first statement, which may come before ``of`` is called."""
        with self._lock:
            return self._seq

    def of(self, s: Session, ids: Collection[int], since: int | None = None) -> dict[int, Vm]:
        """VM id -> its view without live numbers, for the ids that exist. ``since``: a ``token()``
        taken before ``s`` began reading (default: now, right for a session that has not read yet)."""
        with self._lock:
            found = {i: self._views[i] for i in ids if i in self._views}
            began = self._seq if since is None else since
        missing = [i for i in ids if i not in found]
        if missing:
            read = {v.id: vm_view(v) for v in s.scalars(select(VmRow).options(*VIEW_LOADS)
                                                         .where(VmRow.id.in_(missing))).unique()}  # fmt: skip
            found |= read
            with self._lock:
                if self._cleared_at <= began:  # else every view read may be stale
                    if len(self._views) + len(read) > MAX_KEPT:
                        self._views.clear()
                    changed_at = self._changed_at
                    self._views |= {i: v for i, v in read.items() if changed_at.get(i, -1) <= began}
        return found

    def warm(self, sessions: sessionmaker[Session], chunk: int = 500) -> int:
        """Build every VM's view ahead of the first list (a server just started would otherwise pay
        for 10,000 views in its first full listing); how many were built. Runs in a thread."""
        with self._lock:  # what is invalidated from now on is refreshed later
            self._stale, self._all_stale = set(), False
        with sessions() as s:
            ids = list(s.scalars(select(VmRow.id).order_by(VmRow.name)))
        return self._build(sessions, ids[:MAX_KEPT], chunk)

    def refresh(self, sessions: sessionmaker[Session], chunk: int = 500) -> int:
        """Build again the views invalidated since the last refresh, so that a listing after many
        changes (10,000 VMs adopted as running) reads kept views; how many. Runs in a thread."""
        with self._lock:
            stale, self._stale = self._stale, set()
            everything, self._all_stale = self._all_stale, False
        if everything:
            return self.warm(sessions, chunk)
        return self._build(sessions, sorted(stale), chunk)

    def _build(self, sessions: sessionmaker[Session], ids: list[int], chunk: int) -> int:
        built = 0
        for start in range(0, len(ids), chunk):
            with sessions() as s:  # one short transaction per chunk: never holds a lock for long
                built += len(self.of(s, ids[start:start + chunk]))
        return built

    def _changed(self, changes: Changes) -> None:
        if not (changes.vm_ids or changes.networks):
            return
        with self._lock:
            self._seq += 1
            if changes.networks:
                self._views.clear()
                self._changed_at.clear()  # the clear's stamp covers them
                self._cleared_at = self._seq
                self._all_stale = True
            else:
                for i in changes.vm_ids:
                    self._views.pop(i, None)
                    self._changed_at[i] = self._seq
                self._stale |= changes.vm_ids
                if len(self._changed_at) > 2 * MAX_KEPT:  # deleted VMs' stamps: forget them all, as a clear
                    self._changed_at.clear()
                    self._cleared_at = self._seq
