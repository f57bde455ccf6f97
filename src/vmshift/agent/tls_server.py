"""The agent's HTTPS: mutual TLS against the cluster CA, the caller's certificate handed to routes.

On first start the agent makes a self-signed bootstrap certificate and serves it until the server
issued it one (``vmshift host add``: the operator confirms the bootstrap fingerprint, the server
signs the agent's CSR); from then on it serves ``host.pem``. Every client must present a certificate
of the cluster CA (``ca_file`` in the agent config): the TLS handshake refuses anyone else before a
byte of HTTP is read. ``PeerH11Protocol`` puts the verified certificate's identity into each
request's state (``vmshift.tls.peer.peer_of``), where agent/guard.py decides what it may call.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from vmshift.agent.config import AgentConfig
from vmshift.errors import InvalidInputError
from vmshift.tls import pki
from vmshift.tls.contexts import server_context
from vmshift.tls.files import HostTlsFiles
from vmshift.tls.peer import PEER_STATE_KEY, PeerIdentity

log = logging.getLogger(__name__)


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerIdentity | None:
    """The verified client certificate of a connection as a PeerIdentity (None: no certificate,
    or one without a vmshift role)."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None
    cert = pki.info_from_der(der)
    if cert.role is None:
        return None
    return PeerIdentity(role=cert.role, name=cert.common_name, fingerprint=cert.fingerprint)


class PeerH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with the connection's TLS peer in every request's ``state``
    (uvicorn copies ``app_state`` into each request's scope; this connection gets its own copy)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = peer_identity(transport.get_extra_info("ssl_object"))
        self.app_state = {**self.app_state, PEER_STATE_KEY: peer}


class AgentTls:
    """The agent's certificates and the one serving context, reloaded in place after enrollment."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.files = HostTlsFiles.of(config.state_dir)
        self._pending_key: bytes | None = None  # the key of the last CSR; never leaves this process
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None

    def addresses(self) -> list[str]:
        names = [self.config.name, self.config.listen_host, self.config.management_address,
                 self.config.migration_address]
        return [n for n in dict.fromkeys(names) if n and n not in ("0.0.0.0", "::")]

    def ensure_bootstrap(self) -> None:
        self.files.ensure_bootstrap(self.config.name, self.addresses())

    @property
    def ca_file(self) -> Path:
        return self.config.ca_file

    def context(self) -> ssl.SSLContext:
        """The serving context (built once): client certificates required, from the cluster CA."""
        if self._context is None:
            if not self.ca_file.is_file():
                raise InvalidInputError(f"The cluster CA file {self.ca_file} does not exist.",
                                        hint="Copy the server's CA there ('vmshift-server ca show').")
            self.ensure_bootstrap()
            cert, key = self.files.serving()
            self._context = server_context(cert, key, client_ca=self.ca_file, require_client_cert=True)
        return self._context

    def serving_cert(self) -> bytes:
        self.ensure_bootstrap()
        cert, _ = self.files.serving()
        return cert.read_bytes()

    def fingerprint(self) -> str:
        return pki.fingerprint(self.serving_cert())

    def status(self) -> dict[str, Any]:
        info = pki.info(self.serving_cert())
        return {"fingerprint": info.fingerprint, "enrolled": self.files.enrolled,
                "not_after": info.not_after.isoformat(), "common_name": info.common_name,
                "role": info.role.value if info.role else None}

    def new_csr(self) -> bytes:
        """A new key (kept here until its certificate arrives) and its CSR."""
        pair = pki.make_key_and_csr(self.config.name)
        with self._lock:
            self._pending_key = pair.key_pem
        return pair.cert_pem

    def install(self, cert_pem: bytes, ca_pem: bytes) -> pki.CertInfo:
        """Check the issued certificate against the pending key and the configured CA, keep it and
        serve it to every new connection (the running context is reloaded in place)."""
        with self._lock:
            key = self._pending_key
            if key is None:
                raise InvalidInputError("This agent has no pending certificate request.",
                                        hint="Ask for a CSR first (POST /api/v1/tls/csr).")
            if ca_pem.strip() != self.ca_file.read_bytes().strip():
                raise InvalidInputError("The CA sent with the certificate is not this agent's cluster CA.",
                                        hint=f"The agent trusts only {self.ca_file}.")
            got = pki.check_issued(cert_pem, key, ca_pem, common_name=self.config.name)
            self.files.install(cert_pem, key, ca_pem)
            self._pending_key = None
            if self._context is not None:
                self._context.load_cert_chain(self.files.cert, self.files.key)
        log.info("serving the certificate the cluster CA issued (%s, until %s)", got.fingerprint,
                 got.not_after.isoformat())
        return got


class AgentServer(uvicorn.Server):
    """uvicorn, calling ``before_shutdown`` first when it shuts down: it waits for open responses
    before the app's own shutdown, and a host stream never ends by itself."""

    def __init__(self, config: uvicorn.Config, before_shutdown: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._before_shutdown = before_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self._before_shutdown()
        await super().shutdown(sockets)


def serve(app: Any, config: AgentConfig, tls: AgentTls, log_level: str,
          before_shutdown: Callable[[], Awaitable[None]]) -> None:
    """Run uvicorn over HTTPS with the agent's reloadable context until SIGTERM/SIGINT."""
    context = tls.context()
    uv = uvicorn.Config(app, host=config.listen_host, port=config.listen_port, log_level=log_level,
                        access_log=False, timeout_graceful_shutdown=5, http=PeerH11Protocol, loop="asyncio",
                        ssl_context_factory=lambda _config, _default: context)
    AgentServer(uv, before_shutdown).run()
