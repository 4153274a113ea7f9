"""Content-Encoding: gzip and deflate decoded for processing, raw bytes kept, bombs quarantined."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from receiver.encodings import decode_body
from receiver.errors import Quarantine
from receiver.models import Delivery, Task
from tests.conftest import TOKEN

BODY = json.dumps(
    {
        "type": "task_completed",
        "sessionId": "s-gz",
        "taskId": "t-gz",
        "data": {"message": "compressed"},
        "usage": {"cost": 0.25},
    }
).encode()


def _headers(encoding: str) -> str:
    return json.dumps([["content-encoding", encoding]])


@pytest.mark.parametrize(
    ("encoding", "encoded"),
    [
        pytest.param("gzip", gzip.compress(BODY), id="gzip"),
        pytest.param("x-gzip", gzip.compress(BODY), id="x-gzip"),
        pytest.param("deflate", zlib.compress(BODY), id="deflate-zlib"),
        pytest.param("deflate", zlib.compress(BODY, wbits=-15), id="deflate-raw"),
        pytest.param("gzip, gzip", gzip.compress(gzip.compress(BODY)), id="twice"),
        pytest.param("identity", BODY, id="identity"),
    ],
)
def test_decoded(encoding: str, encoded: bytes) -> None:
    assert decode_body(encoded, _headers(encoding), 10_000) == BODY


@pytest.mark.parametrize(
    ("headers", "body", "reason"),
    [
        pytest.param(_headers("gzip"), b"not gzip", "but the body is not gzip", id="not-gzip"),
        pytest.param(_headers("gzip"), gzip.compress(BODY)[:-8], "truncated", id="truncated"),
        pytest.param(_headers("compress"), b"x", "compress is not supported", id="unknown"),
        pytest.param("[]", gzip.compress(BODY), "without Content-Encoding", id="undeclared"),
    ],
)
def test_refused_with_a_reason(headers: str, body: bytes, reason: str) -> None:
    with pytest.raises(Quarantine) as caught:
        decode_body(body, headers, 10_000)
    assert reason in caught.value.reason


def test_a_zip_bomb_stops_at_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (200 * 2**20))  # 200 MiB of zeros in ~200 KiB
    assert len(bomb) < 2**20
    with pytest.raises(Quarantine) as caught:
        decode_body(bomb, _headers("gzip"), 2**20)
    assert "decodes to more than 1048576 bytes" in caught.value.reason


def test_a_gzip_delivery_is_stored_as_sent_and_processed(
    client: TestClient, engine: Engine
) -> None:
    raw = gzip.compress(BODY)
    answer = client.post(
        "/hooks/gz",
        content=raw,
        headers={
            "Authorization": TOKEN,
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        },
    )
    assert answer.status_code == 200
    client.app.state.pipeline.join()  # type: ignore[attr-defined]
    with engine.connect() as conn:
        row = conn.execute(
            select(Delivery.body, Delivery.status, Delivery.reason).where(
                Delivery.id == answer.json()["delivery_id"]
            )
        ).one()
        task = conn.execute(select(Task.task_id, Task.cost_usd)).one()
    assert row.body == raw  # the bytes as sent
    assert (row.status, row.reason) == ("processed", None)
    assert tuple(task) == ("t-gz", 0.25)


def test_a_zip_bomb_delivery_is_quarantined(client: TestClient, engine: Engine) -> None:
    bomb = gzip.compress(b"[" + b" " * (64 * 2**20) + b"]")
    answer = client.post(
        "/hooks/gz",
        content=bomb,
        headers={"Authorization": TOKEN, "Content-Encoding": "gzip"},
    )
    assert answer.status_code == 200
    client.app.state.pipeline.join()  # type: ignore[attr-defined]
    with engine.connect() as conn:
        reason = conn.scalar(
            select(Delivery.reason).where(Delivery.id == answer.json()["delivery_id"])
        )
    assert reason is not None
    assert "decodes to more than" in reason
