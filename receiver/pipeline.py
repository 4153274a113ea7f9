"""After the commit: a worker thread that processes stored deliveries in the background.

Off the request path, in arrival order and in batches (`receiver.processing`
does the work); bodies the ledger has just committed are kept in hand so
they need not be read back.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable

from sqlalchemy import Engine, select

from receiver.db import utcnow
from receiver.ledger import RawDelivery
from receiver.models import Delivery
from receiver.processing import process_deliveries
from receiver.settings import DEFAULT_MAX_BODY_BYTES
from receiver.states import DeliveryStatus
from receiver.workers import QueueWorker

log = logging.getLogger("receiver.pipeline")

#: How often a pipeline yielding to ingest looks again.
YIELD_POLL_SECONDS = 0.05
#: Bodies of committed deliveries kept in memory until processed (`Pipeline.submit_committed`).
HELD_BYTES = 64 * 2**20
#: A body this big is processed in a transaction of its own (`Pipeline._chunk`).
BIG_BODY_BYTES = 16 * 2**10


def unprocessed_ids(engine: Engine, received_before: dt.datetime | None = None) -> list[str]:
    """Deliveries still ``stored`` (received before ``received_before``), oldest first."""
    query = select(Delivery.id).where(Delivery.status == DeliveryStatus.STORED)
    if received_before is not None:
        query = query.where(Delivery.received_at < received_before)
    with engine.connect() as conn:
        return list(conn.scalars(query.order_by(Delivery.id).limit(100_000)))


class Pipeline(QueueWorker[str]):
    """A worker thread that processes committed deliveries in arrival order, in batches.

    Ingest comes first: while ``busy()`` says the ledger has deliveries waiting
    to be committed, a batch waits (up to ``max_yield`` seconds) so that the
    two do not fight over SQLite's write lock and the GIL.
    """

    thread_name = "pipeline"

    def __init__(
        self,
        engine: Engine,
        *,
        max_depth: int,
        on_processed: Callable[[str, str], None] | None = None,
        busy: Callable[[], bool] | None = None,
        batch_size: int = 64,
        busy_batch_size: int = 8,
        max_yield: float = 0.5,
        sweep_seconds: float = 60.0,
        held_bytes: int = HELD_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.engine = engine
        self.max_depth = max_depth
        #: Told ``(delivery_id, outcome)`` after each run: processed, quarantined or failed.
        self.on_processed = on_processed
        self.busy = busy
        self.batch_size = batch_size
        self.busy_batch_size = busy_batch_size
        self.max_yield = max_yield
        self.sweep_seconds = sweep_seconds
        self.held_bytes = held_bytes
        self.max_body_bytes = max_body_bytes
        super().__init__(queue.Queue())
        self._queue: queue.Queue[str | None]
        self._bodies: dict[str, bytes] = {}
        self._held = 0
        self._lock = threading.Lock()

    def submit(self, delivery_ids: Iterable[str]) -> None:
        for delivery_id in delivery_ids:
            self._queue.put(delivery_id)

    def submit_committed(self, deliveries: Iterable[RawDelivery]) -> None:
        """Queue deliveries the ledger has just committed, keeping their bodies in hand.

        Reading a body back costs as much as writing it (16 ms for a 3.3 MB one on
        PostgreSQL), so up to ``held_bytes`` of bodies wait here for their turn;
        past that, a body is read back from the ledger as after a restart.
        """
        ids = []
        with self._lock:
            for delivery in deliveries:
                size = len(delivery.body)
                if self._held + size <= self.held_bytes:
                    self._bodies[delivery.id] = delivery.body
                    self._held += size
                ids.append(delivery.id)
        self.submit(ids)

    def held(self) -> int:
        """Bytes of bodies in hand, waiting to be processed."""
        return self._held

    def _bodies_for(self, ids: list[str]) -> dict[str, bytes]:
        with self._lock:
            return {i: self._bodies[i] for i in ids if i in self._bodies}

    def _release(self, ids: list[str]) -> None:
        with self._lock:
            for delivery_id in ids:
                body = self._bodies.pop(delivery_id, None)
                if body is not None:
                    self._held -= len(body)

    def join(self) -> None:
        """Wait until every submitted delivery is processed."""
        self._queue.join()

    def submit_unprocessed(self, received_before: dt.datetime | None = None) -> int:
        """Queue deliveries committed but never processed (a crash, a batch lost to an outage)."""
        ids = unprocessed_ids(self.engine, received_before)
        self.submit(ids)
        return len(ids)

    def _take_batch(self) -> list[str | None]:
        while True:
            try:
                batch = [self._queue.get(timeout=self.sweep_seconds)]
                break
            except queue.Empty:
                self._sweep()
        while len(batch) < self.batch_size and batch[-1] is not None:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _sweep(self) -> None:
        """Queue deliveries left 'stored' for a while: a batch that failed during an outage."""
        try:
            self.submit_unprocessed(utcnow() - dt.timedelta(seconds=self.sweep_seconds))
        except Exception:
            log.warning("pipeline sweep could not reach the database")

    def _yield_to_ingest(self) -> bool:
        """Wait while the ledger has work (up to ``max_yield``); True if it was busy.

        Ingest first, in this process: processing in the same process takes the GIL
        from the event loop (on PostgreSQL, processing 270 deliveries/s during a
        burst halved what was answered: bench/README.md, "Sustained stream"). For
        results that stay fresh under a stream, ``RECEIVER_PROCESSING=process``
        runs the pipeline on another core (`receiver.processor`). Checked every
        ``YIELD_POLL_SECONDS``, not faster: each wake-up takes the GIL.
        """
        if self.busy is None or not self.busy():
            return False
        deadline = time.monotonic() + self.max_yield
        while self.busy() and time.monotonic() < deadline:
            time.sleep(YIELD_POLL_SECONDS)
        return True

    def _chunk(self, ids: list[str], size: int) -> tuple[list[str], list[str]]:
        """The next ``size`` ids, but a big body alone: its transaction holds the write
        lock (SQLite: the ledger's too) for long enough without the others' rows."""
        with self._lock:
            big = [len(self._bodies.get(i, b"")) >= BIG_BODY_BYTES for i in ids[:size]]
        if big[0]:
            return ids[:1], ids[1:]
        if any(big):
            size = big.index(True)
        return ids[:size], ids[size:]

    def _process(self, ids: list[str]) -> dict[str, str]:
        try:
            outcomes = process_deliveries(
                self.engine,
                ids,
                max_depth=self.max_depth,
                bodies=self._bodies_for(ids),
                max_body_bytes=self.max_body_bytes,
            )
            return {o.delivery_id: o.status for o in outcomes}
        except Exception:
            if len(ids) > 1:  # find the one that breaks the batch; the rest still go through
                return {k: v for i in ids for k, v in self._process([i]).items()}
            # Left as 'stored': the next start or `receiver reprocess` picks it up.
            log.exception("could not process delivery %s", ids[0])
            return {ids[0]: "failed"}

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            ids = [i for i in batch if i is not None]
            try:
                while ids:
                    # Under load, small transactions: the write lock is the ledger's too.
                    size = self.busy_batch_size if self._yield_to_ingest() else self.batch_size
                    chunk, ids = self._chunk(ids, size)
                    outcomes = self._process(chunk)
                    if self.on_processed is not None:
                        for delivery_id in chunk:
                            self.on_processed(delivery_id, outcomes.get(delivery_id, "failed"))
            except Exception:
                log.exception("pipeline batch bookkeeping failed")
            finally:
                self._release([i for i in batch if i is not None])
                for _ in batch:
                    self._queue.task_done()
            if None in batch:
                return
