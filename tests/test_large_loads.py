"""Big outputs take the column-wise paths (Arrow CSV, flat JSON records, binary COPY): each
must store exactly what the general path stores, on both databases."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
from typing import Any

import pyarrow as pa
import pytest
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from receiver import csvparse, inserts, normalise, pgcopy, results
from receiver.columns import ColumnType
from receiver.models import ResultColumn, ResultTable
from receiver.schema import result_table
from tests.readback import deliver

COPY = inserts.COPY_THRESHOLD
#: PostgreSQL loads big batches through COPY and small ones through executemany: test both.
BOTH_LOAD_PATHS = pytest.mark.parametrize(
    "copy_threshold",
    [pytest.param(COPY, id="copy"), pytest.param(10**9, id="executemany")],
)
#: System columns that two deliveries of one body have in common.
SYSTEM = ("_row_index", "_parent_index", "_list_index", "_session_id", "_task_id")
#: System columns that are the same for two deliveries of one body.
SYSTEM = ("_row_index", "_parent_index", "_list_index", "_session_id", "_task_id")


def stored(engine: Engine, hook: str) -> dict[str, Any]:
    """The hook's catalog and every stored value as the database holds it, exactly.

    SQLite: each value's storage class and quoted literal; PostgreSQL: its text.
    """
    out: dict[str, Any] = {}
    with engine.connect() as conn:
        tables = conn.execute(
            select(ResultTable.table_name, ResultTable.path).where(ResultTable.hook == hook)
        ).all()
        for name, path in tables:
            columns = conn.execute(
                select(ResultColumn.column_name, ResultColumn.source_key, ResultColumn.type)
                .where(ResultColumn.table_name == name)
                .order_by(ResultColumn.position)
            ).all()
            names = [*SYSTEM, *(c.column_name for c in columns)]
            if engine.dialect.name == "sqlite":
                listed = ", ".join(f'typeof("{n}"), quote("{n}")' for n in names)
            else:
                listed = ", ".join(f'"{n}"::text' for n in names)
            rows = conn.exec_driver_sql(
                f'SELECT {listed} FROM "{name}" ORDER BY _delivery_id, _row_index'
            ).all()
            out[path] = {"columns": [tuple(c) for c in columns], "rows": [tuple(r) for r in rows]}
    return out


def regular_csv(rows: int, shift: int = 0) -> bytes:
    """A CSV that csv.writer writes (so regular, one width), big enough for the Arrow path,
    with every type, lossy texts, empty cells and text that COPY and SQL must escape."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "name", "price", "ok", "day", "at", "code", "note", "blank", "n"])
    base = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    prices = ["1.50", "1e3", "-0.0", "5", "0.1", "12.25", "", "0.00001", "1234567890123456.7"]
    stamps = [".123Z", "Z", ".000000Z", ".5Z", ".250000Z"]
    for i in range(rows):
        at = (base + dt.timedelta(seconds=i * 37 + shift)).isoformat().removesuffix("+00:00")
        writer.writerow(
            [
                i + shift,
                f'item "{i}", ünïcode\n🔥\t\\N' if i % 7 == 0 else f"item {i}",
                prices[i % len(prices)],
                ["true", "false", "TRUE", ""][i % 4],
                "" if i % 5 == 0 else (base + dt.timedelta(days=i % 400)).date().isoformat(),
                "" if i % 11 == 0 else at + stamps[i % len(stamps)],
                f"{i % 100:03d}",
                "" if i % 3 else "\\N \t tab \r\n line",
                "",
                "+7" if i % 13 == 0 else ("-0" if i % 17 == 0 else str(i * 12345)),
            ]
        )
    return buffer.getvalue().encode()


