"""The source agent's control loop (agent/source_loop.py, source_endings.py) against fake peers.

QEMU is a :class:`FakeQmp` replaying a recorded ``query-migrate`` trace; the target agent is an
``httpx.MockTransport`` handler (:class:`FakeTarget`) whose incoming stream follows the source's
QEMU. Every test checks the outcome, what was sent to each peer and in which order, and the exact
phases the record went through (each ``_Loop.set_phase`` that changed it; what the store saved
must be those same phases, in order, so no phase is set behind the phase machine's back).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest

from tests.unit.fake_qmp import (
    FakeFiles,
    FakeQmp,
    FakeSupervisor,
    FakeTarget,
    insert_before_completed,
    load_trace,
    status_of,
    trace_meta,
    vm_spec,
)
from vmshift.agent import source_loop
from vmshift.agent.migration_source import OutgoingMigrations
from vmshift.agent.migration_store import MigrationRole, MigrationStore, StoredMigration
from vmshift.agent.supervisor import Supervisor
from vmshift.errors import ConflictError, SwitchoverStartedError
from vmshift.migration.policy import ConvergencePolicy, PolicySettings
from vmshift.migration.samples import MigrationSample
from vmshift.migration.samples import QemuMigrationStatus as Q
from vmshift.migration.uri import MigrationUriError
from vmshift.model.agent_migration import (
    AgentRef,
    FinalizeRequest,
    MigrationProgress,
    MigrationTls,
    OutgoingMigration,
)
from vmshift.model.enums import QemuRunState as RunState
from vmshift.model.migration import (
    ActionKind,
    FinalizeResolution,
    MigrationPhase,
    MigrationSettings,
    MigrationStatus,
)
from vmshift.qemu import migration_qmp as mq
from vmshift.qemu import tls_qmp
from vmshift.tls.files import HostTlsFiles

P = MigrationPhase
S = MigrationStatus
MID = 7
VM = "web1"
MIB = 1 << 20
ACTIVATE = f"POST /migrations/{MID}/activate"
ROLLBACK = f"DELETE /migrations/{MID}"
INCOMING = f"GET /migrations/{MID}/incoming"
STOP_SOURCE = f"supervisor stop_and_unregister {VM}"
#: fast loops: sample every 5 ms; nothing times out by accident (a test that wants it sets it)
FAST: dict[str, float] = {"sample_interval_s": 0.005, "stall_timeout_s": 30.0,
                          "target_check_interval_s": 0.05, "target_down_after_s": 30.0,
                          "activation_deadline_s": 0.4, "settle_s": 0.0}


# ----- the rig ------------------------------------------------------------------------------------
class RecordingStore(MigrationStore):
    """The agent's real store (files under tmp_path) that also remembers each saved source record."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.saved: list[tuple[P, S]] = []

    def save(self, rec: StoredMigration) -> None:
        if rec.role is MigrationRole.SOURCE and rec.progress is not None:
            self.saved.append((rec.progress.phase, rec.progress.status))
        super().save(rec)


def _dedup(items: list[Any]) -> list[Any]:
    return [x for i, x in enumerate(items) if i == 0 or items[i - 1] != x]


@dataclass
class Rig:
    om: OutgoingMigrations
    qmp: FakeQmp
    supervisor: FakeSupervisor
    target: FakeTarget
    store: RecordingStore
    journal: list[str]
    phase_changes: list[P]

    def request(self, **kw: Any) -> OutgoingMigration:
        return OutgoingMigration(migration_id=MID, vm=VM, uri="tcp:10.0.1.2:49152", nonce="n-1",
                                 target_migration_address="10.0.1.2",
                                 target_agent=AgentRef(address="10.0.0.2:8301", capability="c" * 43), **kw)

    async def start(self, **kw: Any) -> MigrationProgress:
        return await self.om.start(self.request(**kw))

    async def reach(self, phase: P, timeout_s: float = 5.0) -> None:
        """Wait until the record is in ``phase``."""
        async with asyncio.timeout(timeout_s):
            while self.om.get(MID).phase is not phase:
                await asyncio.sleep(0.001)

    async def settle(self, timeout_s: float = 10.0) -> MigrationProgress:
        """Wait until the control loop's task has ended; the record as the API returns it."""
        task = self.om._tasks.get(MID)
        if task is not None:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        return self.om.get(MID)

    def phases(self) -> list[P]:
        """The phases the record went through: PREPARE (set by ``start``), then each change the phase
        machine made. The saved records must show the same phases in the same order (some may be
        skipped when two changes fall between saves, none may be added)."""
        seen = [P.PREPARE, *self.phase_changes]
        saved = _dedup([phase for phase, _ in self.store.saved])
        it = iter(seen)
        assert all(phase in it for phase in saved), f"saved phases {saved} are not a subsequence of {seen}"
        assert saved[-1] == seen[-1], f"the last phase set ({seen[-1]}) was never saved"
        return seen

    def statuses(self) -> list[S]:
        return _dedup([status for _, status in self.store.saved])

    def order(self, *entries: str) -> list[int]:
        """Journal index of the first occurrence of each entry (raises if one is missing)."""
        return [self.journal.index(e) for e in entries]


RigFactory = Callable[..., Rig]


