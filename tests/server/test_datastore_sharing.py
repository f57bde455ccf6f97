"""A datastore is shared between hosts only when they prove it (docs/datastores.md): a host whose
directory carries a copy of the marker (the same UUID) but not the other hosts' files is not linked
to it, a warning event says why, and VMs cannot use it there; once its report proves the sharing,
it is."""

from __future__ import annotations

from typing import Any

from conftest import AgentFactory, ServerHarness, wait_for
from typer.testing import CliRunner
from vmshift_fake_agent import SHARED_DS_UUID, FakeAgent, make_facts

from vmshift.cli.main import app
from vmshift.model.api import Datastore
from vmshift.model.host import DatastoreProof, HostFacts


def with_proof(name: str, token: str, peers: dict[str, str]) -> HostFacts:
    facts = make_facts(name)
    for ds in facts.datastores:
        if ds.uuid == SHARED_DS_UUID:
            ds.proof = DatastoreProof(token=token, peers=peers)
    return facts


def shared_1(server: ServerHarness) -> Datastore:
    stores = {d.name: d for d in map(Datastore.model_validate, server.client.get("/datastores").json())}
    return stores["shared-1"]


def shared_hosts(server: ServerHarness) -> list[str]:
    return shared_1(server).hosts


def not_shared_events(server: ServerHarness) -> list[dict[str, Any]]:
    events = server.client.get("/events", params={"limit": 200}).json()
    return [e for e in events if e["kind"] == "datastore.not_shared"]


def test_a_copied_marker_is_not_shared_until_the_host_proves_it(
    server: ServerHarness, agents: AgentFactory
) -> None:
    _, a1 = agents("host-1", facts=with_proof("host-1", "tok-1", {}))
    _, a2 = agents("host-2", facts=with_proof("host-2", "tok-2", {"host-1": "tok-1"}))
    # host-3's folder holds a copy: host-1's file as it was long ago, nobody reads host-3's
    ag3, a3 = agents("host-3", facts=with_proof("host-3", "tok-3", {"host-1": "tok-1-copied"}))
    for agent in (a1, a2, a3):
        server.add_host(agent)
    assert shared_hosts(server) == ["host-1", "host-2"] and shared_1(server).unproven_on == ["host-3"]
    listed = CliRunner().invoke(app, [*server.cli_args(), "datastore", "list"])
    said = "".join(c for c in listed.stdout if c.isalnum() or c in "(-,)")  # the table wraps at its width
    assert listed.exit_code == 0 and "(notprovenonhost-3)" in said, listed.stdout
    [event] = not_shared_events(server)
    assert event["severity"] == "warning" and event["target"] == "shared-1", event
    assert "host-3" in event["message"] and "copy of the marker" in event["message"], event
    host3 = server.client.get("/hosts/host-3").json()
    assert [d["name"] for d in host3["facts"]["unproven_datastores"]] == ["shared-1"]
    assert "shared-1" not in [d["name"] for d in host3["facts"]["datastores"]]
    # a VM cannot be put on it there
    r = server.client.post("/vms", json={"name": "web-1", "host": "host-3", "datastore": "shared-1",
                                         "memory_mib": 128, "disks_mib": [16]})
    assert r.status_code in (400, 404, 409) and "shared-1" in r.json()["error"]["message"], r.text

    # the folder is made the real one (mounted): host-3 now reads host-1's current token
    ag3.facts = with_proof("host-3", "tok-3", {"host-1": "tok-1", "host-2": "tok-2"})
    wait_for(lambda: shared_hosts(server) == ["host-1", "host-2", "host-3"], 10, "host-3 to share shared-1")
    assert len(not_shared_events(server)) == 1  # said once
    assert shared_1(server).unproven_on == []
    assert server.client.get("/hosts/host-3").json()["facts"]["unproven_datastores"] == []


def test_a_host_refused_across_a_token_rotation_is_linked_when_the_other_host_reports(
    server: ServerHarness, agents: AgentFactory
) -> None:
    """host-3 read host-1's file just after host-1 rotated its token, before host-1's report said so:
    refused at first, and linked as soon as host-1's report arrives (host-3 reports nothing new)."""
    ag1, a1 = agents("host-1", facts=with_proof("host-1", "tok-1", {}), stream=True)
    _, a3 = agents("host-3", facts=with_proof("host-3", "tok-3", {"host-1": "tok-1-new"}), stream=True)
    server.add_host(a1)
    server.add_host(a3)
    assert shared_hosts(server) == ["host-1"]
    rotated = with_proof("host-1", "tok-1-new", {"host-3": "tok-3"})
    for ds in rotated.datastores:
        if ds.proof is not None:
            ds.proof.previous = "tok-1"
    ag1.facts = rotated
    wait_for(lambda: shared_hosts(server) == ["host-1", "host-3"], 10, "host-3 to be linked")


ISCSI_2 = {"name": "iscsi-2", "portal": "10.213.3.2:3260", "target": "iqn.2026-12.io.vmshift:ds.t.iscsi-2",
           "storage_role": "http://10.213.3.2:8102", "token": "secret-token"}


