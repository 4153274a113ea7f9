"""After the commit: classify, normalise and load each stored delivery.

Runs in its own thread, off the request path, reading the raw ledger only.
Processing a delivery replaces everything derived from it in one
transaction, so running it again (a crash, `receiver reprocess`) changes
nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Row, bindparam, delete, insert, select, update
from sqlalchemy.exc import DBAPIError

from receiver.attachments import file_rows, network_rows
from receiver.classify import Envelope, Kind, OutputType, classify
from receiver.correlation import correlate
from receiver.db import utcnow, write_transaction
from receiver.encodings import decode_body
from receiver.errors import Quarantine
from receiver.inserts import HeldInserts
from receiver.ledger import RawDelivery
from receiver.memory import closes_after
from receiver.models import Delivery, Hook, Output, TaskFile, TaskNetwork
from receiver.results import delete_results, load_results
from receiver.schema import forget_catalogs, lock_hook, lock_hooks
from receiver.settings import DEFAULT_MAX_BODY_BYTES
from receiver.states import DeliveryStatus
from receiver.tasks import delete_events, event_row, task_ids, write_events
from receiver.workers import QueueWorker

log = logging.getLogger("receiver.pipeline")

#: How often a pipeline yielding to ingest looks again.
YIELD_POLL_SECONDS = 0.05
#: Bodies of committed deliveries kept in memory until processed (`Pipeline.submit_committed`).
HELD_BYTES = 64 * 2**20
#: A body this big is processed in a transaction of its own (`Pipeline._chunk`).
BIG_BODY_BYTES = 16 * 2**10


@dataclass(frozen=True)
class Outcome:
    delivery_id: str
    status: str  # processed | quarantined | duplicate | pruned (body gone: nothing redone)
    reason: str | None = None


def expected_output(conn: Connection, hook: str) -> tuple[OutputType | None, Any]:
    """The output type and schema registered for ``hook``, if any."""
    row = conn.execute(
        select(Hook.output_type, Hook.output_schema).where(Hook.name == hook)
    ).first()
    if row is None or row.output_type is None:
        return None, None
    return OutputType(row.output_type), row.output_schema


def process_delivery(engine: Engine, delivery_id: str, *, max_depth: int) -> Outcome:
    """Derive tasks, outputs and result rows from one stored delivery."""
    [outcome] = process_deliveries(engine, [delivery_id], max_depth=max_depth)
    return outcome


#: Every column of a delivery but its body, which is read apart (or not at all).
_DELIVERY_FIELDS = [c for c in Delivery.__table__.c if c.name != "body"]


def process_deliveries(
    engine: Engine,
    delivery_ids: Sequence[str],
    *,
    max_depth: int,
    bodies: Mapping[str, bytes] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> list[Outcome]:
    """Process several deliveries in one write transaction.

    Parsing happens before the transaction, so the write lock (SQLite) is held
    only for the inserts, and the batch costs one commit instead of one each
    and one statement per table (`_Writes`). If a delivery fails, the batch is
    redone with a savepoint each, so that one is quarantined alone.
    ``bodies`` are bodies already in hand, the very bytes the ledger committed:
    the rest are read back.
    """
    delivery_ids = list(dict.fromkeys(delivery_ids))  # the same id queued twice is done once
    with engine.connect() as conn:
        found = {
            row.id: row
            for row in conn.execute(
                select(*_DELIVERY_FIELDS).where(Delivery.id.in_(list(delivery_ids)))
            )
        }
        missing = [i for i in delivery_ids if i not in found]
        if missing:
            raise LookupError(missing[0])
        runs = _runs_within(delivery_ids, {i: found[i].body_size or 0 for i in delivery_ids})
        if len(runs) > 1:  # large bodies: a batch at a time would hold them all at once
            conn.rollback()
            return [
                outcome
                for run in runs
                for outcome in process_deliveries(
                    engine,
                    run,
                    max_depth=max_depth,
                    bodies=_only(bodies, run),
                    max_body_bytes=max_body_bytes,
                )
            ]
        bodies = dict(bodies or {})
        unread = [
            i
            for i in delivery_ids
            if i not in bodies
            and found[i].status != DeliveryStatus.DUPLICATE
            and found[i].body_pruned_at is None
        ]
        pruned = {i for i in delivery_ids if found[i].body_pruned_at is not None}
        if unread:
            read = conn.execute(
                select(Delivery.id, Delivery.body, Delivery.body_pruned_at).where(
                    Delivery.id.in_(unread)
                )
            )
            for row in read:
                if row.body_pruned_at is not None:  # pruned since its row was read
                    pruned.add(row.id)
                else:
                    bodies[row.id] = row.body
        hooks = {row.hook for row in found.values()}
        registered = {h: expected_output(conn, h) for h in hooks}
        conn.rollback()  # end the read; the writes below run in their own transaction

        outcomes: dict[str, Outcome] = {}
        parsed: list[tuple[Row[Any], Envelope | Quarantine]] = []
        for delivery_id in delivery_ids:
            delivery = found[delivery_id]
            if delivery.status == DeliveryStatus.DUPLICATE:
                outcomes[delivery_id] = Outcome(delivery_id, DeliveryStatus.DUPLICATE)
                continue
            if delivery_id in pruned:  # nothing to derive from: keep what was derived
                outcomes[delivery_id] = Outcome(delivery_id, "pruned")
                continue
            expected, _ = registered[delivery.hook]
            try:
                # Content-Encoding undone, within the body limit (receiver.encodings).
                body = decode_body(bodies[delivery_id], delivery.headers, max_body_bytes)
                envelope = classify(body, delivery.content_type, expected=expected)
                parsed.append((delivery, envelope))
            except Quarantine as exc:
                parsed.append((delivery, exc))
            except Exception as exc:  # a bug in a pure core: keep the delivery, say so
                log.exception("classifying delivery %s failed", delivery_id)
                parsed.append(
                    (delivery, Quarantine(_failure(exc, delivery_id, engine.dialect.name)))
                )

        try:
            with write_transaction(conn):
                outcomes |= _write_batch(
                    conn, parsed, registered, isolated=len(parsed) < 2, max_depth=max_depth
                )
        except _Isolate:
            # One of them failed: again, each in a savepoint of its own, so the rest go through.
            with write_transaction(conn):
                outcomes |= _write_batch(
                    conn, parsed, registered, isolated=True, max_depth=max_depth
                )
        if closes_after(len(body) for body in bodies.values()):
            conn.invalidate()  # its statements hold copies of the bodies (receiver.memory)
    return [outcomes[i] for i in delivery_ids]


#: Most body bytes one batch reads, parses and writes at once (one body may be larger).
BATCH_BYTES = 16 * 2**20


def _runs_within(ids: list[str], sizes: Mapping[str, int]) -> list[list[str]]:
    """``ids`` cut, in order, into runs of at most `BATCH_BYTES` of bodies (one if they fit)."""
    runs: list[list[str]] = [[]]
    total = 0
    for i in ids:
        if runs[-1] and total + sizes[i] > BATCH_BYTES:
            runs.append([])
            total = 0
        runs[-1].append(i)
        total += sizes[i]
    return runs


def _only(bodies: Mapping[str, bytes] | None, ids: list[str]) -> dict[str, bytes]:
    return {i: bodies[i] for i in ids if i in bodies} if bodies else {}


class _Isolate(Exception):
    """A delivery of a batch written without savepoints failed: redo it with them."""


def _write_batch(
    conn: Connection,
    parsed: list[tuple[Row[Any], Envelope | Quarantine]],
    registered: dict[str, tuple[OutputType | None, Any]],
    *,
    isolated: bool,
    max_depth: int,
) -> dict[str, Outcome]:
    """Write a batch's derived rows in the caller's transaction.

    Savepoints cost two round trips a delivery, so a batch first goes without
    (``isolated=False``): any failure raises `_Isolate` and the caller redoes the
    batch with a savepoint per delivery. Hook locks are taken once, up front.
    """
    lock_hooks(conn, {delivery.hook for delivery, _ in parsed})
    # Read under the locks: another process may have processed some since they were read.
    ids = [delivery.id for delivery, _ in parsed]
    done_before = set(
        conn.scalars(
            select(Delivery.id).where(
                Delivery.id.in_(ids), Delivery.status != DeliveryStatus.STORED
            )
        )
    )
    outcomes: dict[str, Outcome] = {}
    writes = _Writes()
    for delivery, envelope in parsed:
        rerun = delivery.id in done_before
        schema = registered[delivery.hook][1]
        if isolated:
            outcomes[delivery.id] = _process_one(conn, delivery, envelope, schema, rerun, max_depth)
            continue
        if isinstance(envelope, Quarantine):
            outcomes[delivery.id] = _quarantine(conn, delivery, envelope.reason, rerun)
            continue
        try:
            _replace_derived(conn, delivery, envelope, schema, rerun, max_depth, writes)
        except Exception as exc:
            raise _Isolate from exc
        outcomes[delivery.id] = Outcome(delivery.id, DeliveryStatus.PROCESSED)
    try:
        writes.flush(conn)
    except Exception as exc:
        raise _Isolate from exc
    return outcomes


#: Marks a delivery processed; run once per batch with a parameter set per delivery.
_MARK_PROCESSED = (
    update(Delivery)
    .where(Delivery.id == bindparam("b_id"))
    .values(
        status=DeliveryStatus.PROCESSED,
        kind=bindparam("b_kind"),
        output_type=bindparam("b_output_type"),
        session_id=bindparam("b_session_id"),
        task_id=bindparam("b_task_id"),
        reason=None,
        processed_at=bindparam("b_processed_at"),
    )
)


class _Writes:
    """Tasks, outputs, result rows and statuses of processed deliveries, held for `flush`.

    Written per delivery, they cost a statement each (a round trip each on
    PostgreSQL) and most of a small delivery's processing time; held, a batch
    costs one statement per table.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.files: list[dict[str, Any]] = []
        self.network: list[dict[str, Any]] = []
        self.outputs: list[dict[str, Any]] = []
        self.results = HeldInserts()
        self.processed: list[dict[str, Any]] = []
        #: (hook, session_id, task_id) of the outputs held: one output per task.
        self.task_outputs: set[tuple[str, str | None, str]] = set()

    def flush(self, conn: Connection) -> None:
        if self.events:
            write_events(conn, self.events)
            key_of = {e["delivery_id"]: e["task_key"] for e in self.events}
            for model, rows in ((TaskFile, self.files), (TaskNetwork, self.network)):
                if rows:
                    conn.execute(
                        insert(model), [r | {"task_key": key_of[r["delivery_id"]]} for r in rows]
                    )
        if self.outputs:
            conn.execute(insert(Output), self.outputs)
        self.results.flush(conn)
        if self.processed:
            conn.execute(_MARK_PROCESSED, self.processed)
        self.events, self.files, self.network = [], [], []
        self.outputs, self.processed = [], []
        self.task_outputs = set()


