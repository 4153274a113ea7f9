"""Tasks: every record shape WebRun sends becomes the task it describes."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, insert, select, text, update
from starlette.testclient import TestClient

from receiver import rollups
from receiver.db import utcnow, write_transaction
from receiver.ledger import Ledger, RawDelivery
from receiver.models import Delivery, Hook, Output, ResultColumn, Task, TaskEvent
from receiver.processing import process_deliveries
from tests.conftest import TOKEN
from tests.live import live_server
from tests.readback import deliver, hook_tables, run_cli, settle, snapshot
from tests.test_classify import (
    ERROR_EVENT,
    POLL_ACTIVE,
    POLL_COMPLETED,
    POLL_FAILED,
    POLL_GUARDRAIL,
    RUN_TASK_COMPLETE,
    RUN_TASK_PENDING,
)


def body(value: object) -> bytes:
    return json.dumps(value).encode()


def test_pending_answer_with_ids_is_a_task_not_a_result(client: TestClient, engine: Engine) -> None:
    row = deliver(client, engine, "pend", body(RUN_TASK_PENDING))
    assert (row.status, row.kind) == ("processed", "running")
    with engine.connect() as conn:
        task = conn.execute(select(Task)).one()
        assert conn.scalars(select(Output.delivery_id)).all() == []
    assert (task.session_id, task.task_id, task.status) == ("s", "t", "pending")
    assert hook_tables(engine, "pend") == {}


def test_id_less_record_takes_its_ids_from_the_url_labels(
    client: TestClient, engine: Engine
) -> None:
    row = deliver(client, engine, "poll", body(POLL_FAILED), query="session_id=s1&task_id=t1")
    assert (row.kind, row.session_id, row.task_id) == ("failure", "s1", "t1")
    with engine.connect() as conn:
        task = conn.execute(select(Task)).one()
    assert (task.session_id, task.task_id, task.status) == ("s1", "t1", "failed")
    assert (task.cost_usd, task.error_code) == (0.0124, "NAVIGATION_TIMEOUT")
    assert hook_tables(engine, "poll") == {}


# One task's deliveries, from the API reference's shapes: the run-task "pending" answer,
# a poll answer while running (ids from the URL labels), a guardrail (twice: a pause may
# repeat), the completed webhook, its ping, and the agent's output labelled with the task id.
def _lifecycle(task: str) -> list[tuple[bytes, str]]:
    ids = {"sessionId": f"s-{task}", "taskId": task}
    labels = f"session_id=s-{task}&task_id={task}"
    return [
        (body({**RUN_TASK_PENDING, **ids}), ""),
        (body(POLL_ACTIVE), labels),
        (body({**POLL_GUARDRAIL, **ids}), ""),
        (body({**POLL_GUARDRAIL, **ids, "data": {"type": "human_input_needed"}}), ""),
        (body({**POLL_COMPLETED, **ids, "usage": FINAL_USAGE}), ""),
        (body({"event": "task_completed", **ids}), ""),
        (body({"title": "Product", "price": 29.99}), f"task_id={task}"),
    ]


FINAL_USAGE = {"inputTokens": 20000, "outputTokens": 4000, "computeTime": 9, "cost": 0.02}


def _store(engine: Engine, hook: str, deliveries: list[tuple[bytes, str]]) -> list[str]:
    start = utcnow()
    raw = [
        RawDelivery(
            hook=hook,
            body=b,
            content_type="application/json",
            headers=(),
            query_string=q,
            received_at=start + dt.timedelta(milliseconds=i),
        )
        for i, (b, q) in enumerate(deliveries)
    ]
    ledger = Ledger(engine)
    ledger.start()
    try:
        return [r.delivery_id for r in ledger.record_sync(raw)]
    finally:
        ledger.stop()


#: Columns that say when and through which delivery, not what: they follow the order.
ORDERED = {"first_seen_at", "last_delivery_id", "hook"}


def _task(engine: Engine, task: str) -> dict[str, Any]:
    """The task's row, its name taken out of its strings (ids, key, labels)."""
    with engine.connect() as conn:
        [row] = conn.execute(select(Task.__table__).where(Task.task_id == task)).mappings()
    return {
        k: v.replace(task, "T") if isinstance(v, str) else v
        for k, v in row.items()
        if k not in ORDERED
    }


