"""The WebRun client against the fake WebRun over real HTTP: creation, polling, refusals, bounds."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from receiver.errors import WebRunError
from receiver.fakewebrun import FakeWebRun
from receiver.webrun import WebRunClient, Window, retry_after
from tests.live import free_port

KEY = "fake-key"


@pytest.fixture
def fake() -> Iterator[FakeWebRun]:
    with FakeWebRun(api_key=KEY, task_seconds=0.2).serve() as running:
        yield running


def client_of(fake: FakeWebRun, key: str = KEY, **kwargs: object) -> WebRunClient:
    return WebRunClient(fake.url, key, timeout=10, **kwargs)  # type: ignore[arg-type]


def test_window_lets_a_burst_through_then_waits() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    window = Window(3, 10.0, clock=lambda: now[0], sleep=sleep)
    assert [window.wait() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert window.wait() == pytest.approx(10.0)
    window.hold_off(30.0)
    assert window.wait() == pytest.approx(30.0)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("3", 3.0, id="delta"),
        pytest.param("100000", 120.0, id="capped"),
        pytest.param("soon", None, id="unreadable"),
        pytest.param("Wed, 21 Oct 2015 07:28:00 GMT", 0.0, id="date-in-the-past"),
    ],
)
def test_retry_after(value: str, seconds: float | None) -> None:
    assert retry_after({"retry-after": value}) == seconds


def test_pending_then_polled_to_the_final_record_without_ids(fake: FakeWebRun) -> None:
    with client_of(fake) as client:
        created = client.run_task({"taskDetails": "find it", "outputType": "text"})
        assert created.status == "pending"
        assert created.body["pollUrl"].endswith(f"/task/{created.session_id}/{created.task_id}")
        running = json.loads(client.get_task(created.session_id, created.task_id).body)
        assert running["status"] == "active"
        assert running["pending"] is True
        assert set(running["usage"]) == {"inputTokens", "outputTokens", "computeTime", "cost"}
        time.sleep(0.3)
        final = client.get_task(created.session_id, created.task_id)
    record = json.loads(final.body)
    assert final.status == 200
    assert record["type"] == "task_completed"
    assert "sessionId" not in record
    assert "taskId" not in record
    assert record["usage"]["cost"] == fake.tasks[created.task_id].usage["cost"]


def test_complete_within_the_wait(fake: FakeWebRun) -> None:
    fake.wait_seconds = 5
    with client_of(fake) as client:
        created = client.run_task({"taskDetails": "quick"})
    assert created.status == "complete"
    assert created.body["result"]["type"] == "task_completed"


@pytest.mark.parametrize(
    ("setup", "status", "text"),
    [
        pytest.param({"balance": 0.0}, 402, "Insufficient balance", id="402"),
        pytest.param({"unavailable": 99}, 503, "No instances", id="503"),
        pytest.param({"api_key": "other"}, 401, "Invalid API key", id="401"),
    ],
)
def test_refusals_raise_with_webruns_message(
    fake: FakeWebRun, setup: dict[str, object], status: int, text: str
) -> None:
    for name, value in setup.items():
        setattr(fake, name, value)
    fake.retry_after = 0.01
    with client_of(fake) as client, pytest.raises(WebRunError, match=text) as caught:
        client.run_task({"taskDetails": "x"})
    assert caught.value.status == status
    assert KEY not in str(caught.value)


def test_429_and_503_are_waited_out_with_a_bounded_number_of_requests(fake: FakeWebRun) -> None:
    fake.rate_limit, fake.rate_window, fake.retry_after = 2, 1.0, 0.5
    fake.unavailable = 1
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    # The client believes in a looser limit than the server: it meets 429s and waits.
    with client_of(fake, creations=(100, 60.0), sleep=sleep) as client:
        ids = [client.run_task({"taskDetails": f"t{i}"}, retries=10).task_id for i in range(5)]
    assert len(set(ids)) == 5
    assert fake.count("run-task", 200) == 5
    assert fake.count("run-task", 503) == 1
    # Each 429 holds the window off for Retry-After: never a storm of refused requests.
    assert fake.count("run-task", 429) <= 4
    assert any(s >= 0.4 for s in slept)


def test_creations_stay_within_the_window_without_a_429(fake: FakeWebRun) -> None:
    fake.rate_limit, fake.rate_window = 3, 1.0
    with client_of(fake, creations=(3, 1.0)) as client:
        for i in range(7):
            client.run_task({"taskDetails": f"t{i}"})
    assert fake.count("run-task", 200) == 7
    assert fake.count("run-task", 429) == 0


def test_concurrency_is_bounded(fake: FakeWebRun) -> None:
    fake.poll_delay = 0.1
    with client_of(fake, concurrency=2, rate=1000) as client:
        threads = [threading.Thread(target=client.get_task, args=("s", f"t{i}")) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert fake.count("task", 404) == 8
    assert fake.peak_polls_in_flight == 2


def test_poll_rate_is_bounded(fake: FakeWebRun) -> None:
    with client_of(fake, rate=4) as client:
        started = time.monotonic()
        for i in range(9):
            client.get_task("s", f"t{i}")
    # 4 a second: the ninth poll waits for the third second (a lower bound, never an upper).
    assert time.monotonic() - started >= 1.9


def test_a_timeout_is_an_error_not_a_retry(fake: FakeWebRun) -> None:
    fake.wait_seconds, fake.task_seconds = 5, 2
    client = WebRunClient(fake.url, KEY, timeout=0.3)
    with client, pytest.raises(WebRunError, match="did not answer"):
        client.run_task({"taskDetails": "slow"})
    assert len(fake.tasks) == 1


def test_unreachable_webrun() -> None:
    client = WebRunClient("http://127.0.0.1:9", KEY, timeout=2)
    with client, pytest.raises(WebRunError, match="could not reach WebRun"):
        client.get_task("s", "t")


def test_webhook_modes_and_auth(fake: FakeWebRun) -> None:
    """The fake POSTs each mode's body with ``auth`` as the Authorization header."""
    received: list[tuple[str, str, bytes]] = []
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def hook(request: Request) -> Response:
        received.append(
            (
                request.headers.get("authorization", ""),
                request.headers.get("content-type", ""),
                await request.body(),
            )
        )
        return Response("ok")

    sink_app = Starlette(routes=[Route("/h", hook, methods=["POST"])])

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(sink_app, host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        with client_of(fake) as client:
            for mode, output in [
                ("full_response", "structured_json"),
                ("ai_response", "structured_csv"),
                ("just_ping", "text"),
            ]:
                client.run_task(
                    {
                        "taskDetails": mode,
                        "outputType": output,
                        "outputSchema": ["a", "b"] if output == "structured_csv" else None,
                        "webhook": {
                            "name": "h",
                            "url": f"http://127.0.0.1:{port}/h",
                            "auth": "Bearer hook",
                            "submittedData": mode,
                        },
                    }
                )
        deadline = time.monotonic() + 10
        while len(received) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.should_exit = True
        thread.join(5)
    assert {auth for auth, _, _ in received} == {"Bearer hook"}
    by_type = {ct.split(";")[0]: body for _, ct, body in received}
    assert by_type["text/csv"].startswith(b"a,b\n")
    records = [json.loads(b) for _, ct, b in received if ct.startswith("application/json")]
    assert {r.get("type") or r.get("event") for r in records} == {"task_completed"}
    assert all("sessionId" in r and "taskId" in r for r in records)
    assert any("usage" in r for r in records)
    assert any("usage" not in r for r in records)


def test_drops_exactly_the_fraction() -> None:
    fake = FakeWebRun(drop_fraction=1 / 3)
    with fake.serve(), client_of(fake) as client:
        for i in range(9):
            client.run_task({"taskDetails": f"t{i}"})
    assert sum(t.dropped for t in fake.tasks.values()) == 3


def test_polls_answer_queued_failures_then_404_for_unknown(fake: FakeWebRun) -> None:
    fake.poll_failures.extend([503, 429])
    with client_of(fake) as client:
        first = client.get_task("s", "t")
        second = client.get_task("s", "t")
        third = client.get_task("s", "t")
    assert (first.status, second.status, third.status) == (503, 429, 404)
    assert first.retry_after == fake.retry_after
    assert third.status == httpx.codes.NOT_FOUND


def test_start_session_then_send_message(fake: FakeWebRun) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=fake.url, headers=headers) as http:
        session = http.post("/start/start-session", json={"mode": "default"}).json()
        assert "taskId" not in session
        message = {"actionType": "newTask", "newState": "start", "taskDetails": "next"}
        sent = http.post(
            "/start/send-message", json={"sessionId": session["sessionId"], "message": message}
        ).json()
        unknown = http.post("/start/send-message", json={"sessionId": "nope", "message": message})
    assert sent["sessionId"] == session["sessionId"]
    assert sent["pending"] is True
    assert sent["taskId"] in fake.tasks
    assert unknown.status_code == 404
    time.sleep(0.3)
    with client_of(fake) as client:
        record = json.loads(client.get_task(sent["sessionId"], sent["taskId"]).body)
    assert record["type"] == "task_completed"
