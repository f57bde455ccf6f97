"""Fake peers of the source agent's control loop: QEMU replaying a recorded trace, its supervisor,
and the target agent.

The source agent's control loop (``agent/migration_source.py``) uses a small part of
``QmpSession``: a handful of commands, ``query-status``/``cont``, and the ``MIGRATION``/``STOP``
events it waits on. :class:`FakeQmp` plays QEMU for exactly that part, from a trace recorded on a
real QEMU (``tests/unit/traces``): after ``migrate``, every ``query-migrate`` answers the sample
QEMU is at and QEMU then moves on to the next one. What QEMU does between two samples (a new
status, the vCPUs stopping for the switchover) arrives as events, so the loop's event wait wakes
the way it does on a real QEMU. Every command is recorded with the status QEMU was in when it came.

Knobs a test turns: ``hold_at`` (QEMU stays on one sample until :meth:`FakeQmp.release`);
``kill_on_entering`` (the process is killed as QEMU reaches a status, before it can announce it)
and ``kill_after_announcing`` (killed right after the status's events went out): either way the
next command fails as a broken QMP connection does, and the process is gone from then on;
:meth:`FakeQmp.kill`; and :meth:`FakeQmp.gate` (QEMU does
not answer one command until the test opens the gate). After ``migrate-start-postcopy`` the
recorded ``active`` samples are answered as ``postcopy-active``.

:class:`FakeTarget` is the target agent, an ``httpx.MockTransport`` handler: its receiving QEMU
(paused, ``-S``) holds whatever the source's QEMU has sent, and every request is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import httpx

from vmshift.errors import ConflictError, NotFoundError, QemuError
from vmshift.migration.samples import QemuMigrationStatus as Q
from vmshift.model.enums import BootKind
from vmshift.model.enums import QemuRunState as RunState
from vmshift.model.migration import SwitchoverTimeline
from vmshift.model.vm import BootSpec, VmSpec
from vmshift.qemu.cmdline import VmPaths
from vmshift.qemu.qmp import QmpEvent, QmpStatus

TRACES = Path(__file__).parent / "traces"
Answer = dict[str, Any]

#: QEMU stops the vCPUs when it enters these (the switchover), and reports the source
#: ``postmigrate`` once the stream completed.
VCPUS_STOPPED_IN = frozenset({Q.PRE_SWITCHOVER, Q.DEVICE, Q.POSTCOPY_ACTIVE, Q.COMPLETED})
#: Statuses in which this fake honours ``migrate_cancel``. Once QEMU is in ``device`` (or done) the
#: cancel comes too late here: the switchover finishes on its own.
CANCELLABLE = frozenset({Q.SETUP, Q.ACTIVE, Q.PRE_SWITCHOVER, Q.WAIT_UNPLUG})
CAPABILITIES = ("events", "auto-converge", "postcopy-ram", "multifd", "validate-uuid", "late-block-activate")


def load_trace(name: str) -> list[Answer]:
    """The recorded ``query-migrate`` answers of one trace, in order."""
    data = json.loads((TRACES / f"{name}.json").read_text())
    return [sample["answer"] for sample in data["samples"]]


def trace_meta(name: str) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((TRACES / f"{name}.json").read_text())["meta"]
    return meta


def status_of(answer: Answer) -> Q:
    return Q.parse(str(answer.get("status", "none")))


def insert_before_completed(answers: list[Answer], status: Q) -> list[Answer]:
    """The trace with one more sample, in ``status``, just before ``completed``: the recorded
    traces were sampled every 200 ms and never caught QEMU's short ``device`` step."""
    end = next(i for i, a in enumerate(answers) if status_of(a) is Q.COMPLETED)
    extra = copy.deepcopy(answers[end - 1])
    extra["status"] = status.value
    return [*answers[:end], extra, *answers[end:]]


@dataclass(frozen=True)
class QmpCall:
    cmd: str
    args: dict[str, Any] | None
    status: Q  # QEMU's migration status when the command arrived
    sample: int  # index of the trace sample QEMU was at (-1: no migration yet)


