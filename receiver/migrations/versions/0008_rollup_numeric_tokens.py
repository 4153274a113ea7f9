"""rollup sums that cannot overflow: token sums NUMERIC on PostgreSQL

Two tasks of ``2**63-1`` tokens on one hook made every read of ``cost_daily``
fail with ``bigint out of range`` on PostgreSQL. Classification now bounds
usage (`receiver.bounds`: at most 10^9 tokens a task), which keeps the sums
within 64 bits for any real traffic; on PostgreSQL they now cannot overflow
at all: the token sums of ``rollup_daily``, ``rollup_delta``, ``rollup_label``
and ``rollup_label_delta`` become NUMERIC, and ``cost_daily`` and
``cost_by_label`` sum them as NUMERIC instead of casting to ``bigint`` (their
values read as Python `Decimal`; `receiver.rollups` hands out ints). Task
counts stay ``bigint`` (one per task). Money and times stay float64: the
bounds keep those sums finite.

SQLite needs nothing: its integers are 64-bit whatever the declared type,
and the bounds keep every sum within them.

The views are dropped and recreated around the type change (PostgreSQL
refuses to alter a column a view reads); their SQL is 0003's and 0005's,
copied here, not imported, so this stays what it was when those change.
The downgrade puts ``bigint`` back (it fails if a sum no longer fits).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 14:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

MEASURES = ("input_tokens", "output_tokens", "total_tokens", "compute_time_s", "cost_usd")
TOKENS = MEASURES[:3]
SUMS = ("tasks", *(f"known_{m}" for m in MEASURES), *MEASURES)
TABLES = ("rollup_daily", "rollup_delta", "rollup_label", "rollup_label_delta")
_STATUS = "CASE WHEN r.status_key = '' THEN NULL ELSE substr(r.status_key, 2) END"


def _sums(token_type: str) -> dict[str, str]:
    sums = {c: f"CAST(sum(r.{c}) AS BIGINT)" for c in SUMS[: 1 + len(MEASURES)]}
    sums |= {c: f"CAST(sum(r.{c}) AS {token_type})" for c in TOKENS}
    sums |= {c: f"sum(r.{c})" for c in MEASURES[3:]}
    return sums


def _measures(sums: dict[str, str]) -> str:
    return ",\n    ".join(
        f"CASE WHEN {sums[f'known_{m}']} > 0 THEN {sums[m]} END AS {m}" for m in MEASURES
    )


def _cost_daily(token_type: str) -> str:
    """0003's PostgreSQL ``cost_daily``, its token sums cast to ``token_type``."""
    sums = _sums(token_type)
    columns = ", ".join(("day", "hook", "status_key", *SUMS))
    both = f"SELECT {columns} FROM rollup_daily UNION ALL SELECT {columns} FROM rollup_delta"
    return f"""CREATE VIEW cost_daily AS
SELECT r.day AS day, r.hook AS hook, {_STATUS} AS status,
    {sums["tasks"]} AS tasks,
    {sums["tasks"]} - {sums["known_cost_usd"]} AS tasks_unknown_cost,
    {_measures(sums)}
FROM ({both}) AS r
GROUP BY r.day, r.hook, r.status_key HAVING {sums["tasks"]} <> 0"""


def _cost_by_label(token_type: str) -> str:
    """0005's PostgreSQL ``cost_by_label``, its token sums cast to ``token_type``."""
    sums = _sums(token_type)
    key = ("day", "hook", "status_key", "label_key", "label_value_key")
    columns = ", ".join((*key, *SUMS))
    value = "CASE WHEN r.label_value_key = '' THEN NULL ELSE substr(r.label_value_key, 2) END"
    both = f"SELECT {columns} FROM rollup_label UNION ALL SELECT {columns} FROM rollup_label_delta"
    return f"""CREATE VIEW cost_by_label AS
SELECT r.day AS day, r.hook AS hook, {_STATUS} AS status,
    r.label_key AS label_key, {value} AS label_value,
    {sums["tasks"]} AS tasks,
    {sums["tasks"]} - {sums["known_cost_usd"]} AS tasks_unknown_cost,
    {_measures(sums)}
FROM ({both}) AS r
GROUP BY {", ".join(f"r.{c}" for c in key)} HAVING {sums["tasks"]} <> 0"""


def _retype(token_type: str) -> None:
    op.execute("DROP VIEW cost_daily")
    op.execute("DROP VIEW cost_by_label")
    for table in TABLES:
        changes = ", ".join(f"ALTER COLUMN {c} TYPE {token_type}" for c in TOKENS)
        op.execute(f"ALTER TABLE {table} {changes}")
    op.execute(_cost_daily(token_type))
    op.execute(_cost_by_label(token_type))


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _retype("NUMERIC")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _retype("BIGINT")
