"""The pipeline: batches, one failure per savepoint, and the sweep after an outage."""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import Engine, event, func, insert, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.testclient import TestClient

from receiver.db import utcnow, write_transaction
from receiver.ledger import Ledger, RawDelivery
from receiver.models import Delivery, Hook, Output, Task
from receiver.pipeline import HELD_BYTES, Pipeline
from receiver.processing import _failure, process_deliveries
from tests.conftest import DELIVERIES, TOKEN
from tests.readback import column_map, hook_tables, raw_rows, snapshot
from tests.test_results import csv_tables

#: Documents whose tables, columns and types change from one to the next (no NUL:
#: PostgreSQL text cannot hold it, and such a delivery is quarantined either way).
JSON_DOCS = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_characters="\x00"), max_size=6),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "b", "c d", "e"]), children, max_size=4)
    ),
    max_leaves=12,
)

FULL = (DELIVERIES / "01-full-response-json.body").read_bytes()
PING = b'{"event":"task_completed","sessionId":"s","taskId":"t2"}'


def store(
    engine: Engine, *bodies: bytes, hook: str = "p", content_type: str = "application/json"
) -> list[str]:
    """Commit deliveries through the ledger without telling any pipeline."""
    ledger = Ledger(engine)
    ledger.start()
    try:
        recorded = ledger.record_sync(_deliveries(*bodies, hook=hook, content_type=content_type))
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
        assert sorted(conn.scalars(select(Task.task_id)).all(), key=str) == ["t2", "task_xyz789"]


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