_orders = itertools.count()


@hsettings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_the_task_row_is_the_same_whatever_order_its_deliveries_arrive_in(
    engine: Engine, data: st.DataObject
) -> None:
    n = next(_orders)
    reference = f"ref{n}"
    ids = _store(engine, f"ref{n}", _lifecycle(reference))
    for delivery_id in ids:
        process_deliveries(engine, [delivery_id], max_depth=5)
    expected = _task(engine, reference)

    task = f"perm{n}"
    deliveries = data.draw(st.permutations(_lifecycle(task)))
    batched = data.draw(st.booleans())
    ids = _store(engine, f"perm{n}", deliveries)
    if batched:
        process_deliveries(engine, ids, max_depth=5)
    else:
        for delivery_id in ids:
            process_deliveries(engine, [delivery_id], max_depth=5)
    got = _task(engine, task)
    assert (got["session_id"], got["task_id"]) == ("s-T", "T")
    assert got == expected
    assert got["status"] == "completed"
    assert (got["cost_usd"], got["input_tokens"], got["usage_status"]) == (0.02, 20000, "completed")
    with engine.connect() as conn:
        events = conn.execute(
            select(TaskEvent.status).where(TaskEvent.task_key == f'["s-{task}", "{task}"]')
        ).all()
    assert sorted(str(e.status) for e in events) == sorted(
        ["pending", "running", "guardrail", "guardrail", "completed", "completed", "None"]
    )


def test_a_late_guardrail_never_turns_a_completed_task_back(
    client: TestClient, engine: Engine
) -> None:
    ids = {"sessionId": "s", "taskId": "t"}
    deliver(client, engine, "late", body({**POLL_COMPLETED, **ids}))
    deliver(client, engine, "late", body({**POLL_GUARDRAIL, **ids}))
    deliver(
        client, engine, "late", body({**POLL_ACTIVE, "usage": {"cost": 0.5}}), query="task_id=t"
    )
    with engine.connect() as conn:
        task = conn.execute(select(Task)).one()
        timeline = conn.execute(select(TaskEvent.status).order_by(TaskEvent.received_at)).all()
    assert (task.status, task.cost_usd, task.usage_status) == ("completed", 0.0124, "completed")
    assert (task.guardrail_type, task.session_id) == ("human_input_needed", "s")
    assert [e.status for e in timeline] == ["completed", "guardrail", "running"]


def test_running_usage_is_shown_as_such_until_the_final_one(
    client: TestClient, engine: Engine
) -> None:
    deliver(client, engine, "run", body(POLL_ACTIVE), query="task_id=t")
    with engine.connect() as conn:
        task = conn.execute(select(Task)).one()
    assert (task.status, task.usage_status, task.cost_usd) == ("running", "running", 0.0124)
    deliver(
        client, engine, "run", body({**POLL_FAILED, "usage": {"cost": 0.03}}), query="task_id=t"
    )
    with engine.connect() as conn:
        task = conn.execute(select(Task)).one()
    # The failure's usage replaces the running one whole: no running token count stays.
    assert (task.status, task.usage_status, task.cost_usd) == ("failed", "failed", 0.03)
    assert task.input_tokens is None


def test_reprocessing_rebuilds_tasks_and_events_and_twice_changes_nothing(
    engine: Engine,
) -> None:
    ids = _store(engine, "re", _lifecycle("t"))
    process_deliveries(engine, ids, max_depth=5)
    before = snapshot(engine)
    with engine.begin() as conn:  # a lost row is rebuilt from the events' deliveries
        conn.execute(delete(Task))
    for _ in range(2):
        for delivery_id in ids:
            process_deliveries(engine, [delivery_id], max_depth=5)
        assert snapshot(engine) == before


