"""The reconciler: fetch from WebRun what its webhooks did not bring.

WebRun never retries a webhook. For every run (`receiver.runs`) still
``launched`` once its final record is overdue (``expected_by``), or as soon as
a delivery without the result or cost arrived (``just_ping``, ``ai_response``),
it calls ``GET /task/:sessionId/:taskId``. Each answer is committed through
the ledger like a delivery (the exact bytes, a ``x-receiver-fetched`` header,
the run's labels plus ``session_id``/``task_id``/``via=reconciled``), so the
same pipeline processes it, and it is kept, reprocessable and exported like
any other. A non-final answer reschedules with backoff; 429, 5xx and timeouts
back off too (``Retry-After`` respected); 404 ``LOST_AFTER`` times makes the
run ``lost``. It runs in its own thread and writes through the ledger's queue,
so a WebRun outage never holds up ingest.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Engine, and_, func, insert, select, update

from receiver.classify import classify
from receiver.correlation import VIA_LABEL
from receiver.db import utcnow
from receiver.errors import ReceiverError, WebRunError
from receiver.ledger import RawDelivery, Recorded, new_delivery_id
from receiver.models import Run, RunState, Task
from receiver.runs import MAX_DURATION_MS, tracked_row, webhook_query
from receiver.settings import Settings
from receiver.states import DeliveryStatus
from receiver.webrun import WebRunClient

log = logging.getLogger("receiver.reconcile")

#: 404 answers before a run is declared lost (WebRun may not know a task for a moment).
LOST_AFTER = 3
#: Longest wait between two polls of one run.
MAX_BACKOFF_SECONDS = 600.0
#: Runs polled in one pass at most (the rest wait for the next pass).
BATCH = 200
#: How far back each pass looks for tasks first seen in a delivery and not yet watched.
TRACK_WINDOW = dt.timedelta(minutes=10)
#: Header marking a ledger row as fetched from WebRun, not delivered by it.
FETCHED_HEADER = "x-receiver-fetched"
#: Task statuses after which nothing more is expected.
FINAL_STATUSES = ("completed", "failed")

#: Commits deliveries and says what became of each (`Ledger.record_sync`).
Record = Callable[[Sequence[RawDelivery]], list[Recorded]]


class CallOutcome(StrEnum):
    """What one poll of WebRun came to, as counted in ``/metrics``."""

    FINAL = "final"
    RUNNING = "running"
    NOT_FOUND = "not_found"
    LOST = "lost"
    THROTTLED = "throttled"
    UNAVAILABLE = "unavailable"
    REFUSED = "refused"
    ERROR = "error"


@dataclass(frozen=True)
class Snapshot:
    """Runs by state and the oldest overdue run's age, as of the last pass (for /metrics)."""

    by_state: dict[str, int]
    oldest_overdue_seconds: float


def backoff(attempts: int, interval: float, retry_after: float | None = None) -> float:
    """Seconds until the next poll: doubling from ``interval``, capped; ``Retry-After`` wins."""
    delay = min(interval * 2.0 ** min(attempts, 10), MAX_BACKOFF_SECONDS)
    return max(delay, retry_after or 0.0)


def is_final(body: bytes, content_type: str | None) -> bool:
    """Whether a poll answer is a task's final record (completed or failed)."""
    try:
        envelope = classify(body, content_type)
    except ReceiverError:
        return False
    return envelope.status is not None and str(envelope.status) in FINAL_STATUSES


def fetched_query(run_id: str, labels: dict[str, str], session_id: str, task_id: str) -> str:
    """The labels of a fetched answer: the run's, its ids, and ``via=reconciled``."""
    extra = {**labels, "session_id": session_id, "task_id": task_id}
    extra[VIA_LABEL] = str(RunState.RECONCILED)
    return webhook_query(run_id, extra)