def _failure(exc: BaseException, delivery_id: str, dialect: str) -> str:
    """A reason a person can act on, for an error no check foresaw (the log has the details)."""
    if isinstance(exc, DBAPIError):
        if "too many columns" in str(exc).lower():
            return (
                f"the output has more fields than a {dialect} table can hold as columns;"
                " register the hook's schema with fewer fields or nest them"
            )
        return (
            f"the database refused this delivery's rows ({type(exc.orig).__name__}); the"
            f" receiver's log has the details under delivery {delivery_id}"
        )
    return (
        f"an internal error stopped processing ({type(exc).__name__}); it is logged with"
        f" delivery {delivery_id}: please report it, then run `receiver reprocess --quarantined`"
    )


def _process_one(
    conn: Connection,
    delivery: Row[Any],
    envelope: Envelope | Quarantine,
    schema: Any,
    rerun: bool,
    max_depth: int,
) -> Outcome:
    """One delivery in a savepoint: a failure quarantines it alone."""
    reason: str
    if isinstance(envelope, Quarantine):
        reason = envelope.reason
    else:
        savepoint = conn.begin_nested()
        try:
            writes = _Writes()
            _replace_derived(conn, delivery, envelope, schema, rerun, max_depth, writes)
            writes.flush(conn)
            savepoint.commit()
            return Outcome(delivery.id, DeliveryStatus.PROCESSED)
        except Quarantine as exc:
            savepoint.rollback()
            reason = exc.reason
        except Exception as exc:
            # A bug or a value the database refuses must not lose the delivery: it stays
            # quarantined with the reason, and `receiver reprocess` retries it after a fix.
            savepoint.rollback()
            log.exception("processing delivery %s failed", delivery.id)
            reason = _failure(exc, delivery.id, conn.dialect.name)
        forget_catalogs(conn)  # what the savepoint created is gone
        if envelope.kind is not Kind.AI_RESPONSE and envelope.output is not None:
            partial = _quarantine_output(conn, delivery, envelope, reason, rerun)
            if partial is not None:
                return partial
    return _quarantine(conn, delivery, reason, rerun)


