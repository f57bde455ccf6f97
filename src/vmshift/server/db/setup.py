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


def make_engine(url: str) -> Engine:
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False}
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

    return engine


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
