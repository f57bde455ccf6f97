"""Disk moves through the server (Storage vMotion, cold moves) against fake agents on real HTTP.

The fake agent plays the source role of a disk move as a script: each GET of a move advances it
one step (copy half, copy all, finish, completed) unless ``hold`` keeps it copying or ``fail``
ends it failed. Its target role records the NBD exports the server asks for. What is checked is
what a user sees: the VM's host and files in the inventory, the migration record, and which
requests reached which host (a refused move reaches none).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import ServerHarness, wait_for
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from vmshift_fake_agent import FakeAgent, UvicornThread, make_facts

from vmshift.model.api import ErrorInfo
from vmshift.model.enums import PowerState
from vmshift.model.migration import MigrationPhase
from vmshift.model.moves import (
    DiskExportRequest,
    DiskExports,
    DiskMoveRequest,
    MoveProgress,
    MoveState,
    NbdTarget,
)

MIB = 2**20


@dataclass
class MovingAgent(FakeAgent):
    moves: dict[int, MoveProgress] = field(default_factory=dict)
    requests: dict[int, DiskMoveRequest] = field(default_factory=dict)
    exports: dict[int, DiskExportRequest] = field(default_factory=dict)
    export_deletes: list[tuple[int, str]] = field(default_factory=list)  # (move id, keep_files)
    vm_deletes: list[str] = field(default_factory=list)  # query strings of DELETE /vms/NAME
    cancels: list[int] = field(default_factory=list)
    hold: bool = False
    fail: bool = False
    partial: bool = False  # the failure comes after disk 0 pivoted (the agent wrote a mixed definition)

    def _advance(self, p: MoveProgress) -> None:
        if p.state.finished or self.hold:
            return
        if self.fail:
            p.state, p.phase = MoveState.FAILED, MigrationPhase.FAILED
            p.error = ErrorInfo(code="qemu_error", message="No space left on device.", hint="Free space.")
            if self.partial:
                spec = self.requests[p.move_id].target_spec
                old = self.specs[p.vm]
                p.written_spec = spec.model_copy(update={"datastore": old.datastore,
                                                         "disks": [spec.disks[0], *old.disks[1:]]})
        elif p.done_bytes < p.total_bytes:
            p.done_bytes = min(p.total_bytes, p.done_bytes + p.total_bytes // 2)
            p.rate_bps, p.eta_s, p.elapsed_s = 100 * MIB, 0.5, p.elapsed_s + 0.5
        elif p.phase is MigrationPhase.COPY:
            p.phase = MigrationPhase.FINISH
        else:
            p.state, p.phase = MoveState.COMPLETED, MigrationPhase.COMPLETED

    def app(self) -> FastAPI:
        app = super().app()

        @app.middleware("http")
        async def record_deletes(request: Request, call_next: Any) -> Any:
            if request.method == "DELETE" and request.url.path.startswith("/api/v1/vms/"):
                self.vm_deletes.append(request.url.query)
            return await call_next(request)

        @app.post("/api/v1/moves")
        async def start(req: DiskMoveRequest) -> Any:
            self.requests[req.move_id] = req
            total = sum(d.size_mib for d in req.target_spec.disks) * MIB
            p = MoveProgress(move_id=req.move_id, nonce=req.nonce, vm=req.vm, kind=req.kind,
                             state=MoveState.RUNNING, phase=MigrationPhase.COPY, total_bytes=total)
            self.moves[req.move_id] = p
            return p.model_dump(mode="json")

        @app.get("/api/v1/moves/{mid}")
        async def progress(mid: int) -> Any:
            p = self.moves.get(mid)
            if p is None:
                return JSONResponse({"error": {"code": "not_found", "message": "no move", "hint": None}}, 404)
            self._advance(p)
            return p.model_dump(mode="json")

        @app.post("/api/v1/moves/{mid}/cancel")
        async def cancel(mid: int) -> Any:
            self.cancels.append(mid)
            p = self.moves[mid]
            if not p.state.finished:
                p.state, p.phase = MoveState.CANCELLED, MigrationPhase.CANCELLED
                p.error = ErrorInfo(code="cancelled", message="The move was cancelled.", hint=None)
            return p.model_dump(mode="json")

        @app.post("/api/v1/disk-exports")
        async def export(req: DiskExportRequest) -> Any:
            self.exports[req.move_id] = req
            targets = [NbdTarget(index=i, uri=f"nbd://127.0.0.1:10809/disk{i}", size_bytes=size)
                       for i, size in enumerate(req.sizes_bytes)]
            return DiskExports(move_id=req.move_id, targets=targets).model_dump(mode="json")

        @app.delete("/api/v1/disk-exports/{mid}")
        async def unexport(mid: int, keep_files: str) -> Any:
            self.export_deletes.append((mid, keep_files))
            return {"deleted": mid}

        return app


@pytest.fixture(name="hosts")
def hosts_fixture(server: ServerHarness) -> Iterator[tuple[MovingAgent, MovingAgent]]:
    running = []
    pair = []
    for name in ("host-1", "host-2"):
        agent = MovingAgent(facts=make_facts(name))
        thread = UvicornThread(agent.app(), tls=agent.tls).start()
        running.append(thread)
        server.add_host(thread)
        pair.append(agent)
    yield pair[0], pair[1]
    for t in running:
        t.stop(force=True)


def create_vm(server: ServerHarness, *, start: bool, disks: list[int] | None = None) -> None:
    body = {"name": "vm-1", "host": "host-1", "datastore": "shared-1", "memory_mib": 256,
            "networks": ["VM Network"], "disks_mib": disks or [64, 128], "start": start}
    r = server.client.post("/vms", json=body)
    assert r.status_code == 202, r.text
    assert server.wait_task(r.json()["id"])["state"] == "success"


def move(server: ServerHarness, **body: Any) -> Any:
    return server.client.post("/vms/vm-1/migrate", json=body)


def vm(server: ServerHarness) -> dict[str, Any]:
    r = server.client.get("/vms/vm-1")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def spec_places(server: ServerHarness) -> tuple[str, list[str]]:
    v = vm(server)
    return v["datastore"], [d["datastore"] for d in v["disks"]]


def test_storage_vmotion_moves_the_files_and_keeps_the_host(
    server: ServerHarness, hosts: tuple[MovingAgent, MovingAgent]
) -> None:
    src, dst = hosts
    create_vm(server, start=True)
    r = move(server, datastore="local-host-1", disk_format="raw")
    assert r.status_code == 202, r.text
    started = r.json()
    assert started["migration_kind"] == "storage"
    assert server.wait_task(started["id"])["state"] == "success"
    m = server.client.get(f"/migrations/{started['migration_id']}").json()
    assert (m["kind"], m["status"], m["source_datastore"], m["target_datastore"]) == (
        "storage", "completed", "shared-1", "local-host-1")
    assert m["bytes_sent"] == 192 * MIB
    req = src.requests[started["migration_id"]]
    assert req.targets == [] and [d.file for d in req.target_spec.disks] == ["disk0.raw", "disk1.raw"]
    assert vm(server)["host"] == "host-1"
    assert spec_places(server) == ("local-host-1", ["local-host-1", "local-host-1"])
    files = [(d["file"], d["format"]) for d in vm(server)["disks"]]
    assert files == [("disk0.raw", "raw"), ("disk1.raw", "raw")]
    assert dst.moves == {} and dst.exports == {}  # the other host took no part
    events = server.client.get("/events", params={"target": "vm-1"}).json()
    assert any("moved from host-1/shared-1 to host-1/local-host-1" in e["message"] for e in events)


def test_a_failed_copy_leaves_the_vm_on_its_files(
    server: ServerHarness, hosts: tuple[MovingAgent, MovingAgent]
) -> None:
    src, _dst = hosts
    create_vm(server, start=True)
    src.fail = True
    started = move(server, datastore="local-host-1").json()
    task = server.wait_task(started["id"])
    assert task["state"] == "error" and "No space left" in task["error"]["message"]
    m = server.client.get(f"/migrations/{started['migration_id']}").json()
    assert m["status"] == "failed" and m["error"]["message"] == "No space left on device."
    assert spec_places(server) == ("shared-1", ["shared-1", "shared-1"])


def test_cancel_mid_copy_rolls_back_on_the_source(
    server: ServerHarness, hosts: tuple[MovingAgent, MovingAgent]
) -> None:
    src, _dst = hosts
    create_vm(server, start=True)
    src.hold = True
    started = move(server, datastore="local-host-1").json()
    mid = started["migration_id"]
    wait_for(lambda: server.client.get(f"/migrations/{mid}").json()["phase"] == "copy", 10, "the copy")
    r = server.client.post(f"/tasks/{started['id']}/cancel")
    assert r.status_code in (200, 202), r.text
    assert server.wait_task(started["id"])["state"] == "cancelled"
    assert src.cancels == [mid]
    assert server.client.get(f"/migrations/{mid}").json()["status"] == "cancelled"
    assert spec_places(server) == ("shared-1", ["shared-1", "shared-1"])


def test_a_cold_move_to_another_host_copies_into_its_exports_then_hands_over(
    server: ServerHarness, hosts: tuple[MovingAgent, MovingAgent]
) -> None:
    src, dst = hosts
    create_vm(server, start=False)
    started = move(server, host="host-2", datastore="local-host-2").json()
    assert started["migration_kind"] == "cold"
    assert server.wait_task(started["id"])["state"] == "success"
    mid = started["migration_id"]
    export = dst.exports[mid]
    assert export.sizes_bytes == [64 * MIB, 128 * MIB] and export.spec.datastore == "local-host-2"
    assert [t.uri for t in src.requests[mid].targets] == [
        "nbd://127.0.0.1:10809/disk0", "nbd://127.0.0.1:10809/disk1"]
    assert dst.export_deletes == [(mid, "true")]
    assert dst.specs["vm-1"].datastore == "local-host-2"  # registered on its copies
    assert "vm-1" not in src.specs and src.vm_deletes == [""]  # the originals were deleted
    assert vm(server)["host"] == "host-2"
    assert spec_places(server) == ("local-host-2", ["local-host-2", "local-host-2"])


def test_a_failed_cold_copy_removes_the_targets_files(
    server: ServerHarness, hosts: tuple[MovingAgent, MovingAgent]
) -> None:
    src, dst = hosts
    create_vm(server, start=False)
    src.fail = True
    started = move(server, host="host-2", datastore="local-host-2").json()
    assert server.wait_task(started["id"])["state"] == "error"
    assert dst.export_deletes == [(started["migration_id"], "false")]
    assert "vm-1" not in dst.specs and "vm-1" in src.specs
    assert vm(server)["host"] == "host-1"


def test_a_cold_move_between_hosts_sharing_the_datastore_copies_nothing(
    server: ServerHarness, hosts: tuple[MovingAgent, MovingAgent]
) -> None:
    src, dst = hosts
    create_vm(server, start=False)
    started = move(server, host="host-2").json()
    assert server.wait_task(started["id"])["state"] == "success"
    assert src.requests == {} and dst.exports == {}
    assert src.vm_deletes == ["keep_files=true"] and "vm-1" in dst.specs
    assert vm(server)["host"] == "host-2"


def test_moves_that_cannot_work_are_refused_before_anything_is_copied(
    server: ServerHarness, hosts: tuple[MovingAgent, MovingAgent]
) -> None:
    src, dst = hosts
    create_vm(server, start=False, disks=[20_000])  # local-host-2 has 9000 MiB free
    cases = [
        (move(server, host="host-2", datastore="local-host-2"), 409, "datastore_space", "9000 MiB free"),
        (move(server, datastore="local-host-2"), 422, "target_datastore", "does not see"),
        (move(server, datastore="shared-1"), 409, "kind", "nothing to move"),
    ]
    for r, status, check, words in cases:
        assert r.status_code in (status, 409), r.text  # 409 too: a host missed heartbeats under load
        body = r.json()
        assert body["error"]["message"] and body["error"]["hint"], body
        failed = {x["check"]: x for x in body["report"]["results"] if x["severity"] == "error"}
        assert check in failed and words in failed[check]["message"] and failed[check]["hint"], body
        if len(failed) == 1:
            assert r.status_code == status and body["error"]["message"] == failed[check]["message"]
    assert src.requests == {} and dst.exports == {}
    assert server.client.get("/migrations").json() == []
    r = move(server, host="host-2", datastore="local-host-2", check_only=True)
    assert r.status_code == 200 and any(x["check"] == "datastore_space" for x in r.json()["results"])


def test_a_paused_vm_is_not_moved(server: ServerHarness, hosts: tuple[MovingAgent, MovingAgent]) -> None:
    create_vm(server, start=True)
    r = server.client.post("/vms/vm-1/power", json={"action": "pause"})
    assert server.wait_task(r.json()["id"])["state"] == "success"
    wait_for(lambda: vm(server)["power_state"] == PowerState.PAUSED.value, 10, "the VM to be paused")
    r = move(server, datastore="local-host-1")
    assert r.status_code == 409 and "paused" in r.json()["error"]["message"]


def test_a_move_survives_a_server_restart(
    server: ServerHarness, hosts: tuple[MovingAgent, MovingAgent]
) -> None:
    src, _dst = hosts
    create_vm(server, start=True)
    src.hold = True
    started = move(server, datastore="local-host-1").json()
    mid = started["migration_id"]
    wait_for(lambda: server.client.get(f"/migrations/{mid}").json()["phase"] == "copy", 10, "the copy")
    server.stop()
    src.hold = False
    server.start()
    assert server.wait_task(started["id"])["state"] == "success"
    assert len(src.requests) == 1  # followed again, not started again
    assert spec_places(server) == ("local-host-1", ["local-host-1", "local-host-1"])


def test_a_move_that_failed_past_its_pivot_records_the_files_where_they_are(
    server: ServerHarness, hosts: tuple[MovingAgent, MovingAgent]
) -> None:
    src, _dst = hosts
    create_vm(server, start=True)
    src.fail = src.partial = True
    started = move(server, datastore="local-host-1").json()
    assert server.wait_task(started["id"])["state"] == "error"
    assert spec_places(server) == ("shared-1", ["local-host-1", "shared-1"])
    events = server.client.get("/events", params={"target": "vm-1"}).json()
    said = [e["message"] for e in events if "ended part way" in e["message"]]
    assert said and "--datastore local-host-1" in said[0]
