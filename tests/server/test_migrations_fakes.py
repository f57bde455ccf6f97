"""A fake agent that also plays the live-migration roles (no tests here: helpers for test_migrations*
and test_switchover).

Source role, a scripted "control loop": each GET of a migration advances it one step: pre-copy
rounds 1 and 2, the switchover (the source VM paused), then the end that ``end`` names:

- ``completed``: the VM moves from this agent's table to its ``peer`` (the target), as the real
  source agent's activate + unregister would;
- ``needs_finalize``: the target could not be told to run, so the VM waits paused on both hosts
  (the target holds the whole stream); the error's hint names ``vmshift migration finalize ID``;
- ``lost``: the source QEMU is gone and the target never got the whole VM.

``hold`` stops the loop where it is; ``hold_switchover`` keeps it in the switchover, where a cancel
is refused with 409 ``switchover_started`` as the real agent refuses it; ``fail_at_round`` makes it
fail in pre-copy. Every answer carries the request's nonce, or ``foreign_nonce`` when a test makes
the record look like another server's. ``POST /migrations/{id}/finalize`` ends a needs_finalize
migration as its resolution says and is recorded in ``finalize_requests``.

Target role: ``POST /migrations/incoming`` adds a receiving QEMU to the VM table (paused, with
``incoming_migration`` set, as a real agent reports it) and answers port 4444 with its URI, or
``answer_uri`` when a test makes it answer another one. ``GET /migrations/{id}/incoming`` answers
the target's proof: derived from the migration (stream active; completed once the source's stream
completed; running once activated) unless a test scripts it with ``script_proof``; 503 while
``proof_unavailable``. ``POST .../activate`` runs the receiving copy (recorded in ``activations``);
``DELETE`` discards it, refused once the stream completed, as the real agent refuses it.

``journal``, shared by the two agents of a pair, lists their migration requests in order as
(host, method, path); ``thread`` is the agent's HTTP server (stop it and the host is unreachable).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import pytest
from conftest import ServerHarness
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from vmshift_fake_agent import FakeAgent, UvicornThread, make_facts

from vmshift.model.agent_migration import (
    FinalizeRequest,
    IncomingRequest,
    IncomingState,
    MigrationProgress,
    OutgoingMigration,
    PeerGrant,
)
from vmshift.model.api import ErrorInfo
from vmshift.model.enums import PowerState
from vmshift.model.migration import (
    ActionKind,
    FinalizeResolution,
    MigrationAction,
    MigrationMetrics,
    MigrationPhase,
    MigrationStatus,
    SampleRecord,
)
from vmshift.model.vm import VmRuntime

MIB = 2**20
BANDWIDTH = 125_000_000.0  # what the fake netperf "measures" (1 Gbit/s)
DIRTY_RATE = 10 * MIB
SWITCHOVER_STARTED = "the switchover has started; the migration will finish or fail on its own."


def _error(status: int, code: str, message: str, hint: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "hint": hint}}, status)


def _missing() -> JSONResponse:
    return _error(404, "not_found", "No such migration.")


class SourceEnd(StrEnum):
    """How the source's scripted stream ends once the switchover is over."""

    COMPLETED = "completed"
    NEEDS_FINALIZE = "needs_finalize"
    LOST = "lost"


@dataclass(frozen=True)
class Proof:
    """What the target says of its receiving QEMU (the QEMU fields of an IncomingState)."""

    stream: str | None
    qemu_status: str | None
    qemu_alive: bool = True


HOLDS_STREAM = Proof("completed", "paused")  # the whole VM arrived; it never ran here (-S)
RUNS_VM = Proof("completed", "running")
STREAM_ACTIVE = Proof("active", "inmigrate")  # the stream never completed
QEMU_GONE = Proof(None, None, qemu_alive=False)


