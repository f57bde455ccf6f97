"""live migration table; per-VM migration SLA and per-host migration settings

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_STATUS = ("queued", "running", "completed", "failed", "cancelled")
_PHASE = (
    "queued", "check", "estimate", "prepare", "precopy", "postcopy", "switchover", "finish",
    "rollback", "completed", "failed", "cancelled",
)  # fmt: skip


def upgrade() -> None:
    op.create_table(
        "migration",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("vm", sa.String(length=64), nullable=False),
        sa.Column("source_host", sa.String(length=64), nullable=False),
        sa.Column("target_host", sa.String(length=64), nullable=False),
        sa.Column(
            "status", sa.Enum(*_STATUS, name="migrationstatus", native_enum=False, length=32), nullable=False
        ),
        sa.Column(
            "phase", sa.Enum(*_PHASE, name="migrationphase", native_enum=False, length=32), nullable=False
        ),
        sa.Column("task_id", sa.Integer(), nullable=True),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("checks", sa.JSON(), nullable=True),
        sa.Column("prediction", sa.JSON(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("actions", sa.JSON(), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=True),
        sa.Column("measured_bandwidth_bps", sa.Float(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("migration", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_migration_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_migration_vm"), ["vm"], unique=False)
    with op.batch_alter_table("vm", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("max_downtime_ms", sa.Integer(), server_default=sa.text("500"), nullable=False)
        )
        batch_op.add_column(
            sa.Column("allow_postcopy", sa.Boolean(), server_default=sa.text("false"), nullable=False)
        )
    with op.batch_alter_table("host", schema=None) as batch_op:
        batch_op.add_column(sa.Column("migration_bandwidth_limit_bps", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("migration_link_rate_bps", sa.Float(), nullable=True))
        batch_op.add_column(
            sa.Column("migration_limit", sa.Integer(), server_default=sa.text("4"), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("host", schema=None) as batch_op:
        batch_op.drop_column("migration_limit")
        batch_op.drop_column("migration_link_rate_bps")
        batch_op.drop_column("migration_bandwidth_limit_bps")
    with op.batch_alter_table("vm", schema=None) as batch_op:
        batch_op.drop_column("allow_postcopy")
        batch_op.drop_column("max_downtime_ms")
    with op.batch_alter_table("migration", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_migration_vm"))
        batch_op.drop_index(batch_op.f("ix_migration_status"))
    op.drop_table("migration")
