"""A fake WebRun API, written from WebRun's API reference, for tests and demos.

``POST /start/run-task`` (or ``start-session`` then ``send-message`` with
``actionType: "newTask"``) creates a task that "runs" for ``task_seconds``:
the answer is the result when that fits in ``wait_seconds`` (WebRun waits
50 s), else ``pending`` with a ``pollUrl``. ``GET /task/:sessionId/:taskId``
answers ``active`` with running usage, then the final record, without ids.
When a task ends, its webhook is POSTed in the mode asked for (``full_response``,
``ai_response``, ``just_ping``) with ``auth`` as the Authorization header, once:
WebRun never retries, and a ``drop_fraction`` of webhooks is never sent at all.
It refuses like WebRun: 401 (key), 400 (fields), 402 (balance), 429 (past
``rate_limit`` creations in ``rate_window`` seconds), 503 (``unavailable``),
and ``poll_failures`` queues statuses for the next polls.

Run one for a demo: ``python -m receiver.fakewebrun --port 8100 --api-key demo``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

MODES = ("full_response", "ai_response", "just_ping")


@dataclass
class FakeTask:
    """One task the fake launched, with everything it will report."""

    number: int
    session_id: str
    task_id: str
    config: dict[str, Any]
    started: float
    ends: float
    failed: bool
    output_type: str
    output: Any  # str for text and CSV, a JSON value for structured_json
    usage: dict[str, Any]
    completed_at: str
    dropped: bool
    #: What became of the webhook: pending, none, dropped, sent <status>, refused <error>.
    webhook: str = "pending"

    @property
    def output_text(self) -> str:
        return self.output if isinstance(self.output, str) else json.dumps(self.output)

    def final_record(self) -> dict[str, Any]:
        """The poll answer of a finished task: WebRun leaves the ids out."""
        if self.failed:
            return {
                "success": False,
                "status": "failed",
                "error": "Navigation timed out",
                "code": "NAVIGATION_TIMEOUT",
                "usage": self.usage,
            }
        u = self.usage
        return {
            "success": True,
            "type": "task_completed",
            "data": {
                "message": self.output_text,
                "prompt_tokens": u["inputTokens"],
                "completion_tokens": u["outputTokens"],
                "total_tokens": u["inputTokens"] + u["outputTokens"],
                "completion_time": u["computeTime"],
            },
            "usage": u,
            "completedAt": self.completed_at,
        }

    def running_record(self, now: float) -> dict[str, Any]:
        share = max(0.0, min(1.0, (now - self.started) / max(self.ends - self.started, 1e-9)))
        return {
            "success": True,
            "status": "active",
            "pending": True,
            "usage": {
                "inputTokens": int(self.usage["inputTokens"] * share),
                "outputTokens": int(self.usage["outputTokens"] * share),
                "computeTime": round(self.usage["computeTime"] * share, 3),
                "cost": round(self.usage["cost"] * share, 6),
            },
        }

    def webhook_body(self, mode: str) -> tuple[bytes, str]:
        """The webhook body and content type for ``submittedData`` = ``mode``."""
        ids = {"sessionId": self.session_id, "taskId": self.task_id}
        if mode == "just_ping":
            event = "task_failed" if self.failed else "task_completed"
            record: Any = {"event": event, **ids, "completedAt": self.completed_at}
        elif mode == "ai_response" and not self.failed:
            if self.output_type == "structured_json":
                return json.dumps(self.output).encode(), "application/json"
            media = "text/csv" if self.output_type == "structured_csv" else "text/plain"
            return self.output_text.encode(), f"{media}; charset=utf-8"
        else:
            final = self.final_record()
            record = {k: v for k, v in final.items() if k != "success" or self.failed}
            record = {**({"type": final["type"]} if "type" in final else {}), **ids, **record}
        return json.dumps(record).encode(), "application/json"


def _value(schema: Any, name: str, n: int, depth: int = 0) -> Any:
    """A value that fits a JSON Schema node: what an agent would have filled in."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind == "object" or (kind is None and isinstance(schema, dict) and "properties" in schema):
        props = schema.get("properties") or {}
        return {k: _value(v, k, n, depth + 1) for k, v in props.items()}
    if kind == "array":
        item = schema.get("items", {"type": "string"})
        return [_value(item, name, n * 10 + i, depth + 1) for i in range(2)]
    if kind == "number":
        return round(n * 1.25 + 0.5, 2)
    if kind == "integer":
        return n
    if kind == "boolean":
        return n % 2 == 0
    return f"{name} {n}"


