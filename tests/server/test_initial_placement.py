"""``vm create`` without a host: initial placement through a real server and fake agents (issue 11).

The new VM goes where the placement engine's filters allow it and the cluster stays balanced; a
host in maintenance mode, one that does not see the datastore, or one without room is never
chosen; when no host fits, the answer is a 422 that gives each host's reason, and nothing changes.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import AgentFactory, ServerHarness
from typer.testing import CliRunner
from vmshift_fake_agent import FakeAgent

from vmshift.cli.main import app


def body(name: str, **kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"name": name, "datastore": "shared-1", "memory_mib": 256,
                         "networks": ["VM Network"], "disks_mib": [64]}  # fmt: skip
    b.update(kw)
    return b


def create(server: ServerHarness, name: str, **kw: Any) -> str:
    r = server.client.post("/vms", json=body(name, **kw))
    assert r.status_code == 202, r.text
    assert server.wait_task(r.json()["id"])["state"] == "success"
    host: str = server.client.get(f"/vms/{name}").json()["host"]
    return host


@pytest.fixture
def three(server: ServerHarness, agents: AgentFactory) -> list[FakeAgent]:
    """host-1 and host-2 see shared-1 (2 GiB each); host-3 does not."""
    out = []
    for name, shared in (("host-1", True), ("host-2", True), ("host-3", False)):
        agent, thread = agents(name, shared=shared)
        server.add_host(thread)
        out.append(agent)
    return out


def test_new_vms_are_spread_over_the_hosts_that_can_run_them(server: ServerHarness, three: Any) -> None:
    hosts = [create(server, f"vm-{i}", start=True) for i in range(4)]
    assert sorted(hosts) == ["host-1", "host-1", "host-2", "host-2"]  # host-3 lacks the datastore
    events = server.client.get("/events?target=vm-0").json()
    assert any("by initial placement" in e["message"] for e in events)


def test_placement_skips_a_host_in_maintenance(server: ServerHarness, three: Any) -> None:
    assert server.client.post("/hosts/host-1/maintenance", json={"enter": True}).status_code == 200
    assert {create(server, f"vm-{i}") for i in range(3)} == {"host-2"}


def test_no_host_with_room_is_a_422_with_each_hosts_reason_and_nothing_changed(
    server: ServerHarness, three: Any
) -> None:
    before = server.counts()
    r = server.client.post("/vms", json=body("big", memory_mib=2000))
    assert r.status_code == 422, r.text
    msg = r.json()["error"]["message"]
    assert "No host can run VM 'big'" in msg and "host-1" in msg and "host-2" in msg, msg
    assert server.counts() == before
    r = server.client.post("/vms", json=body("lost", cluster="nope"))
    assert r.status_code == 404 and server.counts() == before


def test_cli_vm_create_without_host_says_where_it_went(server: ServerHarness, three: Any) -> None:
    result = CliRunner().invoke(app, [*server.cli_args(), "vm", "create", "cli-1", "--datastore", "shared-1",
                                      "--memory", "128"])
    assert result.exit_code == 0, result.stdout
    assert "Initial placement chose host host-" in result.stdout
