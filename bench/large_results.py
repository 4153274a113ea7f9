"""Figure 2 (and 5): a 50,000-row structured_csv and a 20,000-object structured_json delivery.

Measured: from the start of the POST to the rows being queryable (the
delivery's status turns ``processed`` in the same transaction that inserts
its rows; polled every 2 ms on a connection opened before the POST), then
the row count is checked. Baseline, in this process on its
own fresh database: pyarrow parses the same bytes and one bulk insert loads
them (``sqlite3.executemany`` or psycopg ``COPY``), committed.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv

from bench.databases import BenchDatabase, fresh_database
from bench.ingest import TOKEN, _env
from bench.servers import free_port, receiver_argv, running

CSV_ROWS = 50_000
JSON_OBJECTS = 20_000
TIMEOUT_S = 120.0
#: Poll period while waiting for the status to change (the precision of the figure).
POLL_S = 0.002


def csv_body(rows: int) -> bytes:
    """A structured_csv ai_response: header + ``rows`` rows of mixed types."""
    out = io.StringIO()
    out.write("id,name,price,qty,in_stock,updated,category,note\n")
    for i in range(rows):
        out.write(
            f'{i},"Product {i}",{(i % 1000) * 1.25 + 0.99},{i % 37},{"true" if i % 3 else "false"},'
            f'2026-0{1 + i % 9}-{10 + i % 18}T10:00:00Z,cat-{i % 12},"note, {i} with a comma"\n'
        )
    return out.getvalue().encode()


def json_body(objects: int) -> bytes:
    """A structured_json ai_response: a top-level array of ``objects`` flat objects."""
    docs = [
        {
            "id": i,
            "name": f"Product {i}",
            "price": (i % 1000) * 1.25 + 0.99,
            "qty": i % 37,
            "in_stock": i % 3 != 0,
            "updated": f"2026-0{1 + i % 9}-{10 + i % 18}T10:00:00Z",
            "category": f"cat-{i % 12}",
            "note": f"note, {i}",
        }
        for i in range(objects)
    ]
    return json.dumps(docs).encode()


def _post(url: str, body: bytes, content_type: str) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": content_type, "Authorization": TOKEN}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def _delivery_state(conn: Any, marker: str, delivery_id: str) -> tuple[str, str | None]:
    row = conn.execute(
        f"SELECT status, reason FROM deliveries WHERE id = {marker}", (delivery_id,)
    ).fetchone()
    return row[0], row[1]


@contextlib.contextmanager
def _watcher(db: BenchDatabase) -> Iterator[Any]:
    """One connection for polling, opened before the POST: a PostgreSQL connect per poll
    (~5 ms) would add its own latency to what is measured. Each SELECT sees the latest
    commit (autocommit on PostgreSQL; no open transaction on SQLite)."""
    conn = db.connect()
    try:
        if db.dialect == "postgresql":
            conn.autocommit = True
        yield conn
    finally:
        conn.close()


def _result_rows(db: BenchDatabase, hook: str, delivery_id: str) -> int:
    marker = "?" if db.dialect == "sqlite" else "%s"
    with contextlib.closing(db.connect()) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                f"SELECT table_name FROM result_tables WHERE hook = {marker}"
                " AND parent_table IS NULL",
                (hook,),
            ).fetchall()
        ]
        return sum(
            conn.execute(
                f'SELECT count(*) FROM "{t}" WHERE _delivery_id = {marker}', (delivery_id,)
            ).fetchone()[0]
            for t in tables
        )


def time_receiver(
    server_url: str, db: BenchDatabase, hook: str, body: bytes, content_type: str
) -> dict[str, Any]:
    marker = "?" if db.dialect == "sqlite" else "%s"
    with _watcher(db) as watch:
        started = time.perf_counter()
        answer = _post(f"{server_url}/hooks/{hook}", body, content_type)
        answered = time.perf_counter()
        while True:
            status, reason = _delivery_state(watch, marker, answer["delivery_id"])
            if status != "stored" or time.perf_counter() - started > TIMEOUT_S:
                break
            time.sleep(POLL_S)
        done = time.perf_counter()
    return {
        "response_s": round(answered - started, 3),
        "queryable_s": round(done - started, 3),
        "status": status,
        "reason": reason,
        "rows": _result_rows(db, hook, answer["delivery_id"]),
    }


def _sqlite_type(t: pa.DataType) -> str:
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        return "INTEGER"
    return "REAL" if pa.types.is_floating(t) else "TEXT"


def _pg_type(t: pa.DataType) -> str:
    if pa.types.is_integer(t):
        return "BIGINT"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ"
    return "DOUBLE PRECISION" if pa.types.is_floating(t) else "TEXT"


def _pylists(table: pa.Table) -> list[list[Any]]:
    """Columns as Python lists; timestamps as ISO text (10x faster than datetime objects)."""
    return [
        (col.cast(pa.string()) if pa.types.is_timestamp(col.type) else col).to_pylist()
        for col in table.columns
    ]


def bulk_load(db: BenchDatabase, table: pa.Table, name: str) -> None:
    """Create ``name`` from the Arrow schema and load it in one statement, one commit."""
    columns = table.column_names
    with contextlib.closing(db.connect()) as conn:
        if db.dialect == "sqlite":
            ddl = ", ".join(
                f'"{c}" {_sqlite_type(t)}' for c, t in zip(columns, table.schema.types, strict=True)
            )
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f'CREATE TABLE "{name}" ({ddl})')
            marks = ", ".join("?" * len(columns))
            values = _pylists(table)
            conn.executemany(f'INSERT INTO "{name}" VALUES ({marks})', zip(*values, strict=True))
            conn.execute("COMMIT")
            return
        ddl = ", ".join(
            f'"{c}" {_pg_type(t)}' for c, t in zip(columns, table.schema.types, strict=True)
        )
        conn.execute(f'CREATE TABLE "{name}" ({ddl})')
        with conn.cursor() as cur, cur.copy(f'COPY "{name}" FROM STDIN') as copy:
            for row in zip(*_pylists(table), strict=True):
                copy.write_row(row)
        conn.commit()


def time_baseline(db: BenchDatabase, body: bytes, kind: str, name: str) -> dict[str, Any]:
    started = time.perf_counter()
    if kind == "csv":
        table = pacsv.read_csv(io.BytesIO(body))
    else:
        table = pa.Table.from_pylist(json.loads(body))
    bulk_load(db, table, name)
    return {"queryable_s": round(time.perf_counter() - started, 3), "rows": table.num_rows}


def run(dialects: list[str], logs: Path, repeats: int = 5) -> dict[str, Any]:
    """Figure 2 per dialect: median of ``repeats`` deliveries (each to a new hook)."""
    bodies = {
        "csv": (csv_body(CSV_ROWS), "text/csv", CSV_ROWS),
        "json": (json_body(JSON_OBJECTS), "application/json", JSON_OBJECTS),
    }
    out: dict[str, Any] = {}
    for dialect in dialects:
        per: dict[str, Any] = {}
        with fresh_database(dialect) as db:
            port = free_port()
            log = logs / f"large-{dialect}.log"
            env = _env(db, logs / "data")
            with running(receiver_argv(port), env, log, port=port, ready_path="/healthz") as server:
                _post(f"{server.url}/hooks/warmup", b'{"ok": true}', "application/json")
                for kind, (body, content_type, expected) in bodies.items():
                    runs = [
                        time_receiver(server.url, db, f"big_{kind}_{i}", body, content_type)
                        for i in range(repeats)
                    ]
                    base = [
                        time_baseline(db, body, kind, f"baseline_{kind}_{i}")
                        for i in range(repeats)
                    ]
                    recv_s = statistics.median(r["queryable_s"] for r in runs)
                    base_s = statistics.median(b["queryable_s"] for b in base)
                    per[kind] = {
                        "body_mb": round(len(body) / 1e6, 2),
                        "expected_rows": expected,
                        "receiver": {
                            "queryable_s": recv_s,
                            "response_s": statistics.median(r["response_s"] for r in runs),
                            "rows": runs[-1]["rows"],
                            "status": runs[-1]["status"],
                            "reason": runs[-1]["reason"],
                            "runs_s": [r["queryable_s"] for r in runs],
                        },
                        "baseline": {"queryable_s": base_s, "rows": base[-1]["rows"]},
                        "ratio": round(recv_s / base_s, 2),
                    }
                per["server_peak_rss_mb"] = server.peak_rss_mb()
        out[dialect] = per
    return out
