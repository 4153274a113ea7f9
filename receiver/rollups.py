"""Cost rollups: the ``cost_daily`` and ``cost_by_label`` views, and sums over them.

The views group ``tasks`` by the UTC day the receiver first heard of a task,
its hook and status; ``cost_by_label`` also by each query-string label.
``cost_daily`` (migration 0003) reads ``rollup_daily`` and ``cost_by_label``
(migration 0005) reads ``rollup_label``, which triggers on ``tasks`` keep
current (plus, on PostgreSQL, the ``rollup_delta`` / ``rollup_label_delta``
rows not yet folded in by `fold`), so both answer in milliseconds however many
tasks there are, and a BI tool reading them needs no refresh job.

A task is one row of ``tasks``, so redeliveries never count twice; failed
tasks count (they cost money); a task whose cost is unknown is counted in
``tasks_unknown_cost`` and adds nothing to ``cost_usd``, which stays NULL
(unknown) when no task of a group has a cost.
Money is float64, as WebRun reports it and ``tasks.cost_usd`` stores it.
Token sums cannot overflow: NUMERIC on PostgreSQL (migration 0008, read as
ints here), and on SQLite within 64 bits by the usage bounds (receiver.bounds).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BigInteger, Column, Date, Engine, Float, MetaData, Table, Text, select, text

from receiver.db import Bind, json_object_each_sql, lock_transaction, single_writer, utc_day_sql

_views = MetaData()

_MEASURES = (
    ("tasks", BigInteger),
    ("tasks_unknown_cost", BigInteger),
    ("input_tokens", BigInteger),
    ("output_tokens", BigInteger),
    ("total_tokens", BigInteger),
    ("compute_time_s", Float),
    ("cost_usd", Float),
)

#: Measure columns, in view order.
MEASURES = tuple(name for name, _ in _MEASURES)
_TOKEN_MEASURES = frozenset(MEASURES[2:5])

cost_daily = Table(
    "cost_daily",
    _views,
    Column("day", Date),
    Column("hook", Text),
    Column("status", Text),
    *(Column(name, type_()) for name, type_ in _MEASURES),
)

cost_by_label = Table(
    "cost_by_label",
    _views,
    Column("day", Date),
    Column("hook", Text),
    Column("status", Text),
    Column("label_key", Text),
    Column("label_value", Text),
    *(Column(name, type_()) for name, type_ in _MEASURES),
)

#: The rollup views by name; the export writes each as a dataset partitioned by ``day``.
VIEWS: dict[str, Table] = {t.name: t for t in (cost_daily, cost_by_label)}

GROUPINGS = ("day", "week", "month", "hook", "status")

#: PostgreSQL advisory lock key of `fold` (the migrations' lock is 0x5EB7_0000).
_FOLD_LOCK = 0x5EB7_0003
_SUMS = (
    "tasks",
    *(f"known_{m}" for m in MEASURES[2:]),
    *MEASURES[2:],
)


def _fold_sql(rollup: str, delta: str, key: Sequence[str]) -> str:
    """Move the committed rows of ``delta`` into ``rollup``, summed per ``key``."""
    keys = ", ".join(key)
    return f"""WITH moved AS (DELETE FROM {delta} RETURNING *)
