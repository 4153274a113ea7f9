"""The pipeline: batches, one failure per savepoint, and the sweep after an outage."""

from __future__ import annotations

import re
import time

import pytest
from sqlalchemy import Engine, event, insert, select, text

from receiver.db import utcnow, write_transaction
from receiver.ledger import Ledger, RawDelivery
from receiver.models import Delivery, Hook, Task
from receiver.pipeline import HELD_BYTES, Pipeline, process_deliveries
from tests.conftest import DELIVERIES

FULL = (DELIVERIES / "01-full-response-json.body").read_bytes()
PING = b'{"event":"task_completed","sessionId":"s","taskId":"t2"}'


def store(engine: Engine, *bodies: bytes) -> list[str]:
    """Commit deliveries through the ledger without telling any pipeline."""
    ledger = Ledger(engine)
    ledger.start()
    try:
        recorded = ledger.record_sync(
            [
                RawDelivery(
                    hook="p", body=b, content_type="application/json", headers=(), query_string=""
                )
                for b in bodies
            ]
        )
    finally:
        ledger.stop()
    return [r.delivery_id for r in recorded]


def statuses(engine: Engine) -> dict[str, tuple[str, str | None]]:
    with engine.connect() as conn:
        return {
            r.id: (r.status, r.reason)
            for r in conn.execute(select(Delivery.id, Delivery.status, Delivery.reason))
        }


def test_a_batch_quarantines_one_and_processes_the_rest(engine: Engine) -> None:
    good, bad, ping = store(engine, FULL, b"{broken", PING)
    outcomes = process_deliveries(engine, [good, bad, ping, good], max_depth=5)
    assert [o.status for o in outcomes] == ["processed", "quarantined", "processed"]
    seen = statuses(engine)
    assert seen[good][0] == "processed"
    assert seen[bad][0] == "quarantined"
    reason = seen[bad][1]
    assert reason is not None
    assert reason.startswith("invalid JSON")
    with engine.connect() as conn:
        assert sorted(conn.scalars(select(Task.task_id))) == ["t2", "task_xyz789"]


def test_reprocessing_a_batch_changes_nothing(engine: Engine) -> None:
    ids = store(engine, FULL, PING)
    process_deliveries(engine, ids, max_depth=5)
    with engine.connect() as conn:
        before = conn.execute(select(Task.__table__).order_by(Task.task_key)).all()
    process_deliveries(engine, ids, max_depth=5)
    with engine.connect() as conn:
        after = conn.execute(select(Task.__table__).order_by(Task.task_key)).all()
    assert before == after


def test_sweep_picks_up_deliveries_left_stored(engine: Engine) -> None:
    [delivery_id] = store(engine, FULL)  # committed, but no pipeline was told (an outage)
    pipeline = Pipeline(engine, max_depth=5, sweep_seconds=0.2)
    pipeline.start()
    try:
        deadline = time.monotonic() + 10
        while statuses(engine)[delivery_id][0] == "stored" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        pipeline.stop()
    assert statuses(engine)[delivery_id][0] == "processed"


def test_a_crash_in_a_pure_core_quarantines_with_the_reason(engine: Engine) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000  # not declared JSON: the parsers recurse and give up
    ledger = Ledger(engine)
    ledger.start()
    try:
        [recorded] = ledger.record_sync(
            [
                RawDelivery(
                    hook="p", body=deep, content_type="text/plain", headers=(), query_string=""
                )
            ]
        )
    finally:
        ledger.stop()
    [outcome] = process_deliveries(engine, [recorded.delivery_id], max_depth=5)
    assert outcome.status == "quarantined"
    assert statuses(engine)[recorded.delivery_id][0] == "quarantined"


def test_a_failure_while_writing_redoes_the_batch_one_savepoint_each(engine: Engine) -> None:
    """A batch goes first without savepoints; a delivery that fails while its rows are
    written (here: against the hook's JSON Schema) is quarantined alone on the redo."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "qty": {"type": "integer"}},
        "required": ["name"],
    }
    with engine.connect() as conn, write_transaction(conn):
        conn.execute(
            insert(Hook).values(
                name="p", created_at=utcnow(), output_type="structured_json", output_schema=schema
            )
        )
    first, wrong, last = store(
        engine, b'{"name": "a", "qty": 1}', b'{"qty": "many"}', b'{"name": "c", "qty": 3}'
    )
    outcomes = process_deliveries(engine, [first, wrong, last], max_depth=5)
    assert [o.status for o in outcomes] == ["processed", "quarantined", "processed"]
    reason = statuses(engine)[wrong][1]
    assert reason is not None
    assert "does not match the hook's schema" in reason
    with engine.connect() as conn:
        rows = conn.execute(text('SELECT name, qty FROM "results__p" ORDER BY qty')).all()
    assert [tuple(r) for r in rows] == [("a", 1), ("c", 3)]


def test_the_ledger_is_busy_during_a_stream_not_after_one_delivery(engine: Engine) -> None:
    """The pipeline yields to a stream of deliveries, and processes a lone one at once."""
    ledger = Ledger(engine)
    ledger.start()

    def one(n: int) -> None:
        body = f'{{"event":"task_completed","sessionId":"s","taskId":"b{n}"}}'.encode()
        ledger.record_sync(
            [RawDelivery(hook="p", body=body, content_type=None, headers=(), query_string="")]
        )

    try:
        assert not ledger.busy(within=2.0)
        one(1)
        assert not ledger.busy(within=2.0)  # a delivery on its own
        one(2)
        assert ledger.busy(within=2.0)  # two commits close together: a stream
        time.sleep(0.3)
        assert not ledger.busy(within=0.2)  # and it has passed
    finally:
        ledger.stop()


_BODY = re.compile(r"\bdeliveries\.body\b")  # not body_sha256 or body_size


def _body_reads(engine: Engine) -> list[str]:
    """Every statement this engine runs from now on that reads ``deliveries.body``."""
    reads: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().upper().startswith("SELECT") and _BODY.search(statement):
            reads.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    return reads


def _deliveries(*bodies: bytes) -> list[RawDelivery]:
    return [
        RawDelivery(hook="p", body=b, content_type="application/json", headers=(), query_string="")
        for b in bodies
    ]


@pytest.mark.parametrize("held_bytes", [HELD_BYTES, len(FULL) + 1, 0])
def test_committed_bodies_are_processed_from_memory_within_the_budget(
    engine: Engine, held_bytes: int
) -> None:
    """What the ledger just committed is not read back, unless it went past ``held_bytes``."""
    pipeline = Pipeline(engine, max_depth=5, held_bytes=held_bytes)
    ledger = Ledger(engine, on_committed=lambda ds, _: pipeline.submit_committed(ds))
    reads = _body_reads(engine)
    pipeline.start()
    ledger.start()
    try:
        deliveries = _deliveries(FULL, PING, b"{broken")
        ledger.record_sync(deliveries)
        pipeline.join()
        assert pipeline.held() == 0  # released once processed
    finally:
        ledger.stop()
        pipeline.stop()
    seen = statuses(engine)
    assert [seen[d.id][0] for d in deliveries] == ["processed", "processed", "quarantined"]
    # All in hand: no read. Past the budget: one read, in the batch, of what was not kept.
    assert len(reads) == (0 if held_bytes == HELD_BYTES else 1), reads
