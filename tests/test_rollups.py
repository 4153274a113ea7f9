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
from sqlalchemy import Engine, func, inspect, select, update
from starlette.testclient import TestClient

from receiver import rollups
from receiver.cli import main
from receiver.db import alembic_config
from receiver.models import Base, Task
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
