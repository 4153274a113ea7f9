"""deliveries.body_pruned_at: when retention removed a delivery's raw body

`receiver prune` (and ``RECEIVER_RETENTION``) empty ``deliveries.body`` and
set this; everything else about the delivery stays (size, SHA-256, headers,
status), so a redelivery is still recognised by its hash. NULL: the body is
there. No index: the prune walks the primary key in batches, and an index
here would be one more write on the ingest path.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 13:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "deliveries", sa.Column("body_pruned_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("body_pruned_at")
