"""Cost rollups against totals computed by hand from the delivery catalogue, on both databases."""

from __future__ import annotations

import datetime as dt
import json
import math
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, case, delete, func, insert, inspect, select, text, update
from starlette.testclient import TestClient

from receiver import rollups
from receiver.cli import main
from receiver.db import alembic_config, driver_time
from receiver.models import Base, RollupDelta, RollupLabelDelta, Task
from receiver.tasks import upsert_tasks
from tests.conftest import DELIVERIES, post

CASES = sorted(p.with_suffix("") for p in DELIVERIES.glob("*.json"))
#: Labels per case; a task's cases agree (01 and 03 are one task). 12 (failed) has none.
LABELS = {"12-failed": ""}


def labels_for(name: str) -> str:
    number = int(name[:2])
    return LABELS.get(name, f"project={'alpha' if number % 2 else 'beta'}&team=t{number % 3}")


#: 11 reuses 05's example task id without its session: posted together, a bare task id
#: joins the one task that has it (the README's "One task, one row"), so 11 gets its own.
RETASKED = {"11-websocket-shape-cost-in-data": ("x9y8z7w6v5u4", "ws-x9y8z7w6v5u4")}


def post_catalogue(client: TestClient) -> None:
    """Every case once, and the first case again (a redelivery, which must not count)."""
    for stem in [*CASES, CASES[0]]:
        case = json.loads(stem.with_suffix(".json").read_text())
        body = stem.with_suffix(".body").read_bytes()
        if stem.name in RETASKED:
            old, new = RETASKED[stem.name]
            body = body.replace(old.encode(), new.encode())
        post(client, "catalogue", body, case["content_type"], query=labels_for(stem.name))


def expected_tasks() -> dict[tuple[Any, str], dict[str, Any]]:
    """The catalogue's tasks merged by hand: later known values win, unknown never erases."""
    tasks: dict[tuple[Any, str], dict[str, Any]] = {}
    for stem in CASES:
        task = json.loads(stem.with_suffix(".json").read_text())["expect"]["task"]
        if task is None:
            continue
        task_id = RETASKED.get(stem.name, (None, task["task_id"]))[1]
        key = (task.get("session_id", stem.name), task_id)
        merged = tasks.setdefault(key, {"cost_usd": None, "status": None, "labels": ""})
        for field in ("cost_usd", "status"):
            if task.get(field) is not None:
                merged[field] = task[field]
        merged["labels"] = labels_for(stem.name) or merged["labels"]
    return tasks


def test_views_exist_and_models_still_match_migrations(engine: Engine) -> None:
    """The views are created by migration 0002 and are no drift for the core models."""
    assert {"cost_daily", "cost_by_label"} <= set(inspect(engine).get_view_names())

    def include(obj: object, name: str | None, type_: str, reflected: bool, other: object) -> bool:
        return not (type_ == "table" and name is not None and name.startswith("results__"))

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": include})
        assert compare_metadata(context, Base.metadata) == []


def test_downgrade_drops_the_views(engine: Engine) -> None:
    command.downgrade(alembic_config(engine), "0001")
    assert not {"cost_daily", "cost_by_label"} & set(inspect(engine).get_view_names())
    command.upgrade(alembic_config(engine), "head")
    assert {"cost_daily", "cost_by_label"} <= set(inspect(engine).get_view_names())


def test_cost_daily_matches_the_catalogue(client: TestClient, engine: Engine) -> None:
    post_catalogue(client)
    expected = expected_tasks()
    known = [t["cost_usd"] for t in expected.values() if t["cost_usd"] is not None]
    today = dt.datetime.now(dt.UTC).date()

    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(select(rollups.cost_daily)).mappings()]
        db_total = conn.scalar(select(func.sum(Task.cost_usd)))
    assert {r["day"] for r in rows} == {today}
    assert {r["hook"] for r in rows} == {"catalogue"}
    assert sum(r["tasks"] for r in rows) == len(expected) == 8
    unknown = sum(1 for t in expected.values() if t["cost_usd"] is None)
    assert sum(r["tasks_unknown_cost"] for r in rows) == unknown == 1
    view_total = sum(r["cost_usd"] for r in rows if r["cost_usd"] is not None)
    assert round(view_total, 2) == round(sum(known), 2) == round(float(db_total or 0), 2)
    assert math.isclose(view_total, sum(known), rel_tol=1e-12)

    by_status = {r["status"]: r for r in rows}
    # Failed tasks cost money and count; the guardrail task's unknown cost is not $0.
    assert by_status["failed"]["tasks"] == 1
    assert math.isclose(by_status["failed"]["cost_usd"], 0.0011)
    assert by_status["guardrail"]["tasks_unknown_cost"] == 1
    assert by_status["guardrail"]["cost_usd"] is None