class Reconciler:
    """Polls WebRun for overdue runs; `run_once` is one pass, `start` runs passes in a thread.

    ``clock`` is what a pass takes as now (due times, backoff): tests step it
    instead of sleeping, so no assertion depends on how fast the machine is.
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        client: WebRunClient,
        record: Record,
        *,
        on_call: Callable[[str], None] | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.settings = settings
        self.client = client
        self.record = record
        self.on_call = on_call
        self.interval = settings.reconcile_interval_seconds
        self.snapshot = Snapshot({}, 0.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, settings.webrun_concurrency), thread_name_prefix="reconcile"
        )
        self._tracked_since: dt.datetime | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="reconciler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop after the current pass, without waiting on polls WebRun is slow to answer:
        a run whose answer was not recorded is polled again after the next start."""
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # the database is away, say: try again next pass
                log.warning("reconciliation pass failed", exc_info=True)
            self._stop.wait(self.interval)

    def run_once(self) -> dict[str, int]:
        """One pass: watch new tasks, settle what arrived, poll what is due. Outcomes counted."""
        now = self.clock()
        self.track_seen(now)
        self.settle(now)
        due = self.due(now)
        outcomes: dict[str, int] = {}
        for called in self._pool.map(self.check, due):
            outcome = str(called)  # plain strings: printed and counted as such
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if self.on_call is not None:
                self.on_call(outcome)
        self.snapshot = self.take_snapshot(self.clock())
        return outcomes

    def track_seen(self, now: dt.datetime) -> int:
        """Watch every task a delivery named that no run knows (launched by another tool)."""
        since = self._tracked_since or now - dt.timedelta(days=1)
        self._tracked_since = now - TRACK_WINDOW
        known = select(Run.id).where(Run.session_id == Task.session_id, Run.task_id == Task.task_id)
        query = select(
            Task.hook,
            Task.session_id,
            Task.task_id,
            Task.first_seen_at,
            Task.status,
            Task.cost_usd,
            Task.labels,
        ).where(
            Task.first_seen_at >= since,
            Task.session_id.is_not(None),
            Task.task_id.is_not(None),
            ~known.exists(),
        )
        grace = dt.timedelta(seconds=self.settings.reconcile_grace_seconds)
        with self.engine.begin() as conn:
            rows = conn.execute(query).all()
            for row in rows:
                done = row.status in FINAL_STATUSES and row.cost_usd is not None
                expected = row.first_seen_at + dt.timedelta(milliseconds=MAX_DURATION_MS) + grace
                labels = {k: v for k, v in json.loads(row.labels).items() if isinstance(v, str)}
                conn.execute(
                    insert(Run).values(
                        tracked_row(
                            new_delivery_id(),
                            row.hook,
                            row.session_id,
                            row.task_id,
                            expected,
                            now,
                            labels=labels,
                            state=RunState.DELIVERED if done else RunState.LAUNCHED,
                            # A delivery came, so the task has ended: no need to wait.
                            next_check_at=now,
                        )
                    )
                )
        return len(rows)

    def settle(self, now: dt.datetime) -> None:
        """Mark runs whose final record was delivered; poll at once those that got a
        delivery without it; give up on launches that never got WebRun's answer."""
        task = and_(Task.session_id == Run.session_id, Task.task_id == Run.task_id)
        launched = Run.state == RunState.LAUNCHED
        final = Task.status.in_(FINAL_STATUSES) & Task.cost_usd.is_not(None)
        with self.engine.begin() as conn:
            delivered = select(Task.task_key).where(task, final).exists()
            conn.execute(
                update(Run)
                .where(launched, delivered)
                .values(state=RunState.DELIVERED, next_check_at=None, updated_at=now)
            )
            # A ping or an ai_response: the task has ended but its record is still to fetch.
            arrived = select(Task.task_key).where(task).exists()
            conn.execute(
                update(Run)
                .where(launched, Run.attempts == 0, Run.next_check_at > now, arrived)
                .values(next_check_at=now, updated_at=now)
            )
            stale = now - dt.timedelta(seconds=self.settings.webrun_timeout_seconds + 60)
            conn.execute(
                update(Run)
                .where(launched, Run.task_id.is_(None), Run.created_at < stale)
                .values(
                    state=RunState.LAUNCH_FAILED,
                    next_check_at=None,
                    last_error="launch interrupted: WebRun's answer was never recorded",
                    updated_at=now,
                )
            )

    def due(self, now: dt.datetime) -> list[Any]:
        query = (
            select(Run.id, Run.session_id, Run.task_id, Run.hook, Run.labels, Run.attempts)
            .where(
                Run.state == RunState.LAUNCHED,
                Run.next_check_at <= now,
                Run.task_id.is_not(None),
                Run.session_id.is_not(None),
            )
            .order_by(Run.next_check_at)
            .limit(BATCH)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(query).all())

    def check(self, run: Any) -> str:
        """Poll one run and act on the answer; returns the `CallOutcome`."""
        try:
            polled = self.client.get_task(run.session_id, run.task_id)
        except WebRunError as exc:
            self._reschedule(run, str(exc))
            return CallOutcome.ERROR
        status = polled.status
        if status == 200:
            labels = json.loads(run.labels)
            delivery = RawDelivery(
                hook=run.hook,
                body=polled.body,
                content_type=polled.content_type,
                headers=((FETCHED_HEADER, f"GET /task/{run.session_id}/{run.task_id}"),),
                query_string=fetched_query(run.id, labels, run.session_id, run.task_id),
            )
            try:
                self.record([delivery])
            except ReceiverError as exc:  # the database is away: poll again later
                self._reschedule(run, f"could not record WebRun's answer: {exc}")
                return CallOutcome.ERROR
            if is_final(polled.body, polled.content_type):
                log.info("run %s reconciled: its final record was fetched from WebRun", run.id)
                self._update(
                    run.id,
                    state=RunState.RECONCILED,
                    attempts=run.attempts + 1,
                    next_check_at=None,
                    last_error=None,
                )
                return CallOutcome.FINAL
            self._reschedule(run, None)
            return CallOutcome.RUNNING
        error = f"WebRun answered {status} to GET /task"
        if status == 404:
            if run.attempts + 1 >= LOST_AFTER:
                log.warning("run %s lost: WebRun answered 404 %d times", run.id, LOST_AFTER)
                self._update(
                    run.id,
                    state=RunState.LOST,
                    attempts=run.attempts + 1,
                    next_check_at=None,
                    last_error=f"{error} {run.attempts + 1} times: WebRun does not know the task",
                )
                return CallOutcome.LOST
            self._reschedule(run, error)
            return CallOutcome.NOT_FOUND
        if status == 429:
            self.client.polls.hold_off(polled.retry_after or self.interval)
            self._reschedule(run, error, polled.retry_after)
            return CallOutcome.THROTTLED
        self._reschedule(run, error, polled.retry_after)
        return CallOutcome.UNAVAILABLE if status >= 500 else CallOutcome.REFUSED

    def _reschedule(self, run: Any, error: str | None, retry_after: float | None = None) -> None:
        delay = backoff(run.attempts, self.interval, retry_after)
        self._update(
            run.id,
            attempts=run.attempts + 1,
            next_check_at=self.clock() + dt.timedelta(seconds=delay),
            last_error=error,
        )

    def _update(self, run_id: str, **values: Any) -> None:
        """Change a run still ``launched``: one settled meanwhile (another worker, a
        webhook) keeps its state, so states only move forward."""
        with self.engine.begin() as conn:
            conn.execute(
                update(Run)
                .where(Run.id == run_id, Run.state == RunState.LAUNCHED)
                .values(updated_at=self.clock(), **values)
            )

    def take_snapshot(self, now: dt.datetime) -> Snapshot:
        with self.engine.connect() as conn:
            counted = conn.execute(select(Run.state, func.count()).group_by(Run.state))
            by_state = {str(row[0]): int(row[1]) for row in counted}
            oldest = conn.scalar(
                select(func.min(Run.expected_by)).where(
                    Run.state == RunState.LAUNCHED, Run.expected_by < now
                )
            )
        if oldest is not None and oldest.tzinfo is None:  # SQLite hands back naive UTC
            oldest = oldest.replace(tzinfo=dt.UTC)
        age = (now - oldest).total_seconds() if oldest is not None else 0.0
        return Snapshot(by_state, max(age, 0.0))


