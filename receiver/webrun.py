"""The receiver's client of WebRun's REST API: creating tasks and polling them.

The one owner of httpx for outbound calls. Every call is bounded: at most
``concurrency`` in flight, polls at most ``rate`` a second, creations at most
WebRun's 10 a minute (a sliding window, so a batch waits instead of being
refused). The API key goes in the ``Authorization`` header and nowhere else:
not in an error message, not in a log line.
"""

from __future__ import annotations

import collections
import email.utils
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from receiver.db import utcnow
from receiver.errors import WebRunError

if TYPE_CHECKING:
    from receiver.settings import Settings

#: WebRun's documented limit on start-session, send-message and run-task.
CREATIONS_PER_MINUTE = 10
#: Statuses worth trying again after a wait; anything else is final.
RETRYABLE = frozenset({429, 500, 502, 503, 504})
#: Longest wait a ``Retry-After`` may impose on one call.
MAX_RETRY_AFTER = 120.0


class Window:
    """At most ``limit`` events in any ``seconds``: `wait` blocks until one more fits.

    Thread-safe. A sliding window rather than a fixed rate, so a burst up to the
    limit goes at once and only what is past it waits.
    """

    def __init__(
        self,
        limit: int,
        seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.limit = max(1, limit)
        self.seconds = seconds
        self._clock = clock
        self._sleep = sleep
        self._times: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def wait(self) -> float:
        """Take a slot, sleeping until there is one; returns the seconds slept."""
        slept = 0.0
        while True:
            with self._lock:
                now = self._clock()
                while self._times and self._times[0] <= now - self.seconds:
                    self._times.popleft()
                if len(self._times) < self.limit:
                    self._times.append(now)
                    return slept
                pause = self._times[0] + self.seconds - now
            self._sleep(pause)
            slept += pause

    def hold_off(self, seconds: float) -> None:
        """Treat the window as full for ``seconds`` (the server said 429)."""
        with self._lock:
            until = self._clock() + seconds - self.seconds
            self._times = collections.deque([until] * self.limit)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` in seconds (delta or HTTP date), capped; None when absent or unreadable."""
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (when - utcnow()).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


@dataclass(frozen=True)
class Created:
    """WebRun's answer to a task creation: ids, and the result if it finished within 50 s."""

    session_id: str
    task_id: str
    status: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Polled:
    """WebRun's answer to ``GET /task/:sessionId/:taskId``, as received."""

    status: int
    body: bytes
    content_type: str | None
    retry_after: float | None


def _message(response: httpx.Response) -> str:
    """WebRun's own ``message``/``error`` for a refusal, else the first bytes of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        text = body.get("message") or body.get("error")
        if isinstance(text, str):
            if "balance" in body:
                return f"{text} (balance {body['balance']})"
            return text[:300]
    return response.text[:200]


class WebRunClient:
    """A bounded, thread-safe client of one WebRun API base URL."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float = 60.0,
        concurrency: int = 4,
        rate: float = 5.0,
        creations: tuple[int, float] = (CREATIONS_PER_MINUTE, 60.0),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max(1, concurrency)),
        )
        self._slots = threading.BoundedSemaphore(max(1, concurrency))
        rate_limit = max(1, round(rate)) if rate >= 1 else 1
        self.polls = Window(rate_limit, 1.0 if rate >= 1 else 1.0 / rate, sleep=sleep)
        # A margin: WebRun counts a creation when it arrives, we when we send it.
        limit, seconds = creations
        self.creations = Window(limit, seconds * 1.02 + 0.1, sleep=sleep)
        self._sleep = sleep

    @classmethod
    def from_settings(cls, settings: Settings) -> WebRunClient:
        """The client `settings` describe; `WebRunError` when RECEIVER_WEBRUN_URL is unset."""
        if settings.webrun_url is None:
            raise WebRunError("RECEIVER_WEBRUN_URL is not set: the receiver makes no calls")
        return cls(
            settings.webrun_url,
            settings.webrun_api_key,
            timeout=settings.webrun_timeout_seconds,
            concurrency=settings.webrun_concurrency,
            rate=settings.webrun_rate,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> WebRunClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, path: str, body: Any = None) -> httpx.Response:
        with self._slots:
            try:
                return self._http.request(method, self.base_url + path, json=body)
            except httpx.TimeoutException as exc:
                raise WebRunError(f"WebRun did not answer {method} {path} in time") from exc
            except httpx.HTTPError as exc:
                raise WebRunError(f"could not reach WebRun: {type(exc).__name__}") from exc

    def run_task(self, config: Mapping[str, Any], *, retries: int = 3) -> Created:
        """``POST /start/run-task``; waits out 429 and 503 up to ``retries`` times.

        A timeout is not retried: the task may have been created, and a second
        try would launch it twice.
        """
        attempt = 0
        while True:
            self.creations.wait()
            response = self._send("POST", "/start/run-task", dict(config))
            if response.status_code in (429, 503) and attempt < retries:
                attempt += 1
                wait = retry_after(response.headers)
                if wait is None:
                    wait = min(2.0**attempt, 30.0)
                if response.status_code == 429:
                    self.creations.hold_off(wait)
                else:
                    self._sleep(wait)
                continue
            return _created(response)

    def get_task(self, session_id: str, task_id: str) -> Polled:
        """``GET /task/:sessionId/:taskId``, any status: the caller decides what it means."""
        self.polls.wait()
        path = "/task/{}/{}".format(
            urllib.parse.quote(session_id, safe=""), urllib.parse.quote(task_id, safe="")
        )
        response = self._send("GET", path)
        return Polled(
            response.status_code,
            response.content,
            response.headers.get("content-type"),
            retry_after(response.headers),
        )


def _created(response: httpx.Response) -> Created:
    if response.status_code != 200:
        raise WebRunError(
            f"WebRun answered {response.status_code}: {_message(response)}",
            status=response.status_code,
            retry_after=retry_after(response.headers),
        )
    try:
        body = response.json()
    except ValueError:
        raise WebRunError("WebRun's answer is not JSON", status=200) from None
    session_id = body.get("sessionId") if isinstance(body, dict) else None
    task_id = body.get("taskId") if isinstance(body, dict) else None
    if not (isinstance(session_id, str) and isinstance(task_id, str)):
        raise WebRunError(f"WebRun's answer has no sessionId/taskId: {json.dumps(body)[:200]}")
    status = body.get("status")
    return Created(session_id, task_id, status if isinstance(status, str) else "pending", body)
