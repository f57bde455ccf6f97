"""server identity (a UUID made with the database) and a nonce per migration

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Migration ids restart at 1 with a new database; agents keep their migration records across that.
The server's id and a per-migration nonce travel with every migration request, so an agent never
takes an old record for a new migration with the same id.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "server_identity",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(table, [{"id": str(uuid.uuid4())}])
    with op.batch_alter_table("migration", schema=None) as batch_op:
        batch_op.add_column(sa.Column("nonce", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("migration", schema=None) as batch_op:
        batch_op.drop_column("nonce")
    op.drop_table("server_identity")