def retyped_csv(rows: int) -> bytes:
    """The same header with other types: the second delivery's cells go to variant columns."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "name", "price", "ok", "day", "at", "code", "note", "blank", "n"])
    for i in range(rows):
        writer.writerow(
            [f"x{i}", i, i, "2024-01-01", "true", 1.5, i, "", "filled", "2024-01-01T00:00:00Z"]
        )
    return buffer.getvalue().encode()


@BOTH_LOAD_PATHS
def test_arrow_csv_stores_what_the_stdlib_path_stores(
    client: TestClient, engine: Engine, monkeypatch: pytest.MonkeyPatch, copy_threshold: int
) -> None:
    monkeypatch.setattr(inserts, "COPY_THRESHOLD", copy_threshold)
    monkeypatch.setattr(pgcopy, "_COPY_CHUNK", 1000)  # several chunks per COPY
    bodies = [regular_csv(3000), regular_csv(2500, shift=10**6), retyped_csv(2000)]
    for body in bodies:
        assert len(body) >= csvparse.ARROW_MIN_CHARS
        assert not isinstance(csvparse.parse_csv_columns(body.decode()).values[0], list)
    payloads: list[bool] = []
    binary_rows = pgcopy._binary_rows

    def spy(*args: Any) -> Any:
        payload = binary_rows(*args)
        payloads.append(payload is not None)
        return payload

    monkeypatch.setattr(pgcopy, "_binary_rows", spy)
    for hook in ("arrow", "stdlib"):
        if hook == "stdlib":
            monkeypatch.setattr(csvparse, "ARROW_MIN_CHARS", 10**12)
        for body in bodies:
            row = deliver(client, engine, hook, body, "text/csv")
            assert row.status == "processed", row.reason
    if engine.dialect.name == "postgresql" and copy_threshold == COPY:
        # Arrow arrays go to COPY in Arrow-built chunks; Python values (a timestamp variant,
        # the stdlib path) row by row.
        assert payloads == [True] * (3 + 3) + [False] * 4
    arrow, stdlib = stored(engine, "arrow"), stored(engine, "stdlib")
    assert arrow == stdlib
    [root] = arrow.values()
    assert len(root["rows"]) == 7500
    assert any("__v_" in c[0] for c in root["columns"])  # the third body made variants


def flat_records_json(items: int) -> bytes:
    return json.dumps(
        [
            {
                "i": i if i % 5 else None,
                "f": [i / 3, -0.0, 7.0, 1e300, 5e-324][i % 5],
                "s": f"s\t{i}\\N 🔥" if i % 4 else "",
                "b": i % 2 == 0,
                "big": 2**63 - 1 - i,
                "null": None,
            }
            for i in range(items)
        ]
    ).encode()


@BOTH_LOAD_PATHS
def test_flat_records_store_what_flatten_stores(
    client: TestClient, engine: Engine, monkeypatch: pytest.MonkeyPatch, copy_threshold: int
) -> None:
    monkeypatch.setattr(inserts, "COPY_THRESHOLD", copy_threshold)
    uniform = json.dumps([{"u": i, "v": f"v{i}", "w": i / 7} for i in range(3000)]).encode()
    # A JSON column from a depth cut, then plain strings under the same key: variants.
    deep = json.dumps([{"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}]).encode()
    shallow = json.dumps([{"a": {"b": {"c": {"d": {"e": "text"}}}}}] * 1500).encode()
    mixed = json.dumps([{"m": [1, "one", 1.5, True, None][i % 5]} for i in range(1500)]).encode()
    bodies = [flat_records_json(3000), uniform, deep, shallow, mixed]
    loaded: list[int | None] = []
    load_records = results._load_records

    def spy(*args: Any) -> int | None:
        loaded.append(load_records(*args))
        return loaded[-1]

    monkeypatch.setattr(results, "_load_records", spy)
    for hook in ("records", "flatten"):
        if hook == "flatten":
            monkeypatch.setattr(normalise, "flat_records", lambda document: None)
        for body in bodies:
            row = deliver(client, engine, hook, body)
            assert row.status == "processed", row.reason
    assert stored(engine, "records") == stored(engine, "flatten")
    # Whole columns for the first two; nested objects are not records; mixed types fall back.
    assert loaded == [3000, 3000, None]


def test_floats_survive_bit_for_bit(client: TestClient, engine: Engine) -> None:
    """Binary COPY (and SQLite's driver) write floats exactly: extremes, subnormals, pi."""
    values = [5e-324, -5e-324, 1.7976931348623157e308, 0.1, math.pi, -2.5]
    body = json.dumps([{"v": values[i % len(values)]} for i in range(3000)]).encode()
    assert deliver(client, engine, "floats", body).status == "processed"
    with engine.connect() as conn:
        got = conn.exec_driver_sql('SELECT v FROM "results__floats" ORDER BY _row_index').all()
    assert [repr(r[0]) for r in got] == [repr(values[i % len(values)]) for i in range(3000)]


class Label(str):
    """A str subclass: psycopg dumps it, the Arrow encoder leaves it to psycopg."""


def test_copy_goes_row_by_row_from_the_chunk_arrow_cannot_encode(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: chunks 0-5 are Arrow-built, then psycopg takes over mid-COPY and ends the
    stream. SQLite (multi-row INSERTs) must store the same batch just as well."""
    monkeypatch.setattr(pgcopy, "_COPY_CHUNK", 100)
    count = 1250
    table = result_table("results__chunks", (("n", ColumnType.INTEGER), ("s", ColumnType.TEXT)))
    texts: list[str | None] = [f"s{i}" if i % 3 else None for i in range(count)]
    texts[640] = Label("odd one")
    with engine.begin() as conn:
        table.create(conn)
        columns: dict[str, inserts.Values] = {
            "n": pa.array(range(count), pa.int64()),
            "s": texts,
            "_row_index": range(count),
        }
        inserts.insert_columns(conn, table, count, columns, {"_delivery_id": "d"})
        got = conn.exec_driver_sql("SELECT _row_index, n, s FROM results__chunks ORDER BY 1").all()
    assert [tuple(r) for r in got] == [(i, i, texts[i]) for i in range(count)]
