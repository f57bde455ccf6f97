"""The agent's host stream publisher (agent/host_stream.py) over plain data: what it publishes, what
a connection receives on a fresh start, a resume and a reader left behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from vmshift.agent.host_stream import HostStream
from vmshift.model.enums import Accelerator, PowerState
from vmshift.model.host import HostFacts
from vmshift.model.host_stream import (
    Keepalive,
    Snapshot,
    StatsReport,
    StreamCursor,
    Verdict,
    VmChanged,
    VmRemoved,
    decode,
)
from vmshift.model.vm import VmRuntime


class Host:
    def __init__(self) -> None:
        self.vms = {"a": VmRuntime(name="a", uuid="ua", power_state=PowerState.POWERED_ON, pid=1)}
        self.facts = HostFacts(name="h", cpu_vendor="v", cpu_model="m", cpus=2, qemu_version="10",
                               accelerator=Accelerator.TCG, memory_total_mib=100, memory_free_mib=50)

    async def list_vms(self) -> list[VmRuntime]:
        return [rt.model_copy() for rt in self.vms.values()]

    async def get_facts(self) -> HostFacts:
        return self.facts.model_copy()


Message = Snapshot | VmChanged | VmRemoved | StatsReport | Keepalive


async def _next(lines: AsyncGenerator[bytes, None]) -> Message:
    msg = decode(await asyncio.wait_for(anext(lines), 3.0))
    assert not isinstance(msg, Snapshot) or msg.facts.name == "h"
    return msg  # type: ignore[return-value]


async def test_snapshot_then_changes_then_keepalive() -> None:
    host = Host()
    stream = HostStream(host.list_vms, host.get_facts, stats_interval_s=3600)
    await stream.start()
    try:
        lines = stream.lines(None, None)
        snap = await _next(lines)
        assert isinstance(snap, Snapshot) and [v.name for v in snap.vms] == ["a"]
        cursor = StreamCursor()
        assert cursor.accept(snap) is Verdict.APPLY

        host.vms["a"].cpu_seconds = 5.0  # volatile only: no change
        host.vms["b"] = VmRuntime(name="b", uuid="ub", power_state=PowerState.PAUSED)
        stream.poke()
        changed = await _next(lines)
        assert isinstance(changed, VmChanged) and changed.vm.name == "b"
        assert cursor.accept(changed) is Verdict.APPLY

        del host.vms["a"]
        stream.poke()
        removed = await _next(lines)
        assert isinstance(removed, VmRemoved) and removed.name == "a"
        assert cursor.accept(removed) is Verdict.APPLY

        alive = await _next(lines)  # nothing changed for a second
        assert isinstance(alive, Keepalive) and alive.seq == removed.seq
        assert cursor.accept(alive) is Verdict.SKIP

        # a second connection resumes where the cursor stands: nothing to replay, a keepalive
        again = stream.lines(cursor.epoch, 1)
        replayed = await _next(again)
        assert isinstance(replayed, VmChanged) and replayed.seq == 2
        assert cursor.accept(replayed) is Verdict.SKIP  # already applied
        # and an unknown epoch gets a snapshot with the state after every change
        fresh = await _next(stream.lines("other", 3))
        assert isinstance(fresh, Snapshot) and [v.name for v in fresh.vms] == ["b"]
        assert fresh.seq == removed.seq
        await lines.aclose()
        await again.aclose()
    finally:
        await stream.close()


async def test_stats_and_end_streams() -> None:
    host = Host()
    stream = HostStream(host.list_vms, host.get_facts, stats_interval_s=1)
    await stream.start()
    try:
        lines = stream.lines(None, None)
        assert isinstance(await _next(lines), Snapshot)
        while not isinstance(msg := await _next(lines), StatsReport):
            assert isinstance(msg, Keepalive)
        assert [(v.name, v.cpu_seconds) for v in msg.vms] == [("a", 0.0)]
        assert msg.memory_free_mib == 50
        assert (msg.cpus, msg.memory_total_mib, msg.vms[0].cpu_cores) == (2, 100, 0.0)  # first look: no load
        await stream.end_streams()
        rest = [line async for line in lines]  # the generator ends instead of waiting forever
        assert all(isinstance(decode(x), StatsReport | Keepalive) for x in rest)
    finally:
        await stream.close()
