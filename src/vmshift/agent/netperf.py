"""Migration-link checks between two agents: a TCP sink on the target, a timed stream from the source.

Both ends bind to their host's migration address, so the number measures the vMotion network, not
the management one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from vmshift.errors import InvalidInputError
from vmshift.model.agent_migration import Measurement, Sink

log = logging.getLogger(__name__)
CHUNK = 256 * 1024
CONNECT_TIMEOUT_S = 3.0


class NetperfSinks:
    """Owner of the short-lived sink servers (each closes itself after its time)."""

    def __init__(self, migration_address: str) -> None:
        self.address = migration_address
        self._tasks: set[asyncio.Task[None]] = set()

    async def open(self, seconds: float) -> Sink:
        if not self.address:
            raise InvalidInputError("This host has no migration address to measure.",
                                    hint="Set 'migration_address' in the agent config.")

        async def drain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while await reader.read(CHUNK):
                    pass
            writer.close()

        server = await asyncio.start_server(drain, self.address, 0)
        port = int(server.sockets[0].getsockname()[1])

        async def close_later() -> None:
            try:
                await asyncio.sleep(seconds + CONNECT_TIMEOUT_S)
            finally:
                server.close()

        task = asyncio.create_task(close_later(), name=f"netperf-sink:{port}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return Sink(address=self.address, port=port)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def measure(local_address: str, address: str, port: int, seconds: float) -> Measurement:
    """Stream zeros to ``address:port`` for ``seconds`` from ``local_address``; bytes/s acknowledged."""
    local = (local_address, 0) if local_address else None
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(address, port, local_addr=local), timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return Measurement(reachable=False, error=f"cannot connect to {address}:{port} "
                                                  f"from {local_address or 'any address'}: {reason}")
    data = bytes(CHUNK)
    sent = 0
    start = time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            writer.write(data)
            await writer.drain()
            sent += len(data)
    except OSError as exc:
        return Measurement(reachable=True, error=f"the stream broke after {sent} bytes: {exc}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    elapsed = max(1e-6, time.monotonic() - start)
    return Measurement(reachable=True, bandwidth_bps=sent / elapsed)
