"""A typed QMP session over ``qemu.qmp.QMPClient``.

QMP failures are translated into ``vmshift.errors.QemuError`` (the original exception stays in
``__cause__``). Asynchronous QMP events are drained by a background task owned by the session, so
the client's queue never grows; the most recent ones stay readable in ``recent_events``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError, Runstate

from vmshift.errors import QemuError
from vmshift.model.enums import QemuRunState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QmpEvent:
    name: str
    data: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0  # QEMU's timestamp (epoch seconds, microsecond resolution)
    seq: int = 0  # 1, 2, ... in the order this session (and the sessions it replaced) received them


@dataclass(frozen=True)
class QmpStatus:
    status: str
    running: bool

    @property
    def state(self) -> QemuRunState | None:
        """The run state as an enum (None for a state newer than vmshift's list)."""
        try:
            return QemuRunState(self.status)
        except ValueError:
            return None


def _event_time(stamp: object) -> float:
    """QMP's ``{"seconds": S, "microseconds": U}`` as epoch seconds (now if absent)."""
    if isinstance(stamp, dict):
        seconds, micros = stamp.get("seconds"), stamp.get("microseconds", 0)
        if isinstance(seconds, int | float) and isinstance(micros, int | float):
            return float(seconds) + float(micros) / 1e6
    return time.time()


class QmpSession:
    """One connected QMP session to one QEMU. Create it with :meth:`connect`."""

    def __init__(self, client: QMPClient, socket_path: Path, keep_events: int = 200) -> None:
        self._client = client
        self.socket_path = socket_path
        self.recent_events: deque[QmpEvent] = deque(maxlen=keep_events)
        self.last_seq = 0
        self._event_seen = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = asyncio.create_task(
            self._drain_events(), name=f"qmp-events:{socket_path}"
        )

    @classmethod
    async def connect(cls, socket_path: Path, *, timeout_s: float = 5.0, name: str = "vmshift") -> QmpSession:
        """Connect and negotiate; retry until ``timeout_s`` while the socket does not accept yet."""
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while True:
            client = QMPClient(name)
            try:
                remaining = max(0.1, deadline - time.monotonic())
                await asyncio.wait_for(client.connect(str(socket_path)), timeout=remaining)
                return cls(client, socket_path)
            except (QMPError, OSError, TimeoutError) as exc:
                last_error = exc
                with contextlib.suppress(Exception):
                    await client.disconnect()
            if time.monotonic() >= deadline:
                raise QemuError(
                    f"Could not connect to QEMU's QMP socket {socket_path} within {timeout_s:g} s.",
                    hint="Check that QEMU is running; its log is in the VM's state directory.",
                ) from last_error
            await asyncio.sleep(0.05)

    @property
    def connected(self) -> bool:
        return self._drain_task is not None and self._client.runstate is Runstate.RUNNING

    async def _drain_events(self) -> None:
        async for msg in self._client.events:
            data = msg.get("data")
            self.last_seq += 1
            event = QmpEvent(
                name=str(msg.get("event", "")),
                data=dict(data) if isinstance(data, dict) else {},
                time=_event_time(msg.get("timestamp")),
                seq=self.last_seq,
            )
            self.recent_events.append(event)
            self._event_seen.set()

    def adopt_events(self, old: QmpSession) -> None:
        """Keep the events of the session this one replaces (after a reconnect), numbering on."""
        self.recent_events.extend(old.recent_events)
        self.last_seq = max(self.last_seq, old.last_seq)

    def events_named(self, *names: str) -> list[QmpEvent]:
        return [e for e in self.recent_events if e.name in names]

    async def wait_event(self, *names: str, timeout_s: float, after_seq: int = 0) -> QmpEvent | None:
        """Wait until an event in ``names`` with ``seq > after_seq`` arrives; None at the timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            for event in list(self.recent_events):
                if event.seq > after_seq and event.name in names:
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._event_seen.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):  # not wait_for: it may swallow a cancel (3.11)
                    await self._event_seen.wait()

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run one QMP command; a non-dict return value is wrapped as ``{"return": value}``."""
        try:
            result = await self._client.execute(cmd, args)
        except ExecuteError as exc:
            raise QemuError(
                f"QEMU refused the QMP command {cmd!r}: {exc}",
                hint="Check the command's arguments against the QEMU version in use.",
            ) from exc
        except (QMPError, OSError, EOFError) as exc:
            raise QemuError(
                f"The QMP command {cmd!r} failed because the connection to QEMU broke ({exc}).",
                hint="QEMU may have exited; look at the VM's QEMU log.",
            ) from exc
        if isinstance(result, dict):
            return result
        return {"return": result}

    async def query_status(self) -> QmpStatus:
        reply = await self.execute("query-status")
        return QmpStatus(status=str(reply.get("status", "")), running=bool(reply.get("running", False)))

    async def cont(self) -> None:
        await self.execute("cont")

    async def stop(self) -> None:
        await self.execute("stop")

    async def system_powerdown(self) -> None:
        await self.execute("system_powerdown")

    async def system_reset(self) -> None:
        await self.execute("system_reset")

    async def quit(self) -> None:
        """Ask QEMU to exit; the connection dropping while it does so is not an error."""
        with contextlib.suppress(QemuError):
            await self.execute("quit")

    async def close(self) -> None:
        task, self._drain_task = self._drain_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self._client.disconnect()
