"""The agent's HTTPS (agent/tls_server.py) on loopback: client certificates are required and
verified, the verified peer reaches the route, and enrollment swaps the served certificate in place."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from vmshift.agent.config import AgentConfig
from vmshift.agent.tls_server import AgentTls, PeerH11Protocol
from vmshift.errors import InvalidInputError
from vmshift.tls import pki
from vmshift.tls.contexts import client_context, unverified_context
from vmshift.tls.files import ServerTlsFiles, write_private
from vmshift.tls.peer import peer_of


class Served:
    def __init__(self, tmp: Path) -> None:
        self.server_files = ServerTlsFiles.of(tmp / "server")
        self.server_files.ensure([])
        self.config = AgentConfig(name="host-1", listen="127.0.0.1:0", state_dir=tmp / "agent",
                                  ca_file=self.server_files.ca_cert)
        self.tls = AgentTls(self.config)
        app = FastAPI()

        @app.get("/who")
        async def who(request: Request) -> dict[str, Any]:
            peer = peer_of(request)
            return {"role": peer.role.value, "name": peer.name} if peer else {"role": None}

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        context = self.tls.context()
        config = uvicorn.Config(app, log_level="warning", http=PeerH11Protocol,
                                ssl_context_factory=lambda _c, _d: context)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.sock = sock

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/who"

    def get(self, verify: Any) -> tuple[dict[str, Any], str]:
        with httpx.Client(verify=verify, trust_env=False) as http:
            resp = http.get(self.url)
            der = resp.extensions["network_stream"].get_extra_info("ssl_object").getpeercert(True)
        return resp.json(), pki.fingerprint(der)

    def as_server(self) -> Any:
        f = self.server_files
        return unverified_context(cert=f.cert, key=f.key)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    yield s
    s.stop()


def test_the_verified_peer_reaches_the_route_and_strangers_are_refused(served: Served) -> None:
    body, fingerprint = served.get(served.as_server())
    assert body == {"role": "vmshift-server", "name": "vmshift-server"}
    bootstrap = pki.fingerprint(served.tls.files.bootstrap_cert.read_bytes())
    assert fingerprint == served.tls.fingerprint() == bootstrap
    with pytest.raises(httpx.HTTPError):  # no client certificate
        served.get(unverified_context())
    stranger = pki.issue_with_key(pki.create_ca(), common_name=pki.SERVER_NAME, role=pki.Role.SERVER, sans=[])
    write_private(served.config.state_dir / "x.pem", stranger.cert_pem)
    write_private(served.config.state_dir / "x-key.pem", stranger.key_pem)
    with pytest.raises(httpx.HTTPError):  # a certificate of another CA
        served.get(unverified_context(cert=served.config.state_dir / "x.pem",
                                      key=served.config.state_dir / "x-key.pem"))


def test_enrollment_swaps_the_served_certificate_in_place(served: Served) -> None:
    with pytest.raises(InvalidInputError, match="no pending"):
        served.tls.install(b"", b"")
    csr = served.tls.new_csr()
    ca = served.server_files.ca()
    cert = pki.issue(ca, csr, common_name="host-1", role=pki.Role.HOST, sans=["127.0.0.1"])
    with pytest.raises(InvalidInputError, match="not this agent's cluster CA"):
        served.tls.install(cert, pki.create_ca().cert_pem)
    got = served.tls.install(cert, ca.cert_pem)
    assert served.tls.files.enrolled and served.tls.status()["enrolled"]
    f = served.server_files
    body, fingerprint = served.get(client_context(f.ca_cert, cert=f.cert, key=f.key))  # verified now
    assert fingerprint == got.fingerprint == served.tls.fingerprint() and body["role"] == "vmshift-server"
    # the key never left: the agent's key file matches the served certificate, 0600
    assert (served.tls.files.key.stat().st_mode & 0o777) == 0o600
