"""DRS: the hosts' load history and the recommendations of DRS passes

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02

``host_load`` holds one row per host per history step (the VMs' loads as JSON in it), so the
history stays hosts x steps rows; retention deletes rows older than the window. A recommendation
keeps its reason, benefit, cost and predicted time, and its state (pending, applied, dismissed,
expired).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_REASON = ("must_rule", "should_rule", "balance", "evacuate")
_STATE = ("pending", "applied", "dismissed", "expired")


def upgrade() -> None:
    op.create_table(
        "host_load",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("host_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cpus", sa.Integer(), nullable=False),
        sa.Column("memory_total_mib", sa.Integer(), nullable=False),
        sa.Column("vms", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["host_id"], ["host.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("host_load", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_host_load_host_id"), ["host_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_host_load_at"), ["at"], unique=False)
    op.create_table(
        "drs_recommendation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cluster_id", sa.Integer(), nullable=False),
        sa.Column("vm", sa.String(length=64), nullable=False),
        sa.Column("source_host", sa.String(length=64), nullable=False),
        sa.Column("target_host", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Enum(*_REASON, name="movereason", native_enum=False, length=32),
                  nullable=False),
        sa.Column("why", sa.Text(), nullable=False),
        sa.Column("benefit", sa.Float(), nullable=False),
        sa.Column("cost", sa.Float(), nullable=False),
        sa.Column("predicted_s", sa.Float(), nullable=False),
        sa.Column("downtime_ms", sa.Integer(), nullable=False),
        sa.Column("state", sa.Enum(*_STATE, name="recommendationstate", native_enum=False, length=32),
                  nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("migration_id", sa.Integer(), nullable=True),
        sa.Column("task_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["cluster_id"], ["cluster.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("drs_recommendation", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_drs_recommendation_cluster_id"), ["cluster_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_drs_recommendation_vm"), ["vm"], unique=False)
        batch_op.create_index(batch_op.f("ix_drs_recommendation_state"), ["state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("drs_recommendation", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_drs_recommendation_state"))
        batch_op.drop_index(batch_op.f("ix_drs_recommendation_vm"))
        batch_op.drop_index(batch_op.f("ix_drs_recommendation_cluster_id"))
    op.drop_table("drs_recommendation")
    with op.batch_alter_table("host_load", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_host_load_at"))
        batch_op.drop_index(batch_op.f("ix_host_load_host_id"))
    op.drop_table("host_load")