@pytest.fixture
async def make_rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RigFactory]:
    phase_changes: list[P] = []
    original = source_loop.SourceLoop.set_phase

    def observed_set_phase(loop: source_loop.SourceLoop, phase: P) -> None:
        before = loop.p.phase
        original(loop, phase)
        if loop.p.phase is not before:
            phase_changes.append(loop.p.phase)

    monkeypatch.setattr(source_loop.SourceLoop, "set_phase", observed_set_phase)
    rigs: list[Rig] = []

    def factory(answers: list[dict[str, Any]], *, hold_at: int | None = None,
                kill_on_entering: Q | None = None, kill_after_announcing: Q | None = None,
                **loop_kw: float) -> Rig:
        journal: list[str] = []
        qmp = FakeQmp(answers, journal=journal, hold_at=hold_at, kill_on_entering=kill_on_entering,
                      kill_after_announcing=kill_after_announcing)
        supervisor = FakeSupervisor(VM, qmp, FakeFiles(tmp_path, vm_spec(VM)), journal)
        target = FakeTarget(qmp, journal, MID, VM)
        store = RecordingStore(tmp_path / "state")
        om = OutgoingMigrations(cast(Supervisor, supervisor), store,
                                target_transport=httpx.MockTransport(target),
                                **{**FAST, **loop_kw})
        rig = Rig(om, qmp, supervisor, target, store, journal, phase_changes)
        rigs.append(rig)
        return rig

    yield factory
    for rig in rigs:
        # cancelled until it ends: on Python 3.11 a cancel can be swallowed (see the last test)
        for task in list(rig.om._tasks.values()):
            for _ in range(100):
                if task.done():
                    break
                task.cancel()
                await asyncio.sleep(0.01)
        await asyncio.wait_for(rig.om.close(), 5)


def _last_active(answers: list[dict[str, Any]]) -> int:
    return max(i for i, a in enumerate(answers) if status_of(a) is Q.ACTIVE)


def _short_converging() -> list[dict[str, Any]]:
    """setup, the last active sample, completed: every step is a new status, so QEMU announces each
    one with a MIGRATION event and a loop sampling every 30 s still follows at once."""
    trace = load_trace("converging")
    return [trace[0], trace[_last_active(trace)], trace[-1]]


# ----- 1. a converging migration ------------------------------------------------------------------
async def test_converging_trace_completes_and_activates_the_target_once_after_qemu_completed(
        make_rig: RigFactory) -> None:
    rig = make_rig(load_trace("converging"))
    await rig.start()
    progress = await rig.settle()

    assert progress.status is S.COMPLETED and progress.error is None
    assert rig.phases() == [P.PREPARE, P.PRECOPY, P.FINISH, P.COMPLETED]
    assert rig.statuses() == [S.RUNNING, S.COMPLETED]
    # the confirm went once, and only once the source's QEMU had announced "completed"
    assert rig.target.calls(ACTIVATE) == 1 and rig.target.source_at_activate == [Q.COMPLETED]
    # the source is stopped only once the target runs the VM; it is never resumed
    assert rig.supervisor.stopped == [VM]
    completed, activate, stop = rig.order("event MIGRATION completed", f"target {ACTIVATE}", STOP_SOURCE)
    assert completed < activate < stop
    assert not rig.qmp.sent("cont") and not rig.qmp.sent("migrate_cancel")
    assert rig.target.calls(ROLLBACK) == 0
    # setup: events on, downtime limit and bandwidth set before `migrate`, capabilities never after
    names = [c.cmd for c in rig.qmp.commands]
    migrate = names.index("migrate")
    assert names.index("migrate-set-capabilities") < names.index("migrate-set-parameters") < migrate
    assert rig.qmp.capabilities["events"] and rig.qmp.capabilities["auto-converge"]
    assert not rig.qmp.capabilities["postcopy-ram"]
    assert rig.qmp.sent("migrate")[0].args == {"uri": "tcp:10.0.1.2:49152"}
    assert rig.qmp.parameters["downtime-limit"] == 30
    assert rig.qmp.parameters["max-bandwidth"] == mq.UNLIMITED_BANDWIDTH
    # QEMU was asked once before `migrate` (no migration yet), then read every recorded sample once
    assert rig.qmp.reported == [Q.NONE, *(status_of(a) for a in rig.qmp.answers)]
    # the switchover timeline: QEMU's STOP, its MIGRATION completed, then the confirm, then the target
    tl = progress.metrics.timeline
    assert tl.source_stopped is not None and tl.last_byte_sent is not None and tl.confirm_sent is not None
    assert tl.source_stopped <= tl.last_byte_sent <= tl.confirm_sent
    assert tl.target_cont == rig.target.timeline.target_cont and tl.target_cont is not None
    assert tl.confirm_sent <= tl.target_cont
    # QEMU's numbers of the final sample
    assert progress.metrics.downtime_ms == 24 and progress.metrics.total_ms == 1527
    stored = rig.store.load(MID)
    assert stored is not None and stored.progress is not None and stored.progress.status is S.COMPLETED


async def test_the_loop_wakes_on_qemus_migration_event_not_on_the_next_sample(make_rig: RigFactory) -> None:
    """With a 30 s sampling interval the migration still ends at once: QEMU's MIGRATION event
    (here ``completed``) ends the loop's wait, and the target is confirmed right away."""
    rig = make_rig(_short_converging(), sample_interval_s=30.0)
    began = time.monotonic()
    await rig.start()
    progress = await rig.settle(timeout_s=5.0)
    assert progress.status is S.COMPLETED
    assert time.monotonic() - began < 2.0
    assert rig.target.calls(ACTIVATE) == 1


