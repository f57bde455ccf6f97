"""The agent routes one simulated host answers: what the server calls for enrollment and inventory.

Same paths, models and TLS as the real agent (agent/app.py, agent/routes_tls.py,
agent/tls_server.py): only the cluster's server may call (its certificate, verified in the TLS
handshake against the cluster CA). A silent host (``SimHost.loud`` cleared) keeps every connection
open and answers nothing until it is loud again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from pydantic import BaseModel, TypeAdapter, ValidationError

from vmshift.agent.routes_tls import CertificateRequest, IssuedCertificate, TlsStatus
from vmshift.agent.tls_server import AgentTls
from vmshift.client.agent import API_PREFIX, AgentHealth
from vmshift.errors import ApiError, InvalidInputError, NotFoundError
from vmshift.hostsim.fleet import SimHost
from vmshift.hostsim.http1 import Request, Response, Streaming, json_response
from vmshift.model.host_stream import KEEPALIVE_INTERVAL_S, STREAM_MEDIA_TYPE, STREAM_PATH, Keepalive, encode
from vmshift.model.vm import VmRuntime
from vmshift.tls.pki import Role

_RUNTIMES = TypeAdapter(list[VmRuntime])


def _model(model: BaseModel) -> Response:
    return Response(200, model.model_dump_json().encode())


class SimAgentApi:
    """Request handler of one simulated host (give ``handle`` to an ``HttpServer``)."""

    def __init__(self, host: SimHost, tls: AgentTls) -> None:
        self.host = host
        self.tls = tls
        self.requests = 0

    async def handle(self, req: Request) -> Response | Streaming:
        if req.peer is None or req.peer.role is not Role.SERVER:
            raise ApiError("Only the cluster's server may call this host.", status=403, code="forbidden",
                           hint="Present the server's certificate (the simulator speaks to the server only).")
        await self.host.loud.wait()
        self.requests += 1
        route = (req.method, req.path.removeprefix(API_PREFIX))
        now = time.monotonic()
        if route == ("GET", "/health"):
            return _model(AgentHealth(name=self.host.name, time=time.time()))
        if route == ("GET", "/facts"):
            return _model(self.host.facts())
        if route == ("GET", "/vms"):
            return Response(200, _RUNTIMES.dump_json(self.host.runtimes(now)))
        if route == ("GET", STREAM_PATH):
            return self._stream(req)
        if route == ("GET", "/tls"):
            return _model(TlsStatus.model_validate(self.tls.status()))
        if route == ("POST", "/tls/csr"):
            csr = await asyncio.to_thread(self.tls.new_csr)
            return _model(CertificateRequest(csr_pem=csr.decode()))
        if route == ("PUT", "/tls/cert"):
            return await self._install(req)
        raise NotFoundError(f"The simulated host has no route {req.method} {req.path}.",
                            hint="It serves /health, /facts, /vms, /stream and /tls only (docs/scale.md).")

    async def _install(self, req: Request) -> Response:
        try:
            body = IssuedCertificate.model_validate_json(req.body)
        except ValidationError as e:
            raise InvalidInputError("The certificate body is not valid.", hint=str(e).splitlines()[0]) from e
        got = await asyncio.to_thread(self.tls.install, body.cert_pem.encode(), body.ca_pem.encode())
        self.host.enrolled = True
        return json_response({"fingerprint": got.fingerprint, "not_after": got.not_after.isoformat()})

    def _stream(self, req: Request) -> Streaming:
        raw_since = req.query.get("since")
        if raw_since is not None and not raw_since.isdigit():
            raise InvalidInputError(f"since={raw_since!r} is not a change number.",
                                    hint="Pass the seq of the last change applied, or leave it out.")
        return Streaming(self._lines(req.query.get("epoch"), int(raw_since) if raw_since else None),
                         STREAM_MEDIA_TYPE)

    async def _lines(self, epoch: str | None, since: int | None) -> AsyncIterator[bytes]:
        """A snapshot (or the changes after ``since``), then each change, a keepalive each second."""
        host, loop = self.host, asyncio.get_running_loop()
        listener = host.listen()  # before reading the log: no change can fall between the two
        try:
            missed = host.log.since(epoch, since)
            if missed is None:
                first = host.snapshot(time.monotonic())
                sent = first.seq
                yield encode(first)
            else:
                sent = since or 0
                for change in missed:
                    sent = change.seq
                    yield encode(change)
            # changes already in the batch above may also be queued: skip them by number
            keepalive_at = loop.time() + KEEPALIVE_INTERVAL_S
            while True:
                item: tuple[int, bytes] | bool | None
                try:
                    item = await asyncio.wait_for(listener.queue.get(), max(0.0, keepalive_at - loop.time()))
                except TimeoutError:
                    item = False  # nothing changed: time for a keepalive
                await host.loud.wait()
                if item is None:
                    return  # cut: too far behind; the server reconnects and resumes
                if isinstance(item, tuple) and item[0] > sent:
                    sent = item[0]
                    yield item[1]
                if loop.time() >= keepalive_at:
                    yield encode(Keepalive(epoch=host.log.epoch, seq=sent, time=time.time()))
                    keepalive_at = loop.time() + KEEPALIVE_INTERVAL_S
        finally:
            host.unlisten(listener)
