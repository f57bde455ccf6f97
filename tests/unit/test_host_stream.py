"""The host stream's sequence logic (model/host_stream.py): every change applied once, in order,
across cuts, resumes, dropped history and agent restarts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vmshift.model.enums import Accelerator, PowerState
from vmshift.model.host import HostFacts
from vmshift.model.host_stream import (
    ChangeLog,
    Keepalive,
    Snapshot,
    StreamCursor,
    Verdict,
    VmChanged,
    VmRemoved,
    contiguous,
    decode,
    encode,
    facts_state,
    vm_state,
)
from vmshift.model.vm import VmRuntime


def _facts() -> HostFacts:
    return HostFacts(name="host-1", cpu_vendor="x", cpu_model="y", cpus=2, qemu_version="10.0.2",
                     accelerator=Accelerator.TCG, memory_total_mib=1024, memory_free_mib=512)


def _rt(name: str, state: PowerState = PowerState.POWERED_ON) -> VmRuntime:
    return VmRuntime(name=name, uuid=f"uuid-{name}", power_state=state)


def _change(log: ChangeLog, name: str) -> VmChanged:
    c = VmChanged(epoch=log.epoch, seq=log.next_seq(), vm=_rt(name))
    log.append(c)
    return c


def test_wire_round_trip() -> None:
    msgs = [Snapshot(epoch="e", seq=0, facts=_facts(), vms=[_rt("a")]),
            VmChanged(epoch="e", seq=1, vm=_rt("a", PowerState.PAUSED)),
            VmRemoved(epoch="e", seq=2, name="a"),
            Keepalive(epoch="e", seq=2, time=1.5)]
    for m in msgs:
        line = encode(m)
        assert line.endswith(b"\n") and b"\n" not in line[:-1]
        assert decode(line) == m


def test_volatile_numbers_are_not_changes() -> None:
    a, b = _rt("a"), _rt("a")
    b.cpu_seconds, b.rss_mib = 99.0, 300.0
    assert vm_state(a) == vm_state(b)
    b.power_state = PowerState.PAUSED
    assert vm_state(a) != vm_state(b)
    f, g = _facts(), _facts()
    g.memory_free_mib = 1
    assert facts_state(f) == facts_state(g)
    g.cpus = 4
    assert facts_state(f) != facts_state(g)


def test_log_resumes_from_a_number_it_holds() -> None:
    log = ChangeLog("e", capacity=3)
    changes = [_change(log, f"vm{i}") for i in range(5)]
    assert log.since("e", 5) == []
    assert log.since("e", 3) == changes[3:]
    assert log.since("e", 2) == changes[2:]  # oldest kept is seq 3: after 2 is still complete
    assert log.since("e", 1) is None  # seq 2 was dropped: a snapshot is needed
    assert log.since("other", 5) is None  # another epoch: the agent restarted
    assert log.since("e", 6) is None  # from the future (a stale server): a snapshot
    assert log.since(None, None) is None


def test_cursor_applies_each_change_once_and_asks_again_on_a_gap() -> None:
    cur = StreamCursor()
    assert cur.resume_params() == {}
    assert cur.accept(Snapshot(epoch="e", seq=4, facts=_facts(), vms=[])) is Verdict.APPLY
    assert cur.resume_params() == {"epoch": "e", "since": 4}
    assert cur.accept(VmChanged(epoch="e", seq=4, vm=_rt("a"))) is Verdict.SKIP
    assert cur.accept(VmChanged(epoch="e", seq=5, vm=_rt("a"))) is Verdict.APPLY
    assert cur.accept(Keepalive(epoch="e", seq=5, time=0)) is Verdict.SKIP
    assert cur.accept(Keepalive(epoch="e", seq=7, time=0)) is Verdict.RESYNC  # 6 and 7 were missed
    assert cur.accept(VmChanged(epoch="e", seq=7, vm=_rt("a"))) is Verdict.RESYNC
    assert cur.accept(VmChanged(epoch="f", seq=1, vm=_rt("a"))) is Verdict.RESYNC  # agent restarted
    assert cur.seq == 5


@settings(max_examples=200, deadline=None)
@given(
    n_changes=st.integers(1, 60),
    capacity=st.integers(1, 20),
    cuts=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 5)), max_size=8),
)
def test_every_change_applied_once_across_random_cuts(
    n_changes: int, capacity: int, cuts: list[tuple[int, int]]
) -> None:
    """The agent makes changes; the stream is cut after random deliveries and the tail of each
    connection may be delivered again (a resume from an older number). The server's applied changes
    plus its snapshots always account for every change exactly once."""
    log = ChangeLog("e", capacity=capacity)
    cur = StreamCursor()
    applied: list[int] = []
    state: set[str] = set()  # what the server believes exists
    made = 0
    cut_at = dict(cuts)
    while made < n_changes or cur.seq < log.last_seq:
        # a connection: resume or snapshot
        resumed = log.since(*(cur.epoch, cur.seq) if cur.epoch is not None else (None, None))
        if resumed is None:
            snap = Snapshot(epoch=log.epoch, seq=log.last_seq, facts=_facts(),
                            vms=[_rt(f"vm{i}") for i in range(log.last_seq)])
            assert cur.accept(snap) is Verdict.APPLY
            state = {vm.name for vm in snap.vms}
            applied = list(range(1, snap.seq + 1))  # the snapshot accounts for all before it
            backlog: list[VmChanged | VmRemoved] = []
        else:
            backlog = [c for c in resumed if isinstance(c, VmChanged | VmRemoved)]
        delivered = 0
        budget = cut_at.pop(made, None)
        while True:
            if not backlog and made < n_changes:
                backlog.append(_change(log, f"vm{made}"))
                made += 1
            if not backlog:
                break
            msg = backlog.pop(0)
            verdict = cur.accept(msg)
            if verdict is Verdict.APPLY:
                applied.append(msg.seq)
                if isinstance(msg, VmChanged):
                    state.add(msg.vm.name)
            delivered += 1
            if budget is not None and delivered >= budget:
                break  # the cut
        if budget is None and not backlog and made >= n_changes:
            break
    assert contiguous(applied) and applied == list(range(1, n_changes + 1))
    assert state == {f"vm{i}" for i in range(n_changes)}
