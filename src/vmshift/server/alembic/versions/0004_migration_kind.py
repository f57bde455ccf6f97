"""a kind, the source and target datastores and (disk moves) the spec after the move on every migration

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Storage vMotion, shared-nothing, cold and suspended moves are migrations too (issue 8); rows from
before this revision are live migrations that kept their datastores.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_KIND = ("live", "storage", "relocate", "cold", "suspended")


def upgrade() -> None:
    with op.batch_alter_table("migration", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "kind",
                sa.Enum(*_KIND, name="migrationkind", native_enum=False, length=32),
                nullable=False,
                server_default="live",
            )
        )
        batch_op.add_column(sa.Column("source_datastore", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("target_datastore", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("target_spec", sa.JSON(), nullable=True))
        batch_op.add_column(
            sa.Column("disk_format", sa.Enum("qcow2", "raw", name="diskformat", native_enum=False, length=32),
                      nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("migration", schema=None) as batch_op:
        batch_op.drop_column("disk_format")
        batch_op.drop_column("target_spec")
        batch_op.drop_column("target_datastore")
        batch_op.drop_column("source_datastore")
        batch_op.drop_column("kind")