def test_cost_by_label_matches_the_catalogue(client: TestClient, engine: Engine) -> None:
    post_catalogue(client)
    expected: dict[str, float] = {}
    counts: dict[str, int] = {}
    for task in expected_tasks().values():
        project = dict(p.split("=") for p in task["labels"].split("&") if p).get("project")
        if project is not None:
            counts[project] = counts.get(project, 0) + 1
            expected[project] = expected.get(project, 0.0) + (task["cost_usd"] or 0.0)

    rows = rollups.costs(engine, ["label:project"])
    assert {r.key[0]: r.tasks for r in rows} == counts
    for row in rows:
        assert row.key[0] is not None
        assert round(row.cost_usd or 0.0, 6) == round(expected[row.key[0]], 6)
    # The unlabelled failed task is in no label group, but in the daily total.
    assert sum(counts.values()) == len(expected_tasks()) - 1


def test_groupings_by_week_month_hook_and_bounds(client: TestClient, engine: Engine) -> None:
    post_catalogue(client)
    days = [dt.date(2024, 1, 1), dt.date(2024, 1, 7), dt.date(2024, 1, 8), dt.date(2024, 2, 1)]
    with engine.begin() as conn:
        keys = list(conn.scalars(select(Task.task_key).order_by(Task.task_key)))
        for i, key in enumerate(keys):
            when = dt.datetime.combine(days[i % len(days)], dt.time(23, 59, 59), dt.UTC)
            conn.execute(update(Task).where(Task.task_key == key).values(first_seen_at=when))
        costs = {r.task_key: r.cost_usd for r in conn.execute(select(Task))}

    def expect(pick: list[int]) -> float:
        return sum(costs[k] or 0.0 for i, k in enumerate(keys) if i % len(days) in pick)

    weeks = {r.key: r for r in rollups.costs(engine, ["week"])}
    # 2024-01-01 and -07 are ISO week 1; -08 week 2; 02-01 week 5.
    assert set(weeks) == {("2024-W01",), ("2024-W02",), ("2024-W05",)}
    assert math.isclose(weeks[("2024-W01",)].cost_usd or 0.0, expect([0, 1]))
    months = {r.key: r for r in rollups.costs(engine, ["month", "hook"])}
    assert set(months) == {("2024-01", "catalogue"), ("2024-02", "catalogue")}
    assert months[("2024-01", "catalogue")].tasks == sum(1 for i in range(len(keys)) if i % 4 < 3)
    bounded = rollups.costs(engine, ["day"], since=dt.date(2024, 1, 7), until=dt.date(2024, 1, 8))
    assert [r.key for r in bounded] == [("2024-01-07",), ("2024-01-08",)]
    total = rollups.total(rollups.costs(engine, ["status"]))
    assert math.isclose(total.cost_usd or 0.0, sum(c or 0.0 for c in costs.values()))


