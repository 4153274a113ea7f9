"""The pipeline in a process of its own: same rows as in a thread, outcomes counted, and a
child that dies is started again without losing what was stored."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, func, select
from starlette.testclient import TestClient

from receiver.app import create_app
from receiver.models import Delivery
from receiver.processing import process_deliveries
from receiver.settings import Settings
from tests.conftest import DELIVERIES, TOKEN
from tests.readback import snapshot


@pytest.fixture
def in_a_process(settings: Settings, engine: Engine) -> Iterator[TestClient]:
    app = create_app(dataclasses.replace(settings, processing="process"), engine=engine)
    with TestClient(app) as client:
        yield client


def catalogue() -> list[tuple[bytes, str]]:
    return [
        (meta.with_suffix(".body").read_bytes(), json.loads(meta.read_text())["content_type"])
        for meta in sorted(DELIVERIES.glob("*.json"))
    ]


def send(client: TestClient, body: bytes, content_type: str) -> str:
    headers = {"authorization": TOKEN, "content-type": content_type}
    response = client.post("/hooks/shop", content=body, headers=headers)
    assert response.status_code == 200, response.text
    return str(response.json()["delivery_id"])


def stored(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).where(Delivery.status == "stored")) or 0)


def test_a_child_process_leaves_what_processing_in_process_leaves(
    in_a_process: TestClient, engine: Engine
) -> None:
    ids = [send(in_a_process, body, content_type) for body, content_type in catalogue()]
    in_a_process.app.state.pipeline.join()  # type: ignore[attr-defined]
    assert stored(engine) == 0
    there = snapshot(engine)
    process_deliveries(engine, sorted(ids), max_depth=5)  # again, here, in one batch
    assert snapshot(engine) == there
    metrics = in_a_process.get("/metrics").text
    counted = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("receiver_pipeline_processed_total{")
    )
    assert counted == len(ids)  # every outcome came back to the server's metrics


def test_a_child_that_dies_is_started_again_and_nothing_is_lost(
    in_a_process: TestClient, engine: Engine
) -> None:
    pipeline = in_a_process.app.state.pipeline  # type: ignore[attr-defined]
    first = send(in_a_process, b'{"n": 1}', "application/json")
    pipeline.join()
    os.kill(pipeline._process.pid, signal.SIGKILL)
    pipeline._process.join(10)
    later = [send(in_a_process, b'{"n": %d}' % n, "application/json") for n in range(2, 12)]
    deadline = time.monotonic() + 60
    while stored(engine):  # waits on the condition; the deadline only bounds a failure
        assert time.monotonic() < deadline, "the deliveries were not processed after a restart"
        time.sleep(0.1)
    assert pipeline.restarts.count == 1
    assert pipeline.alive()
    with engine.connect() as conn:
        statuses = {r.id: r.status for r in conn.execute(select(Delivery.id, Delivery.status))}
    assert {statuses[i] for i in [first, *later]} == {"processed"}
    assert in_a_process.get("/readyz").status_code == 200


def test_the_setting_is_checked() -> None:
    from receiver.errors import SettingsError

    assert Settings.from_env({"RECEIVER_PROCESSING": "process"}).processing == "process"
    assert Settings.from_env({}).processing == "thread"
    with pytest.raises(SettingsError, match="RECEIVER_PROCESSING must be thread or process"):
        Settings.from_env({"RECEIVER_PROCESSING": "fork"})