# ----- 2. cancel during pre-copy ------------------------------------------------------------------
@pytest.mark.parametrize("source_paused", [False, True], ids=["running", "paused"])
async def test_cancel_during_precopy_rolls_back_and_leaves_the_source_running(
        make_rig: RigFactory, source_paused: bool) -> None:
    trace = load_trace("converging")
    hold = 3
    assert status_of(trace[hold]) is Q.ACTIVE
    rig = make_rig(trace, hold_at=hold)
    await rig.start()
    await asyncio.wait_for(rig.qmp.held.wait(), 5)
    if source_paused:  # the vCPUs were stopped (QEMU left them so, or someone paused the VM)
        rig.qmp.run_state = RunState.PAUSED

    progress = await rig.om.cancel(MID)

    assert progress.status is S.CANCELLED
    assert progress.error is not None and progress.error.code == "cancelled"
    assert rig.phases() == [P.PREPARE, P.PRECOPY, P.ROLLBACK, P.CANCELLED]
    assert rig.statuses() == [S.RUNNING, S.CANCELLED]
    assert rig.qmp.sent("migrate_cancel") and rig.qmp.status is Q.CANCELLED
    assert rig.target.calls(ROLLBACK) == 1 and rig.target.rolled_back
    assert rig.target.calls(ACTIVATE) == 0
    assert rig.qmp.run_state is RunState.RUNNING and rig.supervisor.stopped == []
    conts = rig.qmp.sent("cont")
    if source_paused:
        assert len(conts) == 1 and conts[0].status is Q.CANCELLED, "resumed once QEMU had cancelled"
        cont, rollback = rig.order("qmp cont", f"target {ROLLBACK}")
        assert cont < rollback
    else:
        assert conts == [], "a running source is not sent `cont`"
    stored = rig.store.load(MID)
    assert stored is not None and stored.cancel_requested


# ----- 3. cancel once the switchover started ------------------------------------------------------
async def test_cancel_in_device_is_refused_and_the_migration_completes(make_rig: RigFactory) -> None:
    trace = insert_before_completed(load_trace("converging"), Q.DEVICE)
    device = next(i for i, a in enumerate(trace) if status_of(a) is Q.DEVICE)
    rig = make_rig(trace, hold_at=device)
    await rig.start()
    await asyncio.wait_for(rig.qmp.held.wait(), 5)
    assert rig.om.get(MID).phase is P.SWITCHOVER

    with pytest.raises(SwitchoverStartedError) as refused:
        await rig.om.cancel(MID)
    assert refused.value.code == "switchover_started"
    assert "the switchover has started" in refused.value.message
    assert not rig.qmp.sent("migrate_cancel"), "a refused cancel never reaches QEMU"

    rig.qmp.release()
    progress = await rig.settle()
    assert progress.status is S.COMPLETED
    assert rig.phases() == [P.PREPARE, P.PRECOPY, P.SWITCHOVER, P.FINISH, P.COMPLETED]
    assert rig.target.calls(ACTIVATE) == 1 and rig.target.calls(ROLLBACK) == 0
    assert rig.supervisor.stopped == [VM] and not rig.qmp.sent("cont")
    stored = rig.store.load(MID)
    assert stored is not None and not stored.cancel_requested


async def test_cancel_is_refused_from_qemus_own_status_when_the_loop_has_not_seen_it(
        make_rig: RigFactory) -> None:
    """QEMU went to ``pre-switchover`` between two samples: the record still says pre-copy, but the
    cancel reads QEMU itself and is refused; the MIGRATION events then finish the migration."""
    trace = insert_before_completed(_short_converging(), Q.PRE_SWITCHOVER)
    rig = make_rig(trace, hold_at=1, sample_interval_s=30.0)
    await rig.start()
    await asyncio.wait_for(rig.qmp.held.wait(), 5)
    rig.qmp.release(advance=True, emit=False)
    assert rig.qmp.status is Q.PRE_SWITCHOVER and rig.om.get(MID).phase is P.PRECOPY

    with pytest.raises(SwitchoverStartedError, match="the switchover has started"):
        await rig.om.cancel(MID)
    assert not rig.qmp.sent("migrate_cancel")

    progress = await rig.settle(timeout_s=5.0)
    assert progress.status is S.COMPLETED
    assert rig.phases() == [P.PREPARE, P.PRECOPY, P.FINISH, P.COMPLETED]
    assert rig.target.calls(ACTIVATE) == 1


async def test_a_cancel_that_loses_the_race_with_the_switchover_never_rolls_back_a_completed_stream(
        make_rig: RigFactory) -> None:
    """The cancel was accepted (QEMU answered ``active``), but QEMU entered ``device`` before its
    migrate_cancel arrived and completed: the stream is whole, so the target runs the VM."""
    trace = insert_before_completed(_short_converging(), Q.DEVICE)
    rig = make_rig(trace, hold_at=1, sample_interval_s=30.0)
    await rig.start()
    await asyncio.wait_for(rig.qmp.held.wait(), 5)
    rig.qmp.release()  # the cancel's own query-migrate is the last `active`; QEMU moves on after it

    progress = await rig.om.cancel(MID)

    assert progress.status is S.COMPLETED
    assert rig.qmp.sent("migrate_cancel") and rig.qmp.sent("migrate_cancel")[0].status is Q.DEVICE
    assert rig.phases()[-2:] == [P.FINISH, P.COMPLETED] and P.ROLLBACK not in rig.phases()
    assert rig.target.calls(ACTIVATE) == 1 and rig.target.calls(ROLLBACK) == 0
    assert not rig.qmp.sent("cont")


# ----- 4. the source QEMU vanishes after its last bytes -------------------------------------------
async def test_source_killed_after_its_last_bytes_activates_the_target_on_its_proof(
        make_rig: RigFactory) -> None:
    """SIGKILL as the stream completes, before QEMU could announce it: the loop only sees QMP break
    (QemuError) and the process gone; the target's QEMU holds the whole stream, so it is activated."""
    rig = make_rig(load_trace("converging"), kill_on_entering=Q.COMPLETED)
    await rig.start()
    progress = await rig.settle()

    assert not rig.qmp.alive and rig.qmp.status is Q.COMPLETED
    assert "event MIGRATION completed" not in rig.journal and Q.COMPLETED not in rig.qmp.reported
    assert progress.status is S.COMPLETED and progress.error is None
    assert rig.phases() == [P.PREPARE, P.PRECOPY, P.FINISH, P.COMPLETED]
    incoming, activate = rig.order(f"target {INCOMING}", f"target {ACTIVATE}")
    assert incoming < activate, "the target's proof decided"
    assert rig.target.calls(ACTIVATE) == 1 and rig.target.activated
    assert rig.target.calls(ROLLBACK) == 0
    assert rig.supervisor.stopped == [VM]


