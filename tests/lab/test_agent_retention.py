"""A real ``vmshift-agent`` process purges old finished records at start and keeps unfinished ones.

No VM and no namespace: the agent listens on loopback with an empty datastore list; it needs QEMU
installed only for its start-up probe (accelerator ``tcg`` skips the KVM probe guest).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.lab.helpers import wait_for
from vmshift.agent.migration_store import MigrationRole, MigrationStore, StoredMigration, TargetState
from vmshift.model.agent_migration import MigrationProgress
from vmshift.model.migration import MigrationPhase, MigrationStatus
from vmshift.tls.contexts import unverified_context
from vmshift.tls.files import ServerTlsFiles

pytestmark = pytest.mark.lab
DAY_S = 86400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_the_agent_removes_old_finished_records_at_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = MigrationStore(state)
    old = time.time() - 45 * DAY_S
    running = MigrationProgress(migration_id=2, vm="b", phase=MigrationPhase.PRECOPY,
                                status=MigrationStatus.NEEDS_FINALIZE)
    target, source = MigrationRole.TARGET, MigrationRole.SOURCE
    records = [
        StoredMigration(role=target, migration_id=1, vm="a", target_state=TargetState.ACTIVATED),  # goes
        StoredMigration(role=source, migration_id=2, vm="b", progress=running),  # waits for finalize
        StoredMigration(role=target, migration_id=3, vm="c", target_state=TargetState.LISTENING),  # receiving
    ]
    for rec in records:
        store.save(rec)
        os.utime(store.path(rec.migration_id), (old, old))
    store.save(StoredMigration(role=MigrationRole.TARGET, migration_id=4, vm="d",
                               target_state=TargetState.ROLLED_BACK))  # finished today
    server = ServerTlsFiles.of(tmp_path / "server")  # a cluster CA and the server's certificate
    server.ensure([])
    port = _free_port()
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"name": "retention", "listen": f"127.0.0.1:{port}",
                                  "ca_file": str(server.ca_cert), "state_dir": str(state),
                                  "accelerator": "tcg",
                                  "record_retention_days": 30}))
    log = tmp_path / "agent.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "vmshift-agent"), "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()
            try:  # not added yet, the agent serves its bootstrap certificate: call it as the server
                r = httpx.get(f"https://127.0.0.1:{port}/api/v1/health",
                              verify=unverified_context(cert=server.cert, key=server.key))
            except httpx.TransportError:
                return False
            return r.status_code == 200

        wait_for("the agent to answer", healthy, timeout=60, interval=0.2)
        assert sorted(int(p.stem) for p in store.dir.glob("*.json")) == [2, 3, 4]
        said = "retention removed 1 migration record(s) and 0 move record(s) older than 30 day(s)"
        assert said in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
