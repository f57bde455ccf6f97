"""a kind on every datastore: a directory of files, or an iSCSI target with one LUN per disk

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02

Datastores from before this revision are directories (issue 10 added iSCSI datastores).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datastore", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "kind",
                sa.Enum("directory", "iscsi", name="datastorekind", native_enum=False, length=32),
                nullable=False,
                server_default="directory",
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("datastore", schema=None) as batch_op:
        batch_op.drop_column("kind")
