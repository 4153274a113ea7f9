"""rollup views: cost_daily and cost_by_label

The day of a task is the UTC date the receiver first heard of it
(``tasks.first_seen_at``), which is also the partition of its row in the
Parquet export. SQLite keeps it as ISO text, PostgreSQL as ``date``; both read
back as a date through `receiver.rollups`. Sums of token counts are cast to
BIGINT because PostgreSQL's ``sum(bigint)`` is ``numeric``. ``cost_usd`` is
NULL when no task of the group has a known cost: unknown is never $0.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 10:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_MEASURES = """
    COUNT(*) AS tasks,
    COUNT(*) - COUNT(t.cost_usd) AS tasks_unknown_cost,
    CAST(SUM(t.input_tokens) AS BIGINT) AS input_tokens,
    CAST(SUM(t.output_tokens) AS BIGINT) AS output_tokens,
    CAST(SUM(t.total_tokens) AS BIGINT) AS total_tokens,
    SUM(t.compute_time_s) AS compute_time_s,
    SUM(t.cost_usd) AS cost_usd"""

_DAY = {
    # SQLAlchemy stores SQLite timestamps as naive UTC text 'YYYY-MM-DD HH:MM:SS.ffffff'.
    "sqlite": "substr(t.first_seen_at, 1, 10)",
    "postgresql": "CAST(t.first_seen_at AT TIME ZONE 'UTC' AS date)",
}

_LABELS = {
    "sqlite": "json_each(t.labels) AS l",
    "postgresql": "jsonb_each_text(CAST(t.labels AS jsonb)) AS l",
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    day = _DAY[dialect]
    op.execute(
        f"""CREATE VIEW cost_daily AS
SELECT {day} AS day, t.hook AS hook, t.status AS status,{_MEASURES}
FROM tasks AS t
GROUP BY {day}, t.hook, t.status"""
    )
    op.execute(
        f"""CREATE VIEW cost_by_label AS
SELECT {day} AS day, t.hook AS hook, t.status AS status,
    l.key AS label_key, l.value AS label_value,{_MEASURES}
FROM tasks AS t, {_LABELS[dialect]}
GROUP BY {day}, t.hook, t.status, l.key, l.value"""
    )


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS cost_by_label")
    op.execute("DROP VIEW IF EXISTS cost_daily")
