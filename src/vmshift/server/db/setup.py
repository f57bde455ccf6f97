"""Engine creation and schema upgrade (Alembic, run programmatically at start)."""

from __future__ import annotations

from importlib import resources
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from vmshift.server.db.schema import ClusterRow, DatacenterRow

DEFAULT_DATACENTER = "Datacenter"
DEFAULT_CLUSTER = "Cluster"


#: How long a SQLite connection waits for another one's write lock before it fails ("database is locked").
SQLITE_BUSY_TIMEOUT_S = 30.0


def make_engine(url: str, pool_size: int = 5) -> Engine:
    """An engine used from many threads at once: the API's thread pool and the event loop.

    ``pool_size`` connections stay open (the server sizes it above its API threads, so the event loop
    always finds one without waiting); as many again may open for a burst.
    """
    kwargs: dict[str, Any] = {"pool_size": pool_size, "max_overflow": pool_size}
    if url.startswith("sqlite"):
        # A connection is used by one thread at a time (the pool hands it out), but not always the one
        # that opened it.
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        _sqlite_immediate_transactions(engine)
    return engine


def _sqlite_immediate_transactions(engine: Engine) -> None:
    """Every SQLite transaction takes the write lock when it begins (``BEGIN IMMEDIATE``).

    With the default deferred ``BEGIN``, a transaction that reads and then writes fails at once with
    "database is locked" when another connection wrote in between (SQLite cannot wait there: the
    snapshot it read is gone). Once routes run in threads beside the event loop this happens; taking
    the lock at the start makes the second writer wait (up to the busy timeout) instead. SQLite allows
    one writer at a time anyway; PostgreSQL, the database for large inventories, is not affected.
    """

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # pysqlite issues no BEGIN of its own: the listener below does
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at the packaged scripts (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("vmshift.server") / "alembic"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_schema(engine: Engine) -> None:
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def seed_defaults(sessions: sessionmaker[Session]) -> None:
    """The datacenter ``Datacenter`` and cluster ``Cluster`` exist from the first start."""
    with sessions.begin() as s:
        dc = s.scalar(select(DatacenterRow).where(DatacenterRow.name == DEFAULT_DATACENTER))
        if dc is None:
            dc = DatacenterRow(name=DEFAULT_DATACENTER)
            s.add(dc)
            s.flush()
        if s.scalar(select(ClusterRow).where(ClusterRow.name == DEFAULT_CLUSTER)) is None:
            s.add(ClusterRow(name=DEFAULT_CLUSTER, datacenter_id=dc.id))
