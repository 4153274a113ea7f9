"""rollup_label: cost_by_label kept current by triggers on tasks

``cost_by_label`` unpacked the JSON labels of every task on each read: over a
million tasks, 2-3 seconds. Now triggers on ``tasks`` keep the sums per
(UTC day, hook, status, label key, label value) in ``rollup_label``, exactly
as 0003 does per day in ``rollup_daily`` (SQLite: row triggers upsert it;
PostgreSQL: statement triggers append pre-summed rows to
``rollup_label_delta``, which `receiver.rollups.fold` moves in under its
lock, so writers never wait on each other nor deadlock), and
``cost_by_label`` reads those rows: same columns, same meaning, always current.

A task counts once in each of its labels' groups. An UPDATE that changes none
of the grouped or summed columns nor ``labels`` leaves the rollup alone; one
that changes the labels moves the task's sums from its old labels to its new
ones. Key columns cannot be NULL, so a value is keyed as ``'=' || value``
and a JSON null as ``''`` (like ``status_key``). Labels that are not a JSON
object (the receiver always writes one) count under no label on both
databases; a label value that is not a string reads as PostgreSQL's
``jsonb_each_text`` gives it (``1``, ``true``), on SQLite too.

Beware, as for 0003: an SQLite batch ALTER of ``tasks`` copies the table and
drops it with its triggers: such a migration must recreate these too (see
``_create_triggers``). 0003's SQL is copied here, not imported, so this stays
what it was when 0003 changes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

MEASURES = ("input_tokens", "output_tokens", "total_tokens", "compute_time_s", "cost_usd")
#: The columns of rollup_label and rollup_label_delta after the key, in order.
SUMS = ("tasks", *(f"known_{m}" for m in MEASURES), *MEASURES)
KEY = ("day", "hook", "status_key", "label_key", "label_value_key")
COLUMNS = ", ".join((*KEY, *SUMS))
#: Grouped or summed: an UPDATE touching none of them changes no label rollup.
WATCHED = ("first_seen_at", "hook", "status", "labels", *MEASURES)

_DAY = {
    # SQLAlchemy stores SQLite timestamps as naive UTC text 'YYYY-MM-DD HH:MM:SS.ffffff'.
    "sqlite": "substr({t}.first_seen_at, 1, 10)",
    "postgresql": "CAST({t}.first_seen_at AT TIME ZONE 'UTC' AS date)",
}
# '' is NULL, '=' || status a status (0003's encoding: a key column cannot be NULL).
_STATUS_KEY = "coalesce('=' || {t}.status, '')"
#: One row per label of ``{t}.labels`` (none unless a JSON object), as ``l.key``, ``l.value``.
_LABELS = {
    "sqlite": "json_each(CASE json_type({t}.labels) WHEN 'object' THEN {t}.labels ELSE '{{}}' END)",
    "postgresql": (
        "jsonb_each_text(CASE jsonb_typeof(CAST({t}.labels AS jsonb))"
        " WHEN 'object' THEN CAST({t}.labels AS jsonb) ELSE '{{}}' END)"
    ),
}
#: The label value as a key: PostgreSQL's jsonb_each_text text on both, JSON null as ''.
_VALUE_KEY = {
    "sqlite": (
        "CASE l.type WHEN 'null' THEN '' WHEN 'true' THEN '=true' WHEN 'false' THEN '=false'"
        " ELSE '=' || l.value END"
    ),
    "postgresql": "coalesce('=' || l.value, '')",
}


def _table(name: str) -> None:
    delta = name == "rollup_label_delta"
    op.create_table(
        name,
        *(
            [sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False)]
            if delta
            else []
        ),
        sa.Column("day", sa.Date(), nullable=False),
        *(sa.Column(c, sa.Text(), nullable=False) for c in KEY[1:]),
        *(
            sa.Column(
                c,
                sa.Float() if c in {"compute_time_s", "cost_usd"} else sa.BigInteger(),
                nullable=False,
            )
            for c in SUMS
        ),
        sa.PrimaryKeyConstraint(*(["id"] if delta else KEY), name=op.f(f"pk_{name}")),
    )


def _group_sums(sign: str, t: str) -> str:
    """Select-list sums of one group: ``sign`` is +1/-1 per row (a column or a constant)."""
    known = [f"sum(CASE WHEN {t}.{m} IS NOT NULL THEN {sign} ELSE 0 END)" for m in MEASURES]
    sums = [f"coalesce(sum({sign} * {t}.{m}), 0)" for m in MEASURES]
    return ", ".join([f"sum({sign})", *known, *sums])


def _sqlite_upsert(row: str, sign: int) -> str:
    """Add ``sign`` times the task ``row`` (NEW or OLD) to the group of each of its labels."""
    values = [
        _DAY["sqlite"].format(t=row),
        f"{row}.hook",
        _STATUS_KEY.format(t=row),
        "l.key",
        _VALUE_KEY["sqlite"],
        str(sign),
        *(f"{sign} * ({row}.{m} IS NOT NULL)" for m in MEASURES),
        *(f"{sign} * coalesce({row}.{m}, 0)" for m in MEASURES),
    ]
    updates = ", ".join(f"{c} = {c} + excluded.{c}" for c in SUMS)
    # `WHERE true`: SQLite's parser needs it between a SELECT's FROM and ON CONFLICT.
    return (
        f"INSERT INTO rollup_label ({COLUMNS}) SELECT {', '.join(values)}"
        f" FROM {_LABELS['sqlite'].format(t=row)} AS l WHERE true"
        f" ON CONFLICT ({', '.join(KEY)}) DO UPDATE SET {updates};"
    )


def _pg_delta(source: str) -> str:
    """Append the per-label sums of ``source`` (task rows with a ``sign``) to rollup_label_delta."""
    return (
        f"INSERT INTO rollup_label_delta ({COLUMNS})"
        f" SELECT {_DAY['postgresql'].format(t='c')}, c.hook, {_STATUS_KEY.format(t='c')},"
        f" l.key, {_VALUE_KEY['postgresql']}, {_group_sums('c.sign', 'c')}"
        f" FROM ({source}) AS c, {_LABELS['postgresql'].format(t='c')} AS l"
        " GROUP BY 1, 2, 3, 4, 5;"
    )


def _create_triggers(dialect: str) -> None:
    """The triggers that keep rollup_label current (recreate them after rebuilding tasks)."""
    if dialect == "sqlite":
        op.execute(
            "CREATE TRIGGER rollup_label_tasks_insert AFTER INSERT ON tasks BEGIN "
            f"{_sqlite_upsert('NEW', 1)} END"
        )
        op.execute(
            f"CREATE TRIGGER rollup_label_tasks_update AFTER UPDATE OF {', '.join(WATCHED)}"
            f" ON tasks WHEN ({', '.join(f'OLD.{c}' for c in WATCHED)})"
            f" IS NOT ({', '.join(f'NEW.{c}' for c in WATCHED)}) BEGIN "
            f"{_sqlite_upsert('OLD', -1)} {_sqlite_upsert('NEW', 1)} END"
        )
        op.execute(
            "CREATE TRIGGER rollup_label_tasks_delete AFTER DELETE ON tasks BEGIN "
            f"{_sqlite_upsert('OLD', -1)} END"
        )
        return
    # A row whose key and watched columns are all unchanged is left out on both sides;
    # unlike an inner join on task_key, this still counts an UPDATE of task_key itself.
    unchanged = (
        "EXISTS (SELECT FROM {other} AS u WHERE u.task_key = {t}.task_key AND"
        f" ({', '.join(f'u.{c}' for c in WATCHED)}) IS NOT DISTINCT FROM"
        f" ({', '.join('{t}.' + c for c in WATCHED)}))"
    )
    old = unchanged.format(other="new_rows", t="o")
    new = unchanged.format(other="old_rows", t="n")
    bodies = {
        "insert": _pg_delta("SELECT 1 AS sign, n.* FROM new_rows AS n"),
        "update": _pg_delta(
            f"SELECT -1 AS sign, o.* FROM old_rows AS o WHERE NOT {old}"
            f" UNION ALL SELECT 1 AS sign, n.* FROM new_rows AS n WHERE NOT {new}"
        ),
        "delete": _pg_delta("SELECT -1 AS sign, o.* FROM old_rows AS o"),
    }
    referencing = {
        "insert": "NEW TABLE AS new_rows",
        "update": "OLD TABLE AS old_rows NEW TABLE AS new_rows",
        "delete": "OLD TABLE AS old_rows",
    }
    for event, body in bodies.items():
        op.execute(
            f"CREATE FUNCTION rollup_label_tasks_{event}() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN {body} RETURN NULL; END $$"
        )
        op.execute(
            f"CREATE TRIGGER rollup_label_tasks_{event} AFTER {event.upper()} ON tasks"
            f" REFERENCING {referencing[event]} FOR EACH STATEMENT"
            f" EXECUTE FUNCTION rollup_label_tasks_{event}()"
        )


def _drop_triggers(dialect: str) -> None:
    for event in ("insert", "update", "delete"):
        if dialect == "sqlite":
            op.execute(f"DROP TRIGGER IF EXISTS rollup_label_tasks_{event}")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS rollup_label_tasks_{event} ON tasks")
            op.execute(f"DROP FUNCTION IF EXISTS rollup_label_tasks_{event}()")


def _cost_by_label(dialect: str) -> str:
    status = "CASE WHEN r.status_key = '' THEN NULL ELSE substr(r.status_key, 2) END"
    value = "CASE WHEN r.label_value_key = '' THEN NULL ELSE substr(r.label_value_key, 2) END"
    if dialect == "sqlite":
        # rollup_label_delta stays empty on SQLite: the triggers write rollup_label directly.
        sums = {c: f"r.{c}" for c in SUMS}
        source, tail = "rollup_label AS r", "WHERE r.tasks <> 0"
    else:
        sums = {c: f"CAST(sum(r.{c}) AS BIGINT)" for c in SUMS[: 1 + len(MEASURES)]}
        sums |= {c: f"CAST(sum(r.{c}) AS BIGINT)" for c in MEASURES[:3]}
        sums |= {c: f"sum(r.{c})" for c in MEASURES[3:]}
        both = (
            f"SELECT {COLUMNS} FROM rollup_label UNION ALL SELECT {COLUMNS} FROM rollup_label_delta"
        )
        source = f"({both}) AS r"
        tail = f"GROUP BY {', '.join(f'r.{c}' for c in KEY)} HAVING {sums['tasks']} <> 0"
    measures = ",\n    ".join(
        f"CASE WHEN {sums[f'known_{m}']} > 0 THEN {sums[m]} END AS {m}" for m in MEASURES
    )
    return f"""CREATE VIEW cost_by_label AS
