"""Shared-nothing migration (kind relocate) through the server against fake agents (real HTTP and database).

host-2 sees only its local datastore, so a plain live migration is refused for lack of shared storage,
and ``--datastore local-host-2`` makes it a relocate: the live orchestrator with the target spec sent to
the target (which answers with its NBD exports) and the exports sent to the source.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import ServerHarness
from test_migrations_fakes import (  # noqa: F401
    MIB,
    AgentStarter,
    Pair,
    migrating_agents_fixture,
    start_vm,
)

from vmshift.model.enums import MigrationKind
from vmshift.model.migration import Migration


@pytest.fixture(name="split")
def split_fixture(server: ServerHarness, migrating_agents: AgentStarter) -> Pair:
    """host-1 sees shared-1 and its local datastore, host-2 only local-host-2; vm-1 runs on host-1."""
    src, t1 = migrating_agents("host-1")
    dst, t2 = migrating_agents("host-2", shared=False)
    src.peer, dst.peer = dst, src
    dst.journal = src.journal
    server.add_host(t1)
    server.add_host(t2)
    start_vm(server)
    return src, dst


def relocate(server: ServerHarness, vm: str = "vm-1", **kw: Any) -> Any:
    body = {"host": "host-2", "datastore": "local-host-2", **kw}
    return server.client.post(f"/vms/{vm}/migrate", json=body)


def test_relocate_moves_host_and_files_in_one_task(server: ServerHarness, split: Pair) -> None:
    src, dst = split
    plain = server.client.post("/vms/vm-1/migrate", json={"host": "host-2"})
    assert plain.status_code == 422, plain.text
    assert "shared-nothing" in plain.json()["error"]["message"]

    checks = relocate(server, check_only=True)
    assert checks.status_code == 200, checks.text
    results = {x["check"]: x for x in checks.json()["results"]}
    assert "datastores" not in results
    for check in ("kind", "target_datastore", "datastore_space", "reachability", "cpu_model"):
        assert results[check]["severity"] == "ok", results[check]
    assert dst.incoming == {} and src.outgoing == {}
    preview = relocate(server, dry_run=True)
    assert preview.status_code == 200, preview.text
    assert preview.json()["kind"] == "relocate" and preview.json()["prediction"]["total_ms"] > 0
    assert not preview.json()["settings"]["allow_postcopy"]  # a relocate never uses post-copy
    assert dst.incoming == {} and src.outgoing == {}

    r = relocate(server)
    assert r.status_code == 202, r.text
    assert r.json()["migration_kind"] == MigrationKind.RELOCATE.value
    task = server.wait_task(r.json()["id"])
    assert task["state"] == "success", task
    m = Migration.model_validate(server.client.get(f"/migrations/{r.json()['migration_id']}").json())
    assert m.kind is MigrationKind.RELOCATE and m.status.value == "completed"
    assert (m.source_datastore, m.target_datastore) == ("shared-1", "local-host-2")
    assert not m.settings.allow_postcopy

    # the target got the spec after the move and the relocate flag; the source its NBD exports
    out = src.outgoing[m.id]
    assert [t.uri for t in out.mirror_targets] == ["nbd://127.0.0.1:10809/disk0"]
    assert out.mirror_targets[0].size_bytes == 64 * MIB
    vm = server.client.get("/vms/vm-1").json()
    assert vm["host"] == "host-2"
    assert vm["datastore"] == "local-host-2", vm
    assert [d["datastore"] for d in vm["disks"]] == ["local-host-2"]
    events = [e["message"] for e in server.client.get("/events?target=vm-1").json()]
    assert any("host-1/shared-1 to host-2/local-host-2" in e for e in events), events


def test_a_relocate_without_room_is_refused_before_any_copy(server: ServerHarness, split: Pair) -> None:
    src, dst = split
    body = {"name": "huge", "host": "host-1", "datastore": "shared-1", "memory_mib": 128,
            "networks": ["VM Network"], "disks_mib": [20_000], "start": True}
    r = server.client.post("/vms", json=body)
    assert r.status_code == 202, r.text
    assert server.wait_task(r.json()["id"])["state"] == "success"
    r = relocate(server, "huge")
    assert r.status_code == 409, r.text
    first = r.json()["error"]
    assert "9000 MiB free" in first["message"] and "20000 MiB" in first["message"]
    assert dst.incoming == {} and src.outgoing == {}  # nothing reached the hosts
    assert server.client.get("/vms/huge").json()["host"] == "host-1"
