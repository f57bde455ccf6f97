"""A fake agent that also plays the live-migration roles (no tests here: helpers for test_migrations*).

The source side runs a scripted "control loop": each GET of a migration advances it one step
(round 1, round 2, completed) unless ``hold`` is set; ``fail_at_round`` makes it fail instead.
On completion the VM moves from this agent's table to its ``peer`` (the target), as the real
source agent's activate + unregister would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from conftest import AGENT_TOKEN, ServerHarness
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from vmshift_fake_agent import FakeAgent, UvicornThread, make_facts

from vmshift.model.agent_migration import IncomingRequest, MigrationProgress, OutgoingMigration
from vmshift.model.api import ErrorInfo
from vmshift.model.enums import PowerState
from vmshift.model.migration import (
    ActionKind,
    MigrationAction,
    MigrationMetrics,
    MigrationPhase,
    MigrationStatus,
    SampleRecord,
)

MIB = 2**20
BANDWIDTH = 125_000_000.0  # what the fake netperf "measures" (1 Gbit/s)
DIRTY_RATE = 10 * MIB


def _missing() -> JSONResponse:
    return JSONResponse({"error": {"code": "not_found", "message": "No such migration.", "hint": None}}, 404)


@dataclass
class MigratingAgent(FakeAgent):
    peer: MigratingAgent | None = None
    netperf: bool = True
    reachable: bool = True
    hold: bool = False
    fail_at_round: int | None = None
    outgoing: dict[int, OutgoingMigration] = field(default_factory=dict)
    progress: dict[int, MigrationProgress] = field(default_factory=dict)
    incoming: dict[int, IncomingRequest] = field(default_factory=dict)

    def _step(self, p: MigrationProgress) -> None:
        if p.status.finished or self.hold:
            return
        if self.fail_at_round is not None and p.round >= self.fail_at_round:
            p.status, p.phase = MigrationStatus.FAILED, MigrationPhase.FAILED
            p.error = ErrorInfo(
                code="qemu_error", message="The target QEMU exited during pre-copy.", hint=None
            )
            if self.peer is not None:
                self.peer.incoming.pop(p.migration_id, None)
            return
        if p.round < 2:
            p.round += 1
            p.transferred_bytes += p.total_bytes // 2
            p.remaining_bytes = p.total_bytes // 4
            return
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
        p.status, p.phase, p.remaining_bytes = MigrationStatus.COMPLETED, MigrationPhase.COMPLETED, 0
        rt = self.vms.pop(p.vm)
        self.specs.pop(p.vm, None)
        if self.peer is not None:
            req = self.peer.incoming.pop(p.migration_id)
            rt.power_state = PowerState.POWERED_ON
            self.peer.vms[p.vm], self.peer.specs[p.vm] = rt, req.spec

    def app(self) -> FastAPI:
        app = super().app()

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

        @app.post("/api/v1/migrations/incoming")
        async def incoming(req: IncomingRequest) -> Any:
            self.incoming[req.migration_id] = req
            return {"uri": f"tcp:{self.facts.migration_address}:4444"}

        @app.delete("/api/v1/migrations/{mid}")
        async def rollback(mid: int) -> Any:
            self.incoming.pop(mid, None)
            return JSONResponse({}, 200)

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
            return p.model_dump(mode="json")

        @app.get("/api/v1/migrations/{mid}")
        async def progress(mid: int) -> Any:
            p = self.progress.get(mid)
            if p is None:
                return _missing()
            self._step(p)
            return p.model_dump(mode="json")

        @app.post("/api/v1/migrations/{mid}/cancel")
        async def cancel(mid: int) -> Any:
            p = self.progress.get(mid)
            if p is None:
                return _missing()
            if not p.status.finished:
                p.status, p.phase = MigrationStatus.CANCELLED, MigrationPhase.CANCELLED
                p.error = ErrorInfo(code="cancelled", message="The migration was cancelled.", hint=None)
                if self.peer is not None:
                    self.peer.incoming.pop(mid, None)
                rt = self.vms.get(p.vm)
                if rt is not None:
                    rt.power_state = PowerState.POWERED_ON
            return p.model_dump(mode="json")

        return app


Pair = tuple[MigratingAgent, MigratingAgent]


@pytest.fixture(name="migrating_agents")
def migrating_agents_fixture() -> Iterator[Callable[..., tuple[MigratingAgent, UvicornThread]]]:
    running: list[UvicornThread] = []

    def start(name: str, **kw: Any) -> tuple[MigratingAgent, UvicornThread]:
        agent = MigratingAgent(facts=make_facts(name, **kw), token=AGENT_TOKEN)
        thread = UvicornThread(agent.app()).start()
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
def pair_fixture(
    server: ServerHarness, migrating_agents: Callable[..., tuple[MigratingAgent, UvicornThread]]
) -> Pair:
    """host-1 (source) and host-2 (target) sharing datastore shared-1, with vm-1 running on host-1."""
    src, t1 = migrating_agents("host-1")
    dst, t2 = migrating_agents("host-2")
    src.peer, dst.peer = dst, src
    server.add_host(t1)
    server.add_host(t2)
    start_vm(server)
    return src, dst
