"""Server settings: a dataclass passed in, never a global."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vmshift.errors import InvalidInputError
from vmshift.model.api import DatabaseKind


@dataclass(frozen=True)
class ServerSettings:
    state_dir: Path
    token: str
    db_url: str | None = None
    listen: str = "127.0.0.1:8100"
    heartbeat_interval_s: float = 2.0  # polls of agents that cannot stream; the safety-net reconcile
    missed_heartbeats: int = 3  # x KEEPALIVE_INTERVAL_S (model/host_stream.py): a stream's silence limit
    agent_timeout_s: float = 10.0
    migration_poll_interval_s: float = 0.3  # how often the source agent's migration progress is read
    migration_agent_grace_s: float = 120.0  # how long an unreachable source agent is waited for
    tls_cert: Path | None = None  # the API's PEM certificate; None: the server's own, made on first start
    tls_key: Path | None = None  # its private key; given exactly when tls_cert is
    ca_file: Path | None = None  # the CA clients trust (what `ca show` prints); None: STATE_DIR/tls/ca.pem
    # retention (server/retention.py): how long finished history is kept; 0 keeps it forever
    event_retention_days: int = 30
    task_retention_days: int = 30  # finished tasks
    migration_retention_days: int = 30  # finished migrations (every kind)
    retention_interval_s: float = 3600.0  # how often the purge runs (also once at start)
    retention_batch_rows: int = 500  # rows deleted per transaction
    # the database off the event loop (docs/api.md): API routes run their queries in a pool of this many
    # threads; the engine keeps that many connections open plus db_pool_spare for the event loop's own
    # work (heartbeat, tasks, scheduler, retention), so the loop never waits for a free connection
    api_db_threads: int = 8
    db_pool_spare: int = 8
    # DRS (docs/drs.md): a pass over every cluster this often (0: only `vmshift drs run`); the hosts'
    # load is sampled every load_step_s and kept load_window_s (the window a pass averages over)
    drs_interval_s: float = 60.0
    load_step_s: float = 20.0
    load_window_s: float = 300.0

    @property
    def db_pool_size(self) -> int:
        return self.api_db_threads + self.db_pool_spare

    def database_url(self) -> str:
        """``--db-url``, else ``VMSHIFT_DB_URL``, else SQLite ``STATE_DIR/vmshift.db``."""
        url = self.db_url or os.environ.get("VMSHIFT_DB_URL")
        return url or f"sqlite:///{self.state_dir / 'vmshift.db'}"

    def database_kind(self) -> DatabaseKind:
        return database_kind(self.database_url())


def database_kind(url: str) -> DatabaseKind:
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if scheme == "sqlite":
        return DatabaseKind.SQLITE
    if scheme in ("postgresql", "postgres"):
        return DatabaseKind.POSTGRESQL
    raise InvalidInputError(
        f"Database URL scheme {scheme!r} is not supported.",
        hint="Use sqlite:///PATH or postgresql+psycopg://USER:PASS@HOST/DB.",
    )


def read_token(path: Path, what: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise InvalidInputError(
            f"The {what} file {path} cannot be read: {e.strerror}.",
            hint="Create it with a random secret (e.g. openssl rand -hex 32).",
        ) from e
    if not token:
        raise InvalidInputError(f"The {what} file {path} is empty.", hint="Write a random secret into it.")
    return token
