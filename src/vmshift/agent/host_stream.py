"""The agent's half of the host stream (model/host_stream.py): notice what changed, number it, send it.

The agent looks at its VMs each ``SCAN_INTERVAL_S`` (and at once when a route changed one: ``poke``),
at its facts each ``FACTS_INTERVAL_S``, and reports the volatile numbers each ``stats_interval_s``. A
change is published only when ``vm_state`` / ``facts_state`` differ from what was last published, so an
idle host sends nothing but keepalives.

What was last published (``_runtimes``, ``_facts``) and the change log's last number move together,
with no ``await`` between them, so a snapshot built from them is exactly the state after its ``seq``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from vmshift.model.host import HostFacts
from vmshift.model.host_stream import (
    KEEPALIVE_INTERVAL_S,
    Change,
    ChangeLog,
    FactsChanged,
    Keepalive,
    Snapshot,
    StatsReport,
    VmChanged,
    VmRemoved,
    VmStats,
    encode,
    facts_state,
    vm_state,
)
from vmshift.model.load import CpuMeter
from vmshift.model.vm import VmRuntime

log = logging.getLogger("vmshift.agent.stream")

SCAN_INTERVAL_S = 1.0  # how often VM states are compared without a poke
FACTS_INTERVAL_S = 5.0  # how often facts are recomputed (a datastore or network may come and go)


class HostStream:
    """Owns one background task (``start`` / ``close``); ``lines`` serves one stream connection."""

    def __init__(
        self,
        list_vms: Callable[[], Awaitable[list[VmRuntime]]],
        facts: Callable[[], Awaitable[HostFacts]],
        stats_interval_s: float,
    ) -> None:
        self._list_vms = list_vms
        self._get_facts = facts
        self._stats_interval_s = stats_interval_s
        self.log = ChangeLog(epoch=secrets.token_hex(8))
        self._runtimes: dict[str, VmRuntime] = {}
        self._states: dict[str, dict[str, Any]] = {}
        self._facts: HostFacts | None = None
        self._facts_state: dict[str, Any] | None = None
        self._poke = asyncio.Event()
        self._published = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._ending = False
        self._scan_lock = asyncio.Lock()
        self._cpu = CpuMeter()

    async def start(self) -> None:
        """Take the first look (the state a first snapshot shows), then watch for changes."""
        await self._scan_facts()
        await self._scan_vms()
        self._task = asyncio.create_task(self._loop(), name="agent-host-stream")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def end_streams(self) -> None:
        """The agent stops: end every open stream now (uvicorn waits for open responses before it
        shuts the app down; the server reconnects to the next agent and resumes)."""
        self._ending = True
        await self._notify()

    def poke(self) -> None:
        """A route changed a VM: look now rather than at the next scan."""
        self._poke.set()

    # ----- watching ---------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_facts = loop.time() + FACTS_INTERVAL_S
        next_stats = loop.time() + self._stats_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), SCAN_INTERVAL_S)
            self._poke.clear()
            try:
                await self._scan_vms()
                now = loop.time()
                if now >= next_facts:
                    next_facts = now + FACTS_INTERVAL_S
                    await self._scan_facts()
                if now >= next_stats:
                    next_stats = now + self._stats_interval_s
                    await self._publish_stats()
            except Exception:  # one bad look must not end the stream for good
                log.exception("looking for changes failed")

    async def look_now(self) -> None:
        """Publish the VMs' states before going on (a source agent, before it hands its VM to the
        target: the server then hears of the source's stop first, and sees no duplicate)."""
        await self._scan_vms()

    async def _scan_vms(self) -> None:
        async with self._scan_lock:  # two looks at once could publish an older state last
            await self._scan_vms_locked()

    async def _scan_vms_locked(self) -> None:
        runtimes = {rt.name: rt for rt in await self._list_vms()}
        changes: list[Change] = []
        for name, rt in runtimes.items():
            state = vm_state(rt)
            if self._states.get(name) != state:
                self._states[name] = state
                changes.append(VmChanged(epoch=self.log.epoch, seq=self.log.next_seq(), vm=rt))
                self.log.append(changes[-1])
        for name in sorted(set(self._states) - set(runtimes)):
            del self._states[name]
            changes.append(VmRemoved(epoch=self.log.epoch, seq=self.log.next_seq(), name=name))
            self.log.append(changes[-1])
        self._runtimes = runtimes
        if changes:
            await self._notify()

    async def _scan_facts(self) -> None:
        facts = await self._get_facts()
        state = facts_state(facts)
        changed = self._facts_state is not None and state != self._facts_state
        self._facts, self._facts_state = facts, state
        if changed:
            self.log.append(FactsChanged(epoch=self.log.epoch, seq=self.log.next_seq(), facts=facts))
            await self._notify()

    async def _publish_stats(self) -> None:
        if self._facts is None:
            return
        now = time.time()
        running = [rt for rt in self._runtimes.values() if rt.has_qemu]
        self._cpu.forget_all_but({rt.name for rt in running})
        report = StatsReport(
            epoch=self.log.epoch,
            seq=self.log.next_seq(),
            vms=[VmStats(name=rt.name, cpu_seconds=rt.cpu_seconds, rss_mib=rt.rss_mib,
                         cpu_cores=self._cpu.read(rt.name, rt.pid, rt.cpu_seconds, now))
                 for rt in running],
            memory_free_mib=self._facts.memory_free_mib,
            datastore_free_mib={ds.uuid: ds.free_mib for ds in self._facts.datastores},
            cpus=self._facts.cpus,
            memory_total_mib=self._facts.memory_total_mib,
            time=now,
        )
        self.log.append(report)
        await self._notify()

    async def _notify(self) -> None:
        async with self._published:
            self._published.notify_all()

    async def _wait_past(self, seq: int) -> None:
        """Until a change after ``seq`` is published, the streams end, or a keepalive is due."""
        async with self._published:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._published.wait_for(lambda: self.log.last_seq != seq or self._ending),
                    KEEPALIVE_INTERVAL_S,
                )

    # ----- serving ----------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        assert self._facts is not None, "start() takes the first look"
        return Snapshot(epoch=self.log.epoch, seq=self.log.last_seq, facts=self._facts,
                        vms=list(self._runtimes.values()))

    async def lines(self, epoch: str | None, since: int | None) -> AsyncGenerator[bytes, None]:
        """One connection: the changes after ``since`` of ``epoch`` if the log still holds them, else
        a snapshot; then each change as it is published, and a keepalive whenever a second passed
        without one."""
        backlog = self.log.since(epoch, since)
        if backlog is None:
            snap = self.snapshot()
            position = snap.seq
            yield encode(snap)
        else:
            position = since if since is not None else 0
        while not self._ending:
            if backlog is None:
                backlog = self.log.since(self.log.epoch, position)
                if backlog is None:  # this reader fell further behind than the log holds
                    snap = self.snapshot()
                    position = snap.seq
                    yield encode(snap)
                    backlog = []
            for change in backlog:
                position = change.seq
                yield encode(change)
            backlog = None
            if self.log.last_seq == position:
                await self._wait_past(position)
                if self.log.last_seq == position and not self._ending:
                    yield encode(Keepalive(epoch=self.log.epoch, seq=position, time=time.time()))
