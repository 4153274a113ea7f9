"""Prometheus metrics served on ``GET /metrics``.

The delivery counters add up. Every POST to ``/hooks/{name}`` counts once in
``received`` and, exactly once, in one of ``duplicate``, ``spooled`` or
``rejected{reason}`` when it is answered, or, for a delivery committed as new,
in ``stored`` or ``quarantined`` when the pipeline has processed it
(quarantine is decided after the 2xx). Until then it is counted in the
``processing`` gauge, so at any moment::

    received = stored + quarantined + processing + spooled + duplicate + sum(rejected)

and once the pipeline is idle (``processing`` is 0) the issue's equation holds.
Deliveries the pipeline processes that this process did not answer (a spool
drain, a backlog after a restart) count only in ``receiver_pipeline_processed_total``.

With ``serve --workers N`` each worker is a process: `serve` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder and every worker's scrape
answers the sum over all workers (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from receiver.states import DeliveryStatus

#: The environment variable prometheus_client itself reads at import time.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: HTTP status of a refused delivery -> the ``reason`` label of ``rejected``.
REJECT_REASONS = {
    401: "auth",
    413: "size",
    404: "hook_name",
    400: "disconnected",
    408: "timeout",
    503: "unavailable",
}
#: Any other refusal (a bug answered 500).
OTHER_REASON = "error"

#: WebRun waits 30 s, so the top bucket is 30.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: How many processed-before-answered outcomes to remember (claimed within milliseconds).
_EARLY_LIMIT = 10_000


def multiprocess_dir() -> str | None:
    """The multiprocess folder prometheus_client is using, if any."""
    return os.environ.get(MULTIPROC_ENV) or None


class SpoolCollector(Collector):
    """Spool backlog and age, read at scrape time from whatever ``spool()`` returns."""

    def __init__(self, spool: Callable[[], Any]) -> None:
        self.spool = spool

    def describe(self) -> Iterable[Metric]:
        # Registering must not call ``spool()``: the app may not be built yet.
        yield GaugeMetricFamily("receiver_spool_backlog", "")
        yield GaugeMetricFamily("receiver_spool_oldest_age_seconds", "")

    def collect(self) -> Iterable[Metric]:
        spool = self.spool()
        backlog = getattr(spool, "backlog", None)
        oldest = getattr(spool, "oldest_age_seconds", None)
        yield GaugeMetricFamily(
            "receiver_spool_backlog",
            "Deliveries answered 2xx from the spool and not yet in the database.",
            value=float(backlog()) if callable(backlog) else 0.0,
        )
        age = oldest() if callable(oldest) else None
        yield GaugeMetricFamily(
            "receiver_spool_oldest_age_seconds",
            "Age of the oldest spooled delivery (0 when the spool is empty).",
            value=float(age or 0.0),
        )


#: A value read at scrape time: metric name -> (help, reader). Counters drop ``_total``.
Scraped = dict[str, tuple[str, Callable[[], float]]]


class ScrapedCollector(Collector):
    """Counters and gauges owned elsewhere (the log handler, the connection limiter), read
    when scraped. A name ending in ``_total`` is a counter, any other a gauge."""

    def __init__(self, values: Scraped) -> None:
        self.values = values

    def describe(self) -> Iterable[Metric]:
        # Registering must not read the values: their owners may not be built yet.
        for name, (text, _) in self.values.items():
            if name.endswith("_total"):
                yield CounterMetricFamily(name.removesuffix("_total"), text)
            else:
                yield GaugeMetricFamily(name, text)

    def collect(self) -> Iterable[Metric]:
        for name, (text, read) in self.values.items():
            if name.endswith("_total"):
                yield CounterMetricFamily(name.removesuffix("_total"), text, value=float(read()))
            else:
                yield GaugeMetricFamily(name, text, value=float(read()))


class RunsCollector(Collector):
    """Runs by state and the oldest overdue run's age, from the reconciler's last pass.

    Read from memory, never from the database: a scrape must not wait on it.
    """

    def __init__(self, reconciler: Callable[[], Any]) -> None:
        self.reconciler = reconciler

    def describe(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("receiver_runs", "", labels=["state"])
        yield GaugeMetricFamily("receiver_runs_oldest_overdue_seconds", "")

    def collect(self) -> Iterable[Metric]:
        snapshot = getattr(self.reconciler(), "snapshot", None)
        runs = GaugeMetricFamily(
            "receiver_runs",
            "WebRun runs by state (launched, delivered, reconciled, lost, launch_failed).",
            labels=["state"],
        )
        for state, count in sorted(getattr(snapshot, "by_state", {}).items()):
            runs.add_metric([state], float(count))
        yield runs
        yield GaugeMetricFamily(
            "receiver_runs_oldest_overdue_seconds",
            "How long the oldest launched run has been past its expected_by (0: none).",
            value=float(getattr(snapshot, "oldest_overdue_seconds", 0.0)),
        )


class Metrics:
    """The receiver's counters; one per app, so tests and apps never share state."""

    def __init__(
        self,
        spool: Callable[[], Any] = lambda: None,
        scraped: Scraped | None = None,
        reconciler: Callable[[], Any] = lambda: None,
    ) -> None:
        self._multiproc = multiprocess_dir()
        # In multiprocess mode values live in files; the metrics must not sit in the
        # registry that is scraped, or this process's values would count twice.
        self.registry = CollectorRegistry(auto_describe=True)
        own = None if self._multiproc else self.registry
        self._spool = SpoolCollector(spool)
        self._scraped = ScrapedCollector(scraped or {})
        self._runs = RunsCollector(reconciler)
        if not self._multiproc:
            self.registry.register(self._spool)
            self.registry.register(self._scraped)
            self.registry.register(self._runs)
        self.received = Counter(
            "receiver_deliveries_received", "POSTs to /hooks/{name}.", registry=own
        )
        self.stored = Counter(
            "receiver_deliveries_stored",
            "Deliveries committed as new and processed without quarantine.",
            registry=own,
        )
        self.quarantined = Counter(
            "receiver_deliveries_quarantined",
            "Deliveries committed as new, then quarantined by the pipeline.",
            registry=own,
        )
        self.duplicate = Counter(
            "receiver_deliveries_duplicate", "Deliveries committed as duplicates.", registry=own
        )
        self.spooled = Counter(
            "receiver_deliveries_spooled",
            "Deliveries answered 2xx from the local spool (database unavailable).",
            registry=own,
        )
        self.rejected = Counter(
            "receiver_deliveries_rejected",
            "Deliveries refused, nothing stored; reason auth, size, hook_name,"
            " disconnected, timeout, unavailable or error.",
            ["reason"],
            registry=own,
        )
        for reason in (*REJECT_REASONS.values(), OTHER_REASON):
            self.rejected.labels(reason)
        self.processing = Gauge(
            "receiver_deliveries_processing",
            "Deliveries answered as stored whose processing has not finished.",
            registry=own,
            multiprocess_mode="livesum",
        )
        self.processed = Counter(
            "receiver_pipeline_processed",
            "Pipeline runs by outcome (processed, quarantined, failed), any origin.",
            ["outcome"],
            registry=own,
        )
        self.latency = Histogram(
            "receiver_request_duration_seconds",
            "Time to answer a POST to /hooks/{name}.",
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        self.reconcile_calls = Counter(
            "receiver_reconcile_calls",
            "Polls of WebRun by the reconciler, by outcome (final, running, not_found, lost,"
            " throttled, unavailable, refused, error).",
            ["outcome"],
            registry=own,
        )
        self._lock = threading.Lock()
        self._awaiting: set[str] = set()
        self._early: OrderedDict[str, str] = OrderedDict()

    def delivery_answered(
        self, http_status: int, status: str | None, delivery_id: str | None, seconds: float
    ) -> None:
        """Count one answered POST; ``status`` is the answer's (stored, duplicate, spooled)."""
        self.received.inc()
        self.latency.observe(seconds)
        if http_status != 200 or status is None:
            self.rejected.labels(REJECT_REASONS.get(http_status, OTHER_REASON)).inc()
        elif status == DeliveryStatus.DUPLICATE:
            self.duplicate.inc()
        elif status == "spooled":
            self.spooled.inc()
        elif status == DeliveryStatus.STORED and delivery_id is not None:
            with self._lock:
                early = self._early.pop(delivery_id, None)
                if early is None:
                    self._awaiting.add(delivery_id)
                    self.processing.inc()
            if early is not None:
                self._count_final(early)
        else:
            self.rejected.labels(OTHER_REASON).inc()

    def delivery_processed(self, delivery_id: str, outcome: str) -> None:
        """Count one pipeline outcome (processed, quarantined or failed)."""
        self.processed.labels(outcome).inc()
        with self._lock:
            mine = delivery_id in self._awaiting
            if mine:
                self._awaiting.discard(delivery_id)
                self.processing.dec()
            else:
                # Processed before its request was answered, or not from this edge at all.
                self._early[delivery_id] = outcome
                while len(self._early) > _EARLY_LIMIT:
                    self._early.popitem(last=False)
        if mine:
            self._count_final(outcome)

    def reconcile_call(self, outcome: str) -> None:
        """Count one poll of WebRun by the reconciler."""
        self.reconcile_calls.labels(outcome).inc()

    def _count_final(self, outcome: str) -> None:
        # A delivery that failed to process is still stored (retried on reprocess).
        (self.quarantined if outcome == DeliveryStatus.QUARANTINED else self.stored).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        if self._multiproc:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self._multiproc)  # type: ignore[no-untyped-call]
            registry.register(self._spool)
            registry.register(self._scraped)  # this worker's own
            registry.register(self._runs)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