def test_a_task_lands_even_when_its_output_cannot(
    client: TestClient, engine: Engine, db_url: str
) -> None:
    """The output breaks the hook's registered schema: the task, usage and cost still land
    (in tasks and cost_daily), the delivery says what failed; a fix and a reprocess load it."""
    schema = {"type": "object", "properties": {"qty": {"type": "integer"}}, "required": ["qty"]}
    with engine.connect() as conn, write_transaction(conn):
        conn.execute(
            insert(Hook).values(
                name="strict",
                created_at=utcnow(),
                output_type="structured_json",
                output_schema=schema,
            )
        )
    record = {**POLL_COMPLETED, "sessionId": "s", "taskId": "t"}
    record["data"] = {**POLL_COMPLETED["data"], "message": '{"qty": "many"}'}  # type: ignore[dict-item]
    row = deliver(client, engine, "strict", body(record))
    assert row.status == "quarantined"
    assert row.reason.startswith("the output could not be loaded: output does not match")
    assert "status, usage and cost are recorded" in row.reason
    with engine.connect() as conn:
        task = conn.execute(select(Task)).one()
        day = conn.execute(select(rollups.cost_daily)).one()
    assert (task.task_id, task.status, task.cost_usd) == ("t", "completed", 0.0124)
    assert (day.tasks, day.cost_usd) == (1, 0.0124)
    assert hook_tables(engine, "strict") == {}

    with engine.begin() as conn:  # the user fixes the schema
        conn.execute(update(Hook).where(Hook.name == "strict").values(output_schema=None))
    run_cli(db_url, "reprocess", "--quarantined")
    with engine.connect() as conn:
        assert conn.scalar(select(Delivery.status).where(Delivery.id == row.id)) == "processed"
        assert conn.execute(select(Task.cost_usd, Task.status)).all() == [(0.0124, "completed")]
        rows = conn.execute(text('SELECT qty FROM "results__strict"')).all()
    assert [tuple(r) for r in rows] == [("many",)]


def _record(base: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**base, **fields}


# (name, body, query labels, expected (status, cost_usd)): each its own task.
LIVE_CASES: list[tuple[str, dict[str, Any], str, tuple[str, float | None]]] = [
    ("poll-completed-labels", POLL_COMPLETED, "session_id=s1&task_id=t1", ("completed", 0.0124)),
    ("poll-failed-no-ids", _record(POLL_FAILED, usage={"cost": 0.0011}), "", ("failed", 0.0011)),
    ("poll-guardrail-labels", POLL_GUARDRAIL, "task_id=t3", ("guardrail", None)),
    ("poll-active-no-ids", _record(POLL_ACTIVE, usage={"cost": 0.003}), "", ("running", 0.003)),
    (
        "run-task-pending",
        _record(RUN_TASK_PENDING, sessionId="s5", taskId="t5"),
        "",
        ("pending", None),
    ),
    (
        "run-task-wrapped",
        _record(
            RUN_TASK_COMPLETE,
            sessionId="s6",
            taskId="t6",
            result={
                "type": "task_completed",
                "data": {"message": '{"title": "A", "price": 1.5}', "total_tokens": 10},
                "usage": {"inputTokens": 8, "outputTokens": 2, "computeTime": 1, "cost": 0.05},
            },
        ),
        "",
        ("completed", 0.05),
    ),
    (
        "websocket-flat-data-usage",
        {
            "type": "task_completed",
            "taskId": "t7",
            "data": {"message": "done", "prompt_tokens": 5, "usage": {"cost": 0.0234}},
        },
        "",
        ("completed", 0.0234),
    ),
    (
        "error-event",
        _record(ERROR_EVENT, taskId="t8", usage={"cost": 0.002}),
        "",
        ("failed", 0.002),
    ),
    (
        "failed-with-ids",
        _record(POLL_FAILED, sessionId="s9", taskId="t9", usage={"cost": 0.004}),
        "",
        ("failed", 0.004),
    ),
    (
        "completed-no-ids-json",
        _record(
            POLL_COMPLETED,
            data={"message": '[{"sku": "A-1", "price": 9.5}]', "prompt_tokens": 3},
            usage={"inputTokens": 3, "outputTokens": 1, "computeTime": 1, "cost": 0.007},
        ),
        "",
        ("completed", 0.007),
    ),
]
#: Every usage field name the reference uses: none may become a result column.
USAGE_NAMES = {
    "usage",
    "inputtokens",
    "outputtokens",
    "computetime",
    "cost",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "completion_time",
}


