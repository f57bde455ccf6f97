"""Which VMs the server's own transactions changed, for the cluster-wide reconcile and the API's
views kept in memory (server/vm_views.py, server/vm_names.py).

Reconcile looks at the VMs whose reports or inventory rows changed since its last round, not at all
10,000 every round (server/heartbeat.py). The reports' changes it knows from the host streams; the
inventory's it learns here: every session the server's sessionmaker opens tells, after a commit,
which VM rows and migration rows it flushed. Statements that bypass the ORM (a bulk UPDATE or
DELETE of those tables) cannot say which rows they touched, so they are reported as ``unknown``
and the next round reads everything.

Only this server's writes are seen: a program writing the database behind its back (a benchmark's
seeding) must restart the server, or wait for the next full round (``FULL_RECONCILE_S``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

from vmshift.server.db.schema import (
    HostNetworkRow,
    IpAllocationRow,
    MacAllocationRow,
    MigrationRow,
    NetworkRow,
    VmRow,
)

_KEY = "vmshift.changed"
_WATCHED = frozenset(t.__tablename__ for t in (VmRow, MigrationRow, IpAllocationRow, MacAllocationRow,
                                                NetworkRow, HostNetworkRow))


@dataclass
class Changes:
    uuids: set[str] = field(default_factory=set)  # VM rows inserted, updated or deleted
    names: set[str] = field(default_factory=set)  # VMs whose migration rows changed
    unknown: bool = False  # a bulk statement changed rows no one can name
    placement: bool = False  # a VM row was added or removed, or moved to another host
    vm_ids: set[int] = field(default_factory=set)  # VMs whose rows, IPs or MACs changed (API views)
    networks: bool = False  # a network or a host's link to one changed (every VM view may show it)

    def __bool__(self) -> bool:
        return bool(self.uuids or self.names or self.unknown or self.vm_ids or self.networks)

    def add(self, other: Changes) -> None:
        self.uuids |= other.uuids
        self.names |= other.names
        self.unknown = self.unknown or other.unknown
        self.placement = self.placement or other.placement
        self.vm_ids |= other.vm_ids
        self.networks = self.networks or other.networks


class ChangeFeed:
    """Collects the committed changes of every session of ``sessions``; ``take`` hands them over."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._lock = threading.Lock()
        self._committed = Changes()
        self.placement_generation = 0  # counts the commits that changed which host has which VMs
        self._subscribers: list[Callable[[Changes], None]] = []
        event.listen(sessions, "after_flush", self._after_flush)
        event.listen(sessions, "do_orm_execute", self._on_execute)
        event.listen(sessions, "after_commit", self._after_commit)
        event.listen(sessions, "after_rollback", self._forget)

    def subscribe(self, fn: Callable[[Changes], None]) -> None:
        """Call ``fn`` with each commit's changes, in the committing thread (keep it short)."""
        self._subscribers.append(fn)

    def take(self) -> Changes:
        with self._lock:
            got, self._committed = self._committed, Changes()
        return got

    @staticmethod
    def _pending(session: Session) -> Changes:
        changes: Changes = session.info.setdefault(_KEY, Changes())
        return changes

    def _after_flush(self, session: Session, _ctx: Any) -> None:
        changes = self._pending(session)
        # dirty: every object an attribute was set on, to the value it had too (apply_facts sets each
        # network link's fields at each report): only those with a net change changed a row
        dirty = {obj for obj in session.dirty if session.is_modified(obj)}
        for obj in (*session.new, *dirty, *session.deleted):
            loaded = inspect(obj).dict  # no attribute is loaded here: a deleted row cannot be
            if isinstance(obj, VmRow):
                uuid = loaded.get("uuid")
                if uuid is None:
                    changes.unknown = True
                else:
                    changes.uuids.add(uuid)
                if obj not in dirty or inspect(obj).attrs.host_id.history.has_changes():
                    changes.placement = True
                _add_id(changes, loaded.get("id"))
            elif isinstance(obj, MigrationRow):
                vm = loaded.get("vm")
                if vm is None:
                    changes.unknown = True
                else:
                    changes.names.add(vm)
            elif isinstance(obj, IpAllocationRow | MacAllocationRow):
                _add_id(changes, loaded.get("vm_id"))
            elif isinstance(obj, NetworkRow | HostNetworkRow):
                changes.networks = True

    def _on_execute(self, state: ORMExecuteState) -> None:
        if (state.is_update or state.is_delete or state.is_insert) and any(
            getattr(t, "name", None) in _WATCHED for t in _tables(state)
        ):
            pending = self._pending(state.session)
            pending.unknown = pending.placement = pending.networks = True

    def _after_commit(self, session: Session) -> None:
        changes = session.info.pop(_KEY, None)
        if changes:
            with self._lock:
                self._committed.add(changes)
                if changes.placement:
                    self.placement_generation += 1
            for fn in self._subscribers:
                fn(changes)

    def _forget(self, session: Session) -> None:
        session.info.pop(_KEY, None)


def _add_id(changes: Changes, vm_id: object) -> None:
    if isinstance(vm_id, int):
        changes.vm_ids.add(vm_id)
    else:  # not known yet, or not loaded: every view may be stale
        changes.networks = True


def _tables(state: ORMExecuteState) -> list[Any]:
    table = getattr(state.statement, "table", None)
    return [table] if table is not None else []
