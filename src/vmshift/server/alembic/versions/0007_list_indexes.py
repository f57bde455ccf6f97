"""list indexes: one for every filter and sort key of the paged list routes (docs/api.md, "Paging")

Names are unique (their unique constraints are the sort keys of the named lists) and ids are primary
keys, so only the filters need new indexes: a VM's host and power state, a host's cluster and
connection state, a task's target, state and creation time. Events (time, target) and migrations
(vm, status) have theirs since 0001 and 0002.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_INDEXES = {
    "vm": ("host_id", "power_state"),
    "host": ("cluster_id", "connection_state"),
    "task": ("target", "state", "created_at"),
}


def upgrade() -> None:
    for table, columns in _INDEXES.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in columns:
                batch_op.create_index(batch_op.f(f"ix_{table}_{column}"), [column], unique=False)


def downgrade() -> None:
    for table, columns in _INDEXES.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in columns:
                batch_op.drop_index(batch_op.f(f"ix_{table}_{column}"))