class FakeQmp:
    """The part of ``QmpSession`` the control loop uses, answered from a recorded trace."""

    def __init__(self, answers: list[Answer], *, journal: list[str] | None = None,
                 hold_at: int | None = None, kill_on_entering: Q | None = None,
                 kill_after_announcing: Q | None = None) -> None:
        self.answers = [copy.deepcopy(a) for a in answers]
        self.journal = journal if journal is not None else []
        self.hold_at = hold_at
        self.kill_on_entering = kill_on_entering
        self.kill_after_announcing = kill_after_announcing
        self.current: Answer = {}  # what query-migrate answers now: {} until `migrate`
        self.cursor = -1
        self.run_state = RunState.RUNNING
        self.alive = True
        self._dies_at_next_command = False
        self.commands: list[QmpCall] = []
        self.reported: list[Q] = []  # every status query-migrate answered, in order
        self.parameters: dict[str, Any] = {}
        self.objects: dict[str, dict[str, Any]] = {}  # object-add'ed, by id
        self.capabilities = dict.fromkeys(CAPABILITIES, False)
        self.postcopy = False
        self._gates: dict[str, asyncio.Event] = {}
        self.at_gate = asyncio.Event()  # set once a command waits at a gate
        self.held = asyncio.Event()  # set once query-migrate answered the held sample
        self.recent_events: deque[QmpEvent] = deque(maxlen=200)
        self.last_seq = 0
        self._event_seen = asyncio.Event()

    # ----- what the test reads and turns --------------------------------------------------------
    @property
    def status(self) -> Q:
        return status_of(self.current) if self.current else Q.NONE

    def sent(self, cmd: str) -> list[QmpCall]:
        return [c for c in self.commands if c.cmd == cmd]

    def release(self, *, advance: bool = False, emit: bool = True) -> None:
        """End the hold; with ``advance`` QEMU moves to the next sample now (``emit=False``: its
        MIGRATION event is still on the way, so the loop has not heard of the move)."""
        self.hold_at = None
        if advance:
            self._step(emit=emit)

    def gate(self, cmd: str) -> None:
        """QEMU will not answer ``cmd`` until :meth:`open_gate` (the command is in flight)."""
        self._gates[cmd] = asyncio.Event()

    def open_gate(self, cmd: str) -> None:
        self._gates.pop(cmd).set()

    def kill(self) -> None:
        """The QEMU process is gone (SIGKILL): every command fails from now on."""
        self.alive = False

    # ----- QmpSession's interface ---------------------------------------------------------------
    def events_named(self, *names: str) -> list[QmpEvent]:
        return [e for e in self.recent_events if e.name in names]

    async def wait_event(self, *names: str, timeout_s: float, after_seq: int = 0) -> QmpEvent | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            for event in self.recent_events:
                if event.seq > after_seq and event.name in names:
                    return event
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            self._event_seen.clear()
            with contextlib.suppress(TimeoutError):  # asyncio.wait_for, as QmpSession.wait_event
                await asyncio.wait_for(self._event_seen.wait(), timeout=remaining)

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        await asyncio.sleep(0)  # a round trip to QEMU lets other tasks run
        gate = self._gates.get(cmd)
        if gate is not None:
            self.at_gate.set()
            await gate.wait()
        if self._dies_at_next_command:
            self.alive, self._dies_at_next_command = False, False
        if not self.alive:
            raise QemuError(f"The QMP command {cmd!r} failed because the connection to QEMU broke (EOF).")
        self.commands.append(QmpCall(cmd, copy.deepcopy(args), self.status, self.cursor))
        self.journal.append(f"qmp {cmd}")
        handler = getattr(self, "_do_" + cmd.replace("-", "_"), None)
        if handler is None:
            raise QemuError(f"QEMU refused the QMP command {cmd!r}: The command {cmd} has not been found")
        result: dict[str, Any] = handler(args or {})
        return result

    async def query_status(self) -> QmpStatus:
        reply = await self.execute("query-status")
        return QmpStatus(status=str(reply["status"]), running=bool(reply["running"]))

    async def cont(self) -> None:
        await self.execute("cont")

    # ----- QEMU's side -------------------------------------------------------------------------
    def _emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        self.last_seq += 1
        self.recent_events.append(QmpEvent(name=name, data=data or {}, time=time.time(), seq=self.last_seq))
        self.journal.append(f"event {name} {(data or {}).get('status', '')}".rstrip())
        self._event_seen.set()

    def _enter(self, answer: Answer, *, emit: bool = True) -> None:
        """QEMU moves to ``answer``; a new status changes the vCPUs and is announced."""
        old = self.status
        self.current = answer
        new = self.status
        if new is old:
            return
        if new is self.kill_on_entering:  # SIGKILL right after the last byte: no event goes out
            self._dies_at_next_command, emit = True, False
        if new in VCPUS_STOPPED_IN and self.run_state is RunState.RUNNING:
            self.run_state = RunState.FINISH_MIGRATE
            if emit:
                self._emit("STOP")
        if new is Q.COMPLETED:
            self.run_state = RunState.POSTMIGRATE
        elif (new in (Q.FAILED, Q.CANCELLED) and self.run_state is RunState.FINISH_MIGRATE
              and not self.postcopy):  # after post-copy began the source can no longer run
            self.run_state = RunState.RUNNING  # QEMU restarts the vCPUs it stopped itself
            if emit:
                self._emit("RESUME")
        if emit:
            self._emit("MIGRATION", {"status": new.value})
        if new is self.kill_after_announcing:
            self._dies_at_next_command = True

    def _step(self, *, emit: bool = True) -> None:
        status = self.status
        if self.cursor < 0 or status.finished:
            return
        if status is Q.CANCELLING:
            self._enter({"status": Q.CANCELLED.value}, emit=emit)
        elif self.hold_at != self.cursor and self.cursor + 1 < len(self.answers):
            self.cursor += 1
            answer = copy.deepcopy(self.answers[self.cursor])
            if self.postcopy and status_of(answer) is Q.ACTIVE:
                answer["status"] = Q.POSTCOPY_ACTIVE.value
            self._enter(answer, emit=emit)

    def _migrating(self) -> bool:
        return self.cursor >= 0 and not self.status.finished

    # ----- commands ----------------------------------------------------------------------------
    def _do_query_migrate(self, args: dict[str, Any]) -> Answer:
        answer = copy.deepcopy(self.current)
        self.reported.append(self.status)
        if self.cursor >= 0 and self.hold_at == self.cursor:
            self.held.set()
        self._step()
        return answer

    def _do_query_migrate_capabilities(self, args: dict[str, Any]) -> Answer:
        return {"return": [{"capability": k, "state": v} for k, v in self.capabilities.items()]}

    def _do_migrate_set_capabilities(self, args: dict[str, Any]) -> Answer:
        if self._migrating():
            raise QemuError("QEMU refused the QMP command 'migrate-set-capabilities': "
                            "There's a migration process in progress")
        for item in args["capabilities"]:
            if item["capability"] not in self.capabilities:
                raise QemuError(f"QEMU refused the QMP command 'migrate-set-capabilities': "
                                f"Invalid parameter '{item['capability']}'")
            self.capabilities[item["capability"]] = bool(item["state"])
        return {}

    def _do_migrate_set_parameters(self, args: dict[str, Any]) -> Answer:
        self.parameters.update(args)
        return {}

    def _do_query_migrate_parameters(self, args: dict[str, Any]) -> Answer:
        return {"tls-creds": "", "tls-hostname": "", "tls-authz": "", **self.parameters}

    def _do_object_add(self, args: dict[str, Any]) -> Answer:
        if args["id"] in self.objects:
            raise QemuError(f"QEMU refused the QMP command 'object-add': duplicate ID '{args['id']}'")
        self.objects[args["id"]] = dict(args)
        return {}

    def _do_object_del(self, args: dict[str, Any]) -> Answer:
        if self.objects.pop(args["id"], None) is None:
            raise QemuError(f"QEMU refused the QMP command 'object-del': object '{args['id']}' not found")
        return {}

    def _do_migrate(self, args: dict[str, Any]) -> Answer:
        if self._migrating():
            raise QemuError("QEMU refused the QMP command 'migrate': There's a migration process in progress")
        self.cursor = 0
        self._enter(copy.deepcopy(self.answers[0]))
        return {}

    def _do_migrate_cancel(self, args: dict[str, Any]) -> Answer:
        if self.status in CANCELLABLE:
            self.hold_at = None
            self._enter({"status": Q.CANCELLING.value})
        return {}

    def _do_migrate_start_postcopy(self, args: dict[str, Any]) -> Answer:
        # as QEMU 10: refused without the capability or before `migrate`, accepted (and moot) after
        if not self.capabilities["postcopy-ram"]:
            raise QemuError("QEMU refused the QMP command 'migrate-start-postcopy': "
                            "Enable postcopy with migrate_set_capability before the start of migration")
        if self.cursor < 0:
            raise QemuError("QEMU refused the QMP command 'migrate-start-postcopy': "
                            "Postcopy must be started after migration has been started")
        self.postcopy = True
        if self.status is Q.ACTIVE:
            self._enter({**self.current, "status": Q.POSTCOPY_ACTIVE.value})
        return {}

    def _do_query_status(self, args: dict[str, Any]) -> Answer:
        return {"status": self.run_state.value, "running": self.run_state is RunState.RUNNING}

    def _do_cont(self, args: dict[str, Any]) -> Answer:
        if self.run_state is RunState.INMIGRATE:
            raise QemuError("QEMU refused the QMP command 'cont': the VM waits for an incoming migration")
        if self.run_state is not RunState.RUNNING:
            self.run_state = RunState.RUNNING
            self._emit("RESUME")
        return {}


