"""rollup_daily: cost_daily kept current by triggers on tasks

``cost_daily`` grouped every task on each read: over a million tasks, about
a second. Now triggers on ``tasks`` keep the sums per (UTC day, hook, status)
in ``rollup_daily`` as tasks are inserted, updated and deleted, whoever
writes them (the pipeline, a bulk load, an analyst's UPDATE), and
``cost_daily`` reads those few rows: same columns, same meaning, always
current, so a BI tool needs no refresh job.

- SQLite has one writer at a time, so row triggers update ``rollup_daily``
  directly.
- PostgreSQL statement triggers (transition tables) append one pre-summed row
  per group and statement to ``rollup_delta`` instead: writers never wait on
  each other over a shared rollup row, nor deadlock. ``cost_daily`` adds
  the pending rows in; `receiver.rollups.fold` moves them into
  ``rollup_daily`` under a lock.

An UPDATE that changes none of the grouped or summed columns (a redelivery
only moves ``last_delivery_id``) leaves the rollup alone. Counts and token
sums are exact; float sums are accumulated in write order, so they may
differ from a fresh ``GROUP BY`` in the last bits (as one scan order differs
from another), never by a cent. ``TRUNCATE tasks`` bypasses the triggers.

Beware: an SQLite batch ALTER of ``tasks`` copies the table and drops it,
and its triggers with it: such a migration must recreate them (see
``_create_triggers``). ``cost_by_label`` stays a plain view over ``tasks``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 20:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

MEASURES = ("input_tokens", "output_tokens", "total_tokens", "compute_time_s", "cost_usd")
#: The columns of rollup_daily and rollup_delta after the key, in order.
SUMS = ("tasks", *(f"known_{m}" for m in MEASURES), *MEASURES)
COLUMNS = ", ".join(("day", "hook", "status_key", *SUMS))
#: Grouped or summed: an UPDATE touching none of them changes no rollup.
WATCHED = ("first_seen_at", "hook", "status", *MEASURES)

_DAY = {
    # SQLAlchemy stores SQLite timestamps as naive UTC text 'YYYY-MM-DD HH:MM:SS.ffffff'.
    "sqlite": "substr({t}.first_seen_at, 1, 10)",
    "postgresql": "CAST({t}.first_seen_at AT TIME ZONE 'UTC' AS date)",
}
# A key column cannot be NULL (SQLite's unique index would not match NULLs): '' is
# NULL, '=' || status is a status, so no status collides with NULL.
_STATUS_KEY = "coalesce('=' || {t}.status, '')"


def _table(name: str) -> None:
    op.create_table(
        name,
        *(
            [sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False)]
            if name == "rollup_delta"
            else []
        ),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("hook", sa.Text(), nullable=False),
        sa.Column("status_key", sa.Text(), nullable=False),
        *(
            sa.Column(
                c,
                sa.Float() if c in {"compute_time_s", "cost_usd"} else sa.BigInteger(),
                nullable=False,
            )
            for c in SUMS
        ),
        sa.PrimaryKeyConstraint(
            *(["id"] if name == "rollup_delta" else ["day", "hook", "status_key"]),
            name=op.f(f"pk_{name}"),
        ),
    )


def _group_sums(sign: str, t: str) -> str:
    """Select-list sums of one group: ``sign`` is +1/-1 per row (a column or a constant)."""
    known = [f"sum(CASE WHEN {t}.{m} IS NOT NULL THEN {sign} ELSE 0 END)" for m in MEASURES]
    sums = [f"coalesce(sum({sign} * {t}.{m}), 0)" for m in MEASURES]
    return ", ".join([f"sum({sign})", *known, *sums])


def _sqlite_upsert(row: str, sign: int) -> str:
    values = [
        _DAY["sqlite"].format(t=row),
        f"{row}.hook",
        _STATUS_KEY.format(t=row),
        str(sign),
        *(f"{sign} * ({row}.{m} IS NOT NULL)" for m in MEASURES),
        *(f"{sign} * coalesce({row}.{m}, 0)" for m in MEASURES),
    ]
    updates = ", ".join(f"{c} = {c} + excluded.{c}" for c in SUMS)
    return (
        f"INSERT INTO rollup_daily ({COLUMNS}) VALUES ({', '.join(values)})"
        f" ON CONFLICT (day, hook, status_key) DO UPDATE SET {updates};"
    )


def _changed(old: str, new: str) -> str:
    return (
        f"({', '.join(f'{old}.{c}' for c in WATCHED)})"
        f" IS DISTINCT FROM ({', '.join(f'{new}.{c}' for c in WATCHED)})"
    )


def _pg_delta(source: str) -> str:
    """Append the sums of ``source`` (rows with a ``sign`` column) to rollup_delta."""
    return (
        f"INSERT INTO rollup_delta ({COLUMNS})"
        f" SELECT {_DAY['postgresql'].format(t='c')}, c.hook, {_STATUS_KEY.format(t='c')},"
        f" {_group_sums('c.sign', 'c')} FROM ({source}) AS c GROUP BY 1, 2, 3;"
    )


def _create_triggers(dialect: str) -> None:
    """The triggers that keep rollup_daily current (recreate them after rebuilding tasks)."""
    if dialect == "sqlite":
        op.execute(
            "CREATE TRIGGER rollup_tasks_insert AFTER INSERT ON tasks BEGIN "
            f"{_sqlite_upsert('NEW', 1)} END"
        )
        op.execute(
            f"CREATE TRIGGER rollup_tasks_update AFTER UPDATE OF {', '.join(WATCHED)} ON tasks"
            f" WHEN ({', '.join(f'OLD.{c}' for c in WATCHED)})"
            f" IS NOT ({', '.join(f'NEW.{c}' for c in WATCHED)}) BEGIN "
            f"{_sqlite_upsert('OLD', -1)} {_sqlite_upsert('NEW', 1)} END"
        )
        op.execute(
            "CREATE TRIGGER rollup_tasks_delete AFTER DELETE ON tasks BEGIN "
            f"{_sqlite_upsert('OLD', -1)} END"
        )
        return
    changed = (
        "SELECT {sign} AS sign, {t}.* FROM old_rows AS o"
        f" JOIN new_rows AS n ON n.task_key = o.task_key WHERE {_changed('o', 'n')}"
    )
    bodies = {
        "insert": _pg_delta("SELECT 1 AS sign, n.* FROM new_rows AS n"),
        "update": _pg_delta(
            f"{changed.format(sign=-1, t='o')} UNION ALL {changed.format(sign=1, t='n')}"
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
            f"CREATE FUNCTION rollup_tasks_{event}() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN {body} RETURN NULL; END $$"
        )
        op.execute(
            f"CREATE TRIGGER rollup_tasks_{event} AFTER {event.upper()} ON tasks"
            f" REFERENCING {referencing[event]} FOR EACH STATEMENT"
            f" EXECUTE FUNCTION rollup_tasks_{event}()"
        )


def _drop_triggers(dialect: str) -> None:
    for event in ("insert", "update", "delete"):
        if dialect == "sqlite":
            op.execute(f"DROP TRIGGER IF EXISTS rollup_tasks_{event}")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS rollup_tasks_{event} ON tasks")
            op.execute(f"DROP FUNCTION IF EXISTS rollup_tasks_{event}()")


def _cost_daily(dialect: str) -> str:
    status = "CASE WHEN r.status_key = '' THEN NULL ELSE substr(r.status_key, 2) END"
    if dialect == "sqlite":
        # rollup_delta stays empty on SQLite: the triggers write rollup_daily directly.
        sums = {c: f"r.{c}" for c in SUMS}
        source, tail = "rollup_daily AS r", "WHERE r.tasks <> 0"
    else:
        sums = {c: f"CAST(sum(r.{c}) AS BIGINT)" for c in SUMS[: 1 + len(MEASURES)]}
        sums |= {c: f"CAST(sum(r.{c}) AS BIGINT)" for c in MEASURES[:3]}
        sums |= {c: f"sum(r.{c})" for c in MEASURES[3:]}
        both = f"SELECT {COLUMNS} FROM rollup_daily UNION ALL SELECT {COLUMNS} FROM rollup_delta"
        source = f"({both}) AS r"
        tail = f"GROUP BY r.day, r.hook, r.status_key HAVING {sums['tasks']} <> 0"
    measures = ",\n    ".join(
        f"CASE WHEN {sums[f'known_{m}']} > 0 THEN {sums[m]} END AS {m}" for m in MEASURES
    )
    return f"""CREATE VIEW cost_daily AS
