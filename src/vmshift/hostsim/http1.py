"""A small HTTP/1.1 server on asyncio streams: one per simulated host port, plus the control port.

Why not uvicorn + FastAPI per host: 96 of them in one process on two cores spend more CPU on the
framework than the server under test spends on the hosts, and the simulator's own cost would blur
the measurement. This serves exactly what the simulator needs: keep-alive requests with a
``Content-Length`` body, JSON answers, and chunked streaming answers (the host stream).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from vmshift.agent.tls_server import peer_identity
from vmshift.errors import VmshiftError
from vmshift.tls.peer import PeerIdentity

log = logging.getLogger("vmshift.hostsim.http")
MAX_HEAD = 16_384
MAX_BODY = 1_048_576
REASONS = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large",
           500: "Internal Server Error"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    peer: PeerIdentity | None

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"


@dataclass
class Streaming:
    """An answer of unknown length: each chunk is written (and flushed) as the iterator yields it."""

    chunks: AsyncIterator[bytes]
    content_type: str = "application/x-ndjson"
    status: int = 200


Handler = Callable[[Request], Awaitable[Response | Streaming]]


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data).encode())


def error_response(err: VmshiftError) -> Response:
    """The error body every vmshift HTTP API answers with (``ApiError.from_response`` reads it)."""
    return json_response({"error": {"code": err.code, "message": err.message, "hint": err.hint}}, err.status)


@dataclass
class HttpServer:
    """Serve ``handler`` on HOST:PORT (``port`` 0: a free one), over TLS when ``context`` is given."""

    handler: Handler
    host: str = "127.0.0.1"
    port: int = 0
    context: ssl.SSLContext | None = None
    connections: int = 0
    _server: asyncio.Server | None = field(default=None, repr=False)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set, repr=False)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, ssl=self.context,
                                                  limit=MAX_HEAD, backlog=512)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        peer = peer_identity(writer.get_extra_info("ssl_object"))
        try:
            while await self._one(reader, writer, peer):
                pass
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ssl.SSLError,
                TimeoutError):
            pass
        except asyncio.CancelledError:  # shutdown; not re-raised: asyncio 3.11 logs it as an error
            pass
        finally:
            self.connections -= 1
            self._writers.discard(writer)
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   peer: PeerIdentity | None) -> bool:
        """One request and its answer; False when the connection should end."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ", 2)
        except ValueError:
            return False
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        if length > MAX_BODY:
            await _write(writer, json_response({"error": {"code": "too_large", "message":
                                                          "The request body is too large."}}, 413), False)
            return False
        body = await reader.readexactly(length) if length else b""
        url = urlsplit(target)
        request = Request(method.upper(), url.path, dict(parse_qsl(url.query)), headers, body, peer)
        keep = headers.get("connection", "").lower() != "close"
        try:
            answer = await self.handler(request)
        except VmshiftError as e:
            answer = error_response(e)
        except Exception:  # a simulator bug: answer 500 and keep serving the other hosts
            log.exception("%s %s failed", method, url.path)
            answer = json_response({"error": {"code": "internal", "message": "The simulator failed."}}, 500)
        if isinstance(answer, Streaming):
            await _stream(writer, answer)
            return False
        await _write(writer, answer, keep)
        return keep


def _head(status: int, content_type: str, extra: str) -> bytes:
    return (f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\ncontent-type: {content_type}\r\n"
            f"{extra}\r\n").encode()


async def _write(writer: asyncio.StreamWriter, answer: Response, keep: bool) -> None:
    conn = "" if keep else "connection: close\r\n"
    writer.write(_head(answer.status, answer.content_type, f"content-length: {len(answer.body)}\r\n{conn}")
                 + answer.body)
    await writer.drain()


async def _stream(writer: asyncio.StreamWriter, answer: Streaming) -> None:
    writer.write(_head(answer.status, answer.content_type, "transfer-encoding: chunked\r\n"))
    try:
        async for chunk in answer.chunks:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    finally:
        aclose = getattr(answer.chunks, "aclose", None)
        if aclose is not None:
            await aclose()