def two_hosts(server: ServerHarness, agents: AgentFactory) -> tuple[FakeAgent, FakeAgent]:
    """host-1 and host-2 (polled fake agents) in the inventory."""
    ag1, a1 = agents("host-1")
    ag2, a2 = agents("host-2")
    server.add_host(a1)
    server.add_host(a2)
    return ag1, ag2


def test_datastore_add_registers_an_iscsi_target_on_every_host_or_none(
    server: ServerHarness, agents: AgentFactory
) -> None:
    """`vmshift datastore add NAME --iscsi PORTAL --target IQN`: all hosts get it, or, when one of
    them cannot reach the portal, none keeps it and the error says which portal from which host."""
    ag1, ag2 = two_hosts(server, agents)
    body = dict(ISCSI_2)
    ag2.dead_portals.add("10.213.3.99:3260")
    ag2.portal_timeout_s = 1.0  # host-1 is polled five times between its registration and the rollback
    r = server.client.post("/datastores", json={**body, "name": "iscsi-3", "portal": "10.213.3.99:3260"})
    assert r.status_code == 400, r.text
    assert "10.213.3.99:3260 does not answer from host host-2" in r.json()["error"]["message"], r.text
    assert ag1.unregistered == ["iscsi-3"], "host-1 registered it first: it must forget it again"
    assert "iscsi-3" not in [d["name"] for d in server.client.get("/datastores").json()]

    r = server.client.post("/datastores", json=body)
    assert r.status_code == 201, r.text
    ds = Datastore.model_validate(r.json())
    assert (ds.name, ds.kind.value, ds.hosts, ds.shared) == ("iscsi-2", "iscsi", ["host-1", "host-2"], True)
    again = server.client.post("/datastores", json=body)
    assert again.status_code == 409 and "already in the inventory" in again.json()["error"]["message"]
    r = server.client.post("/datastores", json={**body, "name": "iscsi-4", "hosts": ["host-9"]})
    assert r.status_code == 404 and "host-9" in r.json()["error"]["message"], r.text
    r = server.client.post("/datastores", json={**body, "name": "iscsi-4", "portal": "no port"})
    assert r.status_code == 422, r.text


def test_datastore_remove_is_refused_while_a_vm_is_on_it_and_says_which_host_kept_it(
    server: ServerHarness, agents: AgentFactory
) -> None:
    """`vmshift datastore remove NAME`: refused while a VM of the inventory is on it (nothing asked of
    the hosts); a host whose agent refuses keeps it and is named; then gone from every host."""
    ag1, ag2 = two_hosts(server, agents)
    body = dict(ISCSI_2)
    assert server.client.post("/datastores", json=body).status_code == 201
    for d in [*ag1.facts.datastores, *ag2.facts.datastores]:  # the kernel image the VM boots, as
        if d.name == "iscsi-2":  # `lab up` puts it on iscsi-1
            d.images.append("lab-guest")
    def images(host: str) -> list[str]:
        facts = server.client.get(f"/hosts/{host}").json()["facts"]
        return [i for d in facts["datastores"] if d["name"] == "iscsi-2" for i in d["images"]]

    wait_for(lambda: images("host-1") == images("host-2") == ["lab-guest"], 10, "the image on both hosts")
    r = server.client.post("/vms", json={"name": "db-1", "host": "host-1", "datastore": "iscsi-2",
                                         "memory_mib": 128, "disks_mib": [16]})
    assert r.status_code == 202, r.text
    assert server.wait_task(r.json()["id"])["state"] == "success"

    r = server.client.delete("/datastores/iscsi-2")
    assert r.status_code == 409 and "holds VM db-1" in r.json()["error"]["message"], r.text
    assert ag1.unregistered == ag2.unregistered == [], ("refused before any host was asked", r.text)

    r = server.client.delete("/vms/db-1")
    assert r.status_code == 202 and server.wait_task(r.json()["id"])["state"] == "success", r.text
    ag2.kept_datastores.add("iscsi-2")
    r = server.client.delete("/datastores/iscsi-2")
    assert r.status_code == 409, r.text
    said = r.json()["error"]["message"]
    assert "Host host-2 kept datastore 'iscsi-2'" in said and "removed from host-1" in said, said
    listed = {d["name"]: d for d in server.client.get("/datastores").json()}
    assert listed["iscsi-2"]["hosts"] == ["host-2"], listed

    ag2.kept_datastores.clear()
    result = CliRunner().invoke(app, [*server.cli_args(), "datastore", "remove", "iscsi-2"])
    assert result.exit_code == 0 and "Datastore iscsi-2 removed." in result.output, result.output
    assert ag1.unregistered == ag2.unregistered == ["iscsi-2"]
    assert "iscsi-2" not in [d["name"] for d in server.client.get("/datastores").json()]
    events = server.client.get("/events", params={"limit": 50}).json()
    assert any(e["kind"] == "datastore.removed" and e["target"] == "iscsi-2" for e in events), events
    r = server.client.delete("/datastores/iscsi-2")
    assert r.status_code == 404 and "not in the inventory" in r.json()["error"]["message"], r.text