def _quarantine_output(
    conn: Connection, delivery: Row[Any], envelope: Envelope, reason: str, rerun: bool
) -> Outcome | None:
    """A task record whose output cannot be loaded still gives its task: status, usage and
    cost land (and count in every rollup); only the output is quarantined, with the reason.
    `receiver reprocess --quarantined` loads the output once the cause is fixed."""
    reason = (
        f"the output could not be loaded: {reason}. The task's status, usage and cost"
        " are recorded in tasks; only the output is missing."
    )
    savepoint = conn.begin_nested()
    try:
        writes = _Writes()
        labels = _task_facts(conn, delivery, envelope, rerun, writes)
        writes.flush(conn)
        session_id, task_id = task_ids(envelope, labels)
        conn.execute(
            update(Delivery)
            .where(Delivery.id == delivery.id)
            .values(
                status=DeliveryStatus.QUARANTINED,
                kind=envelope.kind.value,
                session_id=session_id,
                task_id=task_id,
                reason=reason,
                processed_at=utcnow(),
            )
        )
        savepoint.commit()
    except Exception:
        savepoint.rollback()
        log.exception("recording the task of delivery %s failed", delivery.id)
        return None
    return Outcome(delivery.id, DeliveryStatus.QUARANTINED, reason)


def _quarantine(conn: Connection, delivery: Row[Any], reason: str, rerun: bool) -> Outcome:
    if rerun:
        delete_derived(conn, delivery.id, delivery.hook)
    conn.execute(
        update(Delivery)
        .where(Delivery.id == delivery.id)
        .values(status=DeliveryStatus.QUARANTINED, reason=reason, processed_at=utcnow())
    )
    return Outcome(delivery.id, DeliveryStatus.QUARANTINED, reason)


