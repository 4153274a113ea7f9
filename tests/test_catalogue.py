"""Every shape in the WebRun delivery catalogue, posted over HTTP, gives its expected facts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from starlette.testclient import TestClient

from receiver.models import Delivery, Output, ResultColumn, ResultTable, Task
from tests.conftest import DELIVERIES, post

CASES = sorted(p.with_suffix("") for p in DELIVERIES.glob("*.json"))


def case_params() -> list[Any]:
    return [pytest.param(p, id=p.name) for p in CASES]


def load_case(stem: Path) -> tuple[bytes, dict[str, Any]]:
    return stem.with_suffix(".body").read_bytes(), json.loads(stem.with_suffix(".json").read_text())


def same(actual: Any, expected: Any) -> bool:
    if isinstance(expected, float) or isinstance(actual, float):
        return actual is not None and expected is not None and math.isclose(actual, expected)
    return bool(actual == expected)


def task_facts(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(Task.__table__))]


def result_rows(engine: Engine, parent: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Rows of every result table, keyed by the table's catalogued JSON path."""
    out: dict[str, list[dict[str, Any]]] = {}
    with engine.connect() as conn:
        originals = {
            (c.table_name, c.column_name): json.loads(c.source_key)[-1]
            for c in conn.execute(select(ResultColumn.__table__))
        }
        for t in conn.execute(select(ResultTable.__table__)):
            path = json.loads(t.path)[1]
            rows = conn.execute(
                text(f'SELECT * FROM "{t.table_name}" ORDER BY _row_index')
            ).mappings()
            out[path[-1] if path else ""] = [
                {
                    originals[(t.table_name, k)]: v
                    for k, v in r.items()
                    if not k.startswith("_") and v is not None
                }
                for r in rows
            ]
    return out


@pytest.mark.parametrize("stem", case_params())
def test_catalogue_case(stem: Path, client: TestClient, engine: Engine) -> None:
    body, case = load_case(stem)
    answer = post(client, "catalogue", body, case["content_type"])
    assert answer["status"] == "stored"
    expect = case["expect"]

    with engine.connect() as conn:
        delivery = conn.execute(select(Delivery.__table__)).one()
    assert delivery.body == body
    assert delivery.status == "processed", delivery.reason

    tasks = task_facts(engine)
    if expect["task"] is None:
        assert tasks == []
    else:
        assert len(tasks) == 1
        for column, value in expect["task"].items():
            actual = tasks[0][column]
            if column == "completed_at" and actual is not None:
                actual = actual.replace(tzinfo=None).isoformat() + "Z"
            assert same(actual, value), (column, actual, value)

    tables = result_rows(engine)
    rows = tables.get("", [])
    assert len(rows) == len(expect["rows"])
    for actual_row, expected_row in zip(rows, expect["rows"], strict=True):
        assert set(actual_row) == set(expected_row)
        for column, value in expected_row.items():
            assert same(actual_row[column], value), (column, actual_row[column], value)
    for field, expected_rows in expect.get("child_rows", {}).items():
        assert tables[field] == expected_rows

    if "text" in expect:
        with engine.connect() as conn:
            content = conn.scalar(select(Output.content).where(Output.output_type == "text"))
        assert content == expect["text"]


def test_ping_after_full_response_keeps_cost(client: TestClient, engine: Engine) -> None:
    full, _ = load_case(DELIVERIES / "01-full-response-json")
    ping, _ = load_case(DELIVERIES / "03-just-ping")
    for first, second in ((full, ping), (ping, full)):
        post(client, "merge", first)
        post(client, "merge", second)
        [task] = task_facts(engine)
        assert task["status"] == "completed"
        assert task["cost_usd"] == pytest.approx(0.0124)
        assert task["input_tokens"] == 8500


def test_ai_response_task_ids_from_labels(client: TestClient, engine: Engine) -> None:
    body, _ = load_case(DELIVERIES / "02-ai-response-json-object")
    post(client, "labelled", body, query="project=pricing&task_id=t-1&session_id=s-1")
    [task] = task_facts(engine)
    assert (task["session_id"], task["task_id"]) == ("s-1", "t-1")
    assert json.loads(task["labels"])["project"] == "pricing"
    assert task["cost_usd"] is None


def test_case_06_price_is_numeric(client: TestClient, engine: Engine) -> None:
    body, case = load_case(DELIVERIES / "06-ai-response-csv-text")
    post(client, "csvhook", body, case["content_type"])
    with engine.connect() as conn:
        name = conn.scalar(select(ResultTable.table_name).where(ResultTable.hook == "csvhook"))
        total = conn.scalar(text(f'SELECT sum(price) FROM "{name}"'))
    assert total == pytest.approx(95360.97 + 3325.94 + 0.9994)
