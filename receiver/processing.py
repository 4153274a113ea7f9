"""Processing: a batch of stored deliveries through classify, normalise and load.

`process_deliveries` reads the raw ledger only. The pure stages (classify,
normalise) run before the transaction; the load writes a batch in one
transaction, replacing everything derived from each delivery, so running it
again (a crash, `receiver reprocess`) changes nothing. `receiver.pipeline`
feeds it from the ledger in the background.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Row, bindparam, delete, insert, select, update
from sqlalchemy.exc import DBAPIError

from receiver.attachments import file_rows, network_rows
from receiver.classify import Envelope, Kind, OutputType, classify
from receiver.correlation import correlate
from receiver.db import text_holds_nul, utcnow, write_transaction
from receiver.encodings import decode_body
from receiver.errors import Quarantine
from receiver.inserts import HeldInserts
from receiver.memory import closes_after
from receiver.models import Delivery, Hook, Output, TaskFile, TaskNetwork
from receiver.normalise import Normalised, normalise
from receiver.results import delete_results, load_results
from receiver.schema import forget_catalogs, lock_hook, lock_hooks
from receiver.settings import DEFAULT_MAX_BODY_BYTES
from receiver.states import DeliveryStatus
from receiver.tasks import delete_events, event_row, task_ids, write_events

log = logging.getLogger("receiver.processing")


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
        parsed: list[Parsed] = []
        nul_ok = text_holds_nul(engine)
        for delivery_id in delivery_ids:
            delivery = found[delivery_id]
            if delivery.status == DeliveryStatus.DUPLICATE:
                outcomes[delivery_id] = Outcome(delivery_id, DeliveryStatus.DUPLICATE)
                continue
            if delivery_id in pruned:  # nothing to derive from: keep what was derived
                outcomes[delivery_id] = Outcome(delivery_id, "pruned")
                continue
            expected, schema = registered[delivery.hook]
            parsed.append(
                _parse(
                    delivery,
                    bodies[delivery_id],
                    expected,
                    schema,
                    max_depth=max_depth,
                    max_body_bytes=max_body_bytes,
                    nul_ok=nul_ok,
                    dialect=engine.dialect.name,
                )
            )

        try:
            with write_transaction(conn):
                outcomes |= _write_batch(conn, parsed, isolated=len(parsed) < 2)
        except _Isolate:
            # One of them failed: again, each in a savepoint of its own, so the rest go through.
            with write_transaction(conn):
                outcomes |= _write_batch(conn, parsed, isolated=True)
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


@dataclass(frozen=True)
class Parsed:
    """A delivery after the pure stages: its envelope (classify) and its output as tables
    (normalise), or the `Quarantine` that stopped it and where (``envelope`` is kept when
    only the output failed, so the task it describes is still recorded)."""

    delivery: Row[Any]
    envelope: Envelope | None
    normalised: Normalised | None = None
    problem: Quarantine | None = None


def _parse(
    delivery: Row[Any],
    raw: bytes,
    expected: OutputType | None,
    schema: Any,
    *,
    max_depth: int,
    max_body_bytes: int,
    nul_ok: bool,
    dialect: str,
) -> Parsed:
    """Classify and normalise one delivery, outside any transaction."""
    envelope: Envelope | None = None
    try:
        # Content-Encoding undone, within the body limit (receiver.encodings).
        body = decode_body(raw, delivery.headers, max_body_bytes)
        envelope = classify(body, delivery.content_type, expected=expected)
        if envelope.output is None:
            return Parsed(delivery, envelope)
        normalised = normalise(envelope.output, schema, max_depth=max_depth, nul_ok=nul_ok)
        return Parsed(delivery, envelope, normalised)
    except Quarantine as exc:
        return Parsed(delivery, envelope, problem=exc)
    except Exception as exc:  # a bug in a pure core: keep the delivery, say so
        log.exception("parsing delivery %s failed", delivery.id)
        return Parsed(delivery, envelope, problem=Quarantine(_failure(exc, delivery.id, dialect)))


class _Isolate(Exception):
    """A delivery of a batch written without savepoints failed: redo it with them."""


def _write_batch(conn: Connection, parsed: list[Parsed], *, isolated: bool) -> dict[str, Outcome]:
    """Write a batch's derived rows in the caller's transaction.

    Savepoints cost two round trips a delivery, so a batch first goes without
    (``isolated=False``): any failure raises `_Isolate` and the caller redoes the
    batch with a savepoint per delivery. What the pure stages quarantined never
    fails here. Hook locks are taken once, up front.
    """
    lock_hooks(conn, {p.delivery.hook for p in parsed})
    # Read under the locks: another process may have processed some since they were read.
    ids = [p.delivery.id for p in parsed]
    done_before = set(
        conn.scalars(
            select(Delivery.id).where(
                Delivery.id.in_(ids), Delivery.status != DeliveryStatus.STORED
            )
        )
    )
    outcomes: dict[str, Outcome] = {}
    writes = _Writes()
    for item in parsed:
        delivery = item.delivery
        rerun = delivery.id in done_before
        if item.problem is not None:
            outcomes[delivery.id] = _quarantined(conn, item, item.problem.reason, rerun)
            continue
        assert item.envelope is not None
        if isolated:
            outcomes[delivery.id] = _process_one(conn, item, rerun)
            continue
        try:
            _replace_derived(conn, delivery, item.envelope, item.normalised, rerun, writes)
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


def _process_one(conn: Connection, item: Parsed, rerun: bool) -> Outcome:
    """One delivery in a savepoint: a failure quarantines it alone."""
    delivery, envelope = item.delivery, item.envelope
    assert envelope is not None
    savepoint = conn.begin_nested()
    try:
        writes = _Writes()
        _replace_derived(conn, delivery, envelope, item.normalised, rerun, writes)
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
    return _quarantined(conn, item, reason, rerun)


def _quarantined(conn: Connection, item: Parsed, reason: str, rerun: bool) -> Outcome:
    """Quarantine a delivery; a task record whose output alone failed still gives its task."""
    envelope = item.envelope
    if envelope is not None and envelope.kind is not Kind.AI_RESPONSE and envelope.output:
        partial = _quarantine_output(conn, item.delivery, envelope, reason, rerun)
        if partial is not None:
            return partial
    return _quarantine(conn, item.delivery, reason, rerun)


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
    normalised: Normalised | None,
    rerun: bool,
    writes: _Writes,
) -> None:
    """Derive what ``delivery`` gives into ``writes``; only a rerun's deletes go at once."""
    labels = _task_facts(conn, delivery, envelope, rerun, writes)
    session_id, task_id = task_ids(envelope, labels)
    output = envelope.output
    if output is not None:
        assert normalised is not None  # `_parse` normalises every output
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
            normalised,
            hook=delivery.hook,
            delivery_id=delivery.id,
            session_id=session_id,
            task_id=task_id,
            received_at=delivery.received_at,
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
