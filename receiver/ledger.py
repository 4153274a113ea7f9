"""The raw ledger: every delivery, committed before it is answered.

This is the hot path, so it talks to the database driver directly and
commits in groups: one writer thread takes whatever deliveries are waiting,
writes them in one transaction and only then resolves each request's future.
Under load that is one fsync for many deliveries; when idle it is one each,
with no added wait. Duplicates are decided by a unique index on
``first_key``, so concurrent redeliveries collapse even across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy import Engine

from receiver.db import begin_raw_write, driver_time, insert_returning, paramstyle, utcnow
from receiver.deadlines import Timeout
from receiver.errors import LedgerUnavailable
from receiver.memory import closes_after
from receiver.states import DeliveryStatus
from receiver.workers import QueueWorker

log = logging.getLogger("receiver.ledger")

MAX_BATCH = 256


def new_delivery_id(now: dt.datetime | None = None) -> str:
    """A UUIDv7: time-ordered, so ids sort by arrival and index well."""
    millis = int((now or utcnow()).timestamp() * 1000)
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64
    value |= 0b10 << 62 | rand & ((1 << 62) - 1)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def parse_labels(query_string: str) -> dict[str, str]:
    """Query-string labels; a repeated key keeps its last value (the raw string is kept too)."""
    return dict(parse_qsl(query_string, keep_blank_values=True))


@dataclass(frozen=True)
class RawDelivery:
    """A delivery as it came off the wire, before anything is made of it."""

    hook: str
    body: bytes
    content_type: str | None
    headers: tuple[tuple[str, str], ...]
    query_string: str
    id: str = field(default_factory=new_delivery_id)
    received_at: dt.datetime = field(default_factory=utcnow)
    #: Authorised by a global token: the hook is created if it does not exist yet.
    create_hook: bool = False

    @cached_property
    def body_sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    @cached_property
    def dedupe_key(self) -> str:
        """Same hook, same query string, same bytes: the same delivery."""
        material = json.dumps([self.hook, self.query_string, self.body_sha256])
        return hashlib.sha256(material.encode()).hexdigest()

    @cached_property
    def labels(self) -> dict[str, str]:
        return parse_labels(self.query_string)


@dataclass(frozen=True)
class Recorded:
    """What the ledger did with a delivery: ``stored`` or ``duplicate`` (of ``duplicate_of``)."""

    delivery_id: str
    status: str
    duplicate_of: str | None = None


#: Told what a commit stored: the deliveries and, in the same order, what became of each.
OnCommitted = Callable[[Sequence[RawDelivery], list[Recorded]], None]


def tell_committed(
    on_committed: OnCommitted | None, deliveries: Sequence[RawDelivery], results: list[Recorded]
) -> None:
    """Hand a commit on (to the pipeline); a failure there never undoes the commit."""
    if on_committed is None:
        return
    try:
        on_committed(deliveries, results)
    except Exception:  # processing is best effort: the raw rows are committed
        log.exception("on_committed hook failed")


_COLUMNS = """id, hook, received_at, body, body_sha256, body_size, content_type,
    headers, query_string, labels, dedupe_key, first_key, duplicate_of, status"""
_INSERT_HEAD = f"INSERT INTO deliveries ({_COLUMNS}) VALUES "
_INSERT = f"{_INSERT_HEAD}({', '.join('?' * 14)})"
# No conflict target: a clash on ``first_key`` is a duplicate, one on ``id`` a replay.
_CONFLICT = " ON CONFLICT DO NOTHING RETURNING id"


def _insert_new(engine: Engine, cursor: Any, rows: list[tuple[Any, ...]]) -> set[str]:
    """Insert ``rows`` as new deliveries; the ids that went in (a clash is not returned).

    In one round trip for the batch where the driver allows (`receiver.db.insert_returning`).
    """
    return set(insert_returning(engine, cursor, _INSERT_HEAD, _CONFLICT, rows))


_INSERT_HOOK = "INSERT INTO hooks (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING"
_FIND_FIRST = "SELECT id FROM deliveries WHERE first_key = ?"
_FIND_ID = "SELECT status, duplicate_of FROM deliveries WHERE id = ?"


def write_deliveries(
    engine: Engine, cursor: Any, deliveries: Sequence[RawDelivery]
) -> list[Recorded]:
    """Insert ``deliveries`` through a raw DBAPI cursor; the caller commits.

    Idempotent per delivery id: one already in the table (a spool drained twice
    after a crash, a write that committed after its request gave up) is not
    written again, and its recorded status is returned.
    """
    sql_id = paramstyle(engine, _FIND_ID)
    sql_dup = paramstyle(engine, _INSERT)
    sql_hook = paramstyle(engine, _INSERT_HOOK)
    sql_find = paramstyle(engine, _FIND_FIRST)
    for hook, created in {d.hook: d.received_at for d in deliveries if d.create_hook}.items():
        cursor.execute(sql_hook, (hook, driver_time(engine, created)))
    rows = [
        (
            d.id,
            d.hook,
            driver_time(engine, d.received_at),
            d.body,
            d.body_sha256,
            len(d.body),
            d.content_type,
            json.dumps([list(h) for h in d.headers]),
            d.query_string,
            json.dumps(d.labels),
            d.dedupe_key,
        )
        for d in deliveries
    ]
    # The common case, all new, in one round trip for the whole batch.
    inserted = _insert_new(
        engine,
        cursor,
        [
            (*r, d.dedupe_key, None, DeliveryStatus.STORED.value)
            for d, r in zip(deliveries, rows, strict=True)
        ],
    )
    results: list[Recorded] = []
    for d, common in zip(deliveries, rows, strict=True):
        if d.id in inserted:
            results.append(Recorded(d.id, DeliveryStatus.STORED))
            continue
        cursor.execute(sql_id, (d.id,))
        existing = cursor.fetchone()
        if existing is not None:
            status, duplicate_of = existing
            if status == DeliveryStatus.DUPLICATE:
                results.append(Recorded(d.id, DeliveryStatus.DUPLICATE, duplicate_of))
            else:
                results.append(Recorded(d.id, DeliveryStatus.STORED))
            continue
        cursor.execute(sql_find, (d.dedupe_key,))
        row = cursor.fetchone()
        first = row[0] if row else None
        cursor.execute(sql_dup, (*common, None, first, DeliveryStatus.DUPLICATE.value))
        results.append(Recorded(d.id, DeliveryStatus.DUPLICATE, first))
    return results


class _Waiter:
    """A request awaiting its commit on an event loop.

    The writer answers a whole batch with one ``call_soon_threadsafe`` per
    loop (one wake-up of the loop per group commit, not one per delivery).
    """

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[Recorded] = loop.create_future()


#: Who waits for a delivery: a request on an event loop, or a plain thread.
_Item = tuple[RawDelivery, "_Waiter | Future[Recorded]"]


def _gave_up(waiter: _Waiter | Future[Recorded]) -> bool:
    """The request stopped waiting (timed out into the spool): do not write it."""
    if isinstance(waiter, _Waiter):
        return waiter.future.cancelled()
    return not waiter.set_running_or_notify_cancel()


def _answer(items: list[tuple[_Waiter | Future[Recorded], Recorded | BaseException]]) -> None:
    """Resolve each waiter with its result or error, one loop wake-up per event loop."""
    per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Recorded], Any]]] = {}
    for waiter, outcome in items:
        if isinstance(waiter, _Waiter):
            per_loop.setdefault(waiter.loop, []).append((waiter.future, outcome))
        elif isinstance(outcome, BaseException):
            waiter.set_exception(outcome)
        else:
            waiter.set_result(outcome)
    for loop, answers in per_loop.items():
        # A closed loop has nobody waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, answers)


def _settle(answers: list[tuple[asyncio.Future[Recorded], Any]]) -> None:
    for future, outcome in answers:
        if future.done():  # cancelled by its timeout meanwhile
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class Ledger(QueueWorker[_Item]):
    """Group-committing writer of raw deliveries. `start` it, `record` from async code."""

    thread_name = "ledger-writer"

    def __init__(
        self,
        engine: Engine,
        *,
        on_committed: OnCommitted | None = None,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.engine = engine
        self.on_committed = on_committed
        self.max_batch = max_batch
        super().__init__(queue.SimpleQueue())
        self._conn: Any = None
        # The last two commits: two close together make a stream, one alone does not.
        self._last_write = self._write_before = 0.0

    def stop(self) -> None:
        """Finish what is queued, then stop the writer."""
        super().stop()
        self._close()

    def busy(self, within: float = 0.02) -> bool:
        """Deliveries are waiting, or are streaming in: the last two commits both
        fell within ``within`` seconds of each other and of now.

        The pipeline yields while this holds: under a stream the queue empties
        between group commits, so its length alone says little. A delivery on
        its own does not count, so it is processed at once.
        """
        if self._queue.qsize() > 0:
            return True
        last = self._last_write
        return time.monotonic() - last < within and last - self._write_before < within

    async def record(self, delivery: RawDelivery, within: Timeout | None = None) -> Recorded:
        """Commit ``delivery``; raises `LedgerUnavailable` if the database refused it
        or did not answer ``within`` the timeout.

        After a timeout the delivery is either never written (still queued: the
        cancelled future makes the writer skip it) or written later by a batch
        already under way, which the spool's replay recognises by its id.
        """
        waiter = _Waiter(asyncio.get_running_loop())
        self._queue.put((delivery, waiter))
        if within is None:
            return await waiter.future
        try:
            async with within:
                return await waiter.future
        except TimeoutError:
            raise LedgerUnavailable(
                f"database did not answer within {within.seconds:g} s"
            ) from None

    def record_sync(self, deliveries: Sequence[RawDelivery]) -> list[Recorded]:
        """Commit ``deliveries`` from a plain thread (spool drain, tools, tests)."""
        futures: list[Future[Recorded]] = []
        for d in deliveries:
            f: Future[Recorded] = Future()
            self._queue.put((d, f))
            futures.append(f)
        return [f.result() for f in futures]

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch: list[_Item] = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._write(batch)

    def _write(self, batch: list[_Item]) -> None:
        # A request that gave up waiting cancelled its future: skip it, it went to the spool.
        batch = [(d, w) for d, w in batch if not _gave_up(w)]
        if not batch:
            return
        started = time.perf_counter()
        try:
            if self._conn is None:
                self._conn = self.engine.raw_connection()
            cursor = self._conn.cursor()
            begin_raw_write(self.engine, cursor)
            try:
                results = write_deliveries(self.engine, cursor, [d for d, _ in batch])
            finally:
                cursor.close()
            self._conn.commit()
        except Exception as exc:
            log.warning("ledger write of %d deliveries failed: %s", len(batch), type(exc).__name__)
            self._close()
            error = LedgerUnavailable(f"database refused the delivery: {type(exc).__name__}")
            _answer([(w, error) for _, w in batch])
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "committed %d deliveries in %.1f ms",
                len(batch),
                (time.perf_counter() - started) * 1e3,
            )
        self._write_before, self._last_write = self._last_write, time.monotonic()
        if closes_after(len(d.body) for d, _ in batch):
            self._close()  # its statements hold copies of the bodies (receiver.memory)
        # Hand the ids on before answering: whoever saw the 2xx can then wait on the pipeline.
        tell_committed(self.on_committed, [d for d, _ in batch], results)
        _answer([(w, r) for (_, w), r in zip(batch, results, strict=True)])

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.rollback()
                self._conn.close()
            except Exception:
                log.debug("closing a broken ledger connection failed", exc_info=True)
            self._conn = None
