"""The reconciler against the fake WebRun: what a webhook did not bring is fetched, once."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from starlette.testclient import TestClient

from receiver.db import utcnow
from receiver.fakewebrun import FakeWebRun
from receiver.models import Delivery, Output, Run, RunState, Task
from receiver.reconcile import FETCHED_HEADER, LOST_AFTER, Reconciler, backoff, is_final
from receiver.runs import RunInfo, launch, show, track
from receiver.settings import Settings
from receiver.webrun import WebRunClient
from tests.conftest import TOKEN, post
from tests.readback import hook_tables, raw_rows

KEY = "fake-key"
SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "price": {"type": "number"}},
}


class Clock:
    """The reconciler's now: real time plus what a test stepped; `hold` stops it.

    Stepping stands in for sleeping past a due time, and holding makes "not due
    again at once" true however slow the machine is.
    """

    def __init__(self) -> None:
        self.offset = dt.timedelta()
        self.held: dt.datetime | None = None

    def __call__(self) -> dt.datetime:
        return self.held if self.held is not None else utcnow() + self.offset

    def step(self, seconds: float) -> None:
        self.offset += dt.timedelta(seconds=seconds)

    @contextlib.contextmanager
    def hold(self) -> Iterator[dt.datetime]:
        self.held = self()
        try:
            yield self.held
        finally:
            self.held = None


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake() -> Iterator[FakeWebRun]:
    with FakeWebRun(api_key=KEY, task_seconds=0.1, drop_fraction=1.0).serve() as running:
        yield running


@pytest.fixture
def quick(settings: Settings) -> Settings:
    return dataclasses.replace(settings, reconcile_grace_seconds=0, reconcile_interval_seconds=0.05)


@pytest.fixture
def reconciler(
    client: TestClient, engine: Engine, quick: Settings, fake: FakeWebRun, clock: Clock
) -> Iterator[Reconciler]:
    webrun = WebRunClient(fake.url, KEY, timeout=10, rate=1000)
    ledger = client.app.state.ledger  # type: ignore[attr-defined]
    outcomes: list[str] = []
    found = Reconciler(
        engine, quick, webrun, ledger.record_sync, on_call=outcomes.append, clock=clock
    )
    found.__dict__["outcomes"] = outcomes
    yield found
    found.stop()
    webrun.close()


def launched(
    engine: Engine, settings: Settings, reconciler: Reconciler, mode: str, **config: Any
) -> RunInfo:
    return launch(
        engine,
        settings,
        reconciler.client,
        hook="shop",
        config={"taskDetails": "find", "maxDuration": 1000, **config},
        token=TOKEN,
        submitted_data=mode,
    )


def until(
    reconciler: Reconciler, client: TestClient, done: Callable[[], bool], timeout: float = 30
) -> None:
    """Run passes (and let the pipeline finish) until ``done()``; generous deadline."""
    deadline = time.monotonic() + timeout
    pipeline = client.app.state.pipeline  # type: ignore[attr-defined]
    while not done():
        assert time.monotonic() < deadline, "not reconciled in time"
        reconciler.run_once()
        pipeline.join()
        time.sleep(0.05)
    pipeline.join()  # a pass before this call may have fetched what ``done`` saw


def state(engine: Engine, run_id: str) -> str:
    found = show(engine, run_id)
    assert found is not None
    return found.state


def test_backoff_doubles_and_respects_retry_after() -> None:
    assert [backoff(n, 5.0) for n in range(4)] == [5.0, 10.0, 20.0, 40.0]
    assert backoff(30, 5.0) == 600.0
    assert backoff(0, 5.0, retry_after=42.0) == 42.0


def test_is_final() -> None:
    assert is_final(b'{"success": true, "type": "task_completed", "data": {}}', None)
    assert is_final(b'{"success": false, "status": "failed", "error": "x", "usage": {}}', None)
    assert not is_final(b'{"success": true, "status": "active", "pending": true}', None)
    assert not is_final(b"not json", "text/plain")


def test_a_lost_webhook_is_fetched_through_the_ledger(
    client: TestClient, engine: Engine, quick: Settings, fake: FakeWebRun, reconciler: Reconciler
) -> None:
    run = launched(
        engine,
        quick,
        reconciler,
        "full_response",
        outputType="structured_json",
        outputSchema=SCHEMA,
    )
    assert reconciler.run_once() == {}  # not due yet: expected_by is a second away
    until(reconciler, client, lambda: state(engine, run.id) == RunState.RECONCILED)
    fake_task = fake.tasks[str(run.task_id)]
    with engine.connect() as conn:
        task = conn.execute(select(Task.__table__)).one()
        [fetched] = conn.execute(select(Delivery.__table__)).all()
    assert (task.session_id, task.task_id) == (run.session_id, run.task_id)
    assert task.status == "completed"
    assert task.cost_usd == fake_task.usage["cost"]
    assert json.loads(task.labels)["via"] == "reconciled"
    # Exactly what WebRun answered, marked as fetched, with the run it answers.
    assert fetched.body == fake.polled[-1]
    assert json.loads(fetched.body) == fake_task.final_record()
    assert [FETCHED_HEADER, f"GET /task/{run.session_id}/{run.task_id}"] in json.loads(
        fetched.headers
    )
    assert json.loads(fetched.labels)["run"] == run.id
    [row] = raw_rows(engine, hook_tables(engine, "shop")[()])
    assert (row["_session_id"], row["_task_id"]) == (run.session_id, run.task_id)
    assert row["price"] == fake_task.output["price"]
    assert "final" in reconciler.__dict__["outcomes"]
    assert reconciler.snapshot.by_state == {"reconciled": 1}


def test_a_late_webhook_after_reconciliation_stays_one_task(
    client: TestClient, engine: Engine, quick: Settings, fake: FakeWebRun, reconciler: Reconciler
) -> None:
    run = launched(engine, quick, reconciler, "ai_response", outputType="structured_json")
    until(reconciler, client, lambda: state(engine, run.id) == RunState.RECONCILED)
    late, content_type = fake.tasks[str(run.task_id)].webhook_body("ai_response")
    post(client, "shop", late, content_type, query=f"run={run.id}")
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Task)) == 1
        assert conn.scalar(select(func.count()).select_from(Output)) == 1
        task = conn.execute(select(Task.__table__)).one()
    assert task.cost_usd == fake.tasks[str(run.task_id)].usage["cost"]
    assert json.loads(task.labels)["via"] == "reconciled"
    rows = raw_rows(engine, hook_tables(engine, "shop")[()])
    assert len(rows) == 1  # replaced, not doubled
    assert rows[0]["_task_id"] == run.task_id
    assert state(engine, run.id) == RunState.RECONCILED


@pytest.mark.parametrize("mode", ["just_ping", "ai_response"])
def test_a_delivery_without_the_cost_is_completed_at_once(
    client: TestClient,
    engine: Engine,
    quick: Settings,
    fake: FakeWebRun,
    reconciler: Reconciler,
    mode: str,
) -> None:
    """No waiting for expected_by: the delivery says the task ended."""
    slow = dataclasses.replace(quick, reconcile_grace_seconds=3600)
    run = launched(
        engine, slow, reconciler, mode, outputType="structured_csv", outputSchema=["a", "b"]
    )
    time.sleep(0.2)  # the task ends at the fake
    body, content_type = fake.tasks[str(run.task_id)].webhook_body(mode)
    post(client, "shop", body, content_type, query=f"run={run.id}")
    until(reconciler, client, lambda: state(engine, run.id) == RunState.RECONCILED)
    with engine.connect() as conn:
        task = conn.execute(select(Task.__table__)).one()
    assert task.status == "completed"
    assert task.cost_usd == fake.tasks[str(run.task_id)].usage["cost"]
    rows = raw_rows(engine, hook_tables(engine, "shop")[()])
    assert len(rows) == 3
    assert {r["_task_id"] for r in rows} == {run.task_id}


def test_a_delivered_record_needs_no_poll(
    client: TestClient, engine: Engine, quick: Settings, fake: FakeWebRun, reconciler: Reconciler
) -> None:
    run = launched(engine, quick, reconciler, "full_response")
    time.sleep(0.2)
    body, content_type = fake.tasks[str(run.task_id)].webhook_body("full_response")
    post(client, "shop", body, content_type, query=f"run={run.id}")
    reconciler.run_once()
    assert state(engine, run.id) == RunState.DELIVERED
    assert fake.count("task") == 0


def test_running_answers_reschedule_with_backoff(
    client: TestClient,
    engine: Engine,
    quick: Settings,
    fake: FakeWebRun,
    reconciler: Reconciler,
    clock: Clock,
) -> None:
    fake.task_seconds = 3600.0  # running until the test ends it
    run = launched(engine, quick, reconciler, "full_response")
    clock.step(1.1)  # past its maxDuration of 1 s: due
    with clock.hold():
        assert reconciler.run_once() == {"running": 1}
        after = show(engine, run.id)
        assert after is not None
        assert after.state == RunState.LAUNCHED
        assert after.attempts == 1
        assert reconciler.run_once() == {}  # backed off: not due again at the same instant
    fake.end(str(run.task_id))
    until(reconciler, client, lambda: state(engine, run.id) == RunState.RECONCILED)
    with engine.connect() as conn:
        kinds = conn.scalars(select(Delivery.kind).order_by(Delivery.id)).all()
        task = conn.execute(select(Task.__table__)).one()
    assert kinds[0] == "running"
    assert kinds[-1] == "full_response"
    assert task.status == "completed"
    assert task.cost_usd == fake.tasks[str(run.task_id)].usage["cost"]
    assert fake.count("task") == 2  # one running answer, then the final record


def test_404_makes_a_run_lost_after_a_few_tries(
    client: TestClient, engine: Engine, quick: Settings, reconciler: Reconciler
) -> None:
    run = track(
        engine, quick, session_id="sess_gone", task_id="task_gone", hook="shop", max_duration_ms=0
    )
    until(reconciler, client, lambda: state(engine, run.id) == RunState.LOST)
    after = show(engine, run.id)
    assert after is not None
    assert after.attempts == LOST_AFTER
    assert after.last_error is not None
    assert "404" in after.last_error
    outcomes = reconciler.__dict__["outcomes"]
    assert outcomes.count("not_found") == LOST_AFTER - 1
    assert outcomes.count("lost") == 1


@pytest.mark.parametrize(
    ("status", "outcome"), [pytest.param(429, "throttled"), pytest.param(503, "unavailable")]
)
def test_429_and_503_back_off_respecting_retry_after(
    client: TestClient,
    engine: Engine,
    quick: Settings,
    fake: FakeWebRun,
    reconciler: Reconciler,
    clock: Clock,
    status: int,
    outcome: str,
) -> None:
    fake.retry_after = 30
    run = launched(engine, quick, reconciler, "full_response")
    clock.step(1.1)  # due
    fake.poll_failures.extend([status])
    with clock.hold() as before:
        assert reconciler.run_once() == {outcome: 1}
        after = show(engine, run.id)
        assert after is not None
        assert after.next_check_at is not None
        due = after.next_check_at
        if due.tzinfo is None:  # SQLite hands back naive UTC
            due = due.replace(tzinfo=dt.UTC)
        assert (due - before).total_seconds() >= 29  # Retry-After: 30, not the 0.05 s step
        assert reconciler.run_once() == {}
    assert fake.count("task") == 1


def test_a_delivery_naming_an_unknown_task_is_tracked(
    client: TestClient, engine: Engine, fake: FakeWebRun, reconciler: Reconciler
) -> None:
    """A ping from a task launched elsewhere: watched, fetched, completed with its cost."""
    with WebRunClient(fake.url, KEY) as other_tool:
        created = other_tool.run_task({"taskDetails": "elsewhere"})
    time.sleep(0.2)
    ping, content_type = fake.tasks[created.task_id].webhook_body("just_ping")
    post(client, "shop", ping, content_type, query="team=a")
    reconciler.run_once()
    with engine.connect() as conn:
        run = conn.execute(select(Run.__table__)).one()
    assert (run.origin, run.session_id, run.task_id) == (
        "tracked",
        created.session_id,
        created.task_id,
    )
    until(reconciler, client, lambda: state(engine, run.id) == RunState.RECONCILED)
    with engine.connect() as conn:
        task = conn.execute(select(Task.__table__)).one()
    assert task.cost_usd == fake.tasks[created.task_id].usage["cost"]
    assert json.loads(task.labels)["team"] == "a"  # the delivery's labels are kept


def test_the_metrics_show_runs_and_polls(
    client: TestClient, engine: Engine, quick: Settings, reconciler: Reconciler
) -> None:
    from receiver.app import create_app

    track(engine, quick, session_id="s", task_id="t", hook="shop", max_duration_ms=0)
    app = create_app(
        dataclasses.replace(quick, webrun_url=reconciler.client.base_url, webrun_api_key=KEY),
        engine=engine,
    )
    with TestClient(app) as live:
        deadline = time.monotonic() + 30
        while True:
            text = live.get("/metrics").text
            if 'receiver_reconcile_calls_total{outcome="not_found"}' in text:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
    assert 'receiver_runs{state="launched"} 1.0' in text
    overdue = next(
        ln for ln in text.splitlines() if ln.startswith("receiver_runs_oldest_overdue_seconds ")
    )
    assert float(overdue.split()[1]) > 0
    assert KEY not in text


def test_rollups_tell_reconciled_from_delivered(
    client: TestClient, engine: Engine, quick: Settings, fake: FakeWebRun, reconciler: Reconciler
) -> None:
    from receiver import rollups

    lost = launched(engine, quick, reconciler, "full_response")
    delivered = launched(engine, quick, reconciler, "full_response")
    time.sleep(0.2)
    body, content_type = fake.tasks[str(delivered.task_id)].webhook_body("full_response")
    post(client, "shop", body, content_type, query=f"run={delivered.id}")
    until(reconciler, client, lambda: state(engine, lost.id) == RunState.RECONCILED)
    assert state(engine, delivered.id) == RunState.DELIVERED
    by_via = {r.key: r.cost_usd for r in rollups.costs(engine, ["label:via"])}
    assert by_via == {
        ("reconciled",): fake.tasks[str(lost.task_id)].usage["cost"],
        ("webhook",): fake.tasks[str(delivered.task_id)].usage["cost"],
    }


def test_cli_reconcile_once(db_url: str, engine: Engine, quick: Settings, fake: FakeWebRun) -> None:
    from click.testing import CliRunner

    from receiver.cli import main

    with WebRunClient(fake.url, KEY) as webrun:
        run = launch(
            engine,
            quick,
            webrun,
            hook="shop",
            config={"taskDetails": "x", "maxDuration": 1000},
            token=TOKEN,
        )
    time.sleep(1.2)
    env = {
        "RECEIVER_DATABASE_URL": db_url,
        "RECEIVER_WEBRUN_URL": fake.url,
        "RECEIVER_WEBRUN_API_KEY": KEY,
    }
    obj: dict[str, Any] = {}
    result = CliRunner().invoke(main, ["reconcile", "--once"], env=env, obj=obj)
    obj["engine"].dispose()
    assert result.exit_code == 0, result.output
    assert result.output == "reconciled: final 1\n"
    assert state(engine, run.id) == RunState.RECONCILED
    with engine.connect() as conn:
        task = conn.execute(select(Task.__table__)).one()
    assert task.cost_usd == fake.tasks[str(run.task_id)].usage["cost"]
    unset = CliRunner().invoke(main, ["reconcile", "--once"], env={"RECEIVER_DATABASE_URL": db_url})
    assert unset.exit_code == 2
    assert "RECEIVER_WEBRUN_URL is not set" in unset.output
