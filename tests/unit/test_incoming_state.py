"""The target's proof (``GET /migrations/{id}/incoming``) is one consistent look at its QEMU.

QEMU ends an incoming migration by setting the loaded VM's run state (``paused`` under ``-S``) and
only then marking the stream ``completed``. Read in that order — the stream, then the run state — a
completed stream always comes with the run state that follows it; the other way round, a stream that
completed between the two reads was reported beside the ``inmigrate`` it had left.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

from vmshift.agent.migration_store import MigrationRole, MigrationStore, StoredMigration, TargetState
from vmshift.agent.migration_target import IncomingMigrations
from vmshift.agent.supervisor import Supervisor
from vmshift.qemu.qmp import QmpStatus

MID = 42


class CompletingQemu:
    """A receiving QEMU whose stream completes right after the first question it answers."""

    def __init__(self) -> None:
        self.loaded = False
        self.asked: list[str] = []

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        reply: dict[str, Any] = {}
        if cmd == "query-migrate":
            reply = {"status": "completed" if self.loaded else "active"}
        elif cmd == "query-migrate-parameters":
            reply = {"tls-creds": ""}
        self._finish_after(cmd)
        return reply

    async def query_status(self) -> QmpStatus:
        status = QmpStatus(status="paused" if self.loaded else "inmigrate", running=False)
        self._finish_after("query-status")
        return status

    def _finish_after(self, cmd: str) -> None:
        self.asked.append(cmd)
        self.loaded = True  # QEMU: run state set, then the stream marked completed, both now


class OneVm:
    def __init__(self, qmp: CompletingQemu) -> None:
        self.qmp = qmp

    def is_alive(self, name: str) -> bool:
        return True

    def qmp_session(self, name: str) -> CompletingQemu:
        return self.qmp


def test_a_stream_completing_between_the_reads_is_never_shown_beside_inmigrate(tmp_path: Path) -> None:
    store = MigrationStore(tmp_path)
    store.save(StoredMigration(role=MigrationRole.TARGET, migration_id=MID, vm="vm-1",
                               target_state=TargetState.LISTENING))
    qemu = CompletingQemu()
    incoming = IncomingMigrations(cast(Supervisor, OneVm(qemu)), store, "10.0.0.2")
    state = asyncio.run(incoming.state(MID))
    assert qemu.asked[0] == "query-migrate", qemu.asked
    assert (state.stream, state.qemu_status) in (("active", "paused"), ("active", "inmigrate"),
                                                 ("completed", "paused")), state
    again = asyncio.run(incoming.state(MID))
    assert (again.stream, again.qemu_status) == ("completed", "paused"), again
