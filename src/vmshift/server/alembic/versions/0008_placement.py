"""placement: affinity rules, each cluster's DRS automation level and threshold, each VM's DRS override

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

All the configuration the placement engine reads (issue 11): a rule belongs to one cluster and its
name is unique there; its VMs and hosts are lists of names (a rule outlives a VM's deletion: it
simply stops applying). Clusters default to vSphere's "partially automated" at threshold 3; VMs
follow their cluster.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_KIND = ("vm_affinity", "vm_anti_affinity", "vm_host_affinity", "vm_host_anti_affinity")
_STRENGTH = ("must", "should")
_AUTOMATION = ("manual", "partially", "fully")
_VM_DRS = ("cluster", "disabled", "manual", "fully")


def upgrade() -> None:
    op.create_table(
        "rule",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("cluster_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.Enum(*_KIND, name="rulekind", native_enum=False, length=32), nullable=False),
        sa.Column("strength", sa.Enum(*_STRENGTH, name="rulestrength", native_enum=False, length=32),
                  nullable=False),
        sa.Column("vms", sa.JSON(), nullable=False),
        sa.Column("hosts", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["cluster_id"], ["cluster.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("cluster_id", "name", name="uq_rule_cluster_name"),
    )
    with op.batch_alter_table("rule", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rule_cluster_id"), ["cluster_id"], unique=False)
    with op.batch_alter_table("cluster", schema=None) as batch_op:
        batch_op.add_column(sa.Column(
            "drs_automation", sa.Enum(*_AUTOMATION, name="drsautomation", native_enum=False, length=32),
            nullable=False, server_default="partially"))
        batch_op.add_column(sa.Column("drs_threshold", sa.Integer(), nullable=False, server_default="3"))
    with op.batch_alter_table("vm", schema=None) as batch_op:
        batch_op.add_column(sa.Column(
            "drs", sa.Enum(*_VM_DRS, name="vmdrs", native_enum=False, length=32),
            nullable=False, server_default="cluster"))


def downgrade() -> None:
    with op.batch_alter_table("vm", schema=None) as batch_op:
        batch_op.drop_column("drs")
    with op.batch_alter_table("cluster", schema=None) as batch_op:
        batch_op.drop_column("drs_threshold")
        batch_op.drop_column("drs_automation")
    with op.batch_alter_table("rule", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rule_cluster_id"))
    op.drop_table("rule")
