"""rollup_daily: an UPDATE of task_key no longer upsets cost_daily on PostgreSQL

0003's PostgreSQL update trigger paired the statement's old and new rows by
``task_key`` and rolled up only the pairs that differed. An UPDATE that
changes ``task_key`` (an analyst's fix-up; the receiver never does it) broke
the pairing: a renamed task whose status changed stayed in its old group, and
a task taking a key another gave up in the same statement was paired with the
wrong task. Now the delta is the sum over the new rows minus the sum over the
old ones, per group, as 0005 does for labels: a row is left out of both sides
only when the other side has a row with the same key and the same grouped and
summed columns, so an UPDATE touching none of them (a redelivery moving
``last_delivery_id``) still appends nothing to ``rollup_delta``.

A rename under 0003 may already have left ``rollup_daily`` wrong, so the
upgrade also rebuilds it from ``tasks`` (as 0003's backfill did: about a
second per million tasks), with writers to ``tasks`` and `fold` held off
until it commits. Float sums come out as a fresh ``GROUP BY`` gives them.

A rename alone now appends rows that sum to zero (a -1 and a +1 in the same
group), where 0003 appended none: correct, and rare.

SQLite needs nothing: its row triggers see each row's OLD and NEW, whatever
its key. The schema, the insert and delete triggers and ``cost_daily`` are
unchanged; only the function ``rollup_tasks_update`` is replaced (the trigger
keeps calling it), and the downgrade puts 0003's back. 0003's SQL is copied
here, not imported, so this stays what it was when 0003 changes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 09:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

MEASURES = ("input_tokens", "output_tokens", "total_tokens", "compute_time_s", "cost_usd")
#: The columns of rollup_delta after the key, in order.
SUMS = ("tasks", *(f"known_{m}" for m in MEASURES), *MEASURES)
COLUMNS = ", ".join(("day", "hook", "status_key", *SUMS))
#: Grouped or summed: an UPDATE touching none of them changes no rollup.
WATCHED = ("first_seen_at", "hook", "status", *MEASURES)

_DAY = "CAST({t}.first_seen_at AT TIME ZONE 'UTC' AS date)"
# '' is NULL, '=' || status a status (0003's encoding: a key column cannot be NULL).
_STATUS_KEY = "coalesce('=' || {t}.status, '')"
#: `receiver.rollups.fold`'s advisory lock key, as it was when this was written.
_FOLD_LOCK = 0x5EB7_0003


def _group_sums(sign: str, t: str) -> str:
    """Select-list sums of one group: ``sign`` is +1/-1 per row (a column or a constant)."""
    known = [f"sum(CASE WHEN {t}.{m} IS NOT NULL THEN {sign} ELSE 0 END)" for m in MEASURES]
    sums = [f"coalesce(sum({sign} * {t}.{m}), 0)" for m in MEASURES]
    return ", ".join([f"sum({sign})", *known, *sums])


def _pg_delta(source: str) -> str:
    """Append the sums of ``source`` (rows with a ``sign`` column) to rollup_delta."""
    return (
        f"INSERT INTO rollup_delta ({COLUMNS})"
        f" SELECT {_DAY.format(t='c')}, c.hook, {_STATUS_KEY.format(t='c')},"
        f" {_group_sums('c.sign', 'c')} FROM ({source}) AS c GROUP BY 1, 2, 3;"
    )


def _update_body() -> str:
    """New rows minus old rows; a row the other side has unchanged (same key) is left out.

    Keys are unique on each side, so what is left out is a matching of equal rows and
    cancels exactly; a renamed row has no partner and counts on both sides.
    """
    unchanged = (
        "EXISTS (SELECT FROM {other} AS u WHERE u.task_key = {t}.task_key AND"
        f" ({', '.join(f'u.{c}' for c in WATCHED)}) IS NOT DISTINCT FROM"
        f" ({', '.join('{t}.' + c for c in WATCHED)}))"
    )
    old = unchanged.format(other="new_rows", t="o")
    new = unchanged.format(other="old_rows", t="n")
    return _pg_delta(
        f"SELECT -1 AS sign, o.* FROM old_rows AS o WHERE NOT {old}"
        f" UNION ALL SELECT 1 AS sign, n.* FROM new_rows AS n WHERE NOT {new}"
    )


def _update_body_0003() -> str:
    """0003's body, as 0003 wrote it: pairs of old and new rows joined on task_key."""
    differ = (
        f"({', '.join(f'o.{c}' for c in WATCHED)})"
        f" IS DISTINCT FROM ({', '.join(f'n.{c}' for c in WATCHED)})"
    )
    changed = (
        "SELECT {sign} AS sign, {t}.* FROM old_rows AS o"
        f" JOIN new_rows AS n ON n.task_key = o.task_key WHERE {differ}"
    )
    return _pg_delta(f"{changed.format(sign=-1, t='o')} UNION ALL {changed.format(sign=1, t='n')}")


def _replace_update_function(body: str) -> None:
    # CREATE OR REPLACE keeps the function's identity: the trigger on tasks needs no change.
    op.execute(
        "CREATE OR REPLACE FUNCTION rollup_tasks_update() RETURNS trigger LANGUAGE plpgsql AS $$"
        f" BEGIN {body} RETURN NULL; END $$"
    )


def _rebuild() -> None:
    """Recompute rollup_daily from tasks and empty rollup_delta, nothing written meanwhile."""
    # Tasks first: every writer has committed its delta rows, and no new one starts. Then
    # fold's advisory lock (receiver.rollups), so no fold moves rows under us.
    op.execute("LOCK TABLE tasks IN SHARE ROW EXCLUSIVE MODE")
    op.execute(f"SELECT pg_advisory_xact_lock({_FOLD_LOCK})")
    op.execute("DELETE FROM rollup_delta")
    op.execute("DELETE FROM rollup_daily")
    op.execute(
        f"INSERT INTO rollup_daily ({COLUMNS})"
        f" SELECT {_DAY.format(t='t')}, t.hook, {_STATUS_KEY.format(t='t')},"
        f" {_group_sums('1', 't')} FROM tasks AS t GROUP BY 1, 2, 3"
    )


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _replace_update_function(_update_body())
        _rebuild()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _replace_update_function(_update_body_0003())
