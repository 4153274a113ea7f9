"""Tasks: every record shape WebRun sends becomes the task it describes."""

from __future__ import annotations

import json

from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from receiver.models import Output, Task
from tests.readback import deliver, hook_tables
from tests.test_classify import POLL_FAILED, RUN_TASK_PENDING


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
