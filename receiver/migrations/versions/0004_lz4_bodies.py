"""PostgreSQL: compress delivery bodies and outputs with lz4

A large delivery is stored twice before it is queryable: its raw bytes in
``deliveries.body`` and its output text in ``outputs.content``. PostgreSQL's
default TOAST compression (pglz) took 26 ms for a 3.3 MB JSON body and 49 ms
for a 4.5 MB CSV body here, against 10 and 12 ms with lz4 (which stores them
about a third larger): the two copies were most of the gap between a large
delivery and a bare bulk load (issue 6).

Only values written from now on use lz4; older ones stay pglz and read as
before (PostgreSQL records the method per value). A server built without lz4
(``default_toast_compression`` does not offer it) keeps pglz; SQLite does not
compress.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 01:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: (table, column) holding whole bodies or outputs: the only values large enough to matter.
LARGE = (("deliveries", "body"), ("outputs", "content"), ("tasks", "extra"))


def _has_lz4() -> bool:
    offered = op.get_bind().scalar(
        sa.text("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'")
    )
    return offered is not None and "lz4" in offered


def _set_compression(method: str) -> None:
    if op.get_bind().dialect.name != "postgresql" or not _has_lz4():
        return
    for table, column in LARGE:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION {method}")


def upgrade() -> None:
    _set_compression("lz4")


def downgrade() -> None:
    _set_compression("default")
