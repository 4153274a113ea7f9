"""Launching runs at the fake WebRun, recording them, and joining deliveries to them."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from starlette.testclient import TestClient

from receiver import runs_cli
from receiver.errors import WebRunError
from receiver.fakewebrun import FakeWebRun
from receiver.models import Delivery, Run, RunState, Task
from receiver.runs import SUBMITTED_DATA, launch, list_runs, show, track, without_secrets
from receiver.settings import Settings
from receiver.webrun import WebRunClient
from tests.conftest import TOKEN, post
from tests.live import live_server
from tests.readback import hook_tables, raw_rows
from tests.test_terminal import progress_lines

KEY = "fake-key"
SECRET = "hunter2-very-secret"
CONFIG_WITH_SECRETS: dict[str, Any] = {
    "taskDetails": "log in and read the invoice",
    "outputType": "structured_json",
    "outputSchema": {"type": "object", "properties": {"total": {"type": "number"}}},
    "secrets": [{"match": "*.example.com", "fields": {"password": SECRET}}],
}


@pytest.fixture
def fake() -> Iterator[FakeWebRun]:
    # drop_fraction 1: no webhook is sent, so each test posts the deliveries it wants.
    with FakeWebRun(api_key=KEY, task_seconds=0.1, drop_fraction=1.0).serve() as running:
        yield running


@pytest.fixture
def webrun(fake: FakeWebRun) -> Iterator[WebRunClient]:
    with WebRunClient(fake.url, KEY, timeout=10) as client:
        yield client


def test_submitted_data_modes_agree() -> None:
    assert runs_cli.SUBMITTED_DATA == SUBMITTED_DATA


def test_without_secrets() -> None:
    nested = {"initialTask": {**CONFIG_WITH_SECRETS}, "secrets": []}
    assert without_secrets(nested) == {"initialTask": without_secrets(CONFIG_WITH_SECRETS)}
    assert "secrets" not in without_secrets(CONFIG_WITH_SECRETS)


def test_launch_records_the_run_and_writes_the_webhook(
    engine: Engine, settings: Settings, fake: FakeWebRun, webrun: WebRunClient
) -> None:
    run = launch(
        engine,
        settings,
        webrun,
        hook="invoices",
        config=CONFIG_WITH_SECRETS,
        token=TOKEN,
        submitted_data="ai_response",
        labels={"team": "billing"},
    )
    assert run.state == RunState.LAUNCHED
    task = fake.tasks[str(run.task_id)]
    assert run.session_id == task.session_id
    sent = task.config
    assert sent["secrets"] == CONFIG_WITH_SECRETS["secrets"]  # WebRun needs them
    assert sent["webhook"] == {
        "name": "invoices",
        "url": f"{settings.public_url}/hooks/invoices?run={run.id}&team=billing",
        "auth": TOKEN,
        "submittedData": "ai_response",
    }
    assert run.config is not None
    assert "secrets" not in run.config
    assert run.labels == {"team": "billing"}
    assert run.expected_by is not None
    assert run.expected_by > run.created_at
    with engine.connect() as conn:
        dump = json.dumps([list(r) for r in conn.execute(select(Run.__table__))], default=str)
    assert SECRET not in dump
    assert TOKEN not in dump  # the webhook's auth is a credential too
    assert [r.id for r in list_runs(engine, states=["launched"], hook="invoices")] == [run.id]
    assert list_runs(engine, states=["lost"]) == []


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        pytest.param({"balance": 0.0}, "402: Insufficient balance", id="402"),
        pytest.param({"unavailable": 99}, "503: No instances", id="503"),
        pytest.param({"rate_limit": 0}, "429: Rate limit", id="429"),
        pytest.param({"api_key": "wrong"}, "401: Invalid API key", id="bad-key"),
    ],
)
def test_a_refused_launch_is_a_launch_failed_run(
    engine: Engine,
    settings: Settings,
    fake: FakeWebRun,
    webrun: WebRunClient,
    setup: dict[str, Any],
    reason: str,
) -> None:
    fake.retry_after = 0.05
    for name, value in setup.items():
        setattr(fake, name, value)
    with pytest.raises(WebRunError, match=reason.split(": ")[1]):
        launch(engine, settings, webrun, hook="h", config={"taskDetails": "x"}, token=TOKEN)
    [run] = list_runs(engine)
    assert run.state == RunState.LAUNCH_FAILED
    assert run.last_error is not None
    assert reason in run.last_error
    assert (run.session_id, run.task_id, run.next_check_at) == (None, None, None)
    # 429 and 503 are retried (three times), the others are not.
    assert fake.count("run-task") == (4 if setup.keys() & {"unavailable", "rate_limit"} else 1)


def test_the_cli_says_a_refusal_in_one_line(
    db_url: str, settings: Settings, fake: FakeWebRun, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from receiver.cli import main

    fake.balance = 0.0
    env = {
        "RECEIVER_DATABASE_URL": db_url,
        "RECEIVER_WEBRUN_URL": fake.url,
        "RECEIVER_WEBRUN_API_KEY": KEY,
        "RECEIVER_TOKEN": TOKEN,
    }
    obj: dict[str, Any] = {}
    result = CliRunner().invoke(main, ["run", "--hook", "h", "--task", "x"], env=env, obj=obj)
    obj["engine"].dispose()
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: launch failed: WebRun answered 402: Insufficient balance (balance 0.0)"
    ]
    assert KEY not in result.output


def test_cli_run_and_runs(db_url: str, fake: FakeWebRun, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from receiver.cli import main

    config = tmp_path / "task.json"
    config.write_text(json.dumps(CONFIG_WITH_SECRETS))
    batch = tmp_path / "tasks.jsonl"
    batch.write_text("".join(json.dumps({"taskDetails": f"t{i}"}) + "\n" for i in range(3)))
    env = {
        "RECEIVER_DATABASE_URL": db_url,
        "RECEIVER_WEBRUN_URL": fake.url,
        "RECEIVER_WEBRUN_API_KEY": KEY,
        "COLUMNS": "240",
    }

    def cli(*args: str) -> str:
        obj: dict[str, Any] = {}
        result = CliRunner().invoke(main, list(args), env=env, obj=obj)
        if "engine" in obj:
            obj["engine"].dispose()
        assert result.exit_code == 0, (result.output, result.exception)
        return result.output

    [one] = json.loads(cli("run", "--hook", "h", "--config", str(config), "--format", "json"))
    assert one["state"] == "launched"
    assert one["task_id"] in fake.tasks
    assert SECRET not in json.dumps(one)
    # No RECEIVER_TOKEN: the run made a token of the hook, and it is what WebRun was given.
    auth = fake.tasks[one["task_id"]].config["webhook"]["auth"]
    assert auth.startswith("Bearer ")
    many = cli(
        "run", "--hook", "h", "--from", str(batch), "--label", "k=v", "--max-duration", "60000"
    )
    assert many.count("launched") >= 3
    listed = json.loads(cli("runs", "list", "--format", "json"))
    assert len(listed) == 4
    assert {r["labels"].get("k") for r in listed} == {None, "v"}
    shown = json.loads(cli("runs", "show", one["id"]))
    assert shown["config"]["taskDetails"] == CONFIG_WITH_SECRETS["taskDetails"]
    assert "secrets" not in shown["config"]
    columns = tmp_path / "columns.json"
    columns.write_text('["name", "price"]')
    [csv_run] = json.loads(
        cli("run", "--hook", "h", "--task", "prices", "--schema", str(columns), "--format", "json")
    )
    sent = fake.tasks[csv_run["task_id"]].config
    assert (sent["outputType"], sent["outputSchema"]) == ("structured_csv", ["name", "price"])
    tracked = cli("runs", "track", "sess_x", "task_y", "--hook", "h")
    assert "task_y" in tracked
    assert len(json.loads(cli("runs", "list", "--format", "json"))) == 6


def test_cli_runs_one_task_and_a_batch_alike(
    db_url: str, engine: Engine, fake: FakeWebRun, tmp_path: Path
) -> None:
    """``--task`` is a batch of one: the same launch and answer, without progress, and its
    refusal ends the command; a ``--from`` batch goes on past a refusal, counts on stderr in
    plain lines (CliRunner's stderr is no terminal), then says what failed."""
    from click.testing import CliRunner

    from receiver.cli import main

    batch = tmp_path / "tasks.jsonl"
    lines = [{"taskDetails": "t0"}, {"taskDetails": "t1", "maxDuration": 5}, {"taskDetails": "t2"}]
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
    env = {
        "RECEIVER_DATABASE_URL": db_url,
        "RECEIVER_WEBRUN_URL": fake.url,
        "RECEIVER_WEBRUN_API_KEY": KEY,
    }

    def cli(*args: str) -> Any:
        obj: dict[str, Any] = {}
        result = CliRunner().invoke(main, ["run", "--hook", "h", *args], env=env, obj=obj)
        obj["engine"].dispose()
        return result

    single = cli("--task", "t", "--format", "json")
    assert (single.exit_code, single.stderr) == (0, "")
    [one] = json.loads(single.stdout)
    assert (one["state"], one["config"]["taskDetails"]) == ("launched", "t")

    many = cli("--from", str(batch), "--format", "json")
    assert many.exit_code == 1
    launched = json.loads(many.stdout)  # stdout is the answer alone
    assert [r["config"]["taskDetails"] for r in launched] == ["t0", "t2"]
    assert all(r.keys() == one.keys() for r in launched)
    refusal = "WebRun answered 400: maxDuration must be 1000-300000"
    *shown, error = many.stderr.splitlines()
    assert error == f"Error: 1 launch(es) failed; first: {refusal}"
    progress = progress_lines("\n".join(shown), "launching")
    assert progress[0] == "launching: started of 3"
    assert re.fullmatch(r"launching: 3/3 \(.+/s\)", progress[-1])

    refused = cli("--task", "t", "--max-duration", "5")
    assert refused.exit_code == 1
    assert refused.stdout == ""
    assert refused.stderr == f"Error: launch failed: {refusal}\n"
    states = sorted(r.state for r in list_runs(engine))
    assert states == [RunState.LAUNCH_FAILED] * 2 + [RunState.LAUNCHED] * 3


def test_track_is_idempotent(engine: Engine, settings: Settings) -> None:
    first = track(engine, settings, session_id="s", task_id="t", hook="h")
    again = track(engine, settings, session_id="s", task_id="t", hook="h")
    assert first.id == again.id
    assert first.origin == "tracked"
    assert show(engine, first.id) == first


def _ai_json_run(engine: Engine, settings: Settings, webrun: WebRunClient) -> Any:
    return launch(
        engine,
        settings,
        webrun,
        hook="shop",
        config={"taskDetails": "price", "outputType": "structured_json"},
        token=TOKEN,
        submitted_data="ai_response",
    )


def test_an_ai_response_labelled_with_its_run_joins_the_task(
    client: TestClient, engine: Engine, settings: Settings, webrun: WebRunClient
) -> None:
    run = _ai_json_run(engine, settings, webrun)
    body = json.dumps({"title": "Lamp", "price": 12.5}).encode()
    answer = post(client, "shop", body, query=f"run={run.id}")
    with engine.connect() as conn:
        task = conn.execute(select(Task.__table__)).one()
        delivery = conn.execute(
            select(Delivery.session_id, Delivery.task_id).where(
                Delivery.id == answer["delivery_id"]
            )
        ).one()
    assert (task.session_id, task.task_id) == (run.session_id, run.task_id)
    assert tuple(delivery) == (run.session_id, run.task_id)
    assert json.loads(task.labels)["via"] == "webhook"
    [row] = raw_rows(engine, hook_tables(engine, "shop")[()])
    assert (row["_session_id"], row["_task_id"]) == (run.session_id, run.task_id)


def test_an_unknown_run_label_changes_nothing_else(client: TestClient, engine: Engine) -> None:
    body = json.dumps({"title": "Lamp"}).encode()
    post(client, "shop", body, query="run=nope&team=a")
    with engine.connect() as conn:
        assert conn.scalar(select(text("count(*)")).select_from(Task)) == 0
        [labels] = conn.scalars(select(Delivery.labels)).all()
    assert json.loads(labels) == {"run": "nope", "team": "a"}
    [row] = raw_rows(engine, hook_tables(engine, "shop")[()])
    assert (row["_session_id"], row["_task_id"]) == (None, None)


def test_a_webhook_that_beats_the_launch_answer_is_joined_afterwards(
    engine: Engine, settings: Settings, fake: FakeWebRun, tmp_path: Path
) -> None:
    """A task finished within run-task's wait sends its webhook before we have its ids."""
    fake.wait_seconds, fake.drop_fraction = 5, 0.0
    # The fake delivers to this receiver through a real socket: a live server is needed.
    with live_server(settings.database_url, tmp_path / "live") as server:
        public = dataclasses.replace(settings, public_url=server.url)
        with WebRunClient(fake.url, KEY, timeout=30) as webrun:
            run = launch(
                engine,
                public,
                webrun,
                hook="shop",
                config={"taskDetails": "quick", "outputType": "structured_json"},
                token=TOKEN,
                submitted_data="ai_response",
            )
        assert fake.tasks[str(run.task_id)].webhook == "sent 200"
        deadline = time.monotonic() + 30
        while True:
            with engine.connect() as conn:
                delivery = conn.execute(
                    select(Delivery.status, Delivery.session_id, Delivery.task_id)
                ).one()
            if delivery.status != "stored" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert tuple(delivery) == ("processed", run.session_id, run.task_id)
