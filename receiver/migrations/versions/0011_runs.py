"""runs: the WebRun tasks the receiver launched or tracks, for reconciliation

One row per task `receiver run` launched (or failed to launch) and per task
launched elsewhere that the receiver watches (`runs track`, or first seen in
a delivery). The reconciler polls WebRun for those past ``expected_by`` with
no final delivery. ``config`` never holds the task config's ``secrets``.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 13:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("hook", sa.String(128), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("config", sa.Text(), nullable=True),
        sa.Column("submitted_data", sa.String(16), nullable=True),
        sa.Column("labels", sa.Text(), nullable=False),
        sa.Column("session_id", sa.Text(), nullable=True),
        sa.Column("task_id", sa.Text(), nullable=True),
        sa.Column("expected_by", _TIME, nullable=True),
        sa.Column("next_check_at", _TIME, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
    )
    op.create_index("ix_runs_hook", "runs", ["hook"])
    op.create_index("ix_runs_session_id_task_id", "runs", ["session_id", "task_id"])
    op.create_index("ix_runs_state_next_check_at", "runs", ["state", "next_check_at"])


def downgrade() -> None:
    op.drop_table("runs")