@dataclass
class MigratingAgent(FakeAgent):
    peer: MigratingAgent | None = None
    netperf: bool = True
    reachable: bool = True
    # source role
    hold: bool = False
    hold_switchover: bool = False
    fail_at_round: int | None = None
    end: SourceEnd = SourceEnd.COMPLETED
    foreign_nonce: str | None = None
    outgoing: dict[int, OutgoingMigration] = field(default_factory=dict)
    progress: dict[int, MigrationProgress] = field(default_factory=dict)
    finalize_requests: list[tuple[int, FinalizeResolution]] = field(default_factory=list)
    # target role
    incoming: dict[int, IncomingRequest] = field(default_factory=dict)
    prepared: list[IncomingRequest] = field(default_factory=list)  # every prepare request, in order
    grants: dict[int, PeerGrant] = field(default_factory=dict)  # every grant the server sent, kept
    revoked: list[int] = field(default_factory=list)  # DELETE /migrations/{id}/grant, in order
    loaded: set[int] = field(default_factory=set)  # streams that completed into this host
    activations: list[int] = field(default_factory=list)
    proof: Proof | None = None
    proof_unavailable: bool = False
    answer_uri: str | None = None  # what prepare answers as its uri (None: tcp: to its own address)
    nbd_address: str | None = None  # where a relocate's exports say they are (None: its migration address)
    journal: list[tuple[str, str, str]] = field(default_factory=list)
    thread: UvicornThread | None = None  # its HTTP server (stop it to make the host unreachable)

    # -- target role ------------------------------------------------------------------------------
    def _receive(self, req: IncomingRequest) -> None:
        self.prepared.append(req)
        self.incoming[req.migration_id] = req
        if req.grant is not None:
            self.grants[req.migration_id] = req.grant
        self.vms[req.spec.name] = VmRuntime(
            name=req.spec.name, uuid=req.spec.uuid, power_state=PowerState.PAUSED, pid=4343,
            qemu_status="inmigrate", incoming_migration=req.migration_id,
        )  # fmt: skip

    def _receiving(self, mid: int) -> VmRuntime | None:
        req = self.incoming.get(mid)
        rt = self.vms.get(req.spec.name) if req is not None else None
        return rt if rt is not None and rt.incoming_migration == mid else None

    def _discard(self, mid: int) -> None:
        rt = self._receiving(mid)
        if rt is not None:
            del self.vms[rt.name]
        self.incoming.pop(mid, None)
        self.loaded.discard(mid)

    def _stream_loaded(self, mid: int) -> None:
        self.loaded.add(mid)
        rt = self._receiving(mid)
        if rt is not None:
            rt.qemu_status = "paused"

    def _run_received(self, mid: int) -> VmRuntime:
        req = self.incoming.pop(mid)
        self.loaded.add(mid)
        rt = VmRuntime(name=req.spec.name, uuid=req.spec.uuid, power_state=PowerState.POWERED_ON, pid=4343,
                       qemu_status="running")  # fmt: skip
        self.vms[req.spec.name], self.specs[req.spec.name] = rt, req.spec
        return rt

    def script_proof(self, proof: Proof) -> None:
        """From now on the target answers ``proof`` for every migration, and its receiving QEMUs
        look the part in ``GET /vms`` (gone, paused, running)."""
        self.proof = proof
        for mid in list(self.incoming):
            rt = self._receiving(mid)
            if rt is None:
                continue
            if not proof.qemu_alive:
                del self.vms[rt.name]
            else:
                rt.qemu_status = proof.qemu_status
                running = proof.qemu_status == "running"
                rt.power_state = PowerState.POWERED_ON if running else PowerState.PAUSED

    def _proof_of(self, mid: int) -> Proof:
        if self.proof is not None:
            return self.proof
        if mid in self.activations:
            return RUNS_VM
        return HOLDS_STREAM if mid in self.loaded else STREAM_ACTIVE

    # -- source role ------------------------------------------------------------------------------
    def _answer(self, p: MigrationProgress) -> dict[str, Any]:
        body = p.model_dump(mode="json")
        if self.foreign_nonce is not None:
            body["nonce"] = self.foreign_nonce
        return body

    def _step(self, p: MigrationProgress) -> None:
        if p.status is not MigrationStatus.RUNNING or self.hold:
            return
        if self.fail_at_round is not None and p.round >= self.fail_at_round:
            p.status, p.phase = MigrationStatus.FAILED, MigrationPhase.FAILED
            p.error = ErrorInfo(
                code="qemu_error", message="The target QEMU exited during pre-copy.", hint=None
            )
            if self.peer is not None:
                self.peer._discard(p.migration_id)
            return
        if p.round < 2:
            p.round += 1
            p.transferred_bytes += p.total_bytes // 2
            p.remaining_bytes = p.total_bytes // 4
            return
        if p.phase is not MigrationPhase.SWITCHOVER:
            p.phase = MigrationPhase.SWITCHOVER  # QEMU stopped the vCPUs for the last pages
            rt = self.vms[p.vm]
            rt.power_state, rt.qemu_status = PowerState.PAUSED, "finish-migrate"
            return
        if not self.hold_switchover:
            self._end(p)

    def _end(self, p: MigrationProgress) -> None:
        sample = SampleRecord(
            time_s=0.5, qemu_status="active", round=2, transferred_bytes=p.transferred_bytes,
            remaining_bytes=p.remaining_bytes, total_bytes=p.total_bytes, dirty_rate_bps=DIRTY_RATE,
            throughput_bps=BANDWIDTH, throttle_percent=0,
        )  # fmt: skip
        p.actions = [
            MigrationAction(
                kind=ActionKind.SET_DOWNTIME_LIMIT,
                value=0.3,
                reason="initial limit",
                time_s=0.5,
                sample=sample,
            )
        ]
        p.metrics = MigrationMetrics(
            total_ms=1234, setup_ms=12, downtime_ms=42, bytes_sent=p.transferred_bytes, rounds=3,
            mean_throughput_bps=BANDWIDTH, peak_throughput_bps=BANDWIDTH, mean_dirty_rate_bps=DIRTY_RATE,
        )  # fmt: skip
        p.remaining_bytes = 0
        mid, rt = p.migration_id, self.vms[p.vm]
        if self.end is SourceEnd.COMPLETED:
            p.status, p.phase = MigrationStatus.COMPLETED, MigrationPhase.COMPLETED
            self._hand_over(p)
        elif self.end is SourceEnd.NEEDS_FINALIZE:
            p.status, p.phase = MigrationStatus.NEEDS_FINALIZE, MigrationPhase.FINISH
            p.error = ErrorInfo(
                code="needs_finalize",
                message="The target agent could not be told to run the VM: connection refused. The VM stays "
                "paused on both hosts.",
                hint=f"Once the target host answers, run 'vmshift migration finalize {mid}'; if the target "
                f"provably never ran the VM, 'vmshift vm resume {p.vm}' resumes the source.",
            )
            rt.qemu_status = "postmigrate"
            if self.peer is not None:
                self.peer._stream_loaded(mid)
        else:
            p.status, p.phase = MigrationStatus.LOST, MigrationPhase.LOST
            p.error = ErrorInfo(
                code="vm_lost",
                message=f"VM '{p.vm}' is lost: the source QEMU exited during the migration, and the target "
                f"had not received the whole VM (its stream was active). Its serial log is kept in "
                f"/srv/shared-1/{p.vm}/serial.log.",
                hint="Start the VM again from its disks (a cold boot); check the hosts' QEMU logs first.",
            )
            rt.power_state, rt.pid, rt.qemu_status = PowerState.POWERED_OFF, None, None
            rt.died, rt.exit_reason = True, "QEMU process exited"
            if self.peer is not None:
                self.peer._discard(mid)

    def _hand_over(self, p: MigrationProgress) -> None:
        """The VM now runs on the peer only: this copy stops and is unregistered."""
        self.vms.pop(p.vm, None)
        spec = self.specs.pop(p.vm, None)
        peer = self.peer
        if peer is None:
            return
        if p.migration_id in peer.incoming:
            peer._run_received(p.migration_id)
        elif p.vm not in peer.vms and spec is not None:
            peer.vms[p.vm] = VmRuntime(name=p.vm, uuid=spec.uuid, power_state=PowerState.POWERED_ON,
                                       pid=4343, qemu_status="running")  # fmt: skip
            peer.specs[p.vm] = spec

    def _finalize(self, p: MigrationProgress, resolution: FinalizeResolution) -> None:
        if resolution is FinalizeResolution.TARGET_ACTIVATED:
            p.status, p.phase, p.error = MigrationStatus.COMPLETED, MigrationPhase.COMPLETED, None
            self._hand_over(p)
            return
        rt = self.vms.get(p.vm)
        if rt is None or not rt.has_qemu:
            p.status, p.phase = MigrationStatus.LOST, MigrationPhase.LOST
            p.error = ErrorInfo(
                code="vm_lost",
                message=f"VM '{p.vm}' is lost: its source QEMU is gone and the target never received the "
                "whole VM.",
            )
            return
        rt.power_state, rt.qemu_status = PowerState.POWERED_ON, "running"
        p.status, p.phase = MigrationStatus.FAILED, MigrationPhase.FAILED
        p.error = ErrorInfo(
            code="resumed_source",
            message="The target never ran the VM. The VM was resumed on the source.",
            hint="The VM keeps running on the source host; retry once the cause is fixed.",
        )

    def app(self) -> FastAPI:
        app = super().app()

        @app.middleware("http")
        async def journal(request: Request, call_next: Any) -> Any:
            if "/migrations" in request.url.path:
                self.journal.append((self.facts.name, request.method, request.url.path))
            return await call_next(request)

        @app.post("/api/v1/netperf/sink")
        async def sink(body: dict[str, Any]) -> Any:
            if not self.netperf:
                return JSONResponse({"detail": "Not Found"}, 404)
            return {"address": self.facts.migration_address, "port": 9}

        @app.post("/api/v1/netperf/measure")
        async def measure(body: dict[str, Any]) -> Any:
            if not self.netperf:
                return JSONResponse({"detail": "Not Found"}, 404)
            if not self.reachable:
                return {"reachable": False, "bandwidth_bps": None, "error": "connection timed out"}
            return {"reachable": True, "bandwidth_bps": BANDWIDTH, "error": None}

        @app.post("/api/v1/vms/{name}/dirty-rate")
        async def dirty_rate(name: str, body: dict[str, Any]) -> Any:
            resident = self.specs[name].memory_mib * MIB // 4 if name in self.specs else None
            return {"dirty_rate_bps": DIRTY_RATE, "seconds": body.get("seconds", 1),
                    "resident_bytes": resident}

        # -- target role ----------------------------------------------------------------------
        @app.delete("/api/v1/migrations/{mid}/grant")
        async def revoke(mid: int) -> Any:
            self.revoked.append(mid)
            return {"revoked": mid in self.grants}

        @app.post("/api/v1/migrations/incoming")
        async def incoming(req: IncomingRequest) -> Any:
            self._receive(req)
            # a relocate: one NBD export per disk of the (target) spec, as the real target makes them
            disks = req.spec.disks if req.relocate else []
            where = self.nbd_address or self.facts.migration_address
            nbd = [{"index": i, "uri": f"nbd://{where}:10809/disk{i}",
                    "size_bytes": d.size_mib * MIB} for i, d in enumerate(disks)]
            own = f"tcp:{self.facts.migration_address}:4444"
            uri = self.answer_uri if self.answer_uri is not None else own
            return {"port": 4444, "uri": uri, "nbd": nbd}

        @app.get("/api/v1/migrations/{mid}/incoming")
        async def incoming_state(mid: int) -> Any:
            if self.proof_unavailable:
                return _error(503, "unavailable", "The agent is starting up.", "Try again in a moment.")
            req = self.incoming.get(mid)
            if req is None and mid not in self.activations:
                return _error(404, "not_found", f"This host receives no migration {mid}.")
            vm = req.spec.name if req is not None else next(iter(self.vms), "")
            proof = self._proof_of(mid)
            state = IncomingState(
                migration_id=mid, vm=vm, state="activated" if mid in self.activations else "prepared",
                qemu_alive=proof.qemu_alive, qemu_status=proof.qemu_status, stream=proof.stream,
            )  # fmt: skip
            return state.model_dump(mode="json")

        @app.post("/api/v1/migrations/{mid}/activate")
        async def activate(mid: int) -> Any:
            if mid not in self.incoming:
                return _error(409, "conflict", f"Migration {mid} was rolled back on this host.")
            if not self._proof_of(mid).qemu_alive:
                return _error(500, "qemu_error", "The receiving QEMU is gone; the stream did not arrive.")
            self.activations.append(mid)
            return self._run_received(mid).model_dump(mode="json")

        @app.delete("/api/v1/migrations/{mid}")
        async def rollback(mid: int) -> Any:
            proof = self._proof_of(mid)
            holds = proof.qemu_alive and (proof.stream == "completed" or proof.qemu_status == "running")
            if mid in self.activations or (mid in self.incoming and holds):
                return _error(409, "stream_completed", f"The receiving QEMU of migration {mid} holds the "
                              "whole VM (its stream completed), so it is not discarded.")  # fmt: skip
            self._discard(mid)
            return JSONResponse({}, 200)

        # -- source role ----------------------------------------------------------------------
        @app.post("/api/v1/migrations")
        async def outgoing(req: OutgoingMigration) -> Any:
            self.outgoing[req.migration_id] = req
            total = self.specs[req.vm].memory_mib * MIB
            p = MigrationProgress(
                migration_id=req.migration_id, vm=req.vm, phase=MigrationPhase.PRECOPY,
                status=MigrationStatus.RUNNING, round=1, total_bytes=total, remaining_bytes=total,
                throughput_bps=BANDWIDTH, dirty_rate_bps=DIRTY_RATE, updated_at=datetime.now(UTC),
                nonce=req.nonce,
            )  # fmt: skip
            self.progress[req.migration_id] = p
            return self._answer(p)

        @app.get("/api/v1/migrations/{mid}")
        async def progress(mid: int) -> Any:
            p = self.progress.get(mid)
            if p is None:
                return _missing()
            self._step(p)
            return self._answer(p)

        @app.post("/api/v1/migrations/{mid}/finalize")
        async def finalize(mid: int, body: FinalizeRequest) -> Any:
            self.finalize_requests.append((mid, body.resolution))
            p = self.progress.get(mid)
            if p is None:
                return _missing()
            if p.status.finished:
                return self._answer(p)
            if p.status is not MigrationStatus.NEEDS_FINALIZE:
                return _error(
                    409, "conflict", f"Migration {mid} is still running; there is nothing to finalize."
                )
            if body.resolution is FinalizeResolution.RETRY:
                return _error(422, "invalid_input", "The fake agent does not script a retry.")
            self._finalize(p, body.resolution)
            return self._answer(p)

        @app.post("/api/v1/migrations/{mid}/cancel")
        async def cancel(mid: int) -> Any:
            p = self.progress.get(mid)
            if p is None:
                return _missing()
            if p.status.finished:
                return self._answer(p)
            if p.phase in (MigrationPhase.SWITCHOVER, MigrationPhase.POSTCOPY, MigrationPhase.FINISH):
                return _error(
                    409,
                    "switchover_started",
                    f"Migration {mid} cannot be cancelled: {SWITCHOVER_STARTED}",
                    f"Follow it with 'vmshift migration show {mid}'.",
                )
            p.status, p.phase = MigrationStatus.CANCELLED, MigrationPhase.CANCELLED
            p.error = ErrorInfo(code="cancelled", message="The migration was cancelled.", hint=None)
            if self.peer is not None:
                self.peer._discard(mid)
            rt = self.vms.get(p.vm)
            if rt is not None:
                rt.power_state, rt.qemu_status = PowerState.POWERED_ON, "running"
            return self._answer(p)

        return app


