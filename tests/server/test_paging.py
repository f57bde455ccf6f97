"""Paged lists over HTTP (docs/api.md, "Paging"): 1,250 VMs page by page, the filters, the ETag,
the logs' since/after/before, the SDK following the cursor, and the database off the event loop.

The inventory is written straight into the database (fast); the heartbeat is slowed to once an hour
so that it never touches these rows (their hosts have no agents).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TOKEN, ServerHarness
from sqlalchemy import insert, select, text, update
from sqlalchemy.orm import Session
from typer.testing import CliRunner
from vmshift_fake_agent import make_facts

from vmshift.cli.main import app
from vmshift.client import VmshiftClient
from vmshift.model.enums import BootKind, ConnectionState, EventSeverity, PowerState
from vmshift.model.paging import ListName, encode_cursor
from vmshift.model.vm import BootSpec, VmSpec
from vmshift.server.db.schema import ClusterRow, DatacenterRow, EventRow, HostRow, VmRow, utcnow

N_VMS = 1250
#: every 5th VM is a web server (a name prefix), every 3rd runs, odd ones live on host-b (cluster Gold)
WEB, ON, ON_B = (lambda i: i % 5 == 0), (lambda i: i % 3 == 0), (lambda i: i % 2 == 1)


def _name(i: int) -> str:
    return f"web-{i:05d}" if WEB(i) else f"app-{i:05d}"


def _spec(name: str, vm_uuid: str) -> dict[str, Any]:
    return VmSpec(name=name, uuid=vm_uuid, cpus=1, memory_mib=64, cpu_model="qemu64", machine_type="pc",
                  datastore="shared-1", boot=BootSpec(kind=BootKind.KERNEL)).model_dump(mode="json")


def _vm_row(i: int, host_id: int, name: str | None = None) -> dict[str, Any]:
    name = name or _name(i)
    vm_uuid = str(uuid.uuid4())
    state = PowerState.POWERED_ON if ON(i) else PowerState.POWERED_OFF
    return {"name": name, "uuid": vm_uuid, "host_id": host_id, "spec": _spec(name, vm_uuid),
            "power_state": state, "kernel_args": "", "stats": {}}


class Inventory:
    """The server and its database, written directly."""

    def __init__(self, server: ServerHarness) -> None:
        self.server = server
        self.db = server._db
        with Session(self.db) as s, s.begin():
            dc = s.scalar(select(DatacenterRow))
            assert dc is not None
            gold = ClusterRow(name="Gold", datacenter_id=dc.id)
            s.add(gold)
            s.flush()
            default = s.scalar(select(ClusterRow).where(ClusterRow.name == "Cluster"))
            assert default is not None
            hosts = {}
            for name, cluster, state, port in (("host-a", default, ConnectionState.CONNECTED, 1),
                                               ("host-b", gold, ConnectionState.DISCONNECTED, 2)):
                row = HostRow(name=name, address=f"127.0.0.1:{port}", cluster_id=cluster.id,
                              connection_state=state, facts=make_facts(name).model_dump(mode="json"))
                s.add(row)
                s.flush()
                hosts[name] = row.id
            self.hosts = hosts
            s.execute(insert(VmRow), [_vm_row(i, hosts["host-b" if ON_B(i) else "host-a"])
                                      for i in range(N_VMS)])  # fmt: skip
        self.names = sorted(_name(i) for i in range(N_VMS))

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.server.client.get(path, params=params)

    def walk(self, path: str, **params: Any) -> list[list[dict[str, Any]]]:
        """Every page of a list, following X-Next-Cursor; checks Link says the same."""
        pages = []
        while True:
            r = self.get(path, **params)
            assert r.status_code == 200, r.text
            pages.append(r.json())
            cursor = r.headers.get("X-Next-Cursor")
            if cursor is None:
                assert "Link" not in r.headers
                return pages
            link = httpx.URL(r.headers["Link"].removeprefix("<").removesuffix('>; rel="next"'))
            assert link.path == f"/api/v1{path}" and link.params["cursor"] == cursor
            params["cursor"] = cursor


@pytest.fixture
def inventory(tmp_path: Path, db_url: str) -> Iterator[Inventory]:
    harness = ServerHarness(tmp_path / "state", db_url, heartbeat_interval_s=3600).start()
    try:
        yield Inventory(harness)
    finally:
        harness.close()


def test_paging_returns_every_vm_once_in_order(inventory: Inventory) -> None:
    pages = inventory.walk("/vms", limit=100)
    assert [len(p) for p in pages] == [100] * 12 + [50]
    names = [v["name"] for p in pages for v in p]
    assert names == inventory.names  # each VM exactly once, by name
    first = pages[0][0]
    assert first["host"] in ("host-a", "host-b") and first["power_state"] in ("poweredOn", "poweredOff")
    # without a limit: 500 a page; the body is still a plain list
    r = inventory.get("/vms")
    assert r.status_code == 200 and len(r.json()) == 500 and r.headers["X-Next-Cursor"]


def test_a_vm_added_while_paging_does_not_shift_the_pages(inventory: Inventory) -> None:
    r = inventory.get("/vms", limit=100)
    page1, cursor = [v["name"] for v in r.json()], r.headers["X-Next-Cursor"]
    with Session(inventory.db) as s, s.begin():  # sorts before the cursor: keyset paging is not moved
        s.execute(insert(VmRow), [_vm_row(3, inventory.hosts["host-a"], name="aaa-0")])
    rest = [v["name"] for p in inventory.walk("/vms", limit=100, cursor=cursor) for v in p]
    assert page1 + rest == inventory.names


def test_filters_combine(inventory: Inventory) -> None:
    def names(**params: Any) -> list[str]:
        return [v["name"] for p in inventory.walk("/vms", limit=97, **params) for v in p]

    on_b_web = sorted(_name(i) for i in range(N_VMS) if ON(i) and ON_B(i) and WEB(i))
    assert names(host="host-b", power_state="poweredOn", name_prefix="web-") == on_b_web
    assert names(cluster="Gold", power_state="poweredOn", name_prefix="web-") == on_b_web
    assert names(cluster="Cluster") == sorted(_name(i) for i in range(N_VMS) if not ON_B(i))
    assert names(power_state="poweredOff", name_prefix="app-0001") == sorted(
        _name(i) for i in range(10, 20) if not ON(i) and not WEB(i))
    assert names(host="host-a", cluster="Gold") == [] and names(host="host-x") == []
    # '_' and '%' are matched as themselves, not as LIKE wildcards
    with Session(inventory.db) as s, s.begin():
        s.execute(insert(VmRow), [_vm_row(1, inventory.hosts["host-a"], name="we_b-1")])
    assert names(name_prefix="we_") == ["we_b-1"]
    assert len(names(name_prefix="we")) == N_VMS // 5 + 1

    def hosts(**params: Any) -> list[str]:
        return [h["name"] for h in inventory.get("/hosts", **params).json()]

    assert hosts() == ["host-a", "host-b"]
    assert hosts(cluster="Gold") == ["host-b"] and hosts(connection_state="connected") == ["host-a"]
    assert hosts(name_prefix="host-a") == ["host-a"]
    assert hosts(cluster="Gold", connection_state="connected") == []
    host_b = inventory.get("/hosts", cluster="Gold").json()[0]
    assert len(host_b["vms"]) == N_VMS // 2 and host_b["cluster"] == "Gold"


def test_every_list_pages(inventory: Inventory) -> None:
    assert inventory.walk("/clusters", limit=1) == [[c] for c in inventory.get("/clusters").json()]
    assert [c["name"] for p in inventory.walk("/clusters", limit=1) for c in p] == ["Cluster", "Gold"]
    assert [d["name"] for p in inventory.walk("/datacenters", limit=1) for d in p] == ["Datacenter"]
    for path in ("/datastores", "/networks", "/tasks", "/migrations", "/schedules", "/events"):
        assert inventory.walk(path, limit=1)  # pages (even when empty) and refuses a bad limit
        assert inventory.get(path, limit=0).status_code == 422


def test_bad_paging_is_refused_with_one_sentence(inventory: Inventory) -> None:
    for params, status, says in (
        ({"cursor": "garbage"}, 400, "The cursor 'garbage' is not valid"),
        ({"cursor": encode_cursor(ListName.HOSTS, "host-a")}, 400, "belongs to another list ('hosts')"),
        ({"cursor": encode_cursor(ListName.VMS, 7)}, 400, "its position is not a name"),
        ({"limit": 0}, 422, "'limit'"),
        ({"limit": 5000}, 422, "'limit'"),
        ({"cursor": "a/b"}, 422, "'cursor'"),
        ({"power_state": "on"}, 422, "'power_state'"),
        ({"name_prefix": "web\n"}, 422, "'name_prefix'"),
    ):
        r = inventory.get("/vms", **params)
        assert r.status_code == status, (params, r.text)
        err = r.json()["error"]
        assert says in err["message"] and err["message"].endswith(".") and err["hint"], err
    r = inventory.get("/events", after="2026-12-01T10:00:00")  # a time without a zone is ambiguous
    assert r.status_code == 422 and "'after'" in r.json()["error"]["message"]
    r = inventory.get("/tasks", before="0.5")  # a number is not taken for Unix seconds
    assert r.status_code == 422 and "ISO 8601" in r.json()["error"]["message"]
    r = inventory.get("/events", after="0001-01-01T00:00:00+05:00")
    assert r.status_code == 400 and "'after'" in r.json()["error"]["message"]
    r = inventory.get("/tasks", cursor=encode_cursor(ListName.EVENTS, 5))
    assert r.status_code == 400 and "('events')" in r.json()["error"]["message"]


def test_etag_is_304_until_a_power_state_changes(inventory: Inventory) -> None:
    r = inventory.get("/vms", limit=1000)
    tag = r.headers["ETag"]
    first = r.json()[0]["name"]
    again = inventory.server.client.get("/vms", params={"limit": 1000}, headers={"If-None-Match": tag})
    assert again.status_code == 304 and again.content == b"" and again.headers["ETag"] == tag
    assert again.headers["X-Next-Cursor"] == r.headers["X-Next-Cursor"]
    # another page, another filter: another tag
    assert inventory.get("/vms", limit=999).headers["ETag"] != tag
    with inventory.server.sessions().begin() as s:  # as the server writes an adopted power change
        vm = s.scalar(select(VmRow).where(VmRow.name == first))
        assert vm is not None
        new = PowerState.POWERED_OFF if vm.power_state is PowerState.POWERED_ON else PowerState.POWERED_ON
        vm.power_state = new
    changed = inventory.server.client.get("/vms", params={"limit": 1000}, headers={"If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["ETag"] != tag
    assert changed.json()[0]["power_state"] == new.value
    # the hosts' list: a VM that moves changes its hosts' entries
    hosts = inventory.get("/hosts")
    h_tag = hosts.headers["ETag"]
    r = inventory.server.client.get("/hosts", headers={"If-None-Match": f'W/{h_tag}, "other"'})
    assert r.status_code == 304
    moved = _name(2)  # from host-a to host-b
    with inventory.server.sessions().begin() as s:  # a bulk statement: the server reads everything again
        s.execute(update(VmRow).where(VmRow.name == moved).values(host_id=inventory.hosts["host-b"]))
    r = inventory.server.client.get("/hosts", headers={"If-None-Match": h_tag})
    assert r.status_code == 200 and r.headers["ETag"] != h_tag
    assert moved in next(h for h in r.json() if h["name"] == "host-b")["vms"]


def test_events_since_after_and_before(inventory: Inventory) -> None:
    t0 = utcnow() - timedelta(hours=10)
    with Session(inventory.db) as s, s.begin():
        before = s.scalar(select(EventRow.id).order_by(EventRow.id.desc()).limit(1)) or 0
        s.execute(insert(EventRow), [
            {"time": t0 + timedelta(minutes=i), "severity": EventSeverity.INFO, "kind": "test.event",
             "target": f"vm-{i % 3}", "message": f"event {i}."} for i in range(300)
        ])  # fmt: skip
    mine = inventory.walk("/events", since=before, limit=64)
    ids = [e["id"] for p in mine for e in p]
    assert len(ids) == 300 and ids == sorted(ids, reverse=True) and min(ids) > before  # newest first
    assert [e["message"] for e in mine[0][:2]] == ["event 299.", "event 298."]
    # incremental: only what came after the newest id seen
    newest = ids[0]
    assert inventory.get("/events", since=newest).json() == []
    window = [e["message"] for p in inventory.walk(
        "/events", after=(t0 + timedelta(minutes=99, seconds=30)).isoformat(),
        before=(t0 + timedelta(minutes=110, seconds=30)).isoformat(), limit=4) for e in p]
    assert window == [f"event {i}." for i in range(110, 99, -1)]
    pages = inventory.walk("/events", target="vm-1", since=before, limit=50)
    target = [e["message"] for p in pages for e in p]
    assert target == [f"event {i}." for i in range(299, -1, -1) if i % 3 == 1]


def test_the_sdk_pages_transparently(inventory: Inventory) -> None:
    server = inventory.server
    with VmshiftClient(server.url, TOKEN, ca_file=server.ca_file) as api:
        vms = api.list_vms(limit=100)
        assert [v["name"] for v in vms] == inventory.names
        assert len(api.list_vms()) == N_VMS  # 500 a page by default
        on_b = api.list_vms(host="host-b", power_state=PowerState.POWERED_ON, limit=50)
        assert [v["name"] for v in on_b] == sorted(_name(i) for i in range(N_VMS) if ON(i) and ON_B(i))
        assert [h["name"] for h in api.list_hosts(cluster="Gold")] == ["host-b"]
        assert len(api.list_events(5, limit=2)) == min(5, len(api.list_events()))


def test_a_slow_query_does_not_stall_the_event_loop(inventory: Inventory) -> None:
    """A transaction holds a lock on the VM table: GET /vms waits for it, in a thread; /about (and
    anything else on the event loop) still answers at once."""
    lock = inventory.db.connect()
    sqlite = inventory.db.dialect.name == "sqlite"
    if sqlite:
        lock.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock: the server's transactions wait for it
    else:
        lock.begin()
        lock.execute(text("LOCK TABLE vm IN ACCESS EXCLUSIVE MODE"))
    got: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: got.append(inventory.get("/vms", limit=10)))
    try:
        waiting.start()
        # (no bound on how fast: on a loaded machine a turn of the loop can take a while; what counts is
        # that /about answers at all while GET /vms still waits, which a blocked loop cannot do)
        for _ in range(5):
            assert inventory.server.client.get("/about", timeout=20).status_code == 200
        assert not got, f"GET /vms should still wait for the lock: {got[0].text if got else ''}"
    finally:
        if sqlite:
            lock.exec_driver_sql("ROLLBACK")
        else:
            lock.rollback()
        lock.close()
    waiting.join(timeout=30)
    assert got and got[0].status_code == 200 and len(got[0].json()) == 10


def test_the_cli_prints_every_match(inventory: Inventory) -> None:
    def cli(*args: str) -> tuple[int, str]:
        """Exit code and stdout, or the error the CLI's entry point would print (one sentence + hint)."""
        result = CliRunner().invoke(app, [*inventory.server.cli_args(), *args])
        return result.exit_code, result.output if result.exception is None else str(result.exception)

    code, out = cli("vm", "list", "--host", "host-b", "--power-state", "on", "--name-prefix", "web", "--json")
    assert code == 0, out
    expected = sorted(_name(i) for i in range(N_VMS) if ON(i) and ON_B(i) and WEB(i))
    assert [v["name"] for v in json.loads(out)] == expected
    code, out = cli("vm", "list", "--json")
    assert code == 0 and len(json.loads(out)) == N_VMS  # three pages of 500, all printed
    code, out = cli("host", "list", "--cluster", "Gold", "--json")
    assert code == 0 and [h["name"] for h in json.loads(out)] == ["host-b"]
    code, out = cli("vm", "list", "--power-state", "sideways")
    assert code == 1 and "Power state 'sideways' is not known" in out and "on, off" in out
    code, out = cli("event", "list", "--since", "0", "--limit", "0", "--after", "2000-01-01T00:00:00Z",
                    "--json")
    assert code == 0 and isinstance(json.loads(out), list)
    code, out = cli("event", "list", "--after", "yesterday")
    assert code == 1 and "'after'" in out and "ISO 8601" in out