def _deliveries(
    *bodies: bytes, hook: str = "p", content_type: str = "application/json"
) -> list[RawDelivery]:
    """Deliveries received a millisecond apart, in order (so no two share a time)."""
    start = utcnow()
    return [
        RawDelivery(
            hook=hook,
            body=b,
            content_type=content_type,
            headers=(),
            query_string="",
            received_at=start + dt.timedelta(milliseconds=i),
        )
        for i, b in enumerate(bodies)
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


def _derived(engine: Engine, hook: str, ids: list[str]) -> dict[object, object]:
    """What ``hook``'s deliveries left, by table path and by position in ``ids``: each row
    as (source key, variant) -> value plus its indexes; outputs; statuses."""
    position = {delivery_id: i for i, delivery_id in enumerate(ids)}
    out: dict[object, object] = {}
    for path, table in hook_tables(engine, hook).items():
        columns = column_map(engine, table)
        rows = []
        for row in raw_rows(engine, table):
            kept: dict[object, object] = {
                k: v for k, v in row.items() if k.startswith("_") and k.endswith("_index")
            }
            kept |= {columns[k][:2]: v for k, v in row.items() if not k.startswith("_")}
            rows.append((position[row["_delivery_id"]], sorted(kept.items(), key=repr)))
        out[path] = sorted(rows, key=repr)
    with engine.connect() as conn:
        outputs = conn.execute(select(Output.delivery_id, Output.output_type, Output.content))
        out["outputs"] = sorted((position[r[0]], r[1], r[2]) for r in outputs if r[0] in position)
        found = conn.execute(select(Delivery.id, Delivery.status, Delivery.kind, Delivery.reason))
        out["deliveries"] = sorted((position[r[0]], *r[1:]) for r in found if r[0] in position)
    return out


_batch_hooks = itertools.count()


def _batches(examples: int) -> hsettings:
    """Hypothesis settings for tests that store and process a batch per example."""
    return hsettings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def _csv_text(table: list[list[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerows(table)
    return out.getvalue().encode()


@_batches(40)
@given(
    st.one_of(
        st.tuples(
            st.lists(JSON_DOCS.map(lambda doc: json.dumps(doc).encode()), min_size=2, max_size=6),
            st.just("application/json"),
        ),
        st.tuples(
            st.lists(csv_tables().map(_csv_text), min_size=2, max_size=6), st.just("text/csv")
        ),
    )
)
def test_a_batch_writes_what_one_at_a_time_writes(
    engine: Engine, drawn: tuple[list[bytes], str]
) -> None:
    """Held writes (one statement per table per batch) leave exactly what writing each
    delivery alone leaves, as tables and columns appear and change type along the way
    (JSON documents, or CSV texts with their row notes)."""
    bodies, content_type = drawn
    n = next(_batch_hooks)
    together = store(engine, *bodies, hook=f"b{n}", content_type=content_type)
    alone = store(engine, *bodies, hook=f"a{n}", content_type=content_type)
    process_deliveries(engine, together, max_depth=3)
    for delivery_id in alone:
        process_deliveries(engine, [delivery_id], max_depth=3)
    assert _derived(engine, f"b{n}", together) == _derived(engine, f"a{n}", alone)


def _task_bodies() -> list[tuple[bytes, str]]:
    """Catalogue deliveries that name a task, with the task id they name."""
    found = []
    for meta in sorted(DELIVERIES.glob("*.json")):
        task = json.loads(meta.read_text())["expect"]["task"]
        if task and task.get("task_id"):
            found.append((meta.with_suffix(".body").read_bytes(), task["task_id"]))
    return found


TASK_BODIES = _task_bodies()


def _tasks(engine: Engine, prefix: str, ids: list[str]) -> list[tuple[object, ...]]:
    """The tasks named ``prefix``-*, with delivery ids and times as positions in ``ids``."""
    position = {delivery_id: i for i, delivery_id in enumerate(ids)}
    with engine.connect() as conn:
        times = select(Delivery.received_at, Delivery.id).where(Delivery.id.in_(ids))
        received = {r.received_at: r.id for r in conn.execute(times)}
        rows = conn.execute(select(Task.__table__).where(Task.task_id.startswith(prefix)))
        out = []
        for row in rows.mappings():
            task = dict(row)
            # Delivery ids and times become positions before the prefix is taken out of the
            # task's own strings: a UUID may hold the prefix's characters too.
            task["first_seen_at"] = position[received[task["first_seen_at"]]]
            task["last_delivery_id"] = position[task["last_delivery_id"]]
            task["hook"] = task["hook"] == prefix.rstrip("-")
            task |= {k: v.replace(prefix, "") for k, v in task.items() if isinstance(v, str)}
            out.append(tuple(sorted(task.items())))
    return sorted(out, key=repr)


@_batches(20)
@given(
    st.lists(
        st.tuples(st.integers(0, len(TASK_BODIES) - 1), st.sampled_from(["x", "y"])),
        min_size=2,
        max_size=8,
    )
)
def test_a_batch_upserts_tasks_as_one_at_a_time_does(
    engine: Engine, picks: list[tuple[int, str]]
) -> None:
    """A task named twice in a batch (a record, then a ping...) merges as it would alone."""
    n = next(_batch_hooks)

    def bodies(prefix: str) -> list[bytes]:
        return [
            TASK_BODIES[i][0].replace(TASK_BODIES[i][1].encode(), f"{prefix}{task}".encode())
            for i, task in picks
        ]

    together = store(engine, *bodies(f"b{n}-"), hook=f"b{n}")
    alone = store(engine, *bodies(f"a{n}-"), hook=f"a{n}")
    process_deliveries(engine, together, max_depth=3)
    for delivery_id in alone:
        process_deliveries(engine, [delivery_id], max_depth=3)
    expected = _tasks(engine, f"a{n}-", alone)
    assert expected  # the catalogue's tasks were found and renamed
    assert _tasks(engine, f"b{n}-", together) == expected


def test_bodies_in_hand_are_released_when_processing_fails(engine: Engine) -> None:
    """A delivery the pipeline cannot process at all (here: never committed) is reported
    failed, and its body does not stay in memory."""
    seen: list[tuple[str, str]] = []
    pipeline = Pipeline(engine, max_depth=5, on_processed=lambda i, o: seen.append((i, o)))
    [ghost] = _deliveries(FULL)
    pipeline.start()
    try:
        pipeline.submit_committed([ghost])
        pipeline.join()
        assert pipeline.held() == 0
    finally:
        pipeline.stop()
    assert seen == [(ghost.id, "failed")]


@pytest.mark.parametrize(
    ("error", "says"),
    [
        pytest.param(
            OperationalError("INSERT", {}, Exception("too many columns on t")),
            "more fields than a sqlite table can hold",
            id="too-wide",
        ),
        pytest.param(
            IntegrityError("INSERT", {}, Exception("constraint failed")),
            "receiver's log has the details under delivery d-1",
            id="refused",
        ),
        pytest.param(ZeroDivisionError("x"), "internal error", id="bug"),
    ],
)
def test_failure_reasons_are_sentences_not_driver_errors(error: Exception, says: str) -> None:
    reason = _failure(error, "d-1", "sqlite")
    assert says in reason
    assert "INSERT" not in reason  # never the statement or the driver's text
    assert "constraint failed" not in reason


def big_csv(target_bytes: int) -> bytes:
    """A typed CSV of about ``target_bytes``: integers, floats, text and dates."""
    lines = ["id,price,qty,title,sku,seen,ok,note"]
    size = len(lines[0])
    n = 0
    while size < target_bytes:
        line = (
            f"{n},{n * 0.37:.2f},{n % 97},Product number {n},SKU-{n:08d},2026-11-{n % 28 + 1:02d},"
        )
        line += f"{'true' if n % 2 else 'false'},a note for row {n} with some text"
        lines.append(line)
        size += len(line) + 1
        n += 1
    return ("\n".join(lines) + "\n").encode()


def test_a_9_mib_csv_being_processed_does_not_hold_up_ordinary_deliveries(
    client: TestClient, engine: Engine
) -> None:
    """Its parsing runs outside the load's transaction (receiver.normalise), so the write
    lock (on SQLite, the ledger's too) is held only while its rows are written: deliveries
    sent meanwhile are committed as ``stored``, none spooled."""
    body = big_csv(9 * 2**20)
    headers = {"authorization": TOKEN, "content-type": "text/csv"}
    big = client.post("/hooks/catalogue", content=body, headers=headers)
    assert big.status_code == 200, big.text
    big_id = big.json()["delivery_id"]

    def big_status() -> str:
        with engine.connect() as conn:
            return str(conn.scalar(select(Delivery.status).where(Delivery.id == big_id)))

    answers: list[dict[str, object]] = []
    sent_while_stored = 0
    seconds: list[float] = []
    deadline = time.monotonic() + 120
    while True:
        still_stored = big_status() == "stored"
        if not still_stored and len(answers) >= 20:
            break
        assert time.monotonic() < deadline, "the big delivery was not processed in time"
        started = time.perf_counter()
        response = client.post(
            "/hooks/orders",
            content=b'{"order": %d, "total": 12.5}' % len(answers),
            headers={"authorization": TOKEN, "content-type": "application/json"},
        )
        seconds.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        answers.append(response.json())
        sent_while_stored += still_stored
    client.app.state.pipeline.join()  # type: ignore[attr-defined]
    print(
        f"{len(answers)} ordinary deliveries, {sent_while_stored} while the CSV was stored;"
        f" slowest answer {max(seconds) * 1e3:.0f} ms"
    )
    assert sent_while_stored >= 1  # some really were sent while it was processed
    assert {a["status"] for a in answers} == {"stored"}  # committed, none spooled
    assert big_status() == "processed"
    with engine.connect() as conn:
        processed = conn.scalar(
            select(func.count()).where(Delivery.hook == "orders", Delivery.status == "processed")
        )
    assert processed == len(answers)
    rows = raw_rows(engine, hook_tables(engine, "catalogue")[()])
    assert len(rows) == body.count(b"\n") - 1


def test_a_stream_processed_during_ingest_leaves_what_processing_after_it_leaves(
    client: TestClient, engine: Engine
) -> None:
    """The pipeline's pauses and batch sizes under a stream (`Pipeline._yield_to_ingest`)
    change when a delivery is processed, never what it leaves: the same deliveries,
    processed again after the stream in one go, leave the same rows, tasks and statuses."""
    catalogue = []
    for meta in sorted(DELIVERIES.glob("*.json")):
        content_type = json.loads(meta.read_text())["content_type"]
        catalogue.append((meta.with_suffix(".body").read_bytes(), content_type))
    stream = [
        # Trailing whitespace makes each JSON copy a new delivery; the others repeat.
        (body + b" " * n if content_type == "application/json" else body, content_type)
        for n in range(12)
        for body, content_type in catalogue
    ]

    def send(item: tuple[bytes, str]) -> str:
        body, content_type = item
        headers = {"authorization": TOKEN, "content-type": content_type}
        response = client.post("/hooks/stream", content=body, headers=headers)
        assert response.status_code == 200, response.text
        return str(response.json()["delivery_id"])

    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(send, stream))
        with engine.connect() as conn:
            during = conn.scalar(select(func.count()).where(Delivery.status != "stored"))
    client.app.state.pipeline.join()  # type: ignore[attr-defined]
    print(f"{len(ids)} deliveries, {during} processed by the time the last was answered")
    assert during is not None
    assert during > 0  # processed during ingest, not only after it
    streamed = snapshot(engine)
    assert {status for _, status, _ in streamed["statuses"]} >= {"processed", "duplicate"}
    ordered = sorted(set(ids))  # arrival order: UUIDv7 ids
    for start in range(0, len(ordered), 64):
        process_deliveries(engine, ordered[start : start + 64], max_depth=5)
    assert snapshot(engine) == streamed