@contextlib.contextmanager
def standalone(engine: Engine, settings: Settings) -> Iterator[Callable[[], dict[str, int]]]:
    """A reconciler outside `serve`, with a ledger and a pipeline of its own.

    Yields ``one_pass``: a pass, then a wait until the pipeline has processed
    what it fetched. `WebRunError` when RECEIVER_WEBRUN_URL is unset.
    """
    from receiver.ledger import Ledger
    from receiver.pipeline import Pipeline

    client = WebRunClient.from_settings(settings)
    pipeline = Pipeline(engine, max_depth=settings.max_depth)

    def committed(deliveries: Sequence[RawDelivery], results: list[Recorded]) -> None:
        stored = zip(deliveries, results, strict=True)
        pipeline.submit_committed(d for d, r in stored if r.status == DeliveryStatus.STORED)

    ledger = Ledger(engine, on_committed=committed)
    reconciler = Reconciler(engine, settings, client, ledger.record_sync)

    def one_pass() -> dict[str, int]:
        outcomes = reconciler.run_once()
        pipeline.join()
        return outcomes

    pipeline.start()
    ledger.start()
    try:
        yield one_pass
    finally:
        reconciler.stop()
        client.close()
        ledger.stop()
        pipeline.stop()


def reconcile_once(engine: Engine, settings: Settings) -> dict[str, int]:
    """One reconciliation pass outside `serve` (``receiver reconcile --once``): outcomes counted."""
    with standalone(engine, settings) as one_pass:
        return one_pass()
