"""End to end: tasks launched at the fake WebRun, a third of their webhooks dropped and the
receiver down for part of the run; at the end every task is in ``tasks``, final, once, with
the cost WebRun charged and its structured output joined to it, and no secret anywhere."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine, MetaData, Table, func, select

from receiver.fakewebrun import FakeWebRun
from receiver.models import Delivery, Run, RunState, Task
from receiver.runs import RunInfo, launch
from receiver.settings import Settings
from receiver.webrun import WebRunClient
from tests.conftest import TOKEN
from tests.live import ServerProcess, free_port
from tests.readback import hook_tables, raw_rows

KEY = "fake-e2e-key"
SECRET = "s3cr3t-pa55w0rd-never-stored"
OUTPUTS: dict[str, dict[str, Any]] = {
    "text": {"outputType": "text"},
    "structured_json": {
        "outputType": "structured_json",
        "outputSchema": {
            "type": "object",
            "properties": {"title": {"type": "string"}, "price": {"type": "number"}},
        },
    },
    "structured_csv": {"outputType": "structured_csv", "outputSchema": ["name", "price"]},
}
MODES = ("full_response", "ai_response", "just_ping")
EXPORT_OPTIONS = ("--with-bodies", "--lag", "0", "--quiet")
TASKS = 30  # ten a phase: before, during and after the receiver's downtime


def configs() -> list[tuple[str, str, dict[str, Any]]]:
    """(hook, submittedData, config) for every task: each mode with each output type."""
    out = []
    for n in range(TASKS):
        mode = MODES[n % 3]
        kind = list(OUTPUTS)[(n // 3) % 3]
        details = f"task {n}" + (" [fail]" if n % 10 == 9 else "")
        config = {
            "taskDetails": details,
            "maxDuration": 2000,
            **OUTPUTS[kind],
            "secrets": [{"match": "all", "fields": {"password": SECRET}}],
        }
        out.append((f"e2e_{kind.removeprefix('structured_')}", mode, config))
    return out


def wait_until_final(engine: Engine, timeout: float) -> list[Any]:
    """Every run settled and every delivery processed (a run is marked reconciled as soon
    as its answer is committed, before the pipeline has processed it)."""
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            runs = list(conn.execute(select(Run.__table__)).all())
            waiting = conn.scalar(
                select(func.count()).select_from(Delivery).where(Delivery.status == "stored")
            )
        settled = all(r.state != RunState.LAUNCHED for r in runs) and waiting == 0
        if settled or time.monotonic() > deadline:
            return runs
        time.sleep(0.25)


def everything(engine: Engine) -> str:
    """Every row of every table, as text."""
    metadata = MetaData()
    metadata.reflect(engine)
    parts = []
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(select(Table(table.name, MetaData(), autoload_with=conn))):
                parts.append(repr(tuple(row)))
    return "\n".join(parts)


@pytest.mark.slow
def test_every_task_lands_once_with_its_cost(
    engine: Engine, settings: Settings, db_url: str, tmp_path: Path
) -> None:
    fake = FakeWebRun(api_key=KEY, drop_fraction=1 / 3, task_seconds=0.8, rate_limit=1000)
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    with fake.serve():
        server = ServerProcess(
            db_url,
            tmp_path / "server",
            port=port,
            env={
                "RECEIVER_WEBRUN_URL": fake.url,
                "RECEIVER_WEBRUN_API_KEY": KEY,
                "RECEIVER_PUBLIC_URL": public,
                "RECEIVER_RECONCILE_GRACE_SECONDS": "1",
                "RECEIVER_RECONCILE_INTERVAL_SECONDS": "0.2",
                "RECEIVER_WEBRUN_RATE": "50",
            },
        )
        mine = dataclasses.replace(settings, public_url=public)
        launched: list[RunInfo] = []
        try:
            server.start()
            with WebRunClient(fake.url, KEY, creations=(1000, 60.0)) as webrun:
                for phase, chunk in enumerate([configs()[:10], configs()[10:20], configs()[20:]]):
                    if phase == 1:
                        server.terminate()  # down: these webhooks are refused
                    for hook, mode, config in chunk:
                        launched.append(
                            launch(
                                engine,
                                mine,
                                webrun,
                                hook=hook,
                                config=config,
                                token=TOKEN,
                                submitted_data=mode,
                            )
                        )
                    if phase == 1:
                        time.sleep(1.5)  # every task of this phase ends while it is down
                        server.start()
            runs = wait_until_final(engine, timeout=180)
            server_log = server.log()
        finally:
            server.kill()

    assert {r.state for r in runs} <= {RunState.DELIVERED, RunState.RECONCILED}, [
        (r.state, r.last_error) for r in runs if r.state != RunState.DELIVERED
    ]
    states = [r.state for r in runs]
    assert states.count(RunState.RECONCILED) >= 10  # dropped, refused, pings, ai_responses
    assert states.count(RunState.DELIVERED) >= 1
    refused = [t for t in fake.tasks.values() if t.webhook.startswith("refused")]
    assert len(refused) >= 5  # the downtime did lose webhooks
    assert sum(t.dropped for t in fake.tasks.values()) == TASKS // 3

    # Every task once, final, with the cost WebRun charged.
    with engine.connect() as conn:
        tasks = {t.task_id: t for t in conn.execute(select(Task.__table__))}
        assert conn.scalar(select(func.count()).select_from(Task)) == TASKS
    assert set(tasks) == set(fake.tasks)
    for task_id, fake_task in fake.tasks.items():
        task = tasks[task_id]
        assert task.session_id == fake_task.session_id
        assert task.status == ("failed" if fake_task.failed else "completed"), task_id
        assert task.cost_usd == fake_task.usage["cost"], task_id
        assert task.input_tokens == fake_task.usage["inputTokens"], task_id

    # Structured outputs in result tables, joined to their task, each task's rows once.
    for hook, per_task in (("e2e_json", 1), ("e2e_csv", 3)):
        rows = raw_rows(engine, hook_tables(engine, hook)[()])
        done = [
            t
            for t in fake.tasks.values()
            if not t.failed and f"e2e_{t.output_type.removeprefix('structured_')}" == hook
        ]
        assert len(rows) == per_task * len(done)
        by_task: dict[str, int] = {}
        for row in rows:
            by_task[row["_task_id"]] = by_task.get(row["_task_id"], 0) + 1
            assert row["_session_id"] == fake.tasks[row["_task_id"]].session_id
        assert by_task == {t.task_id: per_task for t in done}

    # No secret in any table, log line or export.
    assert SECRET not in everything(engine)
    assert SECRET not in server_log
    assert KEY not in server_log
    out = tmp_path / "export"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    subprocess.run(
        [sys.executable, "-m", "receiver", "export", "--out", str(out), *EXPORT_OPTIONS],
        env={**env, "RECEIVER_DATABASE_URL": db_url},
        check=True,
        capture_output=True,
    )
    exported = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in exported)
    for path in exported:
        content = (
            repr(pq.read_table(path).to_pylist()).encode()
            if path.suffix == ".parquet"
            else path.read_bytes()
        )
        assert SECRET.encode() not in content, path
    sent = [json.dumps(t.config) for t in fake.tasks.values()]
    assert all(SECRET in s for s in sent)  # WebRun did get them
