"""Huge token counts, times and costs: quarantined past the bounds, summed exactly up to them."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, insert, select, text
from starlette.testclient import TestClient

from receiver import bounds, rollups
from receiver.classify import classify
from receiver.cli import main
from receiver.errors import Quarantine
from receiver.models import Delivery, Task
from tests.conftest import post


def task(task_id: str, **usage: Any) -> bytes:
    return json.dumps(
        {
            "type": "task_completed",
            "sessionId": "s-huge",
            "taskId": task_id,
            "data": {"message": "done"},
            "usage": usage,
        }
    ).encode()


@pytest.mark.parametrize(
    ("usage", "named"),
    [
        pytest.param({"inputTokens": 2**63 - 1}, "input token count", id="int64-max-tokens"),
        pytest.param({"outputTokens": 10**9 + 1}, "output token count", id="one-past"),
        pytest.param({"totalTokens": -1}, "total token count", id="negative"),
        pytest.param({"cost": 1.7e308}, "cost in USD", id="float-max-cost"),
        pytest.param({"computeTime": 1e300}, "compute time", id="huge-time"),
    ],
)
def test_usage_past_a_bound_is_quarantined(usage: dict[str, Any], named: str) -> None:
    with pytest.raises(Quarantine) as caught:
        classify(task("t", **usage), "application/json")
    assert named in caught.value.reason
    assert "outside 0.." in caught.value.reason


def test_usage_at_the_bounds_is_accepted() -> None:
    envelope = classify(
        task(
            "t",
            inputTokens=bounds.MAX_TOKENS,
            outputTokens=0,
            computeTime=bounds.MAX_SECONDS,
            cost=bounds.MAX_COST_USD,
        ),
        "application/json",
    )
    assert envelope.usage.input_tokens == bounds.MAX_TOKENS
    assert envelope.usage.cost_usd == bounds.MAX_COST_USD


def test_the_bounds_keep_a_day_of_sums_within_64_bits() -> None:
    """The README's claim: a 64-bit rollup sum needs > 9.2e9 tasks at the bound in one group."""
    assert (2**63 - 1) // bounds.MAX_TOKENS > 9 * 10**9
    assert float(bounds.MAX_COST_USD) * 10**300 < 1.8e308


def test_huge_values_on_the_database_quarantine_or_sum_and_costs_answers(
    client: TestClient, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """The issue's probe: two tasks at 2**63-1 tokens (or cost 1.7e308) on one hook."""
    refused = [
        post(client, "huge", task("over-1", inputTokens=2**63 - 1)),
        post(client, "huge", task("over-2", inputTokens=2**63 - 1)),
        post(client, "huge", task("over-3", cost=1.7e308)),
        post(client, "huge", task("over-4", cost=1.7e308)),
    ]
    for i in range(3):  # three tasks at every bound: summed, exactly
        post(
            client,
            "huge",
            task(
                f"max-{i}",
                inputTokens=bounds.MAX_TOKENS,
                outputTokens=bounds.MAX_TOKENS,
                totalTokens=bounds.MAX_TOKENS,
                computeTime=bounds.MAX_SECONDS,
                cost=bounds.MAX_COST_USD,
            ),
        )
    with engine.connect() as conn:
        statuses = dict(
            conn.execute(
                select(Delivery.id, Delivery.reason).where(Delivery.status == "quarantined")
            ).all()
        )
        assert set(statuses) == {str(r["delivery_id"]) for r in refused}
        assert all("outside 0.." in str(reason) for reason in statuses.values())
        daily = conn.execute(text("SELECT * FROM cost_daily WHERE hook = 'huge'")).mappings().one()
    assert daily["tasks"] == 3
    assert int(daily["input_tokens"]) == 3 * bounds.MAX_TOKENS
    assert daily["input_tokens"] % 1 == 0  # exact: an int on SQLite, NUMERIC on PostgreSQL
    assert daily["cost_usd"] == 3.0 * bounds.MAX_COST_USD
    [row] = rollups.costs(engine, ["hook"])
    assert row.total_tokens == 3 * bounds.MAX_TOKENS
    result = CliRunner().invoke(
        main,
        ["costs", "--by", "hook", "--format", "json"],
        env={"RECEIVER_DATABASE_URL": db_url, "RECEIVER_DATA_DIR": str(tmp_path)},
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["input_tokens"] == 3 * bounds.MAX_TOKENS


# PostgreSQL only: SQLite's sums are 64-bit, and the bounds keep them within (the test above).
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_postgresql_sums_past_64_bits_stay_exact(engine: Engine) -> None:
    """Migration 0008: even tasks written past the bounds (an analyst's load) sum exactly."""
    seen = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    with engine.begin() as conn:
        for i in range(3):
            conn.execute(
                insert(Task).values(
                    task_key=f"big{i}",
                    task_id=f"big{i}",
                    hook="analyst",
                    status="completed",
                    input_tokens=2**63 - 1,
                    first_seen_at=seen,
                    last_delivery_id="d",
                    labels='{"team": "red"}',
                )
            )
    with engine.connect() as conn:
        daily = conn.execute(text("SELECT input_tokens FROM cost_daily")).scalar_one()
        labelled = conn.execute(text("SELECT input_tokens FROM cost_by_label")).scalar_one()
    assert daily == labelled == 3 * (2**63 - 1)
    rollups.fold(engine)
    [row] = rollups.costs(engine, ["label:team"])
    assert row.input_tokens == 3 * (2**63 - 1)
    assert isinstance(row.input_tokens, int)