INSERT INTO {rollup} ({keys}, {", ".join(_SUMS)})
SELECT {keys}, {", ".join(f"sum({c})" for c in _SUMS)}
FROM moved GROUP BY {keys}
ON CONFLICT ({keys}) DO UPDATE SET
{", ".join(f"{c} = {rollup}.{c} + excluded.{c}" for c in _SUMS)}"""


_DAILY_KEY = ("day", "hook", "status_key")
_FOLDS = (
    _fold_sql("rollup_daily", "rollup_delta", _DAILY_KEY),
    _fold_sql("rollup_label", "rollup_label_delta", (*_DAILY_KEY, "label_key", "label_value_key")),
)


def fold(engine: Engine) -> None:
    """Move PostgreSQL's pending ``rollup_delta`` and ``rollup_label_delta`` rows into
    ``rollup_daily`` and ``rollup_label`` (SQLite: no-op).

    The views are correct either way; folding keeps the pending rows few, so
    they stay fast. Rows of transactions not yet committed stay for the next
    fold; the advisory lock makes concurrent folds take turns.
    """
    if single_writer(engine):
        return  # the triggers wrote the rollups themselves (migration 0003)
    with engine.begin() as conn:
        lock_transaction(conn, _FOLD_LOCK)
        for sql in _FOLDS:
            conn.execute(text(sql))


def task_sums_sql(view: str, bind: Bind, condition: str) -> str:
    """A subquery: the rows of rollup ``view`` summed over the tasks ``t`` meeting ``condition``.

    What the rollup tables keep current, computed afresh (the definition the views
    had before migrations 0003 and 0005): the export sums the very tasks it exports
    with it, so a rollup row never counts a task that the run leaves out.
    """
    day = utc_day_sql(bind, "t.first_seen_at")
    labelled = view == "cost_by_label"
    keys = [day, "t.hook", "t.status", *(["l.key", "l.value"] if labelled else [])]
    names = ["day", "hook", "status", *(["label_key", "label_value"] if labelled else [])]
    # A task's labels, one row each (none unless a JSON object), as in migration 0005.
    labels = json_object_each_sql(bind, "t.labels")
    source = "tasks AS t" + (f", {labels} AS l" if labelled else "")
    sums = [
        "COUNT(*) AS tasks",
        "COUNT(*) - COUNT(t.cost_usd) AS tasks_unknown_cost",
        *(f"CAST(SUM(t.{m}) AS BIGINT) AS {m}" for m in MEASURES[2:5]),
        *(f"SUM(t.{m}) AS {m}" for m in MEASURES[5:]),
    ]
    columns = ", ".join([*(f"{k} AS {n}" for k, n in zip(keys, names, strict=True)), *sums])
    return (
        f"(SELECT {columns} FROM {source} WHERE {condition} GROUP BY {', '.join(keys)}) AS {view}"
    )


def parse_grouping(value: str) -> str:
    """Check one ``--by`` value: a name of `GROUPINGS` or ``label:KEY``."""
    if value in GROUPINGS or (value.startswith("label:") and len(value) > len("label:")):
        return value
    raise ValueError(f"cannot group by {value!r}: use {', '.join(GROUPINGS)} or label:KEY")


@dataclass
class CostRow:
    """One group of a rollup: its key values, then the measures."""

    key: tuple[str | None, ...]
    tasks: int = 0
    tasks_unknown_cost: int = 0
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    compute_time_s: float | None = None
    cost_usd: float | None = None
    #: Measures summed over some groups whose value is unknown: the sum is of the known
    #: ones only, and a listing must say so rather than show numbers that do not add up.
    partial: set[str] = field(default_factory=set)
    _unknown: set[str] = field(default_factory=set, repr=False)

    def add(self, values: dict[str, Any]) -> None:
        """Add one view row; a NULL measure is unknown and leaves the sum alone."""
        self.tasks += values["tasks"]
        self.tasks_unknown_cost += values["tasks_unknown_cost"]
        for name in MEASURES[2:]:
            value = values[name]
            current = getattr(self, name)
            if value is None:
                if values["tasks"]:
                    self._unknown.add(name)
                    if current is not None:
                        self.partial.add(name)
                continue
            if name in _TOKEN_MEASURES:  # NUMERIC on PostgreSQL (migration 0008): exact
                value = int(value)
            if name in self._unknown:
                self.partial.add(name)
            setattr(self, name, value if current is None else current + value)

    def as_dict(self, columns: Sequence[str]) -> dict[str, Any]:
        return {
            **dict(zip(columns, self.key, strict=True)),
            **{name: getattr(self, name) for name in MEASURES},
        }


def _key_part(grouping: str, row: dict[str, Any]) -> str | None:
    day: dt.date = row["day"]
    if grouping == "day":
        return day.isoformat()
    if grouping == "week":
        year, week, _ = day.isocalendar()
        return f"{year}-W{week:02d}"
    if grouping == "month":
        return f"{day.year:04d}-{day.month:02d}"
    if grouping.startswith("label:"):
        value: str | None = row["label_value"]
        return value
    plain: str | None = row[grouping]
    return plain


def costs(
    engine: Engine,
    by: Iterable[str] = ("day",),
    *,
    since: dt.date | None = None,
    until: dt.date | None = None,
) -> list[CostRow]:
    """Sum the rollup over ``by`` (see `GROUPINGS`, or ``label:KEY``), days ``since``..``until``.

    Both bounds are inclusive. At most one ``label:KEY`` grouping: a task with
    labels appears once per label, so two label groupings would be a cross product.
    """
    groupings = [parse_grouping(g) for g in by]
    labels = [g for g in groupings if g.startswith("label:")]
    if len(labels) > 1:
        raise ValueError("group by at most one label")
    view = cost_by_label if labels else cost_daily
    query = select(view)
    if labels:
        query = query.where(view.c.label_key == labels[0].removeprefix("label:"))
    if since is not None:
        query = query.where(view.c.day >= since)
    if until is not None:
        query = query.where(view.c.day <= until)
    fold(engine)
    groups: dict[tuple[str | None, ...], CostRow] = {}
    with engine.connect() as conn:
        for row in conn.execute(query).mappings():
            values = dict(row)
            key = tuple(_key_part(g, values) for g in groupings)
            groups.setdefault(key, CostRow(key)).add(values)
    return [groups[k] for k in sorted(groups, key=lambda k: tuple((v is None, v or "") for v in k))]


def total(rows: Iterable[CostRow]) -> CostRow:
    """The sum of ``rows``, as one row with an empty key."""
    out = CostRow(())
    for row in rows:
        out.add({name: getattr(row, name) for name in MEASURES})
        out.partial |= row.partial
    return out