Pair = tuple[MigratingAgent, MigratingAgent]
AgentStarter = Callable[..., tuple[MigratingAgent, UvicornThread]]


@pytest.fixture(name="migrating_agents")
def migrating_agents_fixture() -> Iterator[AgentStarter]:
    running: list[UvicornThread] = []

    def start(name: str, **kw: Any) -> tuple[MigratingAgent, UvicornThread]:
        agent = MigratingAgent(facts=make_facts(name, **kw))
        thread = UvicornThread(agent.app(), tls=agent.tls).start()
        agent.thread = thread
        running.append(thread)
        return agent, thread

    yield start
    for t in running:
        t.stop(force=True)


def start_vm(server: ServerHarness, name: str = "vm-1", host: str = "host-1", memory_mib: int = 256) -> None:
    body = {"name": name, "host": host, "datastore": "shared-1", "memory_mib": memory_mib,
            "networks": ["VM Network"], "disks_mib": [64], "start": True}  # fmt: skip
    r = server.client.post("/vms", json=body)
    assert r.status_code == 202, r.text
    assert server.wait_task(r.json()["id"])["state"] == "success"


@pytest.fixture(name="pair")
def pair_fixture(server: ServerHarness, migrating_agents: AgentStarter) -> Pair:
    """host-1 (source) and host-2 (target) sharing datastore shared-1, with vm-1 running on host-1."""
    src, t1 = migrating_agents("host-1")
    dst, t2 = migrating_agents("host-2")
    src.peer, dst.peer = dst, src
    dst.journal = src.journal
    server.add_host(t1)
    server.add_host(t2)
    start_vm(server)
    return src, dst
