"""Retention: remove old raw bodies in small batches, keep everything said about them.

`prune` empties ``deliveries.body`` of deliveries received before a cutoff
that are done with (``processed`` or ``duplicate``; ``quarantined`` only on
request, since a quarantined body is the one a fix still needs) and stamps
``body_pruned_at``. Every other column stays: id, hook, time, size, SHA-256,
headers, labels, status, and the dedupe keys, so a redelivery of a pruned
body is still answered ``duplicate``. Nothing derived is touched: tasks,
outputs, result rows, events and rollups stay as they are (``outputs`` is
derived data, the only table a ``text`` output lives in, so it stays too).

The work goes in batches, each its own short write transaction found by
walking the primary key (ids are time-ordered), so ingest waits at most one
batch for SQLite's write lock, and an interrupted prune is simply run again.
On PostgreSQL each batch locks its rows ``FOR UPDATE SKIP LOCKED``: two
prunes at once (several receivers on one database) share the rows between
them instead of waiting on each other, and a row another transaction holds
is left for the next run.

`vacuum` gives the space back afterwards; `RetentionWorker` is what
``serve`` runs when ``RECEIVER_RETENTION`` is set.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, func, select, update

from receiver.db import reclaim_space, unlocked, utcnow, write_transaction
from receiver.models import Delivery
from receiver.settings import parse_duration
from receiver.states import DeliveryStatus

__all__ = [
    "PruneReport",
    "RetentionWorker",
    "VacuumReport",
    "parse_duration",
    "plan",
    "prune",
    "vacuum",
]

log = logging.getLogger("receiver.retention")

#: Statuses whose body is done with: a processed delivery's rows exist, a duplicate's first has it.
DONE = (DeliveryStatus.PROCESSED.value, DeliveryStatus.DUPLICATE.value)
QUARANTINED = DeliveryStatus.QUARANTINED.value
#: Deliveries per batch (`prune`); the automatic prune uses smaller ones.
BATCH = 500
#: Between batches: lets a waiting writer (the ledger) take SQLite's lock first.
PAUSE_SECONDS = 0.005

#: Told ``(deliveries, bytes, planned)`` after each batch: pruned so far, and deliveries to prune.
Progress = Callable[[int, int, int], None]


@dataclass(frozen=True)
class VacuumReport:
    """Bytes the database (SQLite) or the pruned tables (PostgreSQL) took before and after."""

    method: str
    bytes_before: int
    bytes_after: int


@dataclass
class PruneReport:
    """What a prune removed (or, with ``dry_run``, would remove)."""

    cutoff: dt.datetime
    dry_run: bool
    include_quarantined: bool
    #: Deliveries whose body was (or would be) removed, and the bytes of those bodies.
    deliveries: int = 0
    bytes: int = 0
    batches: int = 0
    #: Deliveries received before the cutoff that keep their body (quarantined, not yet processed).
    kept: int = 0
    vacuum: VacuumReport | None = None

    def rows(self) -> list[list[Any]]:
        """The summary as (name, value) rows for a table."""
        rows: list[list[Any]] = [[k, v] for k, v in self.as_dict().items() if k != "vacuum"]
        if self.vacuum is not None:
            rows += [
                ["vacuum", self.vacuum.method],
                ["bytes before", f"{self.vacuum.bytes_before:,}"],
                ["bytes after", f"{self.vacuum.bytes_after:,}"],
            ]
        return rows

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cutoff": self.cutoff.isoformat(),
            "dry_run": self.dry_run,
            "include_quarantined": self.include_quarantined,
            "deliveries": self.deliveries,
            "bytes": self.bytes,
            "batches": self.batches,
            "kept": self.kept,
        }
        if self.vacuum is not None:
            out["vacuum"] = {
                "method": self.vacuum.method,
                "bytes_before": self.vacuum.bytes_before,
                "bytes_after": self.vacuum.bytes_after,
            }
        return out


def _prunable(
    cutoff: dt.datetime, include_quarantined: bool, *, walk: bool = False
) -> ColumnElement[bool]:
    """The deliveries a prune at ``cutoff`` takes.

    ``walk``: the status test is wrapped so no index can serve it. With it bare,
    SQLite searched ``ix_deliveries_status`` and sorted every processed delivery
    for each batch (200 batches of 500: 32 s at 100,000 deliveries); wrapped, each
    batch reads the next rows along the primary key.
    """
    statuses = (*DONE, QUARANTINED) if include_quarantined else DONE
    status = func.coalesce(Delivery.status, "") if walk else Delivery.status
    return and_(
        Delivery.received_at < cutoff,
        Delivery.body_pruned_at.is_(None),
        status.in_(statuses),
    )


def plan(
    engine: Engine, cutoff: dt.datetime, *, include_quarantined: bool = False
) -> tuple[int, int, int]:
    """Deliveries and body bytes a prune at ``cutoff`` would remove, and deliveries it keeps."""
    with engine.connect() as conn:
        count, size = conn.execute(
            select(func.count(), func.coalesce(func.sum(Delivery.body_size), 0)).where(
                _prunable(cutoff, include_quarantined)
            )
        ).one()
        kept = conn.scalar(
            select(func.count()).where(
                Delivery.received_at < cutoff,
                Delivery.body_pruned_at.is_(None),
                ~_prunable(cutoff, include_quarantined),
            )
        )
    return int(count), int(size), int(kept or 0)


def prune(
    engine: Engine,
    cutoff: dt.datetime,
    *,
    include_quarantined: bool = False,
    dry_run: bool = False,
    batch_size: int = BATCH,
    progress: Progress | None = None,
    pause: Callable[[], None] | None = None,
    stop: threading.Event | None = None,
) -> PruneReport:
    """Remove the bodies of done deliveries received before ``cutoff`` (see the module).

    ``pause`` runs between batches (default: a few milliseconds' sleep, so a
    waiting ingest goes first); ``stop`` set ends the prune after its batch.
    """
    report = PruneReport(cutoff, dry_run, include_quarantined)
    planned, size, report.kept = plan(engine, cutoff, include_quarantined=include_quarantined)
    if dry_run:
        report.deliveries, report.bytes = planned, size
        return report
    last = ""
    condition = _prunable(cutoff, include_quarantined)
    walk = _prunable(cutoff, include_quarantined, walk=True)
    while stop is None or not stop.is_set():
        # Found outside the write transaction: on SQLite the scan never holds the write lock.
        with engine.connect() as conn:
            ids = list(
                conn.scalars(
                    select(Delivery.id)
                    .where(Delivery.id > last, walk)
                    .order_by(Delivery.id)
                    .limit(batch_size)
                )
            )
        if not ids:
            break
        last = ids[-1]
        removed, removed_bytes = _prune_batch(engine, ids, condition)
        report.batches += 1
        report.deliveries += removed
        report.bytes += removed_bytes
        if progress is not None:
            progress(report.deliveries, report.bytes, planned)
        if pause is None:
            time.sleep(PAUSE_SECONDS)
        else:
            pause()
    return report


def _prune_batch(engine: Engine, ids: list[str], condition: ColumnElement[bool]) -> tuple[int, int]:
    """Empty the bodies of ``ids`` still prunable, in one transaction; (count, bytes)."""
    # Rows another prune (or a reprocess) holds are skipped, not waited for.
    target = unlocked(engine, Delivery.id, Delivery.id.in_(ids), condition)
    statement = (
        update(Delivery)
        .where(target, condition)
        .values(body=b"", body_pruned_at=utcnow())
        .returning(Delivery.body_size)
    )
    with engine.connect() as conn, write_transaction(conn):
        sizes = list(conn.scalars(statement))
    return len(sizes), sum(sizes)


def vacuum(engine: Engine) -> VacuumReport:
    """Give the space of pruned bodies back (`receiver.db.reclaim_space`); the size before, after.

    On SQLite it holds the write lock throughout: ingest waits, and past
    ``LEDGER_WAIT_SECONDS`` spools. PostgreSQL's takes no lock ingest waits for.
    """
    return VacuumReport(*reclaim_space(engine, "deliveries"))


#: How often the automatic prune runs (and once at start).
PERIOD = dt.timedelta(days=1)
#: The automatic prune's batches: small, so each write transaction is short.
WORKER_BATCH = 100
#: The automatic prune's pause between batches, longer while ingest is busy.
WORKER_PAUSE_SECONDS = 0.05


class RetentionWorker:
    """Prunes bodies older than ``retention`` at start and every ``period``, in its own thread.

    Low priority: small batches with a pause between them, longer while
    ``busy()`` (the ledger has deliveries waiting), and the thread lowers its
    own OS scheduling priority. Never vacuums (that would block ingest).
    """

    thread_name = "retention"

    def __init__(
        self,
        engine: Engine,
        retention: dt.timedelta,
        *,
        busy: Callable[[], bool] | None = None,
        period: dt.timedelta = PERIOD,
        batch_size: int = WORKER_BATCH,
    ) -> None:
        self.engine = engine
        self.retention = retention
        self.busy = busy
        self.period = period
        self.batch_size = batch_size
        self.runs = 0
        self.last: PruneReport | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop after the current batch."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _pause(self) -> None:
        deadline = time.monotonic() + 1.0
        self._stop.wait(WORKER_PAUSE_SECONDS)
        while self.busy is not None and self.busy() and time.monotonic() < deadline:
            self._stop.wait(WORKER_PAUSE_SECONDS)

    def run_once(self) -> PruneReport:
        """One prune of what is older than the retention, as the thread does it."""
        report = prune(
            self.engine,
            utcnow() - self.retention,
            batch_size=self.batch_size,
            pause=self._pause,
            stop=self._stop,
        )
        self.runs += 1
        self.last = report
        log.info(
            "retention: pruned %d bodies (%d bytes) received before %s",
            report.deliveries,
            report.bytes,
            report.cutoff.isoformat(),
        )
        return report

    def _run(self) -> None:
        # Lower this thread's priority only (Linux: a thread id is a process id to setpriority).
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # the database may be away: try again next period
                log.exception("retention prune failed")
            self._stop.wait(self.period.total_seconds())