def delete_derived(conn: Connection, delivery_id: str, hook: str) -> None:
    """Remove what was derived from a delivery, holding the hook's load lock from here on.

    The lock (PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises) makes two
    processes handling one delivery at once take turns instead of colliding.
    """
    lock_hook(conn, hook)
    delete_events(conn, delivery_id)
    for model in (Output, TaskFile, TaskNetwork):
        conn.execute(delete(model).where(model.delivery_id == delivery_id))
    delete_results(conn, delivery_id, hook)


def _attachments(envelope: Envelope, delivery: Row[Any], writes: _Writes) -> None:
    """A task record's ``data.files`` and ``data.network`` as rows of their own tables."""
    where = {"delivery_id": delivery.id, "received_at": delivery.received_at}
    if "files" in envelope.extra:
        writes.files += file_rows(envelope.extra["files"], **where)
    if "network" in envelope.extra:
        writes.network += network_rows(envelope.extra["network"], **where)


def _replace_task_output(
    conn: Connection, delivery: Row[Any], session_id: str | None, task_id: str, writes: _Writes
) -> None:
    """A task has one output: one from another delivery (a webhook, then the same result
    fetched by the reconciler) is removed, so the task's result rows are replaced, not doubled.

    Two deliveries of one task in a batch written without savepoints would both
    be held: the batch is redone one delivery at a time (`_Isolate`).
    """
    key = (delivery.hook, session_id, task_id)
    if key in writes.task_outputs:
        raise _Isolate
    writes.task_outputs.add(key)
    same_session = (
        Output.session_id.is_(None) if session_id is None else Output.session_id == session_id
    )
    others = conn.scalars(
        select(Output.delivery_id).where(
            Output.task_id == task_id,
            same_session,
            Output.hook == delivery.hook,
            Output.delivery_id != delivery.id,
        )
    ).all()
    if others:
        # Only the output and its rows: what the other delivery said of the task (its
        # usage, its cost) still counts.
        conn.execute(delete(Output).where(Output.delivery_id.in_(others)))
        for other in others:
            delete_results(conn, other, delivery.hook)


