"""Cost rollups against totals computed by hand from the delivery catalogue, on both databases."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, func, insert, inspect, select, update
from starlette.testclient import TestClient

from receiver import rollups
from receiver.cli import main
from receiver.db import alembic_config, driver_time
from receiver.models import Base, RollupDelta, Task
from receiver.tasks import upsert_task
from tests.conftest import DELIVERIES, post

CASES = sorted(p.with_suffix("") for p in DELIVERIES.glob("*.json"))
#: Labels per case; a task's cases agree (01 and 03 are one task). 12 (failed) has none.
LABELS = {"12-failed": ""}


def labels_for(name: str) -> str:
    number = int(name[:2])
    return LABELS.get(name, f"project={'alpha' if number % 2 else 'beta'}&team=t{number % 3}")


def post_catalogue(client: TestClient) -> None:
    """Every case once, and the first case again (a redelivery, which must not count)."""
    for stem in [*CASES, CASES[0]]:
        case = json.loads(stem.with_suffix(".json").read_text())
        body = stem.with_suffix(".body").read_bytes()
        post(client, "catalogue", body, case["content_type"], query=labels_for(stem.name))


def expected_tasks() -> dict[tuple[Any, str], dict[str, Any]]:
    """The catalogue's tasks merged by hand: later known values win, unknown never erases."""
    tasks: dict[tuple[Any, str], dict[str, Any]] = {}
    for stem in CASES:
        task = json.loads(stem.with_suffix(".json").read_text())["expect"]["task"]
        if task is None:
            continue
        key = (task.get("session_id", stem.name), task["task_id"])
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


# cost_daily is kept by triggers on tasks (migration 0003): whatever writes tasks, and
# however, the view must equal a fresh grouping of tasks.

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
        "labels": "{}",
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
    },
)
#: One statement each: the pipeline's upserts, a multi-row insert, an UPDATE or a
#: DELETE of every task of a hook (several rows in one statement on PostgreSQL).
_operations: st.SearchStrategy[tuple[str, Any, Any]] = st.one_of(
    st.tuples(st.just("upsert"), st.lists(_task_rows(), min_size=1, max_size=4), st.just({})),
    st.tuples(
        st.just("insert"),
        st.lists(_task_rows(), min_size=1, max_size=4, unique_by=lambda r: r["task_key"]),
        st.just({}),
    ),
    st.tuples(st.just("update"), st.sampled_from(_HOOKS), _changes),
    st.tuples(st.just("delete"), st.sampled_from(_HOOKS), st.just({})),
)


def _apply(engine: Engine, operation: tuple[str, Any, Any]) -> None:
    kind, what, changes = operation
    with engine.begin() as conn:
        if kind == "upsert":
            for row in what:
                upsert_task(conn, row)
        elif kind == "insert":
            keys = [r["task_key"] for r in what]
            conn.execute(delete(Task).where(Task.task_key.in_(keys)))
            conn.execute(insert(Task), what)
        elif kind == "update":
            conn.execute(update(Task).where(Task.hook == what).values(**changes))
        else:
            conn.execute(delete(Task).where(Task.hook == what))


def _day(value: dt.datetime) -> dt.date:
    return (value if value.tzinfo is None else value.astimezone(dt.UTC)).date()


def expected_daily(engine: Engine) -> dict[tuple[Any, ...], dict[str, Any]]:
    """cost_daily computed here from the tasks themselves: exact sums, None when none known."""
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    with engine.connect() as conn:
        tasks = conn.execute(select(Task)).all()
    for t in tasks:
        key = (_day(t.first_seen_at), t.hook, t.status)
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


def assert_cost_daily_matches_tasks(engine: Engine) -> None:
    expected = expected_daily(engine)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(select(rollups.cost_daily)).mappings()]
        db_total = conn.scalar(select(func.sum(Task.cost_usd)))
    actual = {(r.pop("day"), r.pop("hook"), r.pop("status")): r for r in rows}
    assert len(actual) == len(rows)  # one row per group
    assert set(actual) == set(expected)
    for key, want in expected.items():
        got = actual[key]
        for name, value in want.items():
            if value is None or isinstance(value, int):
                assert got[name] == value, (key, name)
            else:  # float sums: accumulated in write order, never off by more than rounding
                assert math.isclose(got[name], value, rel_tol=1e-9, abs_tol=1e-9), (key, name)
    view_total = sum(r["cost_usd"] for r in rows if r["cost_usd"] is not None)
    assert abs(view_total - float(db_total or 0.0)) < 0.005  # to the cent


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(operations=st.lists(_operations, max_size=8))
def test_cost_daily_follows_every_change_to_tasks(
    engine: Engine, operations: list[tuple[str, Any, Any]]
) -> None:
    with engine.begin() as conn:  # each example starts empty, which a delete must give
        conn.execute(delete(Task))
    rollups.fold(engine)
    assert_cost_daily_matches_tasks(engine)
    for operation in operations:
        _apply(engine, operation)
        assert_cost_daily_matches_tasks(engine)
    rollups.fold(engine)
    assert_cost_daily_matches_tasks(engine)
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(RollupDelta)) == 0


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
            "labels": "{}",
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
    assert_cost_daily_matches_tasks(engine)
    assert sum(r.tasks for r in rollups.costs(engine, ["day"])) == 500


def test_upgrade_from_0002_backfills_and_downgrade_restores_the_plain_view(
    engine: Engine,
) -> None:
    command.downgrade(alembic_config(engine), "0002")
    assert not {"rollup_daily", "rollup_delta"} & set(inspect(engine).get_table_names())
    with engine.begin() as conn:
        conn.execute(insert(Task), [{"extra": None, **r} for r in _bulk_rows(200)])
    assert_cost_daily_matches_tasks(engine)  # the plain view of 0002
    command.upgrade(alembic_config(engine), "head")
    assert_cost_daily_matches_tasks(engine)  # backfilled
    with engine.begin() as conn:
        conn.execute(update(Task).where(Task.hook == "alpha").values(status="failed"))
    assert_cost_daily_matches_tasks(engine)  # and kept from then on


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_postgresql_writers_never_wait_on_a_rollup_row(engine: Engine) -> None:
    """Two open transactions add tasks to the same day, hook and status without blocking;
    a fold leaves what is not yet committed for the next one."""
    first, second = _bulk_rows(14)[0], _bulk_rows(14)[10]
    second |= {"hook": first["hook"], "status": first["status"], "first_seen_at": _SEEN[0]}
    first |= {"first_seen_at": _SEEN[0]}
    with engine.connect() as a, engine.connect() as b:
        a.begin()
        upsert_task(a, first | {"extra": None})
        b.begin()
        b.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
        upsert_task(b, second | {"extra": None})  # would time out if it waited for `a`
        b.commit()
        rollups.fold(engine)  # folds b's row; a's is not committed yet
        a.commit()
    with engine.connect() as conn:
        assert (conn.scalar(select(func.count()).select_from(RollupDelta)) or 0) > 0
    assert_cost_daily_matches_tasks(engine)
    rows = rollups.costs(engine, ["day", "hook", "status"])  # folds the rest
    assert [r.tasks for r in rows] == [2]
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(RollupDelta)) == 0
    assert_cost_daily_matches_tasks(engine)
