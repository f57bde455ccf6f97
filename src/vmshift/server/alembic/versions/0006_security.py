"""security: encrypted vMotion settings, the migration's encryption, the host's issued certificate

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ENCRYPTION = ("disabled", "opportunistic", "required")


def _encryption() -> sa.Column[str]:
    return sa.Column(
        "migration_encryption",
        sa.Enum(*_ENCRYPTION, name="migrationencryption", native_enum=False, length=32),
        server_default="opportunistic",
        nullable=False,
    )


def upgrade() -> None:
    with op.batch_alter_table("host", schema=None) as batch_op:
        batch_op.add_column(_encryption())
        batch_op.add_column(sa.Column("cert_fingerprint", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("cert_not_after", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("vm", schema=None) as batch_op:
        batch_op.add_column(_encryption())
    with op.batch_alter_table("migration", schema=None) as batch_op:
        batch_op.add_column(sa.Column("encrypted", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("migration", schema=None) as batch_op:
        batch_op.drop_column("encrypted")
    with op.batch_alter_table("vm", schema=None) as batch_op:
        batch_op.drop_column("migration_encryption")
    with op.batch_alter_table("host", schema=None) as batch_op:
        batch_op.drop_column("cert_not_after")
        batch_op.drop_column("cert_fingerprint")
        batch_op.drop_column("migration_encryption")
