"""Who is calling: the verified TLS client certificate of the request's connection.

The agent's HTTP server (uvicorn) verifies client certificates against the cluster CA and puts the
peer's identity into the request's state under ``PEER_STATE_KEY`` (see the agent's TLS server);
route guards read it with ``peer_of``.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from vmshift.tls.pki import Role

PEER_STATE_KEY = "tls_peer"
CAPABILITY_HEADER = "X-Vmshift-Capability"


@dataclass(frozen=True)
class PeerIdentity:
    role: Role
    name: str  # the certificate's common name: "vmshift-server" or a host's name
    fingerprint: str


def peer_of(request: Request) -> PeerIdentity | None:
    peer = getattr(request.state, PEER_STATE_KEY, None)
    return peer if isinstance(peer, PeerIdentity) else None
