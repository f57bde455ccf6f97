"""A load generator's HTTP/1.1 client: GETs over a pool of keep-alive TLS connections, on asyncio
streams.

Why not httpx, which the rest of the bench uses: at 200 requests/s httpx's async client took 35-75% of
a core here, on a machine whose other core runs the server under test. This client does only what
reading a JSON API needs (a request line and headers out; a status line, headers and a
``Content-Length`` body back) and costs a fraction of that, so the measured latency is the server's
and not the load generator's queue. It is not a general client: no redirects, no chunked bodies
(the server sends neither to a GET), no proxies.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlencode


class RawHttpError(Exception):
    """The server's answer was not HTTP/1.1 this client can read, or the connection broke."""


class _ClosedBeforeAnswer(Exception):
    """The connection ended before any byte of an answer."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


class RawHttpClient:
    def __init__(self, host: str, port: int, context: ssl.SSLContext, headers: dict[str, str],
                 max_connections: int) -> None:
        self._host, self._port, self._context = host, port, context
        self._headers = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **headers}.items())
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self, path: str, params: dict[str, object] | None = None) -> Answer:
        target = f"{path}?{urlencode(params)}" if params else path
        request = f"GET {target} HTTP/1.1\r\n{self._headers}\r\n".encode()
        async with self._slots:
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await self._open()
            try:
                return await self._exchange(conn, request, target)
            except _ClosedBeforeAnswer:
                if not reused:
                    raise RawHttpError(f"GET {target}: the server closed a new connection") from None
                # the server closed a kept-alive connection that sat idle (uvicorn: after 5 s) before
                # reading the request: what any client does, send it again on a new connection
                return await self._exchange(await self._open(), request, target)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_connection(self._host, self._port, ssl=self._context)
        except OSError as e:
            raise RawHttpError(f"connecting to {self._host}:{self._port}: {e}") from e

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes,
                        target: str) -> Answer:
        reader, writer = conn
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status, length, close = _parse_head(head)
            body = await reader.readexactly(length) if length else b""
        except asyncio.IncompleteReadError as e:
            writer.close()
            if not e.partial:
                raise _ClosedBeforeAnswer from e
            raise RawHttpError(f"GET {target}: the answer was cut: {e}") from e
        except (OSError, asyncio.LimitOverrunError, RawHttpError) as e:
            writer.close()
            raise RawHttpError(f"GET {target}: {type(e).__name__}: {e}") from e
        except BaseException:  # cancelled mid-answer: the connection's state is unknown
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self._idle.append(conn)
        return Answer(status, body)

    async def close(self) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    """(status, Content-Length, whether the server closes) of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise RawHttpError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding":
            raise RawHttpError("a chunked answer: this client reads Content-Length bodies only")
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    return int(parts[1]), length, close
