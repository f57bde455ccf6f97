"""Fixtures: a real vmshift server (uvicorn on loopback) with a real database, and fake agents.

The database is $VMSHIFT_TEST_DB_URL when set (CI: PostgreSQL; each test starts from an empty
schema; under pytest-xdist each worker gets its own database, DB_gw0, DB_gw1, ...), else a fresh
SQLite file per test.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from vmshift_fake_agent import FakeAgent, UvicornThread, make_facts

from vmshift.model.host import HostFacts
from vmshift.server.api.app import create_app
from vmshift.server.db.schema import IpAllocationRow, MacAllocationRow, TaskRow, VmRow
from vmshift.server.settings import ServerSettings
from vmshift.tls.contexts import client_context
from vmshift.tls.files import ServerTlsFiles

TOKEN = "test-server-token"


def worker_database_url(url: str, worker: str) -> URL:
    """The PostgreSQL database of one xdist worker: ``vmshift_test`` becomes ``vmshift_test_gw0``.

    Each test empties its database's ``public`` schema, so two workers must never share one.
    """
    base = make_url(url)
    return base.set(database=f"{base.database}_{worker}")


@pytest.fixture(scope="session")
def postgres_url(worker_id: str) -> str | None:
    """$VMSHIFT_TEST_DB_URL for this worker (its own database under xdist), created if missing."""
    url = os.environ.get("VMSHIFT_TEST_DB_URL")
    if not url or make_url(url).get_backend_name() != "postgresql":
        return url
    if worker_id == "master":  # not under xdist: the database named in the URL
        return url
    mine = worker_database_url(url, worker_id)
    # PostgreSQL's maintenance database: there whether or not the worker's exists yet
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :d"),
                                  {"d": mine.database}).scalar()
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{mine.database}"'))
    except DBAPIError as exc:
        pytest.fail(f"cannot reach or create the worker database {mine.database} ({exc.orig}); "
                    f"create it with: scripts/setup-postgres.sh {mine.database}")
    finally:
        admin.dispose()
    return mine.render_as_string(hide_password=False)


@pytest.fixture
def db_url(tmp_path: Path, postgres_url: str | None) -> str:
    if not postgres_url:
        return f"sqlite:///{tmp_path / 'vmshift.db'}"
    if make_url(postgres_url).get_backend_name() == "postgresql":
        engine = create_engine(postgres_url)
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
        engine.dispose()
    return postgres_url


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


class ServerHarness:
    def __init__(self, state_dir: Path, db_url: str, heartbeat_interval_s: float = 0.2) -> None:
        self.settings = ServerSettings(
            state_dir=state_dir,
            token=TOKEN,
            db_url=db_url,
            heartbeat_interval_s=heartbeat_interval_s,
            missed_heartbeats=3,
            agent_timeout_s=5.0,
        )
        self.port = 0
        self._thread: UvicornThread | None = None
        self._app: FastAPI | None = None
        self.client = httpx.Client()
        self._db = create_engine(db_url)
        self.tls_files = ServerTlsFiles.of(state_dir)  # served like vmshift-server does, over HTTPS

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.tls_files.ca_cert

    def tls(self) -> ssl.SSLContext:
        """Verifies this server (httpx ``verify=``)."""
        return client_context(self.ca_file)

    def cli_args(self) -> list[str]:
        """The `vmshift` global options that point the CLI at this server."""
        return ["--server", self.url, "--token", TOKEN, "--ca-file", str(self.ca_file)]

    def sessions(self) -> sessionmaker[Session]:
        """The running server's own sessions: a write through them is one the server made, which its
        views kept in memory see (a write through ``_db`` is one behind its back)."""
        assert self._app is not None, "the server is not started"
        sessions: sessionmaker[Session] = self._app.state.core.sessions
        return sessions

    def start(self) -> ServerHarness:
        self.tls_files.ensure([])
        self._app = create_app(self.settings)
        self._thread = UvicornThread(self._app, self.port,
                                     ssl_certfile=str(self.tls_files.cert),
                                     ssl_keyfile=str(self.tls_files.key)).start()
        self.port = self._thread.port
        self.client = httpx.Client(
            base_url=f"{self.url}/api/v1",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
            verify=self.tls(),
        )
        return self

    def stop(self) -> None:
        self.client.close()
        if self._thread is not None:
            self._thread.stop()
            self._thread = None

    def close(self) -> None:
        self.stop()
        self._db.dispose()

    def wait_task(self, task_id: int, timeout_s: float = 20) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            t: dict[str, Any] = self.client.get(f"/tasks/{task_id}").json()
            return t if t["state"] in ("success", "error", "cancelled") else None

        result: dict[str, Any] = wait_for(finished, timeout_s, f"task {task_id} to finish")
        return result

    def counts(self) -> dict[str, int]:
        """Row counts straight from the database (not through the API)."""
        with self._db.connect() as conn:
            return {
                t.__tablename__: conn.scalar(select(func.count()).select_from(t)) or 0
                for t in (VmRow, MacAllocationRow, IpAllocationRow, TaskRow)
            }

    def add_host(self, agent: UvicornThread) -> dict[str, Any]:
        """Add a fake agent as an operator does: confirming its bootstrap certificate's fingerprint."""
        assert agent.tls is not None
        body = {"address": agent.address, "fingerprint": agent.tls.bootstrap_fingerprint}
        r = self.client.post("/hosts", json=body)
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        return body


@pytest.fixture
def server(tmp_path: Path, db_url: str) -> Iterator[ServerHarness]:
    harness = ServerHarness(tmp_path / "state", db_url).start()
    try:
        yield harness
    finally:
        harness.close()


AgentFactory = Callable[..., tuple[FakeAgent, UvicornThread]]


@pytest.fixture
def agents() -> Iterator[AgentFactory]:
    running: list[UvicornThread] = []

    def start(
        name: str = "host-1", facts: HostFacts | None = None, stream: bool | None = None, **kw: Any
    ) -> tuple[FakeAgent, UvicornThread]:
        """``stream`` None: as $VMSHIFT_FAKE_AGENT_STREAM says (1: every fake agent streams), else polled."""
        if stream is None:
            stream = os.environ.get("VMSHIFT_FAKE_AGENT_STREAM") == "1"
        agent = FakeAgent(facts=facts or make_facts(name, **kw), stream=stream)
        thread = UvicornThread(agent.app(), tls=agent.tls).start()
        running.append(thread)
        return agent, thread

    yield start
    for t in running:
        t.stop(force=True)