def test_every_record_shape_through_real_http(db_url: str, engine: Engine, tmp_path: Path) -> None:
    """A real `receiver serve`: every shape is its task, with its status and cost; cost_daily
    sums every cost WebRun reported (id-less and failed ones too); no usage is a result column."""
    with live_server(db_url, tmp_path / "data") as server:
        with httpx.Client(base_url=server.url, headers={"authorization": TOKEN}) as http:
            ids = {}
            for name, record, query, _ in LIVE_CASES:
                url = "/hooks/shapes" + (f"?{query}" if query else "")
                response = http.post(url, content=body(record), headers=JSON_TYPE)
                assert response.status_code == 200, response.text
                ids[name] = response.json()["delivery_id"]
            # One more task, in pieces: a labelled ai_response, then its full record.
            labelled = http.post(
                "/hooks/shapes?task_id=t11", content=b'{"title": "B"}', headers=JSON_TYPE
            )
            full = _record(POLL_COMPLETED, sessionId="s11", taskId="t11", usage={"cost": 0.01})
            assert (
                labelled.status_code
                == http.post("/hooks/shapes", content=body(full), headers=JSON_TYPE).status_code
                == 200
            )
        rows = [settle(engine, i) for i in [*ids.values(), labelled.json()["delivery_id"]]]
        rows.append(settle(engine, _last_delivery(engine)))
    assert [r.status for r in rows] == ["processed"] * len(rows), [r.reason for r in rows]

    with engine.connect() as conn:
        key_of = dict(conn.execute(select(TaskEvent.delivery_id, TaskEvent.task_key)).all())
        tasks = {t.task_key: t for t in conn.execute(select(Task))}
        daily = conn.execute(select(rollups.cost_daily)).all()
        sources = conn.execute(select(ResultColumn.table_name, ResultColumn.source_key)).all()
    for name, _, _, (status, cost) in LIVE_CASES:
        task = tasks[key_of[ids[name]]]
        assert (task.status, task.cost_usd) == (status, cost), name
    assert tasks[key_of[ids["poll-completed-labels"]]].task_id == "t1"
    assert tasks[key_of[ids["poll-failed-no-ids"]]].task_id is None
    assert key_of[labelled.json()["delivery_id"]] == '["s11", "t11"]'  # one task, one row
    assert len(tasks) == len(LIVE_CASES) + 1

    reported = [cost for *_, (_, cost) in LIVE_CASES if cost is not None] + [0.01]
    assert sum(d.tasks for d in daily) == len(tasks)
    assert math.isclose(sum(d.cost_usd or 0 for d in daily), sum(reported), rel_tol=1e-12)
    assert {d.status for d in daily if d.cost_usd} >= {"completed", "failed", "running"}
    assert sources  # the outputs did make result columns...
    for table, source in sources:  # ...and none from a task record's usage
        keys = {str(k).lower() for k in json.loads(source)}
        assert not keys & USAGE_NAMES, (table, source)


JSON_TYPE = {"content-type": "application/json"}


def _last_delivery(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.scalar(select(Delivery.id).order_by(Delivery.id.desc()).limit(1)))