SELECT r.day AS day, r.hook AS hook, {status} AS status,
    {sums["tasks"]} AS tasks,
    {sums["tasks"]} - {sums["known_cost_usd"]} AS tasks_unknown_cost,
    {measures}
FROM {source}
{tail}"""


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    _table("rollup_daily")
    _table("rollup_delta")
    # Triggers first, then the backfill, in one transaction: on PostgreSQL CREATE TRIGGER
    # holds off writers to tasks until commit, so no change is missed or counted twice.
    _create_triggers(dialect)
    day, status_key = _DAY[dialect].format(t="t"), _STATUS_KEY.format(t="t")
    op.execute(
        f"INSERT INTO rollup_daily ({COLUMNS})"
        f" SELECT {day}, t.hook, {status_key}, {_group_sums('1', 't')}"
        " FROM tasks AS t GROUP BY 1, 2, 3"
    )
    op.execute("DROP VIEW cost_daily")
    op.execute(_cost_daily(dialect))


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.execute("DROP VIEW IF EXISTS cost_daily")
    _drop_triggers(dialect)
    op.drop_table("rollup_delta")
    op.drop_table("rollup_daily")
    # 0002's plain view, as it was.
    day = _DAY[dialect].format(t="t")
    op.execute(
        f"""CREATE VIEW cost_daily AS
SELECT {day} AS day, t.hook AS hook, t.status AS status,
    COUNT(*) AS tasks,
    COUNT(*) - COUNT(t.cost_usd) AS tasks_unknown_cost,
    CAST(SUM(t.input_tokens) AS BIGINT) AS input_tokens,
    CAST(SUM(t.output_tokens) AS BIGINT) AS output_tokens,
    CAST(SUM(t.total_tokens) AS BIGINT) AS total_tokens,
    SUM(t.compute_time_s) AS compute_time_s,
    SUM(t.cost_usd) AS cost_usd
FROM tasks AS t
GROUP BY {day}, t.hook, t.status"""
    )