def test_groupings_are_checked(engine: Engine) -> None:
    with pytest.raises(ValueError, match="cannot group by"):
        rollups.costs(engine, ["year"])
    with pytest.raises(ValueError, match="at most one label"):
        rollups.costs(engine, ["label:a", "label:b"])


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_costs_command(
    fmt: str, client: TestClient, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    post_catalogue(client)
    result = CliRunner().invoke(
        main,
        ["costs", "--by", "hook", "--by", "status", "--format", fmt],
        env={"RECEIVER_DATABASE_URL": db_url, "RECEIVER_DATA_DIR": str(tmp_path), "COLUMNS": "160"},
    )
    assert result.exit_code == 0, result.output
    if fmt == "json":
        rows = json.loads(result.output)
        assert {(r["hook"], r["status"]) for r in rows} >= {("catalogue", "failed")}
        assert sum(r["tasks"] for r in rows) == 8
        assert [r["cost_usd"] for r in rows if r["status"] == "guardrail"] == [None]
    elif fmt == "csv":
        assert result.output.splitlines()[0] == "hook,status," + ",".join(rollups.MEASURES)
        assert len(result.output.splitlines()) == 1 + len(rollups.costs(engine, ["hook", "status"]))
    else:
        assert "unknown" in result.output
        assert "total" in result.output


# cost_daily and cost_by_label are kept by triggers on tasks (migrations 0003 and 0005):
# whatever writes tasks, and however, each view must equal a fresh grouping of tasks.

_HOOKS = ["alpha", "beta"]
#: '' and NULL are different statuses and must stay apart.
_STATUSES = [None, "", "completed", "failed", "guardrail"]
_SEEN = [
    dt.datetime(2024, 1, 1, 0, 0, tzinfo=dt.UTC),
    dt.datetime(2024, 1, 1, 23, 59, 59, 999999, tzinfo=dt.UTC),
    dt.datetime(2024, 1, 2, 12, 0, tzinfo=dt.UTC),
]
_KEYS = [f"k{i}" for i in range(6)]
_tokens = st.none() | st.integers(min_value=0, max_value=10**12)
_seconds = st.none() | st.floats(min_value=0, max_value=1e5, allow_nan=False)
_costs = st.none() | st.sampled_from([0.0, 0.0011, 0.1, 0.2, 0.3, 12.345]) | _seconds
#: What the receiver writes (a JSON object of strings), and what an analyst might: JSON
#: nulls, numbers and booleans (read as PostgreSQL's jsonb_each_text gives them, on both
#: databases), a key with a space, and text that is not an object (counts under no label).
_label_values = (
    st.sampled_from(["alpha", "beta", "", "é x"]) | st.none() | st.integers(0, 2) | st.booleans()
)
_labels = st.one_of(
    st.dictionaries(st.sampled_from(["project", "team", "a b"]), _label_values, max_size=3).map(
        json.dumps
    ),
    st.sampled_from(["[]", '["project"]', '"project"']),
)


@st.composite
def _task_rows(draw: st.DrawFn) -> dict[str, Any]:
    key = draw(st.sampled_from(_KEYS))
    return {
        "task_key": key,
        "session_id": None,
        "task_id": key,
        "hook": draw(st.sampled_from(_HOOKS)),
        "status": draw(st.sampled_from(_STATUSES)),
        "output_type": None,
        "input_tokens": draw(_tokens),
        "output_tokens": draw(_tokens),
        "total_tokens": draw(_tokens),
        "compute_time_s": draw(_seconds),
        "completion_time_s": None,
        "cost_usd": draw(_costs),
        "error": None,
        "error_code": None,
        "guardrail_type": None,
        "guardrail_value": None,
        "completed_at": None,
        "first_seen_at": draw(st.sampled_from(_SEEN)),
        "last_delivery_id": draw(st.sampled_from(["d1", "d2"])),
        "labels": draw(_labels),
        "extra": None,
    }


_changes = st.fixed_dictionaries(
    {"last_delivery_id": st.sampled_from(["d1", "d3"])},
    optional={
        "hook": st.sampled_from(_HOOKS),
        "status": st.sampled_from(_STATUSES),
        "first_seen_at": st.sampled_from(_SEEN),
        "cost_usd": _costs,
        "input_tokens": _tokens,
        "compute_time_s": _seconds,
        "labels": _labels,
    },
)
#: One statement each: the pipeline's upserts, a multi-row insert, an UPDATE (of labels
#: alone too) or a DELETE of every task of a hook (several rows in one statement on PostgreSQL).
_operations: st.SearchStrategy[tuple[str, Any, Any]] = st.one_of(
    st.tuples(st.just("upsert"), st.lists(_task_rows(), min_size=1, max_size=4), st.just({})),
    st.tuples(
        st.just("insert"),
        st.lists(_task_rows(), min_size=1, max_size=4, unique_by=lambda r: r["task_key"]),
        st.just({}),
    ),
    st.tuples(st.just("update"), st.sampled_from(_HOOKS), _changes),
    # Labels alone: nothing else grouped or summed moves, the label groups do.
    st.tuples(
        st.just("update"), st.sampled_from(_HOOKS), st.fixed_dictionaries({"labels": _labels})
    ),
    st.tuples(st.just("delete"), st.sampled_from(_HOOKS), st.just({})),
    # An analyst's fix-up: rename every task of a hook, alone or with other changes.
    st.tuples(st.just("rename"), st.sampled_from(_HOOKS), _changes | st.just({})),
)


def _apply(engine: Engine, operation: tuple[str, Any, Any], step: int = 0) -> None:
    """Run ``operation`` in one transaction; a rename appends ``#step``, a key no task has."""
    kind, what, changes = operation
    with engine.begin() as conn:
        if kind == "upsert":
            for row in what:
                upsert_tasks(conn, [row])
        elif kind == "insert":
            keys = [r["task_key"] for r in what]
            conn.execute(delete(Task).where(Task.task_key.in_(keys)))
            conn.execute(insert(Task), what)
        elif kind == "update":
            conn.execute(update(Task).where(Task.hook == what).values(**changes))
        elif kind == "rename":
            renamed = Task.task_key + f"#{step}"
            conn.execute(update(Task).where(Task.hook == what).values(task_key=renamed, **changes))
        else:
            conn.execute(delete(Task).where(Task.hook == what))


def _day(value: dt.datetime) -> dt.date:
    return (value if value.tzinfo is None else value.astimezone(dt.UTC)).date()


def _label_text(value: Any) -> str | None:
    """A label value as ``cost_by_label`` shows it: PostgreSQL's ``jsonb_each_text``."""
    return value if value is None or isinstance(value, str) else json.dumps(value)


def _daily_keys(task: Any) -> list[tuple[Any, ...]]:
    return [(_day(task.first_seen_at), task.hook, task.status)]


def _label_keys(task: Any) -> list[tuple[Any, ...]]:
    """One group per label; text that is not a JSON object has no labels."""
    labels = json.loads(task.labels)
    if not isinstance(labels, dict):
        return []
    day = _day(task.first_seen_at)
    return [(day, task.hook, task.status, k, _label_text(v)) for k, v in labels.items()]


#: Each rollup view, its key columns and how a task of `tasks` falls into its groups.
_ROLLUPS = {
    "cost_daily": (("day", "hook", "status"), _daily_keys),
    "cost_by_label": (("day", "hook", "status", "label_key", "label_value"), _label_keys),
}


def expected_rollup(engine: Engine, view: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    """``view`` computed here from the tasks themselves: exact sums, None when none known."""
    _, keys_of = _ROLLUPS[view]
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    # The columns every revision since 0002 has (older revisions are tested too).
    columns = [c for c in Task.__table__.c if c.name != "usage_status"]
    with engine.connect() as conn:
        tasks = conn.execute(select(*columns)).all()
    for t in tasks:
        for key in keys_of(t):
            group = groups.setdefault(key, {"tasks": 0, "tasks_unknown_cost": 0})
            group["tasks"] += 1
            group["tasks_unknown_cost"] += t.cost_usd is None
            for name in rollups.MEASURES[2:]:
                values = [*group.get(f"_{name}", []), getattr(t, name)]
                group[f"_{name}"] = values
    for group in groups.values():
        for name in rollups.MEASURES[2:]:
            known = [v for v in group.pop(f"_{name}") if v is not None]
            exact = math.fsum if name in {"compute_time_s", "cost_usd"} else sum
            group[name] = exact(known) if known else None
    return groups


def assert_rollup_matches_tasks(engine: Engine, view: str = "cost_daily") -> None:
    """``view`` has one row per group of `expected_rollup`, with its counts and sums."""
    columns, _ = _ROLLUPS[view]
    expected = expected_rollup(engine, view)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(select(rollups.VIEWS[view])).mappings()]
    actual = {tuple(r.pop(c) for c in columns): r for r in rows}
    assert len(actual) == len(rows)  # one row per group
    assert set(actual) == set(expected)
    for key, want in expected.items():
        got = actual[key]
        for name, value in want.items():
            if value is None or isinstance(value, int):
                assert got[name] == value, (key, name)
            else:  # float sums: accumulated in write order, never off by more than rounding
                assert math.isclose(got[name], value, rel_tol=1e-9, abs_tol=1e-9), (key, name)
    if view == "cost_daily":
        with engine.connect() as conn:
            db_total = conn.scalar(select(func.sum(Task.cost_usd)))
        view_total = sum(r["cost_usd"] for r in rows if r["cost_usd"] is not None)
        assert abs(view_total - float(db_total or 0.0)) < 0.005  # to the cent


def _view_rows(engine: Engine, view: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The rows of ``view`` by their key columns."""
    columns, _ = _ROLLUPS[view]
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(select(rollups.VIEWS[view])).mappings()]
    return {tuple(r.pop(c) for c in columns): r for r in rows}


def assert_rollups_match_tasks(engine: Engine) -> None:
    for view in _ROLLUPS:
        assert_rollup_matches_tasks(engine, view)


def _pending(engine: Engine) -> int:
    """PostgreSQL: delta rows not yet folded (both rollups)."""
    with engine.connect() as conn:
        return sum(
            conn.scalar(select(func.count()).select_from(t)) or 0
            for t in (RollupDelta, RollupLabelDelta)
        )


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(operations=st.lists(_operations, max_size=8))
def test_rollups_follow_every_change_to_tasks(
    engine: Engine, operations: list[tuple[str, Any, Any]]
) -> None:
    with engine.begin() as conn:  # each example starts empty, which a delete must give
        conn.execute(delete(Task))
    rollups.fold(engine)
    assert_rollups_match_tasks(engine)
    for step, operation in enumerate(operations):
        _apply(engine, operation, step)
        assert_rollups_match_tasks(engine)
    rollups.fold(engine)
    assert_rollups_match_tasks(engine)
    assert _pending(engine) == 0


def _bulk_rows(count: int) -> list[dict[str, Any]]:
    return [
        {
            "task_key": f"bulk{i}",
            "task_id": f"bulk{i}",
            "hook": _HOOKS[i % 2],
            "status": _STATUSES[i % len(_STATUSES)],
            "input_tokens": i,
            "cost_usd": None if i % 7 == 0 else i / 1000,
            "first_seen_at": _SEEN[i % len(_SEEN)],
            "last_delivery_id": "d",
            "labels": "{}" if i % 5 == 0 else f'{{"project": "p{i % 3}", "team": "t{i % 2}"}}',
        }
        for i in range(count)
    ]


def _driver_value(engine: Engine, value: Any) -> Any:
    return driver_time(engine, value) if isinstance(value, dt.datetime) else value


def test_bulk_loads_through_the_driver_count(engine: Engine) -> None:
    """A load that bypasses the receiver (sqlite3 executemany, PostgreSQL COPY) is counted."""
    rows = _bulk_rows(500)
    columns = list(rows[0])
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if engine.dialect.name == "sqlite":
            marks = ", ".join("?" * len(columns))
            cursor.executemany(
                f"INSERT INTO tasks ({', '.join(columns)}) VALUES ({marks})",
                [[_driver_value(engine, v) for v in r.values()] for r in rows],
            )
        else:
            with cursor.copy(f"COPY tasks ({', '.join(columns)}) FROM STDIN") as copy:
                for r in rows:
                    copy.write_row(list(r.values()))
        raw.commit()
    finally:
        raw.close()
    assert_rollups_match_tasks(engine)
    assert sum(r.tasks for r in rollups.costs(engine, ["day"])) == 500


def test_upgrade_from_0002_backfills_and_downgrade_restores_the_plain_view(
    engine: Engine,
) -> None:
    command.downgrade(alembic_config(engine), "0002")
    assert not {"rollup_daily", "rollup_delta"} & set(inspect(engine).get_table_names())
    with engine.begin() as conn:
        conn.execute(insert(Task), [{"extra": None, **r} for r in _bulk_rows(200)])
    assert_rollups_match_tasks(engine)  # the plain view of 0002
    command.upgrade(alembic_config(engine), "head")
    assert_rollups_match_tasks(engine)  # backfilled
    with engine.begin() as conn:
        conn.execute(update(Task).where(Task.hook == "alpha").values(status="failed"))
        conn.execute(update(Task).where(Task.hook == "beta").values(labels='{"project": "x"}'))
    assert_rollups_match_tasks(engine)  # and kept from then on


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_postgresql_writers_never_wait_on_a_rollup_row(engine: Engine) -> None:
    """Two open transactions add tasks to the same day, hook, status and label without
    blocking; a fold leaves what is not yet committed for the next one."""
    first, second = _bulk_rows(14)[0], _bulk_rows(14)[10]
    same = {"first_seen_at": _SEEN[0], "labels": '{"project": "p0"}'}
    second |= {"hook": first["hook"], "status": first["status"], **same}
    first |= same
    with engine.connect() as a, engine.connect() as b:
        a.begin()
        upsert_tasks(a, [first | {"extra": None}])
        b.begin()
        b.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
        upsert_tasks(b, [second | {"extra": None}])  # would time out if it waited for `a`
        b.commit()
        rollups.fold(engine)  # folds b's row; a's is not committed yet
        a.commit()
    with engine.connect() as conn:
        for delta in (RollupDelta, RollupLabelDelta):
            assert (conn.scalar(select(func.count()).select_from(delta)) or 0) > 0
    assert_rollups_match_tasks(engine)
    rows = rollups.costs(engine, ["day", "hook", "status"])  # folds the rest
    assert [r.tasks for r in rows] == [2]
    assert [(r.key, r.tasks) for r in rollups.costs(engine, ["label:project"])] == [(("p0",), 2)]
    assert _pending(engine) == 0
    assert_rollups_match_tasks(engine)


def test_downgrade_to_0004_restores_the_plain_label_view(engine: Engine) -> None:
    """0005 round trip: the plain view of 0002 back, then a backfilled rollup kept current."""
    command.downgrade(alembic_config(engine), "0004")
    tables = set(inspect(engine).get_table_names())
    assert not {"rollup_label", "rollup_label_delta"} & tables
    assert {"rollup_daily", "rollup_delta"} <= tables  # 0003 is left as it was
    assert "cost_by_label" in inspect(engine).get_view_names()
    with engine.begin() as conn:
        conn.execute(insert(Task), [{"extra": None, **r} for r in _bulk_rows(300)])
    assert_rollup_matches_tasks(engine, "cost_by_label")  # the plain view
    plain = _view_rows(engine, "cost_by_label")
    command.upgrade(alembic_config(engine), "head")
    assert_rollup_matches_tasks(engine, "cost_by_label")  # backfilled
    rolled = _view_rows(engine, "cost_by_label")
    assert set(rolled) == set(plain)
    for key, row in plain.items():
        for name, value in row.items():
            if isinstance(value, float):
                assert math.isclose(rolled[key][name], value, rel_tol=1e-9), (key, name)
            else:  # same types too: counts and token sums are integers on both
                assert (type(rolled[key][name]), rolled[key][name]) == (type(value), value)
    with engine.begin() as conn:  # a label changes: the task's sums move from p1 to p9
        conn.execute(
            update(Task)
            .where(Task.labels.contains('"p1"'))
            .values(labels='{"project": "p9", "team": "t0"}')
        )
    moved = {r.key: r.tasks for r in rollups.costs(engine, ["label:project"])}
    assert ("p1",) not in moved
    assert moved[("p9",)] == sum(r["tasks"] for k, r in plain.items() if k[3:] == ("project", "p1"))
    assert_rollups_match_tasks(engine)


def _rollup_writes(conn: Connection) -> int:
    """Rows written so far that a rollup trigger could have written (per connection)."""
    if conn.dialect.name == "sqlite":
        raw = conn.connection.dbapi_connection
        assert isinstance(raw, sqlite3.Connection)
        return raw.total_changes  # counts the rows triggers write too
    return sum(
        conn.scalar(select(func.count()).select_from(t)) or 0
        for t in (RollupDelta, RollupLabelDelta)
    )


def test_an_update_of_nothing_rolled_up_leaves_the_rollups_alone(engine: Engine) -> None:
    """A redelivery moves only ``last_delivery_id`` (and rewrites the same labels): no trigger
    writes a rollup row. Changing the labels does."""
    with engine.begin() as conn:
        conn.execute(insert(Task), [{"extra": None, **r} for r in _bulk_rows(40)])
    rollups.fold(engine)
    with engine.begin() as conn:
        before = _rollup_writes(conn)
        same = conn.execute(update(Task).values(last_delivery_id="d9", labels=Task.labels))
        assert same.rowcount == 40
        tasks_only = 40 if engine.dialect.name == "sqlite" else 0
        assert _rollup_writes(conn) - before == tasks_only
        before = _rollup_writes(conn)
        conn.execute(update(Task).where(Task.task_key == "bulk1").values(labels='{"a": "b"}'))
        assert _rollup_writes(conn) - before > (1 if engine.dialect.name == "sqlite" else 0)
    assert_rollups_match_tasks(engine)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_postgresql_concurrent_writers_and_folds_never_wait_nor_deadlock(engine: Engine) -> None:
    """Writers on their own tasks, all in the same rollup groups, and folds in between: no
    statement waits for a lock (``lock_timeout``), and the rollups end equal to the tasks."""
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for step in range(15):
                rows = _bulk_rows(6)
                with engine.begin() as conn:
                    conn.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
                    for i, row in enumerate(rows):
                        key = f"w{n}-{i}"
                        labels = f'{{"project": "p{(step + i) % 2}"}}'
                        upsert_tasks(
                            conn,
                            [
                                row
                                | {"task_key": key, "task_id": key, "labels": labels, "extra": None}
                            ],
                        )
                    conn.execute(
                        update(Task)
                        .where(Task.task_key.like(f"w{n}-%"), Task.status.is_(None))
                        .values(status="completed")
                    )
                    if step % 5 == 4:
                        conn.execute(delete(Task).where(Task.task_key == f"w{n}-0"))
                if step % 3 == 0:
                    rollups.fold(engine)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert_rollups_match_tasks(engine)
    rollups.fold(engine)
    assert _pending(engine) == 0
    assert_rollups_match_tasks(engine)


def test_cost_by_label_follows_an_update_of_task_key(engine: Engine) -> None:
    """Renaming a task and changing it in one UPDATE moves its label sums."""
    with engine.begin() as conn:
        conn.execute(insert(Task), [{"extra": None, **r} for r in _bulk_rows(12)])
        conn.execute(
            update(Task)
            .where(Task.task_key.in_(["bulk1", "bulk2"]))
            .values(task_key=Task.task_key + "x", status="renamed")
        )
    assert_rollup_matches_tasks(engine, "cost_by_label")
    renamed = [
        r for r in rollups.costs(engine, ["label:project", "status"]) if r.key[1] == "renamed"
    ]
    assert sum(r.tasks for r in renamed) == 2


#: bulk0 gives up its key and bulk1 takes it, in one statement (a true swap is refused by the
#: primary key on both databases, mid-statement). No WHERE: both scan in insertion order, so
#: bulk0 moves first; every other task is rewritten unchanged.
_TAKEN_OVER = case(
    (Task.task_key == "bulk0", "bulk0-moved"),
    (Task.task_key == "bulk1", "bulk0"),
    else_=Task.task_key,
)


@pytest.mark.parametrize(
    ("where", "values"),
    [
        pytest.param(["bulk3"], {"task_key": "bulk3-renamed"}, id="key-alone"),
        pytest.param(
            ["bulk3"],
            {"task_key": "bulk3-renamed", "status": "renamed"},
            id="key-and-status",
        ),
        pytest.param(
            ["bulk3", "bulk4"],
            {
                "task_key": Task.task_key + "-renamed",
                "status": "renamed",
                "cost_usd": 9.5,
                "first_seen_at": _SEEN[2],
            },
            id="two-keys-status-cost-and-day",
        ),
        pytest.param(None, {"task_key": _TAKEN_OVER}, id="key-taken-over"),
        pytest.param(
            None,
            {
                "task_key": _TAKEN_OVER,
                "status": case((Task.task_key == "bulk1", "renamed"), else_=Task.status),
            },
            id="key-taken-over-and-status",
        ),
    ],
)
def test_cost_daily_follows_an_update_of_task_key(
    engine: Engine, where: list[str] | None, values: dict[str, Any]
) -> None:
    """An UPDATE of task_key, alone or with grouped and summed columns, moves exactly the
    renamed tasks' sums: the rollups equal a grouping of tasks, before and after a fold."""
    with engine.begin() as conn:
        conn.execute(insert(Task), [{"extra": None, **r} for r in _bulk_rows(10)])
    rollups.fold(engine)
    before = {r.key: r.tasks for r in rollups.costs(engine, ["status"])}
    with engine.begin() as conn:
        statement = update(Task).values(**values)
        if where is not None:
            statement = statement.where(Task.task_key.in_(where))
        conn.execute(statement)
    with engine.connect() as conn:
        keys = set(conn.scalars(select(Task.task_key)))
        renamed = conn.scalar(select(func.count()).where(Task.status == "renamed"))
    assert len(keys) == 10
    assert keys != {f"bulk{i}" for i in range(10)}
    assert_rollups_match_tasks(engine)
    after = {r.key: r.tasks for r in rollups.costs(engine, ["status"])}  # folds
    assert after.get(("renamed",), 0) == renamed
    if not renamed:
        assert after == before
    assert _pending(engine) == 0
    assert_rollups_match_tasks(engine)


def _update_function(engine: Engine) -> str | None:
    """PostgreSQL: the source of the daily rollup's update trigger function."""
    with engine.connect() as conn:
        source: str | None = conn.scalar(
            text("SELECT prosrc FROM pg_proc WHERE proname = 'rollup_tasks_update'")
        )
    return source


def _statuses(engine: Engine) -> dict[str | None, int]:
    return {r.key[0]: r.tasks for r in rollups.costs(engine, ["status"])}


def test_0006_round_trip_and_repair(engine: Engine) -> None:
    """Below 0006 the function is 0003's own, which pairs rows by task_key and so misses a
    rename with a status change on PostgreSQL; upgrading rebuilds what it missed."""
    config = alembic_config(engine)
    pg = engine.dialect.name == "postgresql"
    head = _update_function(engine) if pg else None
    command.downgrade(config, "0005")
    if pg:
        restored = _update_function(engine)
        command.downgrade(config, "0002")
        command.upgrade(config, "0005")  # 0003 creates its function afresh
        assert restored == _update_function(engine)
        assert restored is not None
        assert "JOIN new_rows AS n ON n.task_key = o.task_key" in restored
        assert head != restored
    with engine.begin() as conn:
        conn.execute(insert(Task), [{"extra": None, **r} for r in _bulk_rows(10)])
    rollups.fold(engine)
    with engine.begin() as conn:
        conn.execute(
            update(Task)
            .where(Task.task_key == "bulk1")
            .values(task_key="bulk1-renamed", status="renamed")
        )
    # SQLite's row triggers were right all along; 0003's PostgreSQL function misses it.
    assert _statuses(engine).get("renamed") == (None if pg else 1)
    with engine.begin() as conn:  # one more change, left pending for the rebuild
        conn.execute(update(Task).where(Task.task_key == "bulk2").values(cost_usd=7.25))
    command.upgrade(config, "head")
    if pg:
        assert _update_function(engine) == head
        with engine.connect() as conn:  # folded into the rebuild
            assert conn.scalar(select(func.count()).select_from(RollupDelta)) == 0
    assert_rollups_match_tasks(engine)
    assert _statuses(engine).get("renamed") == 1
    with engine.begin() as conn:  # and kept from then on
        conn.execute(
            update(Task)
            .where(Task.task_key == "bulk3")
            .values(task_key="bulk3-renamed", status="renamed")
        )
    assert_rollups_match_tasks(engine)
    assert _statuses(engine).get("renamed") == 2
