"""Inventory API: auth, defaults, hosts with their datastores and networks, IP pools."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
from conftest import AgentFactory, ServerHarness

from vmshift.model.api import Datastore, Host, Network


def test_every_call_needs_the_token(server: ServerHarness) -> None:
    base = str(server.client.base_url).rstrip("/")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        for method, path in (("GET", "/about"), ("GET", "/vms"), ("POST", "/hosts")):
            r = httpx.request(method, base + path, headers=headers, json={"address": "127.0.0.1:1"},
                              verify=server.tls())
            assert r.status_code == 401, (method, path, headers)
            err = r.json()["error"]
            assert err["code"] == "unauthorized" and err["message"].endswith(".") and err["hint"]
    assert server.client.get("/hosts").json() == []


def test_about_and_default_inventory(server: ServerHarness) -> None:
    about = server.client.get("/about").json()
    assert about["database"] in ("sqlite", "postgresql")
    assert server.settings.database_kind().value == about["database"]
    assert [d["name"] for d in server.client.get("/datacenters").json()] == ["Datacenter"]
    clusters = server.client.get("/clusters").json()
    assert [(c["name"], c["datacenter"]) for c in clusters] == [("Cluster", "Datacenter")]
    r = server.client.post("/clusters", json={"name": "Gold", "datacenter": "Nowhere"})
    assert r.status_code == 404 and "Datacenter" in r.json()["error"]["hint"]
    assert server.client.post("/clusters", json={"name": "Gold"}).status_code == 201
    assert server.client.post("/clusters", json={"name": "Gold"}).status_code == 409


def test_add_hosts_discovers_shared_datastore_and_networks(
    server: ServerHarness, agents: AgentFactory
) -> None:
    _, a1 = agents("host-1")
    _, a2 = agents("host-2")
    h1 = Host.model_validate(server.add_host(a1))
    assert h1.name == "host-1" and h1.connection_state.value == "connected" and h1.cluster == "Cluster"
    server.add_host(a2)
    stores = {d.name: d for d in map(Datastore.model_validate, server.client.get("/datastores").json())}
    assert set(stores) == {"shared-1", "local-host-1", "local-host-2"}
    assert stores["shared-1"].shared and stores["shared-1"].hosts == ["host-1", "host-2"]
    assert not stores["local-host-1"].shared and stores["local-host-1"].hosts == ["host-1"]
    nets = [Network.model_validate(n) for n in server.client.get("/networks").json()]
    assert [(n.name, n.hosts) for n in nets] == [("VM Network", {"host-1": "br0", "host-2": "br0"})]
    cluster = server.client.get("/clusters").json()[0]
    assert cluster["hosts"] == ["host-1", "host-2"] and cluster["cpu_baseline"] == "Opteron_G2-v1"
    # the same agent twice is refused
    r = server.client.post("/hosts", json={"address": a1.address})
    assert r.status_code == 409 and a1.address in r.json()["error"]["message"]


def test_hosts_added_at_once_share_their_datastore_and_network(
    server: ServerHarness, agents: AgentFactory
) -> None:
    """Six hosts added together (a script in parallel): each discovers the shared datastore and the
    network, in transactions that overlap now that the API's database work runs in threads; every add
    succeeds and each shared object exists once, announced once."""
    threads = [agents(f"host-{k}")[1] for k in range(1, 7)]
    with ThreadPoolExecutor(len(threads)) as pool:
        added = list(pool.map(server.add_host, threads))
    assert sorted(h["name"] for h in added) == [f"host-{k}" for k in range(1, 7)]
    stores = {d.name: d for d in map(Datastore.model_validate, server.client.get("/datastores").json())}
    assert stores["shared-1"].hosts == [f"host-{k}" for k in range(1, 7)]
    nets = [Network.model_validate(n) for n in server.client.get("/networks").json()]
    assert [n.name for n in nets] == ["VM Network"] and len(nets[0].hosts) == 6
    events = server.client.get("/events", params={"limit": 1000}).json()
    assert [e["target"] for e in events if e["kind"] == "datastore.added"].count("shared-1") == 1
    assert [e["target"] for e in events if e["kind"] == "network.added"] == ["VM Network"]


def test_unreachable_host_is_502_and_adds_nothing(server: ServerHarness) -> None:
    r = server.client.post("/hosts", json={"address": "127.0.0.1:9"})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "host_unreachable" and r.json()["error"]["hint"]
    assert server.client.get("/hosts").json() == []
    assert server.client.get("/datastores").json() == []


def test_bad_host_address_names_the_field(server: ServerHarness) -> None:
    r = server.client.post("/hosts", json={"address": "no-port"})
    assert r.status_code == 422
    assert "'address'" in r.json()["error"]["message"]


def test_maintenance_and_ip_pool(server: ServerHarness, agents: AgentFactory) -> None:
    _, a1 = agents("host-1")
    server.add_host(a1)
    r = server.client.post("/hosts/host-1/maintenance", json={"enter": True})
    assert r.status_code == 200 and r.json()["maintenance"] is True
    pool = {"cidr": "10.213.2.0/24", "first": "10.213.2.100", "last": "10.213.2.199"}
    r = server.client.put("/networks/VM Network/ip-pool", json=pool)
    assert r.status_code == 200 and r.json()["ip_pool"] == pool
    bad = {"cidr": "10.213.2.0/24", "first": "10.213.3.1", "last": "10.213.2.199"}
    r = server.client.put("/networks/VM Network/ip-pool", json=bad)
    assert r.status_code == 422 and "not inside" in r.json()["error"]["message"]
    assert server.client.get("/networks").json()[0]["ip_pool"] == pool
    r = server.client.put("/networks/Nope/ip-pool", json=pool)
    assert r.status_code == 404 and "VM Network" in r.json()["error"]["hint"]
    kinds = {e["kind"] for e in server.client.get("/events").json()}
    assert {"host.added", "host.maintenance", "network.pool_set", "datastore.added"} <= kinds
