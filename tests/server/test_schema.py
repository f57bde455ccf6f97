"""The Alembic revisions create exactly the schema the ORM declares, on the test database."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from vmshift.server.db.schema import Base
from vmshift.server.db.setup import make_engine, upgrade_schema


def test_migrations_match_the_orm(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade_schema(engine)
        upgrade_schema(engine)  # idempotent: a second start does nothing
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == [], diff
            tables = set(inspect(conn).get_table_names())
        assert {"vm", "host", "task", "event", "mac_allocation", "ip_allocation", "alembic_version"} <= tables
    finally:
        engine.dispose()