def make_output(config: dict[str, Any], n: int) -> tuple[str, Any]:
    """The output a task config asks for: (outputType, output)."""
    output_type = config.get("outputType") or "text"
    schema = config.get("outputSchema")
    if output_type == "structured_json":
        if not isinstance(schema, dict):
            schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
        return output_type, _value(schema, "value", n)
    if output_type == "structured_csv":
        columns = [str(c) for c in schema] if isinstance(schema, list) and schema else ["name"]
        lines = [",".join(columns)]
        lines += [",".join(f"{c} {n}-{i}" for c in columns) for i in range(3)]
        return output_type, "\n".join(lines) + "\n"
    return "text", f"# Task {n}\n\n{config.get('taskDetails', '')}\n\nDone.\n"


@dataclass
class FakeWebRun:
    """The fake's state and knobs; `app` serves it, `serve` runs it on 127.0.0.1."""

    api_key: str = "fake-key"
    rate_limit: int = 10
    rate_window: float = 60.0
    drop_fraction: float = 0.0
    task_seconds: float = 0.2
    wait_seconds: float = 0.0
    balance: float = 100.0
    #: The next this many creations answer 503 (no instances available).
    unavailable: int = 0
    #: Statuses the next polls answer, in order (429 and 503 carry ``Retry-After``).
    poll_failures: collections.deque[int] = field(default_factory=collections.deque)
    retry_after: float = 1.0
    #: Seconds each poll takes to answer (to see how many a client has in flight).
    poll_delay: float = 0.0
    tasks: dict[str, FakeTask] = field(default_factory=dict)
    #: Every request answered: (method, route, status).
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    #: The exact bytes of every poll answered 200.
    polled: list[bytes] = field(default_factory=list)
    #: Every webhook body sent (or tried), with its Authorization header.
    webhooks: list[tuple[str, str, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._created: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self.url = ""
        self.sessions: set[str] = set()
        self.polls_in_flight = 0
        self.peak_polls_in_flight = 0

    @property
    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/start/run-task", self._run_task, methods=["POST"]),
                Route("/start/start-session", self._start_session, methods=["POST"]),
                Route("/start/send-message", self._send_message, methods=["POST"]),
                Route("/task/{session_id}/{task_id}", self._poll, methods=["GET"]),
            ]
        )

    def count(self, route: str, status: int | None = None) -> int:
        """Requests answered on ``route`` (``run-task`` or ``task``), with ``status`` if given."""
        return sum(1 for _, r, s in self.requests if r == route and status in (None, s))

    def _answer(self, route: str, status: int, body: Any, retry: bool = False) -> Response:
        self.requests.append((route.split()[0], route.split()[1], status))
        headers = {"Retry-After": f"{self.retry_after:g}"} if retry else None
        return JSONResponse(body, status_code=status, headers=headers)

    def _authorised(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.api_key}"

    async def _body(self, request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            return None

    def _refusal(
        self, route: str, request: Request, body: Any, *, task: bool = True
    ) -> Response | None:
        """WebRun's refusals of a creation, in its order: key, fields, balance, rate, capacity.

        Called under the lock: a creation that passes is counted at once.
        """
        if not self._authorised(request):
            return self._answer(route, 401, {"success": False, "message": "Invalid API key"})
        if not isinstance(body, dict):
            return self._answer(route, 400, {"success": False, "message": "Invalid JSON"})
        if task and not isinstance(body.get("taskDetails"), str):
            return self._answer(route, 400, {"success": False, "message": "taskDetails required"})
        duration = body.get("maxDuration", 300000)
        if not isinstance(duration, int) or not 1000 <= duration <= 300000:
            message = "maxDuration must be 1000-300000"
            return self._answer(route, 400, {"success": False, "message": message})
        if self.balance <= 0:
            refused = {"success": False, "message": "Insufficient balance", "balance": self.balance}
            return self._answer(route, 402, refused)
        now = time.monotonic()
        while self._created and self._created[0] <= now - self.rate_window:
            self._created.popleft()
        if len(self._created) >= self.rate_limit:
            return self._answer(
                route, 429, {"success": False, "message": "Rate limit exceeded"}, True
            )
        if self.unavailable > 0:
            self.unavailable -= 1
            refused = {"success": False, "message": "No instances available"}
            return self._answer(route, 503, refused, True)
        self._created.append(now)
        return None

    async def _run_task(self, request: Request) -> Response:
        route = "POST run-task"
        config = await self._body(request)
        with self._lock:
            refused = self._refusal(route, request, config)
            if refused is not None:
                return refused
            task = self._new_task(config, time.monotonic())
        return await self._started(route, task, complete_status=True)

    async def _start_session(self, request: Request) -> Response:
        """A session and no task id (an ``initialTask`` is not run by the fake)."""
        route = "POST start-session"
        config = await self._body(request)
        with self._lock:
            refused = self._refusal(route, request, config, task=False)
            if refused is not None:
                return refused
            session_id = f"sess_{uuid.uuid4().hex[:12]}"
            self.sessions.add(session_id)
        body = {
            "success": True,
            "sessionId": session_id,
            "expiresIn": 300000,
            "balance": self.balance,
            "message": "Session started",
        }
        return self._answer(route, 200, body)

    async def _send_message(self, request: Request) -> Response:
        """``actionType: "newTask"`` starts a task in the session; other actions are accepted."""
        route = "POST send-message"
        body = await self._body(request)
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, dict) or "actionType" not in message:
            return self._answer(route, 400, {"success": False, "message": "message required"})
        if body.get("sessionId") not in self.sessions:
            return self._answer(route, 404, {"success": False, "message": "Session not found"})
        if message["actionType"] != "newTask":
            return self._answer(route, 200, {"success": True, "sessionId": body["sessionId"]})
        with self._lock:
            refused = self._refusal(route, request, message)
            if refused is not None:
                return refused
            task = self._new_task(message, time.monotonic(), session_id=body["sessionId"])
        return await self._started(route, task, complete_status=False)

    async def _started(self, route: str, task: FakeTask, *, complete_status: bool) -> Response:
        """The creation answer: the result within ``wait_seconds``, else pending with a pollUrl."""
        spawned = asyncio.create_task(self._finish(task))
        self._background.add(spawned)
        spawned.add_done_callback(self._background.discard)
        ids = {"success": True, "sessionId": task.session_id, "taskId": task.task_id}
        if task.ends - time.monotonic() <= self.wait_seconds:
            # The worst case for the client: the webhook is sent before this answer.
            await asyncio.shield(spawned)
            final = task.final_record()
            result = {k: v for k, v in final.items() if k != "success"}
            status = {"status": "complete"} if complete_status else {}
            return self._answer(route, 200, {**ids, **status, "result": result})
        poll = f"{self.url}/task/{task.session_id}/{task.task_id}"
        pending = {"status": "pending"} if complete_status else {}
        message = "Task is still running. Poll the pollUrl for the result."
        body = {**ids, **pending, "pending": True, "pollUrl": poll, "message": message}
        return self._answer(route, 200, body)

    def _new_task(
        self, config: dict[str, Any], now: float, session_id: str | None = None
    ) -> FakeTask:
        n = len(self.tasks) + 1
        # Exactly ``drop_fraction`` of the tasks so far lose their webhook, spread evenly.
        dropped = int(n * self.drop_fraction) > int((n - 1) * self.drop_fraction)
        output_type, output = make_output(config, n)
        cost = round(0.0011 * n + 0.0003, 6)
        usage = {
            "inputTokens": 1000 + 17 * n,
            "outputTokens": 200 + 3 * n,
            "computeTime": round(1.5 + n / 10, 2),
            "cost": cost,
        }
        self.balance -= cost
        completed = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.task_seconds)
        task = FakeTask(
            number=n,
            session_id=session_id or f"sess_{uuid.uuid4().hex[:12]}",
            task_id=f"task_{uuid.uuid4().hex[:12]}",
            config=config,
            started=now,
            ends=now + self.task_seconds,
            failed="[fail]" in config["taskDetails"],
            output_type=output_type,
            output=output,
            usage=usage,
            completed_at=completed.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            dropped=dropped,
        )
        self.tasks[task.task_id] = task
        return task

    def end(self, task_id: str) -> None:
        """End a task now (its webhook follows): tests hold tasks running, then end them."""
        self.tasks[task_id].ends = time.monotonic()

    async def _finish(self, task: FakeTask) -> None:
        while (left := task.ends - time.monotonic()) > 0:  # `end` may bring it forward
            await asyncio.sleep(min(left, 0.05))
        webhook = task.config.get("webhook")
        if not isinstance(webhook, dict) or not webhook.get("url"):
            task.webhook = "none"
            return
        if task.dropped:
            task.webhook = "dropped"
            return
        mode = webhook.get("submittedData", "full_response")
        body, content_type = task.webhook_body(mode if mode in MODES else "full_response")
        headers = {"Content-Type": content_type}
        if webhook.get("auth"):
            headers["Authorization"] = str(webhook["auth"])
        self.webhooks.append((str(webhook["url"]), headers.get("Authorization", ""), body))
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                response = await client.post(str(webhook["url"]), content=body, headers=headers)
            task.webhook = f"sent {response.status_code}"
        except httpx.HTTPError as exc:  # WebRun never retries: this result is lost
            task.webhook = f"refused {type(exc).__name__}"

    async def _poll(self, request: Request) -> Response:
        self.polls_in_flight += 1
        self.peak_polls_in_flight = max(self.peak_polls_in_flight, self.polls_in_flight)
        try:
            if self.poll_delay:
                await asyncio.sleep(self.poll_delay)
            return self._poll_answer(request)
        finally:
            self.polls_in_flight -= 1

    def _poll_answer(self, request: Request) -> Response:
        route = "GET task"
        if not self._authorised(request):
            return self._answer(route, 401, {"success": False, "message": "Invalid API key"})
        if self.poll_failures:
            status = self.poll_failures.popleft()
            return self._answer(route, status, {"success": False, "message": "try later"}, True)
        task = self.tasks.get(request.path_params["task_id"])
        if task is None or task.session_id != request.path_params["session_id"]:
            return self._answer(route, 404, {"success": False, "message": "Task not found"})
        now = time.monotonic()
        if now < task.ends:
            response = self._answer(route, 200, task.running_record(now))
            self.polled.append(bytes(response.body))
            return response
        response = self._answer(route, 200, task.final_record())
        self.polled.append(bytes(response.body))
        return response

    @contextlib.contextmanager
    def serve(self, port: int = 0) -> Iterator[FakeWebRun]:
        """Run on 127.0.0.1 (``port`` 0: a free one) in a thread; `url` is its base."""
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="fake-webrun", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake WebRun did not start")
            time.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{bound}"
        try:
            yield self
        finally:
            server.should_exit = True
            thread.join(10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake WebRun API on 127.0.0.1 for demos.")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--api-key", default="fake-key")
    parser.add_argument("--drop", type=float, default=0.0, help="fraction of webhooks dropped")
    parser.add_argument("--task-seconds", type=float, default=5.0)
    parser.add_argument("--rate-limit", type=int, default=10, help="creations a minute")
    args = parser.parse_args(argv)
    fake = FakeWebRun(
        api_key=args.api_key,
        drop_fraction=args.drop,
        task_seconds=args.task_seconds,
        rate_limit=args.rate_limit,
    )
    with fake.serve(args.port):
        print(f"fake WebRun on {fake.url} (API key {args.api_key!r}); Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":  # pragma: no cover
    main()