class FakeFiles:
    """What the loop reads of ``VmFiles``: the spec and where the VM's serial log is."""

    def __init__(self, root: Path, spec: VmSpec) -> None:
        self.root = root
        self.spec = spec

    def load_spec(self, name: str) -> VmSpec:
        if name != self.spec.name:
            raise NotFoundError(f"VM {name!r} is not defined on this host.")
        return self.spec

    def paths(self, spec: VmSpec) -> VmPaths:
        return VmPaths(vm_dir=self.root / "shared" / spec.name,
                       run_dir=self.root / "state" / "vms" / spec.name)


@dataclass
class FakeSupervisor:
    """The supervisor of a host that runs one VM, whose QEMU is ``qmp``."""

    vm: str
    qmp: FakeQmp
    files: FakeFiles
    journal: list[str] = field(default_factory=list)
    registered: bool = True
    stopped: list[str] = field(default_factory=list)
    config: Any = None  # what the loop reads of AgentConfig: state_dir (an encrypted migration)

    async def runtime(self, name: str) -> Any:
        return SimpleNamespace(pid=os.getpid() if self.is_alive(name) else None)

    def is_alive(self, name: str) -> bool:
        return name == self.vm and self.registered and self.qmp.alive

    def qmp_session(self, name: str) -> FakeQmp:
        if not self.is_alive(name):  # as the real one: a VM without a live process has no session
            raise ConflictError(f"VM {name!r} is not running.", hint="Start it first.")
        return self.qmp

    async def stop_and_unregister(self, name: str) -> None:
        self.stopped.append(name)
        self.journal.append(f"supervisor stop_and_unregister {name}")
        if name == self.vm:
            self.qmp.kill()
            self.registered = False