async def test_source_killed_right_after_announcing_completed_still_completes(make_rig: RigFactory) -> None:
    rig = make_rig(load_trace("converging"), kill_after_announcing=Q.COMPLETED)
    await rig.start()
    progress = await rig.settle()

    assert not rig.qmp.alive
    assert progress.status is S.COMPLETED and progress.error is None
    assert rig.phases() == [P.PREPARE, P.PRECOPY, P.FINISH, P.COMPLETED]
    assert rig.target.calls(ACTIVATE) == 1 and rig.target.source_at_activate == [Q.COMPLETED]
    assert rig.target.calls(ROLLBACK) == 0 and not rig.qmp.sent("cont")
    assert rig.supervisor.stopped == [VM]


# ----- 5. the source QEMU vanishes during pre-copy ------------------------------------------------
async def test_source_gone_during_precopy_with_an_incomplete_target_stream_is_lost(
        make_rig: RigFactory, tmp_path: Path) -> None:
    trace = load_trace("converging")
    rig = make_rig(trace, hold_at=4)
    await rig.start()
    await asyncio.wait_for(rig.qmp.held.wait(), 5)
    rig.qmp.kill()

    progress = await rig.settle()

    assert progress.status is S.LOST
    assert progress.error is not None and progress.error.code == "vm_lost"
    assert "active" in progress.error.message
    serial = FakeFiles(tmp_path, vm_spec(VM)).paths(vm_spec(VM)).serial_log
    assert str(serial) in progress.error.message, "the report says where the serial log is kept"
    assert rig.phases() == [P.PREPARE, P.PRECOPY, P.LOST]
    assert rig.target.calls(INCOMING) >= 1
    assert rig.target.calls(ACTIVATE) == 0
    assert rig.target.calls(ROLLBACK) == 1 and rig.target.rolled_back
    incoming, rollback = rig.order(f"target {INCOMING}", f"target {ROLLBACK}")
    assert incoming < rollback
    assert rig.supervisor.stopped == [], "the lost VM's files stay as they are"


# ----- 6. the target cannot be told to run --------------------------------------------------------
async def _needs_finalize(make_rig: RigFactory) -> Rig:
    rig = make_rig(load_trace("converging"))
    rig.target.activate_mode = "unreachable"
    await rig.start()
    progress = await rig.settle()
    assert progress.status is S.NEEDS_FINALIZE and progress.phase is P.FINISH
    assert progress.error is not None and progress.error.code == "needs_finalize"
    assert progress.error.hint is not None and f"vmshift migration finalize {MID}" in progress.error.hint
    assert "cannot be reached" in progress.error.message
    assert rig.target.calls(ACTIVATE) >= 2, "an unreachable target is retried until the deadline"
    # the VM waits paused on both hosts: the source is neither resumed nor stopped
    assert rig.qmp.run_state is RunState.POSTMIGRATE and not rig.qmp.sent("cont")
    assert rig.supervisor.stopped == [] and rig.target.calls(ROLLBACK) == 0
    return rig


async def test_unreachable_target_needs_finalize_then_target_activated_completes(
        make_rig: RigFactory) -> None:
    rig = await _needs_finalize(make_rig)
    attempts = rig.target.calls(ACTIVATE)

    progress = await rig.om.finalize(MID, FinalizeRequest(resolution=FinalizeResolution.TARGET_ACTIVATED))

    assert progress.status is S.COMPLETED and progress.error is None
    assert rig.phases() == [P.PREPARE, P.PRECOPY, P.FINISH, P.COMPLETED]
    assert rig.statuses() == [S.RUNNING, S.NEEDS_FINALIZE, S.COMPLETED]
    assert rig.supervisor.stopped == [VM] and not rig.qmp.sent("cont")
    assert rig.target.calls(ACTIVATE) == attempts, "the server activated it; the source does not again"


async def test_unreachable_target_needs_finalize_then_resume_source_fails_with_the_source_running(
        make_rig: RigFactory) -> None:
    rig = await _needs_finalize(make_rig)

    progress = await rig.om.finalize(MID, FinalizeRequest(resolution=FinalizeResolution.RESUME_SOURCE))

    assert progress.status is S.FAILED
    assert progress.error is not None and progress.error.code == "resumed_source"
    assert rig.phases() == [P.PREPARE, P.PRECOPY, P.FINISH, P.FAILED]
    assert rig.statuses() == [S.RUNNING, S.NEEDS_FINALIZE, S.FAILED]
    (cont,) = rig.qmp.sent("cont")
    assert cont.status is Q.COMPLETED
    assert rig.qmp.run_state is RunState.RUNNING and rig.supervisor.stopped == []


# ----- 7. the target proves its copy never ran ----------------------------------------------------
async def test_activation_refused_with_incoming_failed_resumes_the_source(make_rig: RigFactory) -> None:
    rig = make_rig(load_trace("converging"))
    rig.target.activate_mode = "incoming_failed"
    await rig.start()
    progress = await rig.settle()

    assert progress.status is S.FAILED
    assert progress.error is not None and progress.error.code == "incoming_failed"
    assert "resumed on the source" in progress.error.message
    assert rig.phases() == [P.PREPARE, P.PRECOPY, P.FINISH, P.FAILED]
    assert rig.target.calls(ACTIVATE) == 1, "a proof that the target never ran is not retried"
    (cont,) = rig.qmp.sent("cont")
    assert cont.status is Q.COMPLETED
    activate, resumed = rig.order(f"target {ACTIVATE}", "qmp cont")
    assert activate < resumed
    assert rig.qmp.run_state is RunState.RUNNING and rig.supervisor.stopped == []


