"""`POST /hosts` confirms the agent's certificate and issues it one; the server then talks to the
agent over verified mutual TLS (fake agents serve HTTPS like the real one, vmshift_fake_agent.py)."""

from __future__ import annotations

import httpx
import pytest
from conftest import AgentFactory, ServerHarness, wait_for
from vmshift_fake_agent import pem_files

from vmshift.tls import pki
from vmshift.tls.contexts import client_context
from vmshift.tls.files import ServerTlsFiles


def _nothing_registered(server: ServerHarness) -> None:
    assert server.client.get("/hosts").json() == []
    assert server.client.get("/datastores").json() == []
    assert server.client.get("/networks").json() == []


def test_without_a_fingerprint_409_shows_the_agents_and_registers_nothing(
    server: ServerHarness, agents: AgentFactory
) -> None:
    agent, thread = agents("host-1")
    r = server.client.post("/hosts", json={"address": thread.address})
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["fingerprint"] == agent.tls.bootstrap_fingerprint
    assert body["error"]["code"] == "fingerprint_unconfirmed"
    assert agent.tls.bootstrap_fingerprint in body["error"]["message"]
    assert "--fingerprint" in body["error"]["hint"]
    _nothing_registered(server)
    assert agent.tls.issued == [] and agent.tls.pending_key is None  # no CSR was even asked for


def test_a_wrong_fingerprint_is_409_and_registers_nothing(
    server: ServerHarness, agents: AgentFactory
) -> None:
    agent, thread = agents("host-1")
    wrong = pki.fingerprint(pki.self_signed("someone-else", ["127.0.0.1"]).cert_pem)
    r = server.client.post("/hosts", json={"address": thread.address, "fingerprint": wrong})
    assert r.status_code == 409, r.text
    assert r.json()["fingerprint"] == agent.tls.bootstrap_fingerprint
    assert "not the confirmed" in r.json()["error"]["message"]
    _nothing_registered(server)
    assert agent.tls.issued == []


def test_a_malformed_fingerprint_is_400(server: ServerHarness, agents: AgentFactory) -> None:
    _agent, thread = agents("host-1")
    r = server.client.post("/hosts", json={"address": thread.address, "fingerprint": "SHA256:nope"})
    assert r.status_code == 400 and "fingerprint" in r.json()["error"]["message"]
    _nothing_registered(server)


def _served(server: ServerHarness, address: str) -> pki.CertInfo:
    """The certificate the agent serves to the server (verified against the cluster CA)."""
    files = ServerTlsFiles.of(server.settings.state_dir)
    ctx = client_context(files.ca_cert, cert=files.cert, key=files.key)
    with httpx.Client(verify=ctx, trust_env=False) as http:
        resp = http.get(f"https://{address}/api/v1/health")
        assert resp.status_code == 200
        der = resp.extensions["network_stream"].get_extra_info("ssl_object").getpeercert(True)
    return pki.info_from_der(der)


def test_confirmed_host_gets_a_certificate_of_the_cluster_ca(
    server: ServerHarness, agents: AgentFactory
) -> None:
    agent, thread = agents("host-1")
    # the fingerprint is accepted in any usual spelling (lower case, no prefix)
    typed = agent.tls.bootstrap_fingerprint.removeprefix("SHA256:").lower()
    r = server.client.post("/hosts", json={"address": thread.address, "fingerprint": typed})
    assert r.status_code == 201, r.text
    host = r.json()
    assert agent.tls.issued == [host["cert_fingerprint"]] and host["cert_not_after"]
    assert server.client.get("/hosts/host-1").json()["cert_fingerprint"] == host["cert_fingerprint"]
    # the agent now serves the issued certificate: it verifies against the cluster CA for its address
    got = _served(server, thread.address)
    assert (got.role, got.common_name, got.fingerprint) == (pki.Role.HOST, "host-1", host["cert_fingerprint"])
    assert "127.0.0.1" in got.sans
    # ... and asks its callers for the server's certificate: without one the handshake fails
    files = ServerTlsFiles.of(server.settings.state_dir)
    with httpx.Client(verify=client_context(files.ca_cert), trust_env=False) as http, \
            pytest.raises(httpx.HTTPError):
        http.get(f"https://{thread.address}/api/v1/health")
    # the heartbeat reaches it over verified TLS
    before = server.client.get("/hosts/host-1").json()["last_heartbeat"]
    wait_for(lambda: server.client.get("/hosts/host-1").json()["last_heartbeat"] != before, 10, "a heartbeat")


def test_rotate_cert_issues_a_new_key_and_certificate(server: ServerHarness, agents: AgentFactory) -> None:
    agent, thread = agents("host-1")
    first = server.add_host(thread)["cert_fingerprint"]
    r = server.client.post("/hosts/host-1/rotate-cert")
    assert r.status_code == 200, r.text
    second = r.json()["cert_fingerprint"]
    assert second != first and agent.tls.issued == [first, second]
    assert server.client.get("/hosts/host-1").json()["cert_fingerprint"] == second
    assert _served(server, thread.address).fingerprint == second  # new connections get the new one
    kinds = [e["kind"] for e in server.client.get("/events?target=host-1").json()]
    assert "host.cert_rotated" in kinds
    assert server.client.post("/hosts/nope/rotate-cert").status_code == 404


def test_an_agent_serving_another_cas_certificate_is_not_trusted(
    server: ServerHarness, agents: AgentFactory
) -> None:
    agent, thread = agents("host-1")
    server.add_host(thread)
    other = pki.create_ca()
    forged = pki.issue_with_key(other, common_name="host-1", role=pki.Role.HOST, sans=["127.0.0.1"])
    with pem_files(forged.cert_pem, forged.key_pem) as (cert, key):
        agent.tls.context.load_cert_chain(cert, key)
    r = server.client.post("/hosts/host-1/rotate-cert")
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    assert "TLS check" in err["message"] and "cluster CA" in err["hint"]
    assert agent.tls.issued[1:] == []  # nothing was sent to the impostor
    wait_for(lambda: server.client.get("/hosts/host-1").json()["connection_state"] == "disconnected", 15,
             "the heartbeat to give up on the host")