def vm_spec(name: str = "web1") -> VmSpec:
    return VmSpec(name=name, uuid="5b0e1c8e-0000-4000-8000-000000000001", cpus=1, memory_mib=128,
                  cpu_model="qemu64", machine_type="q35", datastore="shared",
                  boot=BootSpec(kind=BootKind.KERNEL, image="debian"))


# ----- the target agent ---------------------------------------------------------------------------
ActivateMode = Literal["ok", "unreachable", "incoming_failed"]
#: as the real target (agent/migration_target.py): the stream completed, or post-copy began
HANDED_OVER = (Q.COMPLETED, Q.POSTCOPY_ACTIVE)


def _error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message, "hint": None}})


@dataclass
class FakeTarget:
    """The target agent of the migration: its receiving QEMU (paused, ``-S``) holds whatever the
    source's QEMU has sent, so its incoming stream is ``completed`` once the source's is."""

    source: FakeQmp
    journal: list[str]
    migration_id: int
    vm: str
    activate_mode: ActivateMode = "ok"
    down: bool = False  # the whole host is unreachable
    requests: list[str] = field(default_factory=list)
    #: at each activate: the source QEMU's migration status
    source_at_activate: list[Q] = field(default_factory=list)
    activated: bool = False
    rolled_back: bool = False
    timeline: SwitchoverTimeline = field(default_factory=SwitchoverTimeline)

    def stream(self) -> Q:
        source = self.source.status
        if source is Q.COMPLETED:
            return Q.COMPLETED
        if source.postcopy:  # the source handed the VM over; the rest follows on demand
            return Q.POSTCOPY_ACTIVE
        if source in (Q.FAILED, Q.CANCELLED):
            return Q.FAILED
        return Q.SETUP if source is Q.NONE else Q.ACTIVE

    def run_state(self) -> RunState:
        if self.activated:
            return RunState.RUNNING
        return RunState.PAUSED if self.stream() in HANDED_OVER else RunState.INMIGRATE

    def calls(self, what: str) -> int:
        return self.requests.count(what)

    def path(self, method: str, tail: str = "") -> str:
        """How a request shows in ``requests``: ``"POST /migrations/7/activate"``."""
        return f"{method} /migrations/{self.migration_id}{tail}"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        what = f"{request.method} {request.url.path.removeprefix('/api/v1')}"
        self.requests.append(what)
        if self.down:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if what != "GET /health":
            self.journal.append(f"target {what}")
        if what == "GET /health":
            return httpx.Response(200, json={"name": "target", "time": time.time()})
        if what == self.path("GET", "/incoming"):
            return httpx.Response(200, json={
                "migration_id": self.migration_id, "vm": self.vm,
                "state": "activated" if self.activated else "listening",
                "qemu_alive": not self.rolled_back, "qemu_status": self.run_state().value,
                "stream": self.stream().value, "timeline": self.timeline.model_dump(mode="json")})
        if what == self.path("POST", "/activate"):
            return self._activate(request)
        if what == self.path("DELETE"):
            if self.activated or self.stream() in HANDED_OVER:
                return _error(409, "stream_completed",
                              f"The receiving QEMU of VM {self.vm!r} holds the whole VM.")
            self.rolled_back = True
            return httpx.Response(204)
        return _error(404, "not_found", f"No route {what}.")

    def _activate(self, request: httpx.Request) -> httpx.Response:
        self.source_at_activate.append(self.source.status)
        if self.activate_mode == "unreachable":
            raise httpx.ConnectError("[Errno 113] No route to host", request=request)
        if self.activate_mode == "incoming_failed" or self.rolled_back or self.stream() not in HANDED_OVER:
            self.rolled_back = True
            return _error(409, "incoming_failed", f"VM {self.vm!r} never ran on the target host: QEMU "
                          "could not load its state; the target removed its receiving QEMU.")
        if not self.activated:
            self.activated = True
            now = time.time()
            self.timeline = SwitchoverTimeline(target_loaded=now - 0.001, target_cont=now,
                                               first_announce=now + 0.001)
        return httpx.Response(200, json={"name": self.vm, "uuid": vm_spec(self.vm).uuid,
                                         "power_state": "poweredOn", "qemu_status": "running"})