# ----- the convergence policy, applied through QMP ------------------------------------------------
def _policy_parameters(name: str, hint_bps: float | None) -> list[dict[str, Any]]:
    """The migrate-set-parameters the pure policy asks for on this trace (as the loop feeds it)."""
    overrides: dict[str, Any] = {"dirty_rate_hint_bps": hint_bps} if hint_bps else {}
    policy = ConvergencePolicy(PolicySettings.from_migration(MigrationSettings(), **overrides))
    out: list[dict[str, Any]] = []
    for i, answer in enumerate(load_trace(name)):
        sample = MigrationSample.from_qmp(answer, 0.001 * i)
        if sample.status is not Q.ACTIVE:
            continue
        for action in policy.decide(sample):
            if action.kind is ActionKind.SET_DOWNTIME_LIMIT and action.value is not None:
                out.append({"downtime-limit": round(action.value * 1000)})
            elif action.kind is ActionKind.SET_THROTTLE and action.value is not None:
                out.append(mq.throttle_parameters(int(action.value)))
    return out


@pytest.mark.parametrize("name", ["stalled", "over_link_speed", "near_link_speed"])
async def test_policy_actions_reach_qemu_and_a_cancel_by_someone_else_rolls_back(
        make_rig: RigFactory, name: str) -> None:
    """The recorded traces never converged (open loop, cancelled at the end): the loop applies the
    policy's every decision through migrate-set-parameters while QEMU is active, then QEMU's own
    ``cancelled`` ends it as a failure with the source running and the target discarded."""
    meta = trace_meta(name)
    hint = meta["calc_dirty_rate_mibps"] * MIB if "calc_dirty_rate_mibps" in meta else None
    rig = make_rig(load_trace(name))
    await rig.start(dirty_rate_bps=hint)
    progress = await rig.settle()

    after_migrate = rig.qmp.commands[[c.cmd for c in rig.qmp.commands].index("migrate") + 1:]
    applied = [c for c in after_migrate if c.cmd == "migrate-set-parameters"]
    assert [c.args for c in applied] == _policy_parameters(name, hint)
    assert all(c.status is Q.ACTIVE for c in applied)
    assert progress.actions[0].kind is ActionKind.SET_DOWNTIME_LIMIT and len(progress.actions) == len(applied)
    if name == "stalled":  # ~12 MiB left at ~32.6 MiB/s: the limit goes to 400 ms, within the budget
        assert rig.qmp.parameters["downtime-limit"] == 400 and progress.downtime_limit_ms == 400
        assert ActionKind.SET_THROTTLE not in [a.kind for a in progress.actions]
    if name == "over_link_speed":  # one proportional throttle at the first measured round
        (throttle,) = [a for a in progress.actions if a.kind is ActionKind.SET_THROTTLE]
        assert throttle.sample.round == 2
        assert rig.qmp.parameters["cpu-throttle-initial"] == rig.qmp.parameters["max-cpu-throttle"]
        assert 80 <= rig.qmp.parameters["cpu-throttle-initial"] <= 90

    assert progress.status is S.FAILED
    assert progress.error is not None and progress.error.code == "migration_failed"
    assert "cancelled" in progress.error.message
    assert rig.phases() == [P.PREPARE, P.PRECOPY, P.ROLLBACK, P.FAILED]
    assert rig.target.calls(ROLLBACK) == 1 and rig.target.calls(ACTIVATE) == 0
    assert not rig.qmp.sent("migrate_cancel") and not rig.qmp.sent("cont")
    assert rig.supervisor.stopped == [] and rig.qmp.run_state is RunState.RUNNING


async def test_completion_timeout_aborts_through_migrate_cancel(make_rig: RigFactory) -> None:
    rig = make_rig(load_trace("stalled"))
    await rig.start(settings=MigrationSettings(timeout_min_s=0.05, timeout_s_per_gib=0.01))
    progress = await rig.settle()

    assert progress.status is S.FAILED
    assert progress.error is not None and progress.error.code == "migration_timeout"
    assert progress.actions[-1].kind is ActionKind.ABORT
    (cancel,) = rig.qmp.sent("migrate_cancel")
    assert cancel.status is Q.ACTIVE
    assert cancel.sample < len(rig.qmp.answers) - 1, "long before the trace ends"
    assert rig.qmp.status is Q.CANCELLED and rig.qmp.run_state is RunState.RUNNING
    assert rig.phases() == [P.PREPARE, P.PRECOPY, P.ROLLBACK, P.FAILED]
    assert rig.target.calls(ROLLBACK) == 1 and rig.target.calls(ACTIVATE) == 0


async def test_a_cut_link_is_detected_when_no_data_moves(make_rig: RigFactory) -> None:
    """QEMU stays ``active`` with nothing transferred (the recorded sample repeated): the loop
    rolls back after ``stall_timeout_s``, cancelling QEMU's migration first."""
    rig = make_rig(load_trace("converging"), hold_at=3, stall_timeout_s=0.1)
    await rig.start()
    progress = await rig.settle()

    assert progress.status is S.FAILED
    assert progress.error is not None and progress.error.code == "migration_stalled"
    assert rig.qmp.sent("migrate_cancel") and rig.qmp.status is Q.CANCELLED
    assert rig.phases() == [P.PREPARE, P.PRECOPY, P.ROLLBACK, P.FAILED]
    assert rig.target.calls(ROLLBACK) == 1 and rig.target.calls(ACTIVATE) == 0


