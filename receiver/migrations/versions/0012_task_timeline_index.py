"""deliveries.task_id: a partial index, for a task's timeline and the task filter

The console's task page lists the deliveries that spoke of one task, and the
deliveries page filters by task id: without an index each is a full scan of
the deliveries. Partial (``task_id IS NOT NULL``), so the ingest path, which
writes deliveries before they are classified, never touches it.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 13:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_WHERE = sa.text("task_id IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_deliveries_task_id",
        "deliveries",
        ["task_id"],
        postgresql_where=_WHERE,
        sqlite_where=_WHERE,
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_task_id", table_name="deliveries")
