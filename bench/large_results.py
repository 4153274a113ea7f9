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


#: Columns the like-for-like baseline adds to each row: the receiver's key.
_KEY = ("_delivery_id", "_row_index")


#: The key columns' DDL per dialect (the receiver's result tables have this key).
_KEY_DDL = {
    "sqlite": "_delivery_id TEXT, _row_index INTEGER, PRIMARY KEY (_delivery_id, _row_index)",
    "postgresql": "_delivery_id TEXT, _row_index BIGINT, PRIMARY KEY (_delivery_id, _row_index)",
}


def bulk_load(
    db: BenchDatabase, table: pa.Table, name: str, *, keyed: bool = False, output: str | None = None
) -> None:
    """Create ``name`` from the Arrow schema and load it in one statement, one commit.

    ``keyed``: each row also carries the receiver's key (delivery id, row index)
    under a primary key; ``output``: the text is also stored, in ``<name>_output``.
    """
    sqlite = db.dialect == "sqlite"
    column_type = _sqlite_type if sqlite else _pg_type
    ddl = [f'"{field.name}" {column_type(field.type)}' for field in table.schema]
    ddl += [_KEY_DDL[db.dialect]] if keyed else []
    columns = [*(_KEY if keyed else ()), *table.column_names]
    quoted = ", ".join(f'"{c}"' for c in columns)
    values = _pylists(table)
    if keyed:
        values = [[name] * table.num_rows, list(range(table.num_rows)), *values]
    with contextlib.closing(db.connect()) as conn:
        if sqlite:
            conn.execute("BEGIN IMMEDIATE")
        conn.execute(f'CREATE TABLE "{name}" ({", ".join(ddl)})')
        if sqlite:
            marks = ", ".join("?" * len(columns))
            conn.executemany(
                f'INSERT INTO "{name}" ({quoted}) VALUES ({marks})', zip(*values, strict=True)
            )
        else:
            with conn.cursor() as cur, cur.copy(f'COPY "{name}" ({quoted}) FROM STDIN') as copy:
                for row in zip(*values, strict=True):
                    copy.write_row(row)
        if output is not None:
            text_type = "TEXT" if sqlite else "TEXT COMPRESSION lz4"
            conn.execute(f'CREATE TABLE "{name}_output" (content {text_type})')
            conn.execute(
                f'INSERT INTO "{name}_output" VALUES ({"?" if sqlite else "%s"})', (output,)
            )
        if sqlite:
            conn.execute("COMMIT")
        else:
            conn.commit()


def keep_raw(db: BenchDatabase, body: bytes, name: str) -> None:
    """The raw body stored and committed on its own, as the receiver does before its 200."""
    with contextlib.closing(db.connect()) as conn:
        if db.dialect == "sqlite":
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f'CREATE TABLE "{name}_raw" (body BLOB)')
            conn.execute(f'INSERT INTO "{name}_raw" VALUES (?)', (body,))
            conn.execute("COMMIT")
            return
        conn.execute(f'CREATE TABLE "{name}_raw" (body BYTEA COMPRESSION lz4)')
        conn.execute(f'INSERT INTO "{name}_raw" VALUES (%s)', (body,))
        conn.commit()


def time_baseline(
    db: BenchDatabase, body: bytes, kind: str, name: str, *, like_for_like: bool = False
) -> dict[str, Any]:
    """Parse and bulk load. ``like_for_like`` also keeps what the receiver keeps: the raw
    body (committed first), the output text, and a primary key on every row."""
    started = time.perf_counter()
    if like_for_like:
        keep_raw(db, body, name)
    if kind == "csv":
        table = pacsv.read_csv(io.BytesIO(body))
    else:
        table = pa.Table.from_pylist(json.loads(body))
    output = body.decode() if like_for_like else None
    bulk_load(db, table, name, keyed=like_for_like, output=output)
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
                    alike = [
                        time_baseline(db, body, kind, f"alike_{kind}_{i}", like_for_like=True)
                        for i in range(repeats)
                    ]
                    recv_s = statistics.median(r["queryable_s"] for r in runs)
                    base_s = statistics.median(b["queryable_s"] for b in base)
                    alike_s = statistics.median(b["queryable_s"] for b in alike)
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
                        "like_for_like": {
                            "queryable_s": alike_s,
                            "ratio": round(recv_s / alike_s, 2),
                        },
                    }
                per["server_peak_rss_mb"] = server.peak_rss_mb()
        out[dialect] = per
    return out