# ----- failures of the loop's peers and of the loop itself ----------------------------------------
async def test_target_agent_down_during_precopy_rolls_back(make_rig: RigFactory) -> None:
    rig = make_rig(load_trace("converging"), hold_at=3, target_down_after_s=0.1)
    await rig.start()
    await asyncio.wait_for(rig.qmp.held.wait(), 5)
    rig.target.down = True
    progress = await rig.settle()

    assert progress.status is S.FAILED
    assert progress.error is not None and progress.error.code == "host_unreachable"
    assert rig.phases() == [P.PREPARE, P.PRECOPY, P.ROLLBACK, P.FAILED]
    (cancel,) = rig.qmp.sent("migrate_cancel")
    assert cancel.status is Q.ACTIVE and rig.qmp.status is Q.CANCELLED
    assert rig.qmp.run_state is RunState.RUNNING and not rig.qmp.sent("cont")
    assert rig.target.calls(ACTIVATE) == 0 and rig.supervisor.stopped == []


async def test_a_stream_that_completes_while_qemu_hangs_in_the_switchover_needs_finalize(
        make_rig: RigFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Soak (issue 7): the migration link cut while QEMU is in ``device`` leaves QMP silent; the
    loop rolls back, cannot read nor restore the source, and the link's return lets the stream
    complete before the target is asked to discard its copy: the target refuses (it holds the whole
    VM) and the VM waits paused on both hosts. That is ``needs_finalize``, never ``failed``."""
    real = mq.query_migrate

    async def quick(qmp: Any, timeout_s: float = 5.0) -> dict[str, Any]:
        return await real(qmp, timeout_s=0.05)

    monkeypatch.setattr(mq, "query_migrate", quick)
    trace = insert_before_completed(_short_converging(), Q.DEVICE)
    device = next(i for i, a in enumerate(trace) if status_of(a) is Q.DEVICE)
    rig = make_rig(trace, hold_at=device)
    await rig.start()
    await asyncio.wait_for(rig.qmp.held.wait(), 5)
    rig.qmp.gate("query-migrate")  # QEMU's main loop is stuck: nothing answers from now on
    rig.qmp.gate("query-status")
    rig.qmp.release(advance=True, emit=False)  # ... and the stream completes unseen

    progress = await rig.settle()

    assert progress.status is S.NEEDS_FINALIZE, progress.error
    assert progress.error is not None and f"vmshift migration finalize {MID}" in (progress.error.hint or "")
    assert rig.target.calls(ROLLBACK) == 1 and rig.target.calls(ACTIVATE) == 0
    assert not rig.target.rolled_back and not rig.qmp.sent("cont") and rig.supervisor.stopped == []


async def test_a_source_silent_in_the_rollback_runs_again_once_its_target_is_discarded(
        make_rig: RigFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Soak (issue 7): QMP silent in ``device`` (cut link); the target had not loaded the whole
    stream and discarded its copy, yet the source QEMU then reported ``completed`` (its last bytes
    were in its socket) and sat in ``postmigrate``: the only copy of the VM, paused, with the
    migration reported failed. The loop waits for QEMU to answer again and runs the VM."""
    real = mq.query_migrate

    async def quick(qmp: Any, timeout_s: float = 5.0) -> dict[str, Any]:
        return await real(qmp, timeout_s=0.05)

    monkeypatch.setattr(mq, "query_migrate", quick)
    trace = insert_before_completed(_short_converging(), Q.DEVICE)
    device = next(i for i, a in enumerate(trace) if status_of(a) is Q.DEVICE)
    rig = make_rig(trace, hold_at=device)
    monkeypatch.setattr(rig.target, "stream", lambda: Q.ACTIVE)  # the target never read the end
    await rig.start()
    await asyncio.wait_for(rig.qmp.held.wait(), 5)
    rig.qmp.gate("query-migrate")
    rig.qmp.gate("query-status")
    rig.qmp.release(advance=True, emit=False)  # QEMU completed, unseen

    async def link_back() -> None:
        while not rig.target.rolled_back:
            await asyncio.sleep(0.005)
        rig.qmp.open_gate("query-migrate")
        rig.qmp.open_gate("query-status")

    back = asyncio.create_task(link_back())
    progress = await rig.settle()
    await back

    assert progress.status is S.FAILED, progress.error
    assert progress.error is not None and "the VM runs on the source" in progress.error.message
    (cont,) = rig.qmp.sent("cont")
    assert cont.status is Q.COMPLETED and rig.qmp.run_state is RunState.RUNNING
    assert rig.target.calls(ACTIVATE) == 0 and rig.supervisor.stopped == []


async def test_a_crashed_loop_rolls_back_instead_of_staying_running(
        make_rig: RigFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(self: source_loop.SourceLoop, action: Any) -> None:
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(source_loop.SourceLoop, "_apply", broken)
    rig = make_rig(load_trace("converging"))
    await rig.start()
    progress = await rig.settle()

    assert progress.status is S.FAILED
    assert progress.error is not None and progress.error.code == "internal"
    assert "RuntimeError: a bug in the loop" in progress.error.message
    assert rig.phases() == [P.PREPARE, P.PRECOPY, P.ROLLBACK, P.FAILED]
    assert rig.qmp.sent("migrate_cancel") and rig.qmp.status is Q.CANCELLED
    assert rig.target.calls(ROLLBACK) == 1 and rig.target.calls(ACTIVATE) == 0


@pytest.mark.parametrize("saved", [True, False], ids=["migrate-saved", "died-before-saving-migrate"])
async def test_a_restarted_agent_resumes_the_loop_where_qemu_is(make_rig: RigFactory, saved: bool) -> None:
    """The agent stops (its loops end, QEMU keeps migrating) and starts again: the new loop follows
    the same migration to its end and never sends a second ``migrate``."""
    rig = make_rig(load_trace("converging"), hold_at=4)
    await rig.start()
    await asyncio.wait_for(rig.qmp.held.wait(), 5)
    await rig.om.close()
    if not saved:  # as if the agent died between `migrate` and saving that QEMU accepted it
        rec = rig.store.load(MID)
        assert rec is not None and rec.progress is not None
        rec.migrate_sent, rec.progress.phase = False, P.PREPARE
        MigrationStore.save(rig.store, rec)
    rig.om = OutgoingMigrations(cast(Supervisor, rig.supervisor), rig.store,
                                target_transport=httpx.MockTransport(rig.target), **FAST)
    await rig.om.resume_all()
    rig.qmp.release()
    progress = await rig.settle()

    assert progress.status is S.COMPLETED
    assert len(rig.qmp.sent("migrate")) == 1
    assert not rig.qmp.sent("migrate-set-capabilities")[1:], "capabilities are set once, before migrate"
    assert rig.target.calls(ACTIVATE) == 1 and rig.supervisor.stopped == [VM]
    expected = [P.PREPARE, P.PRECOPY, P.FINISH, P.COMPLETED]
    if not saved:
        expected = [P.PREPARE, P.PRECOPY, P.PRECOPY, P.FINISH, P.COMPLETED]  # set again after the restart
    assert [P.PREPARE, *rig.phase_changes] == expected


# ----- post-copy ---------------------------------------------------------------------------------
POSTCOPY = MigrationSettings(allow_postcopy=True, postcopy_after_s=0.001)


async def test_postcopy_is_started_by_the_policy_refuses_cancel_and_completes(make_rig: RigFactory) -> None:
    trace = load_trace("converging")
    rig = make_rig(trace, hold_at=_last_active(trace))
    await rig.start(settings=POSTCOPY)
    await rig.reach(P.POSTCOPY)  # at the first sample of round 2, the one QEMU is held at

    assert rig.qmp.capabilities["postcopy-ram"]
    (start,) = rig.qmp.sent("migrate-start-postcopy")
    assert start.status is Q.ACTIVE and start.sample == _last_active(trace)
    with pytest.raises(SwitchoverStartedError):
        await rig.om.cancel(MID)
    assert not rig.qmp.sent("migrate_cancel")

    rig.qmp.release()
    progress = await rig.settle()
    assert progress.status is S.COMPLETED and progress.metrics.postcopy
    assert rig.phases() == [P.PREPARE, P.PRECOPY, P.POSTCOPY, P.FINISH, P.COMPLETED]
    assert rig.target.calls(ACTIVATE) == 1


async def test_a_failure_after_postcopy_started_never_resumes_the_source(make_rig: RigFactory) -> None:
    trace = load_trace("converging")
    last_active = _last_active(trace)  # the policy starts post-copy here (round 2); QEMU fails later
    trace = [*trace[:last_active + 1], trace[last_active],
             {"status": "failed", "error-desc": "Unable to write to socket: Connection reset by peer"}]
    rig = make_rig(trace)
    await rig.start(settings=POSTCOPY)
    progress = await rig.settle()

    assert progress.status is S.FAILED
    assert progress.error is not None and progress.error.hint is not None
    assert "ost-copy" in progress.error.hint
    assert Q.POSTCOPY_ACTIVE in rig.qmp.reported, "QEMU failed during post-copy"
    assert rig.phases() == [P.PREPARE, P.PRECOPY, P.POSTCOPY, P.FAILED]
    assert not rig.qmp.sent("cont") and rig.qmp.run_state is not RunState.RUNNING
    # the target was told to run when post-copy began (it held the VM then), and is never discarded
    assert rig.target.calls(ROLLBACK) == 0 and rig.target.calls(ACTIVATE) == 1
    assert rig.target.source_at_activate == [Q.POSTCOPY_ACTIVE]


# ----- bugs found ---------------------------------------------------------------------------------
async def test_postcopy_requested_after_qemu_already_failed_still_rolls_back(make_rig: RigFactory) -> None:
    trace = load_trace("converging")
    last_active = _last_active(trace)  # the policy asks for post-copy on this sample...
    trace = [*trace[:last_active + 1], {"status": "failed", "error-desc": "Connection reset by peer"}]
    rig = make_rig(trace)  # ...and QEMU fails in pre-copy right after answering it
    await rig.start(settings=POSTCOPY)
    progress = await rig.settle()

    assert rig.qmp.sent("migrate-start-postcopy")[0].status is Q.FAILED
    assert Q.POSTCOPY_ACTIVE not in rig.qmp.reported and rig.qmp.run_state is RunState.RUNNING
    assert progress.status is S.FAILED
    assert rig.target.calls(ROLLBACK) == 1, "the target's partial, never-run copy is discarded"
    assert progress.error is not None and progress.error.hint is not None
    assert "ost-copy" not in progress.error.hint


async def test_a_cancel_accepted_before_migrate_never_starts_the_stream(make_rig: RigFactory) -> None:
    rig = make_rig(load_trace("converging"))
    rig.qmp.gate("migrate-set-parameters")
    await rig.start()
    await asyncio.wait_for(rig.qmp.at_gate.wait(), 5)  # the loop waits for QEMU in its setup
    cancel = asyncio.create_task(rig.om.cancel(MID))
    while not rig.om._records[MID].cancel_requested:
        await asyncio.sleep(0.001)
    assert rig.om.get(MID).phase is P.PREPARE and not rig.qmp.sent("migrate")
    rig.qmp.open_gate("migrate-set-parameters")
    progress = await asyncio.wait_for(cancel, 10)

    assert progress.status is S.CANCELLED
    assert rig.target.calls(ROLLBACK) == 1
    assert not rig.qmp.sent("migrate"), "the user's cancel was accepted before the stream started"


async def test_agent_exit_stops_the_loop_even_when_the_cancel_meets_a_qmp_answer(
        make_rig: RigFactory) -> None:
    rig = make_rig(load_trace("converging"), hold_at=3)
    await rig.start()
    await rig.qmp.held.wait()  # resumes as the loop's query-migrate got its answer
    task = rig.om._tasks[MID]
    task.cancel()  # what OutgoingMigrations.close() does, once per loop
    commands = len(rig.qmp.commands)
    await asyncio.sleep(0.2)
    assert task.done(), f"the loop kept running: {len(rig.qmp.commands) - commands} more QMP commands"


# ----- the migration URI (issue 9, item 3) ---------------------------------------------------------
@pytest.mark.parametrize("uri", ["exec:touch /tmp/owned", "file:/tmp/vm.state", "tcp:10.0.1.9:49152",
                                 "tcp:10.0.1.2:49152\n"])
async def test_a_uri_other_than_tcp_to_the_targets_migration_address_is_refused_before_qemu(
        make_rig: RigFactory, uri: str) -> None:
    rig = make_rig(load_trace("converging"))
    with pytest.raises(MigrationUriError, match="refused") as refused:
        await rig.om.start(rig.request().model_copy(update={"uri": uri}))
    assert refused.value.status == 400 and repr(uri) in refused.value.message
    # nothing reached QEMU, the target or the store
    assert rig.qmp.commands == [] and rig.journal == [] and rig.store.load(MID) is None


# ----- an encrypted stream (agent/migration_tls.py) -----------------------------------------------
def _enroll(state_dir: Path) -> HostTlsFiles:
    from vmshift.tls import pki
    from vmshift.tls.files import write_private

    files = HostTlsFiles.of(state_dir)
    ca = pki.create_ca()
    req = pki.make_key_and_csr("host-1")
    write_private(files.key, req.key_pem)
    write_private(files.cert, pki.issue(ca, req.cert_pem, common_name="host-1", role=pki.Role.HOST,
                                        sans=["host-1", "10.0.1.1"]), 0o644)
    write_private(files.ca_cert, ca.cert_pem, 0o644)
    return files


async def test_an_encrypted_migration_sets_qemus_tls_before_migrate(make_rig: RigFactory,
                                                                   tmp_path: Path) -> None:
    rig = make_rig(load_trace("converging"))
    files = _enroll(tmp_path / "host")
    rig.supervisor.config = SimpleNamespace(state_dir=tmp_path / "host")
    await rig.start(tls=MigrationTls(peer="host-2"))
    progress = await rig.settle()
    assert progress.status is S.COMPLETED and progress.encrypted is True
    names = [c.cmd for c in rig.qmp.commands]
    creds = rig.qmp.objects[tls_qmp.CREDS_ID]
    assert creds == {"qom-type": "tls-creds-x509", "id": tls_qmp.CREDS_ID, "dir": str(files.qemu_dir),
                     "endpoint": "client", "verify-peer": True}
    assert sorted(p.name for p in files.qemu_dir.iterdir()) == [
        "ca-cert.pem", "client-cert.pem", "client-key.pem", "server-cert.pem", "server-key.pem"]
    tls_set = next(c for c in rig.qmp.sent("migrate-set-parameters") if c.args and "tls-creds" in c.args
                   and c.args["tls-creds"])
    assert tls_set.args == {"tls-creds": tls_qmp.CREDS_ID, "tls-hostname": "10.0.1.2"}  # the URI's address
    assert names.index("object-add") < rig.qmp.commands.index(tls_set) < names.index("migrate")


async def test_a_rolled_back_encrypted_migration_leaves_the_source_plain(make_rig: RigFactory,
                                                                        tmp_path: Path) -> None:
    trace = load_trace("converging")
    rig = make_rig(trace, hold_at=3)
    _enroll(tmp_path / "host")
    rig.supervisor.config = SimpleNamespace(state_dir=tmp_path / "host")
    await rig.start(tls=MigrationTls(peer="host-2"))
    await asyncio.wait_for(rig.qmp.held.wait(), 5)
    progress = await rig.om.cancel(MID)
    assert progress.status is S.CANCELLED and progress.encrypted is True
    await rig.settle()
    # the VM stays here: its next migration must not try TLS
    assert rig.qmp.parameters["tls-creds"] == "" and rig.qmp.objects == {}


async def test_encrypted_migration_refused_without_a_certificate(make_rig: RigFactory,
                                                                 tmp_path: Path) -> None:
    rig = make_rig(load_trace("converging"))
    rig.supervisor.config = SimpleNamespace(state_dir=tmp_path / "bare")
    with pytest.raises(ConflictError, match="no cluster certificate") as err:
        await rig.start(tls=MigrationTls(peer="host-2"))
    assert "vmshift host add" in (err.value.hint or "")
    assert rig.qmp.commands == [] and rig.store.load(MID) is None  # nothing started, nothing written


async def test_an_encrypted_migration_resumed_by_finalize_leaves_the_source_plain(
        make_rig: RigFactory, tmp_path: Path) -> None:
    rig = make_rig(load_trace("converging"))
    _enroll(tmp_path / "host")
    rig.supervisor.config = SimpleNamespace(state_dir=tmp_path / "host")
    rig.target.activate_mode = "unreachable"
    await rig.start(tls=MigrationTls(peer="host-2"))
    assert (await rig.settle()).status is S.NEEDS_FINALIZE
    assert rig.qmp.parameters["tls-creds"] == tls_qmp.CREDS_ID  # waiting: nothing is reset yet
    progress = await rig.om.finalize(MID, FinalizeRequest(resolution=FinalizeResolution.RESUME_SOURCE))
    assert progress.status is S.FAILED and rig.qmp.run_state is RunState.RUNNING
    assert rig.qmp.parameters["tls-creds"] == "" and rig.qmp.objects == {}