def _task_facts(
    conn: Connection, delivery: Row[Any], envelope: Envelope, rerun: bool, writes: _Writes
) -> dict[str, Any]:
    """What a delivery says of its task (its event, files and visited URLs) into ``writes``,
    after a rerun's deletes; returns the labels, correlated with a run the receiver knows."""
    if rerun:
        delete_derived(conn, delivery.id, delivery.hook)
    labels = correlate(conn, json.loads(delivery.labels))
    event = event_row(
        envelope,
        hook=delivery.hook,
        labels=labels,
        delivery_id=delivery.id,
        received_at=delivery.received_at,
    )
    if event is not None:
        writes.events.append(event)
        _attachments(envelope, delivery, writes)
    return labels


def _replace_derived(
    conn: Connection,
    delivery: Row[Any],
    envelope: Envelope,
    schema: Any,
    rerun: bool,
    max_depth: int,
    writes: _Writes,
) -> None:
    """Derive what ``delivery`` gives into ``writes``; only a rerun's deletes go at once."""
    labels = _task_facts(conn, delivery, envelope, rerun, writes)
    session_id, task_id = task_ids(envelope, labels)
    output = envelope.output
    if output is not None:
        if "\x00" in output.text and conn.dialect.name == "postgresql":
            raise Quarantine("the output contains NUL, which PostgreSQL text cannot hold")
        if task_id is not None:
            _replace_task_output(conn, delivery, session_id, task_id, writes)
        writes.outputs.append(
            {
                "delivery_id": delivery.id,
                "hook": delivery.hook,
                "session_id": session_id,
                "task_id": task_id,
                "output_type": output.type.value,
                "content": output.text,
            }
        )
        load_results(
            conn,
            hook=delivery.hook,
            output=output,
            delivery_id=delivery.id,
            session_id=session_id,
            task_id=task_id,
            received_at=delivery.received_at,
            schema=schema,
            max_depth=max_depth,
            held=writes.results,
        )
    writes.processed.append(
        {
            "b_id": delivery.id,
            "b_kind": envelope.kind.value,
            "b_output_type": output.type.value if output else None,
            "b_session_id": session_id,
            "b_task_id": task_id,
            "b_processed_at": utcnow(),
        }
    )


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
        query = select(Delivery.id).where(Delivery.status == DeliveryStatus.STORED)
        if received_before is not None:
            query = query.where(Delivery.received_at < received_before)
        with self.engine.connect() as conn:
            ids = list(conn.scalars(query.order_by(Delivery.id).limit(100_000)))
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

        Checked every ``YIELD_POLL_SECONDS``, not faster: each wake-up takes the GIL
        from the event loop, which then waits for the OS to run this thread.
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
