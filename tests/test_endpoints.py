"""The HTTP edge: auth, size limits, no redirects, what is stored, duplicates."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, func, insert, select
from starlette.testclient import TestClient

from receiver import auth
from receiver.app import create_app
from receiver.db import utcnow
from receiver.models import Delivery, Hook, Task, Token
from receiver.settings import Settings
from tests.conftest import TOKEN, post

BODY = b'{"event":"task_completed","sessionId":"s1","taskId":"t1"}'


def count_deliveries(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(Delivery)) or 0)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"authorization": "Bearer wrong"}, id="wrong"),
        pytest.param({"authorization": ""}, id="empty"),
        pytest.param({"authorization": TOKEN + " "}, id="trailing-space"),
        pytest.param({"authorization": TOKEN.lower()}, id="other-case"),
        pytest.param({b"authorization": b"Bearer \xff\xfe"}, id="non-ascii"),
    ],
)
def test_bad_auth_is_401_and_stores_nothing(
    client: TestClient, engine: Engine, headers: dict[str, str] | dict[bytes, bytes]
) -> None:
    response = client.post("/hooks/h", content=BODY, headers=headers)
    assert response.status_code == 401
    assert "error" in response.json()
    assert count_deliveries(engine) == 0


def test_repeated_authorization_is_refused(client: TestClient, engine: Engine) -> None:
    response = client.post(
        "/hooks/h", content=BODY, headers=[("authorization", TOKEN), ("authorization", TOKEN)]
    )
    assert response.status_code == 401
    assert count_deliveries(engine) == 0


def test_no_token_configured_fails_closed(settings: Settings, engine: Engine) -> None:
    with TestClient(create_app(replace(settings, tokens=()), engine=engine)) as c:
        for header in (TOKEN, "", "Bearer "):
            assert (
                c.post("/hooks/h", content=BODY, headers={"authorization": header}).status_code
                == 401
            )
    assert count_deliveries(engine) == 0


def test_hook_token_only_opens_its_hook(settings: Settings, engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(insert(Hook).values(name="mine", created_at=utcnow()))
    token = auth.add_token(engine, "mine")
    fast = replace(settings, auth_cache_seconds=0)
    with TestClient(create_app(fast, engine=engine)) as c:
        assert (
            c.post("/hooks/mine", content=BODY, headers={"authorization": token}).status_code == 200
        )
        assert (
            c.post("/hooks/other", content=BODY, headers={"authorization": token}).status_code
            == 401
        )
        # Global tokens still open every hook, including one with its own tokens.
        assert (
            c.post("/hooks/mine", content=b"x", headers={"authorization": TOKEN}).status_code == 200
        )
        assert auth.revoke_tokens(engine, "mine") == 1
        assert (
            c.post("/hooks/mine", content=b"y", headers={"authorization": token}).status_code == 401
        )


def test_global_token_creates_unknown_hook(client: TestClient, engine: Engine) -> None:
    post(client, "brand-new", BODY)
    with engine.connect() as conn:
        assert conn.scalar(select(Hook.name).where(Hook.name == "brand-new")) == "brand-new"


def test_generated_token_is_stored_as_hash_only(engine: Engine) -> None:
    token = auth.ensure_token(engine, ())
    assert token is not None
    assert token.startswith("Bearer ")
    assert auth.ensure_token(engine, ()) is None  # made once only
    with engine.connect() as conn:
        stored = conn.execute(select(Token.token_sha256)).scalars().all()
    assert stored == [hashlib.sha256(token.encode()).hexdigest()]


def test_body_over_limit_is_413(settings: Settings, engine: Engine) -> None:
    small = replace(settings, max_body_bytes=1000)
    with TestClient(create_app(small, engine=engine)) as c:
        headers = {"authorization": TOKEN}
        assert c.post("/hooks/h", content=b"x" * 1001, headers=headers).status_code == 413

        def chunks() -> Iterator[bytes]:
            for _ in range(50):
                yield b"y" * 100

        # Chunked: no Content-Length to trust, the stream is cut at the limit.
        assert c.post("/hooks/h", content=chunks(), headers=headers).status_code == 413
        assert c.post("/hooks/h", content=b"z" * 1000, headers=headers).status_code == 200
    assert count_deliveries(engine) == 1


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        pytest.param("POST", "/hooks/h/", 200, id="trailing-slash-answered"),
        pytest.param("GET", "/hooks/h", 405, id="get-hook"),
        pytest.param("POST", "/hooks/", 404, id="no-name"),
        pytest.param("POST", "/hooks", 404, id="no-hooks-slash"),
        pytest.param("GET", "/healthz/", 404, id="health-slash"),
        pytest.param("POST", "/hooks/" + "a" * 129, 404, id="hook-name-too-long"),
    ],
)
def test_never_redirects(client: TestClient, method: str, path: str, status: int) -> None:
    response = client.request(
        method, path, content=BODY, headers={"authorization": TOKEN}, follow_redirects=False
    )
    assert response.status_code == status
    assert not 300 <= response.status_code < 400


def test_stores_exact_delivery(client: TestClient, engine: Engine) -> None:
    body = b'{"title": "caf\xc3\xa9"}\r\n'
    response = client.post(
        "/hooks/store?project=pricing&task_id=t-9&task_id=t-10",
        content=body,
        headers={
            "authorization": TOKEN,
            "content-type": "application/json; charset=utf-8",
            "x-trace": "abc",
        },
    )
    assert response.status_code == 200
    answer = response.json()
    with engine.connect() as conn:
        d = conn.execute(
            select(Delivery.__table__).where(Delivery.id == answer["delivery_id"])
        ).one()
    assert d.body == body
    assert d.body_sha256 == hashlib.sha256(body).hexdigest()
    assert d.body_size == len(body)
    assert d.content_type == "application/json; charset=utf-8"
    assert d.query_string == "project=pricing&task_id=t-9&task_id=t-10"
    assert json.loads(d.labels) == {"project": "pricing", "task_id": "t-10"}
    headers = dict(json.loads(d.headers))
    assert headers["x-trace"] == "abc"
    assert "authorization" not in {k.lower() for k in headers}
    received = (
        d.received_at if d.received_at.tzinfo else d.received_at.replace(tzinfo=utcnow().tzinfo)
    )
    assert abs((utcnow() - received).total_seconds()) < 60


def test_duplicate_is_stored_and_marked(client: TestClient, engine: Engine) -> None:
    first = post(client, "dup", BODY)
    second = post(client, "dup", BODY)
    other_query = post(client, "dup", BODY, query="x=1")
    assert first["status"] == "stored"
    assert second["status"] == "duplicate"
    assert other_query["status"] == "stored"
    with engine.connect() as conn:
        dup = conn.execute(
            select(Delivery.__table__).where(Delivery.id == second["delivery_id"])
        ).one()
        tasks = conn.scalar(select(func.count()).select_from(Task))
    assert dup.duplicate_of == first["delivery_id"]
    assert dup.body == BODY
    assert tasks == 1


def test_concurrent_copies_make_one_task(client: TestClient, engine: Engine) -> None:
    bodies = [
        json.dumps({"event": "task_completed", "sessionId": "s", "taskId": f"t{i}"}).encode()
        for i in range(20)
    ]

    def send(body: bytes) -> str:
        r = client.post("/hooks/burst", content=body, headers={"authorization": TOKEN})
        assert r.status_code == 200
        status: str = r.json()["status"]
        return status

    with ThreadPoolExecutor(max_workers=10) as pool:
        statuses = list(pool.map(send, [b for b in bodies for _ in range(5)]))
    client.app.state.pipeline.join()  # type: ignore[attr-defined]
    assert statuses.count("stored") == 20
    assert statuses.count("duplicate") == 80
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Task)) == 20
        assert count_deliveries(engine) == 100
        firsts = conn.scalar(
            select(func.count()).select_from(Delivery).where(Delivery.first_key.is_not(None))
        )
    assert firsts == 20


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


def test_ready_is_503_when_the_database_is_unreachable(client: TestClient, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    healthy = client.app.state.engine  # type: ignore[attr-defined]
    broken = create_engine(f"sqlite:///{blocker / 'receiver.db'}")
    client.app.state.engine = broken  # type: ignore[attr-defined]
    try:
        response = client.get("/readyz")
    finally:
        client.app.state.engine = healthy  # type: ignore[attr-defined]
        broken.dispose()
    assert response.status_code == 503
    assert client.get("/healthz").status_code == 200


def test_a_body_that_never_arrives_is_408_and_stores_nothing(
    settings: Settings, engine: Engine
) -> None:
    """A client that sends headers and stalls cannot hold a slot: 408 after the read timeout."""
    app = create_app(settings, engine=engine, body_read_seconds=0.3)
    sent: list[dict[str, object]] = []

    async def stalled_request() -> None:
        first = True

        async def receive() -> dict[str, object]:
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": BODY[:10], "more_body": True}
            await asyncio.sleep(60)  # the rest never comes
            raise AssertionError("the timeout should have fired")

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/hooks/h",
            "raw_path": b"/hooks/h",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"authorization", TOKEN.encode()),
                (b"content-length", str(len(BODY)).encode()),
            ],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "state": {},
        }
        # It returns at all only because the timeout fired: the rest of the body never comes.
        await app(scope, receive, send)  # type: ignore[arg-type]

    with TestClient(app) as client:
        client.portal.call(stalled_request)  # type: ignore[union-attr]
    assert sent[0]["status"] == 408
    assert b"not received within 0.3 s" in sent[1]["body"]  # type: ignore[operator]
    assert count_deliveries(engine) == 0