SELECT r.day AS day, r.hook AS hook, {status} AS status,
    r.label_key AS label_key, {value} AS label_value,
    {sums["tasks"]} AS tasks,
    {sums["tasks"]} - {sums["known_cost_usd"]} AS tasks_unknown_cost,
    {measures}
FROM {source}
{tail}"""


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    _table("rollup_label")
    _table("rollup_label_delta")
    # Triggers first, then the backfill, in one transaction: on PostgreSQL CREATE TRIGGER
    # holds off writers to tasks until commit, so no change is missed or counted twice.
    _create_triggers(dialect)
    day, status_key = _DAY[dialect].format(t="t"), _STATUS_KEY.format(t="t")
    op.execute(
        f"INSERT INTO rollup_label ({COLUMNS})"
        f" SELECT {day}, t.hook, {status_key}, l.key, {_VALUE_KEY[dialect]},"
        f" {_group_sums('1', 't')} FROM tasks AS t, {_LABELS[dialect].format(t='t')} AS l"
        " GROUP BY 1, 2, 3, 4, 5"
    )
    op.execute("DROP VIEW cost_by_label")
    op.execute(_cost_by_label(dialect))


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.execute("DROP VIEW IF EXISTS cost_by_label")
    _drop_triggers(dialect)
    op.drop_table("rollup_label_delta")
    op.drop_table("rollup_label")
    # 0002's plain view, as it was.
    day = _DAY[dialect].format(t="t")
    labels = {
        "sqlite": "json_each(t.labels) AS l",
        "postgresql": "jsonb_each_text(CAST(t.labels AS jsonb)) AS l",
    }
    op.execute(
        f"""CREATE VIEW cost_by_label AS
SELECT {day} AS day, t.hook AS hook, t.status AS status,
    l.key AS label_key, l.value AS label_value,
    COUNT(*) AS tasks,
    COUNT(*) - COUNT(t.cost_usd) AS tasks_unknown_cost,
    CAST(SUM(t.input_tokens) AS BIGINT) AS input_tokens,
    CAST(SUM(t.output_tokens) AS BIGINT) AS output_tokens,
    CAST(SUM(t.total_tokens) AS BIGINT) AS total_tokens,
    SUM(t.compute_time_s) AS compute_time_s,
    SUM(t.cost_usd) AS cost_usd
FROM tasks AS t, {labels[dialect]}
GROUP BY {day}, t.hook, t.status, l.key, l.value"""
    )
