"""One host's connection to the server: its stream of changes, or polls for an agent that cannot stream.

The listener holds ``GET /stream`` open (model/host_stream.py), keeps its ``StreamCursor`` across
reconnects, folds each message the cursor accepts into the host's report (server/host_report.py) and
hands the database a batch of them every ``BATCH_S`` (server/host_writes.py, in a thread). It never
decides connection loss itself: the heartbeat's watchdog compares ``last_heard`` with the silence
limit, so a host is shown disconnected within that limit whatever the TCP connection does.

An agent that answers 404 on /stream (an older one) is polled every heartbeat interval as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from vmshift.client.agent import AgentPool
from vmshift.errors import StreamUnsupportedError, VmshiftError
from vmshift.model.api import HostStream, StreamMode
from vmshift.model.host_stream import (
    KEEPALIVE_INTERVAL_S,
    Keepalive,
    Snapshot,
    StreamCursor,
    Verdict,
    VmChanged,
)
from vmshift.server.host_report import HostReport
from vmshift.server.host_writes import Batch, write_batch, write_disconnected, write_polled
from vmshift.server.tasks import TaskEngine
from vmshift.server.withheld_datastores import WithheldDatastores

log = logging.getLogger("vmshift.server.host_listener")

BATCH_S = 0.1  # messages of one host written in one transaction per this period
BACKOFF_S = (0.1, 0.25, 0.5, 1.0)  # waits between failed connects (the last one repeats)
# How stale a streamed report may be when it arrives: an agent's look at its VMs that began before a
# task acted may be sent after the task ended. A task that ended after a message's arrival less this
# owns the VM's state (as one that ended after a poll began does); what it held back is offered again.
REPORT_LAG_S = 0.5
# The cluster-wide reconcile is stricter (it may pause a VM): a change no request caused (a migration
# completing in QEMU) is noticed at the agent's next look, within a keepalive interval, then sent.
RECONCILE_LAG_S = KEEPALIVE_INTERVAL_S + REPORT_LAG_S


@dataclass(frozen=True)
class ListenerContext:
    """What every listener shares (the heartbeat builds it)."""

    sessions: sessionmaker[Session]
    agents: AgentPool
    tasks: TaskEngine
    run_db: Callable[..., Awaitable[Any]]  # runs a blocking function in the heartbeat's thread pool
    poll_interval_s: float
    missed_polls: int  # polls missed until a polled host is disconnected
    silence_s: float  # a stream silent this long: the host is disconnected
    changed: Callable[[bool], None]  # the VMs a host reports changed; True: reconcile without delay
    withheld: WithheldDatastores  # datastores an add or remove owns: reports leave them as they are


class HostListener:
    def __init__(self, ctx: ListenerContext, name: str, address: str) -> None:
        self.ctx = ctx
        self.name = name
        self.address = address
        self.report = HostReport()
        self.cursor = StreamCursor()
        self.mode = StreamMode.STREAM
        self.reconnects = 0
        self.live = False  # the report is complete and current (in sync with the agent)
        self.connected: bool | None = None  # as last written; None: not known yet
        self.last_heard = asyncio.get_running_loop().time()
        self._pending = Batch(name)
        self._wake = asyncio.Event()
        self._db_lock = asyncio.Lock()  # this host's writes in order (the pool has several threads)
        self._deferred: set[str] = set()  # VMs whose reported change a task's work made wait
        self._task: asyncio.Task[None] | None = None

    # ----- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"vmshift-host-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def view(self) -> HostStream:
        return HostStream(mode=self.mode, epoch=self.cursor.epoch, seq=self.cursor.seq,
                          reconnects=self.reconnects, live=self.live)  # fmt: skip

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._flush_loop())
            group.create_task(self._listen())

    @property
    def current_as_of(self) -> float:
        """The loop time up to which the report is known to be current, for the cluster-wide reconcile
        (a task that ended later may not show in it yet)."""
        return self.last_heard - (RECONCILE_LAG_S if self.mode is StreamMode.STREAM else 0.0)

    async def _write(self, fn: Callable[..., object], *args: Any) -> None:
        async with self._db_lock:
            await self.ctx.run_db(fn, *args)

    # ----- connection state (the heartbeat's watchdog calls ``check_silence``) ---------------------
    def _heard(self) -> None:
        self.last_heard = asyncio.get_running_loop().time()
        if self.connected is not True:
            self.connected = True
            self._pending.connected = True
            self._wake.set()

    async def check_silence(self, now: float) -> None:
        if self.mode is StreamMode.STREAM and now - self.last_heard >= self.ctx.silence_s:
            await self._lost(f"its stream was silent for {now - self.last_heard:.1f} s")

    async def _lost(self, why: str) -> None:
        self.live = False
        if self.connected is not False:
            self.connected = False
            try:
                await self._write(write_disconnected, self.ctx.sessions, self.name, why)
            except Exception:
                self.connected = None  # the next look tries again
                raise

    # ----- the stream -----------------------------------------------------------------------------
    async def _listen(self) -> None:
        failures = 0
        while True:
            try:
                await self._stream_once()
                self.live, failures = False, 0  # a resync, or the agent ended it: reconnect at once
            except StreamUnsupportedError as e:
                await self._poll_forever(e.message)
                return
            except VmshiftError as e:
                log.debug("stream of host %s broke: %s", self.name, e.message)
                self.live = False
                await asyncio.sleep(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])
                failures += 1
            except Exception:  # a bug must not leave the host unheard for good
                log.exception("the stream of host %s failed", self.name)
                self.live = False
                await asyncio.sleep(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])
                failures += 1
            self.reconnects += 1

    async def _stream_once(self) -> None:
        """One connection, until it breaks (raises) or the cursor asks for a resync (returns)."""
        client = self.ctx.agents.get(self.address)
        resuming = self.cursor.epoch is not None
        async for message in client.stream(self.cursor.resume_params(), silence_s=self.ctx.silence_s):
            self._heard()
            verdict = self.cursor.accept(message)
            if verdict is Verdict.RESYNC:
                self.live = False
                return
            if isinstance(message, Keepalive):
                self.live = True  # everything up to its number is applied: the report is current
                continue
            if verdict is Verdict.SKIP:
                continue
            if isinstance(message, Snapshot):
                self.live = True
                if resuming:
                    self._pending.resynced = "the changes since its last one could not be resumed"
            resuming = False
            self._add(message)

    def _add(self, message: Any) -> None:
        as_of = asyncio.get_running_loop().time() - REPORT_LAG_S
        if self.report.apply(message):
            self.ctx.changed(False)
        self._pending.items.append((as_of, message))
        self._wake.set()

    def recheck_deferred(self) -> None:
        """Offer the VMs a task kept busy their current report again (the heartbeat calls this each
        interval): a change is streamed once, so one left alone during a task is adopted after it."""
        if not self._deferred or self.mode is not StreamMode.STREAM or not self.live:
            return
        as_of = asyncio.get_running_loop().time() - REPORT_LAG_S
        for name in sorted(self._deferred):
            rt = self.report.vms.get(name)
            if rt is not None:
                again = VmChanged(epoch=self.cursor.epoch or "", seq=self.cursor.seq, vm=rt)
                self._pending.items.append((as_of, again))
        self._deferred.clear()
        self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(BATCH_S)
            self._wake.clear()
            batch, self._pending = self._pending, Batch(self.name)
            if not batch:
                continue
            try:
                async with self._db_lock:
                    ctx = self.ctx
                    self._deferred |= await ctx.run_db(write_batch, ctx.sessions, ctx.tasks, batch,
                                                       ctx.withheld)
            except Exception:  # e.g. the database is busy: keep the batch, in order, and try again
                log.exception("writing what host %s reported failed; retrying", self.name)
                self._pending.items[:0] = batch.items
                self._pending.connected |= batch.connected
                self._pending.resynced = self._pending.resynced or batch.resynced
                self._wake.set()
                await asyncio.sleep(BACKOFF_S[-1])

    # ----- the fallback: polls --------------------------------------------------------------------
    async def _poll_forever(self, why: str) -> None:
        self.mode, self.live = StreamMode.POLLING, False
        await self._write(write_polled, self.ctx.sessions, self.name, why)
        loop = asyncio.get_running_loop()
        missed = 0
        while True:
            started = loop.time()
            try:
                if await self._poll(started):
                    missed = 0
                else:
                    missed += 1
                    self.live = False
                    if missed >= self.ctx.missed_polls:
                        await self._lost(f"{missed} heartbeats missed")
            except Exception:  # a bug in one poll must not stop the polls
                log.exception("polling host %s failed", self.name)
            await asyncio.sleep(max(0.05, self.ctx.poll_interval_s - (loop.time() - started)))

    async def _poll(self, polled_at: float) -> bool:
        client = self.ctx.agents.get(self.address)
        timeout = max(0.5, self.ctx.poll_interval_s * 0.9)
        try:
            await client.health(timeout_s=timeout)
            runtimes = await client.list_vms(timeout_s=timeout)
            facts = await client.facts()
        except VmshiftError:
            return False
        self.last_heard = polled_at
        report = Snapshot(epoch="poll", seq=0, facts=facts, vms=runtimes)
        changed = self.report.apply(report)
        batch = Batch(self.name, [(polled_at, report)], connected=True)
        self.connected = True
        await self._write(write_batch, self.ctx.sessions, self.ctx.tasks, batch, self.ctx.withheld)
        self.live = True
        if changed:
            self.ctx.changed(True)
        return True
