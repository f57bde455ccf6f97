"""Kept VM views (server/vm_views.py) and the change feed that invalidates them, on a real database.

A view is kept between the commits that change its VM: these tests write a VM's row behind the
server's back (a Core UPDATE on another connection, which the feed never sees) to tell a kept view
(it still shows the old value) from one read again (it shows the new one).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker
from vmshift_fake_agent import make_facts

from vmshift.model.enums import BootKind, ConnectionState, PowerState
from vmshift.model.vm import BootSpec, VmSpec
from vmshift.server.db.change_feed import ChangeFeed
from vmshift.server.db.schema import ClusterRow, HostNetworkRow, HostRow, NetworkRow, VmRow
from vmshift.server.db.setup import make_engine, seed_defaults, upgrade_schema
from vmshift.server.vm_views import VmViews

Db = tuple[Engine, sessionmaker[Session], VmViews, dict[str, int]]  # VM ids by name


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Db]:
    engine = make_engine(f"sqlite:///{tmp_path / 'v.db'}")
    upgrade_schema(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    seed_defaults(sessions)
    feed = ChangeFeed(sessions)
    views = VmViews(feed)
    ids: dict[str, int] = {}
    with sessions.begin() as s:
        cluster = s.scalar(select(ClusterRow))
        assert cluster is not None
        host = HostRow(name="host-1", address="127.0.0.1:1", cluster_id=cluster.id,
                       connection_state=ConnectionState.CONNECTED,
                       facts=make_facts("host-1").model_dump(mode="json"))
        net = NetworkRow(name="vm-net")
        s.add_all([host, net])
        s.flush()
        s.add(HostNetworkRow(host_id=host.id, network_id=net.id, bridge="br0"))
        for name in ("a", "b"):
            vm_uuid = str(uuid.uuid4())
            spec = VmSpec(name=name, uuid=vm_uuid, cpus=1, memory_mib=64, cpu_model="qemu64",
                          machine_type="pc", datastore="shared-1", boot=BootSpec(kind=BootKind.KERNEL))
            row = VmRow(name=name, uuid=vm_uuid, host_id=host.id, spec=spec.model_dump(mode="json"),
                        power_state=PowerState.POWERED_OFF, kernel_args="", stats={})
            s.add(row)
            s.flush()
            ids[name] = row.id
    yield engine, sessions, views, ids
    engine.dispose()


def _behind_the_back(engine: Engine, vm_id: int, args: str) -> None:
    with engine.begin() as conn:
        conn.execute(update(VmRow).where(VmRow.id == vm_id).values(kernel_args=args))


def _args(sessions: sessionmaker[Session], views: VmViews, *vm_ids: int) -> list[str]:
    with sessions() as s:
        got = views.of(s, vm_ids)
    return [got[i].kernel_args for i in vm_ids]


def test_a_change_to_one_vm_during_a_read_drops_only_that_vms_view(db: Db) -> None:
    engine, sessions, views, ids = db
    token = views.token()
    with sessions.begin() as s:  # a commit the feed sees, after the read began
        vm = s.get(VmRow, ids["a"])
        assert vm is not None
        vm.kernel_args = "changed"
    with sessions() as s:
        views.of(s, [ids["a"], ids["b"]], since=token)
    _behind_the_back(engine, ids["a"], "unseen-a")
    _behind_the_back(engine, ids["b"], "unseen-b")
    # b's view, read while only a changed, was kept; a's might have been read before its change
    assert _args(sessions, views, ids["a"], ids["b"]) == ["unseen-a", ""]


def test_a_commit_that_sets_a_value_it_already_had_keeps_every_view(db: Db) -> None:
    engine, sessions, views, ids = db
    assert _args(sessions, views, ids["a"], ids["b"]) == ["", ""]
    with sessions.begin() as s:  # what apply_facts does at each report: the same bridge again
        link = s.scalar(select(HostNetworkRow))
        assert link is not None
        link.bridge = "br0"
        vm = s.get(VmRow, ids["a"])
        assert vm is not None
        vm.kernel_args = ""
    _behind_the_back(engine, ids["a"], "unseen-a")
    assert _args(sessions, views, ids["a"], ids["b"]) == ["", ""]  # both kept
    with sessions.begin() as s:  # a real change to a network link may change every view
        link = s.scalar(select(HostNetworkRow))
        assert link is not None
        link.bridge = "br1"
    assert _args(sessions, views, ids["a"], ids["b"]) == ["unseen-a", ""]


def test_refresh_builds_again_the_views_a_commit_invalidated(db: Db) -> None:
    engine, sessions, views, ids = db
    assert views.warm(sessions) == 2
    with sessions.begin() as s:
        vm = s.get(VmRow, ids["a"])
        assert vm is not None
        vm.kernel_args = "changed"
    assert views.refresh(sessions) == 1  # a's view only
    assert views.refresh(sessions) == 0
    _behind_the_back(engine, ids["a"], "unseen-a")
    assert _args(sessions, views, ids["a"]) == ["changed"]  # built by the refresh and kept
