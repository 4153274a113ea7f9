"""After the commit: classify, normalise and load each stored delivery.

Runs in its own thread, off the request path, reading the raw ledger only.
Processing a delivery replaces everything derived from it in one
transaction, so running it again (a crash, `receiver reprocess`) changes
nothing.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Row, delete, insert, select, update

from receiver.classify import Envelope, OutputType, classify
from receiver.db import utcnow, write_transaction
from receiver.errors import Quarantine
from receiver.models import Delivery, Hook, Output
from receiver.results import delete_results, load_results
from receiver.schema import lock_hook
from receiver.tasks import task_ids, task_row, upsert_task

log = logging.getLogger("receiver.pipeline")


@dataclass(frozen=True)
class Outcome:
    delivery_id: str
    status: str  # processed | quarantined
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
    with engine.connect() as conn:
        row = conn.execute(select(Delivery.__table__).where(Delivery.id == delivery_id)).first()
        if row is None:
            raise LookupError(delivery_id)
        delivery = row
        hook = delivery.hook
        if delivery.status == "duplicate":
            conn.rollback()
            return Outcome(delivery_id, "duplicate")
        expected, schema = expected_output(conn, delivery.hook)
        labels: dict[str, str] = json.loads(delivery.labels)
        conn.rollback()  # end the read; the writes below run in their own transaction
        try:
            envelope = classify(delivery.body, delivery.content_type, expected=expected)
            with write_transaction(conn):
                _replace_derived(conn, delivery, envelope, labels, schema, max_depth)
            return Outcome(delivery_id, "processed")
        except Quarantine as exc:
            reason = exc.reason
        except Exception as exc:
            # A bug or a value the database refuses must not lose the delivery: it stays
            # quarantined with the reason, and `receiver reprocess` retries it after a fix.
            if conn.in_transaction():
                conn.rollback()
            log.exception("processing delivery %s failed", delivery_id)
            reason = f"processing failed: {type(exc).__name__}: {str(exc)[:300]}"
        with write_transaction(conn):
            delete_derived(conn, delivery_id, hook)
            conn.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id)
                .values(status="quarantined", reason=reason, processed_at=utcnow())
            )
        return Outcome(delivery_id, "quarantined", reason)


def delete_derived(conn: Connection, delivery_id: str, hook: str) -> None:
    """Remove what was derived from a delivery, holding the hook's load lock from here on.

    The lock (PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises) makes two
    processes handling one delivery at once take turns instead of colliding.
    """
    lock_hook(conn, hook)
    conn.execute(delete(Output).where(Output.delivery_id == delivery_id))
    delete_results(conn, delivery_id, hook)


def _replace_derived(
    conn: Connection,
    delivery: Row[Any],
    envelope: Envelope,
    labels: dict[str, str],
    schema: Any,
    max_depth: int,
) -> None:
    delete_derived(conn, delivery.id, delivery.hook)
    task = task_row(
        envelope,
        hook=delivery.hook,
        labels=labels,
        delivery_id=delivery.id,
        received_at=delivery.received_at,
    )
    if task is not None:
        upsert_task(conn, task)
    session_id, task_id = task_ids(envelope, labels)
    output = envelope.output
    if output is not None:
        if "\x00" in output.text and conn.dialect.name == "postgresql":
            raise Quarantine("the output contains NUL, which PostgreSQL text cannot hold")
        conn.execute(
            insert(Output).values(
                delivery_id=delivery.id,
                hook=delivery.hook,
                session_id=session_id,
                task_id=task_id,
                output_type=output.type.value,
                content=output.text,
            )
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
        )
    conn.execute(
        update(Delivery)
        .where(Delivery.id == delivery.id)
        .values(
            status="processed",
            kind=envelope.kind.value,
            output_type=output.type.value if output else None,
            session_id=session_id,
            task_id=task_id,
            reason=None,
            processed_at=utcnow(),
        )
    )


class Pipeline:
    """A worker thread that processes committed deliveries in arrival order."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_depth: int,
        on_processed: Callable[[str, str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_depth = max_depth
        #: Told ``(delivery_id, outcome)`` after each run: processed, quarantined or failed.
        self.on_processed = on_processed
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pipeline", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, delivery_ids: Iterable[str]) -> None:
        for delivery_id in delivery_ids:
            self._queue.put(delivery_id)

    def join(self) -> None:
        """Wait until every submitted delivery is processed."""
        self._queue.join()

    def submit_unprocessed(self) -> int:
        """Queue deliveries stored but never processed (say, before a crash)."""
        with self.engine.connect() as conn:
            ids = list(
                conn.scalars(
                    select(Delivery.id).where(Delivery.status == "stored").order_by(Delivery.id)
                )
            )
        self.submit(ids)
        return len(ids)

    def _run(self) -> None:
        while True:
            delivery_id = self._queue.get()
            outcome = "failed"
            try:
                if delivery_id is None:
                    return
                outcome = process_delivery(
                    self.engine, delivery_id, max_depth=self.max_depth
                ).status
            except Exception:
                # Left as 'stored': the next start or `receiver reprocess` picks it up.
                log.exception("could not process delivery %s", delivery_id)
            finally:
                try:
                    if delivery_id is not None and self.on_processed is not None:
                        self.on_processed(delivery_id, outcome)
                finally:
                    self._queue.task_done()
