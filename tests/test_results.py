"""Result rows through HTTP and the database: links, depth, identifiers, round trips, COPY."""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
import json
import math
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, inspect, select, text
from starlette.testclient import TestClient

from receiver import inserts
from receiver.app import create_app
from receiver.columns import INT64_MAX, INT64_MIN, ColumnType
from receiver.csvparse import parse_csv, render_cell
from receiver.models import Delivery, ResultTable
from receiver.schema import result_table
from receiver.settings import Settings
from tests.conftest import DELIVERIES, post
from tests.readback import cells, column_map, deliver, hook_tables, raw_rows, settle

_hooks = itertools.count()


def fresh_hook(prefix: str) -> str:
    return f"{prefix}-{next(_hooks)}"


# --------------------------------------------------------------------------- links and duplicates


def test_rows_carry_delivery_session_task_and_index(client: TestClient, engine: Engine) -> None:
    body = (DELIVERIES / "14-full-response-files-network.body").read_bytes()
    first = deliver(client, engine, "linked", body)
    assert first.status == "processed", first.reason
    root = hook_tables(engine, "linked")[()]
    rows = raw_rows(engine, root)
    assert [r["_row_index"] for r in rows] == [0, 1]
    assert {r["_delivery_id"] for r in rows} == {first.id}
    assert {r["_task_id"] for r in rows} == {first.task_id} == {"t-11"}
    assert {r["_session_id"] for r in rows} == {first.session_id}
    assert first.session_id is not None

    again = post(client, "linked", body)
    assert again["status"] == "duplicate"
    assert settle(engine, str(again["delivery_id"])).status == "duplicate"
    assert len(raw_rows(engine, root)) == 2


def test_without_ids_the_links_are_null(client: TestClient, engine: Engine) -> None:
    deliver(client, engine, "bare", b'[{"a": 1}, {"a": 2, "l": [true]}]')
    tables = hook_tables(engine, "bare")
    rows = raw_rows(engine, tables[()])
    assert [(r["_row_index"], r["_list_index"]) for r in rows] == [(0, 0), (1, 1)]
    assert {(r["_session_id"], r["_task_id"]) for r in rows} == {(None, None)}
    [child] = raw_rows(engine, tables[("l",)])
    assert (child["_parent_index"], child["_list_index"], child["value"]) == (1, 0, True)


# --------------------------------------------------------------------------- depth


def test_depth_limit_stores_the_rest_as_json_text(settings: Settings, engine: Engine) -> None:
    doc = {"a": {"b": {"c": {"d": 1}}}, "l": [[1, [2]]], "s": "x"}
    with TestClient(create_app(replace(settings, max_depth=2), engine=engine)) as client:
        assert deliver(client, engine, "deep", json.dumps(doc).encode()).status == "processed"
    tables = hook_tables(engine, "deep")
    assert set(tables) == {(), ("l",)}
    columns = column_map(engine, tables[()])
    assert columns["a__b"] == (("a", "b"), None, "json")
    assert cells(engine, tables[()]) == [{("a", "b"): '{"c":{"d":1}}', ("s",): "x"}]
    assert cells(engine, tables[("l",)]) == [{("value",): "[1,[2]]"}]
    assert column_map(engine, tables[("l",)])["value"][2] == "json"


# --------------------------------------------------------------------------- hostile identifiers

HOSTILE = [
    '"; DROP TABLE tasks; --',
    "x" * 500,
    "🔥💧",
    "",
    "Price",
    "price",
    "PRICE",
    "_delivery_id",
    "a__b",
    "results__deliveries",
]


def test_hostile_json_keys_and_hook_names(client: TestClient, engine: Engine) -> None:
    doc: dict[str, Any] = {key: i for i, key in enumerate(HOSTILE)}
    doc["nested"] = {key: f"n{i}" for i, key in enumerate(HOSTILE)}
    doc[HOSTILE[0]] = [{HOSTILE[1]: 1, "": [2]}]
    # The worst names the hook-name pattern lets in (others are 404: test_hooknames.py).
    hooks = ["DROP.TABLE-tasks", "x" * 64, "a-b", "a_b", "a.b", "deliveries", "tasks"]
    for hook in hooks:
        row = deliver(client, engine, hook, json.dumps(doc).encode())
        assert row.status == "processed", row.reason
    core = {"deliveries", "tasks", "hooks", "tokens", "outputs", "result_tables", "result_columns"}
    assert core <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        names = list(conn.scalars(select(ResultTable.table_name)))
        assert conn.scalar(select(func.count()).select_from(Delivery)) == len(hooks)
    assert len(names) == len(set(names)) == len(hooks) * 3
    assert all(n.startswith("results__") and len(n) <= 63 for n in names)
    for hook in hooks:
        tables = hook_tables(engine, hook)
        [root] = cells(engine, tables[()])
        expected: dict[tuple[str, ...], Any] = {
            (k,): v for k, v in doc.items() if not isinstance(v, dict | list)
        }
        expected |= {("nested", k): v for k, v in doc["nested"].items()}
        assert root == expected
        assert cells(engine, tables[(HOSTILE[0],)]) == [{(HOSTILE[1],): 1}]
        assert cells(engine, tables[(HOSTILE[0], "")]) == [{("value",): 2}]
        for column in column_map(engine, tables[()]):
            assert column.isascii()
            assert len(column) <= 63


def test_hostile_csv_headers(client: TestClient, engine: Engine) -> None:
    headers = [*HOSTILE, "", "price"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(headers)
    writer.writerow([f"v{i}" for i in range(len(headers))])
    row = deliver(client, engine, "hostile-csv", buffer.getvalue().encode(), "text/csv")
    assert row.status == "processed", row.reason
    [table] = hook_tables(engine, "hostile-csv").values()
    columns = column_map(engine, table)
    assert len({k for k, _, _ in columns.values()}) == len(headers)
    [got] = cells(engine, table)
    assert sorted(got.values()) == sorted(f"v{i}" for i in range(len(headers)))
    by_value = {v: k for k, v in got.items()}
    assert by_value["v0"] == (HOSTILE[0],)
    assert by_value["v3"] == ("#4",)  # an empty header is keyed by its position


def test_nul_characters(client: TestClient, engine: Engine, db_url: str) -> None:
    """NUL in a JSON string is kept (PostgreSQL: as its JSON literal in a variant column)."""
    row = deliver(client, engine, "nul", json.dumps({"s": "a\x00b", "t": "plain"}).encode())
    assert row.status == "processed", row.reason
    [got] = raw_rows(engine, hook_tables(engine, "nul")[()])
    if db_url.startswith("sqlite"):
        assert got["s"] == "a\x00b"
    else:
        assert got["s"] is None
        assert json.loads(got["s__v_json"]) == "a\x00b"
    raw = deliver(client, engine, "nul-csv", b"a,b\n1,x\x00y\n", "text/csv")
    if db_url.startswith("sqlite"):
        assert raw.status == "processed"
        assert cells(engine, hook_tables(engine, "nul-csv")[()]) == [{("a",): 1, ("b",): "x\x00y"}]
    else:
        assert raw.status == "quarantined"
        assert "NUL" in raw.reason


# --------------------------------------------------------------------------- round trips

#: PostgreSQL text cannot hold NUL; `test_nul_characters` covers it.
NO_NUL = st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"])
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(NO_NUL),
)
FLAT_OBJECTS = st.dictionaries(st.text(max_size=12), JSON_SCALARS, max_size=8)

ROUND_TRIP = hsettings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def stored_as(value: Any) -> Any:
    """How a JSON scalar reads back: an int beyond int64 as its exact digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if INT64_MIN <= value <= INT64_MAX else str(value)
    return value


@ROUND_TRIP
@given(doc=FLAT_OBJECTS)
def test_flat_json_objects_round_trip(client: TestClient, engine: Engine, doc: Any) -> None:
    hook = fresh_hook("json")
    row = deliver(client, engine, hook, json.dumps(doc).encode())
    assert row.status == "processed", row.reason
    [got] = cells(engine, hook_tables(engine, hook)[()])
    expected = {(k,): stored_as(v) for k, v in doc.items() if v is not None}
    assert got == expected
    for key, value in expected.items():
        assert type(got[key]) is type(value), key


CSV_CELLS = st.one_of(
    st.text(NO_NUL),
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["true", "FALSE", "007", "+44 20 7946 0958", "1e3", "-0", ""]),
    st.dates().map(str),
    st.datetimes(timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=-5))])).map(
        lambda d: d.isoformat()
    ),
)


@st.composite
def csv_tables(draw: st.DrawFn) -> list[list[str]]:
    width = draw(st.integers(1, 5))
    header = draw(st.lists(st.text(NO_NUL, max_size=10), min_size=width, max_size=width))
    rows = draw(
        st.lists(st.lists(CSV_CELLS, min_size=width, max_size=width), min_size=1, max_size=6)
    )
    return [header, *rows]


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def read_back_texts(engine: Engine, table: str) -> list[list[str]]:
    """Each row's cells as text, in header order: the original if one was kept."""
    columns = column_map(engine, table)
    payload = [(n, k[0]) for n, (k, v, _) in columns.items() if v is None and not n.startswith("_")]
    out: list[list[str]] = []
    for row in raw_rows(engine, table):
        originals = json.loads(row["_originals"]) if row.get("_originals") else {}
        texts: list[str] = []
        for name, key in payload:
            value = row[name]
            if isinstance(value, dt.datetime):
                # SQLite keeps UTC without an offset; PostgreSQL answers in the session's zone.
                value = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value
                value = value.astimezone(dt.UTC)
            texts.append(originals.get(key, render_cell(value)))
        out.append(texts)
    return out


@ROUND_TRIP
@given(table=csv_tables())
def test_csv_tables_round_trip(client: TestClient, engine: Engine, table: list[list[str]]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(table)
    text = buffer.getvalue()
    # Repaired rows and bodies that are also valid JSON have their own tests (csvparse, classify).
    assume(not any(r.flag for r in parse_csv(text).rows))
    assume(not is_json(text))
    hook = fresh_hook("csv")
    row = deliver(client, engine, hook, text.encode(), "text/csv")
    assert row.status == "processed", row.reason
    assert read_back_texts(engine, hook_tables(engine, hook)[()]) == table[1:]


# --------------------------------------------------------------------------- COPY


def big_csv(rows: int) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "name", "price", "ok", "day", "at", "code", "note"])
    base = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    for i in range(rows):
        writer.writerow(
            [
                i,
                f'item "{i}", ünïcode\n🔥' if i % 7 == 0 else f"item {i}",
                f"{i * 1.25:.2f}",
                "true" if i % 2 else "false",
                (base + dt.timedelta(days=i % 400)).date().isoformat(),
                (base + dt.timedelta(seconds=i * 37)).isoformat(),
                f"{i % 100:03d}",
                "" if i % 3 else "\\N \t tab",
            ]
        )
    writer.writerow(
        ["x", "ragged", "1", "true", "2024-01-01", "2024-01-01T00:00:00Z", "1", "n", "!"]
    )
    return buffer.getvalue().encode()


def big_json(items: int) -> bytes:
    return json.dumps(
        [
            {"i": i, "f": i / 3, "s": f"s\t{i}\\N", "b": i % 2 == 0, "l": [i, str(i)]}
            for i in range(items)
        ]
    ).encode()


def test_copy_stores_what_executemany_stores(
    client: TestClient, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    payloads = [(big_csv(5000), "text/csv"), (big_json(1500), "application/json")]
    contents: dict[str, list[list[dict[str, Any]]]] = {"copy": [], "executemany": []}
    for mode, threshold in (("copy", inserts.COPY_THRESHOLD), ("executemany", 10**9)):
        monkeypatch.setattr(inserts, "COPY_THRESHOLD", threshold)
        for n, (body, content_type) in enumerate(payloads):
            hook = f"{mode}-{n}"
            assert deliver(client, engine, hook, body, content_type).status == "processed"
            for _, table in sorted(hook_tables(engine, hook).items()):
                rows = raw_rows(engine, table)
                contents[mode].append(
                    [
                        {k: v for k, v in r.items() if k not in ("_delivery_id", "_received_at")}
                        for r in rows
                    ]
                )
    assert contents["copy"] == contents["executemany"]
    csv_rows = contents["copy"][0]
    assert len(csv_rows) == 5001
    assert csv_rows[0]["name"] == 'item "0", ünïcode\n🔥'
    assert csv_rows[0]["note"] == "\\N \t tab"
    assert csv_rows[1]["note"] is None
    assert csv_rows[5]["code"] == "005"
    assert csv_rows[-1]["_flag"] is not None
    assert [r["value"] for r in contents["copy"][2][:4]] == [0, None, 1, None]


# --------------------------------------------------------------------------- bulk insert


BULK_VALUES: list[dict[str, Any]] = [
    {
        "i": 2**63 - 1,
        "f": 1.5,
        "b": True,
        "d": dt.date(2024, 2, 29),
        "t": dt.datetime(2024, 1, 15, 10, 30, 0, 123456, tzinfo=dt.UTC),
        "s": "ünï\tcode\\N 🔥",
        "j": '{"a":[1,2]}',
    },
    {
        "i": -(2**63),
        "f": 7,  # an int in a float column (JSON gives these): stored as a float
        "b": False,
        "d": dt.date(1, 1, 1),
        "t": dt.datetime(2024, 1, 15, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
        "s": "",
        "j": None,
    },
    {"i": None, "f": -0.0, "b": None, "d": None, "t": None, "s": None, "j": "null"},
]


BULK_TYPES = {
    "i": ColumnType.INTEGER,
    "f": ColumnType.FLOAT,
    "b": ColumnType.BOOLEAN,
    "d": ColumnType.DATE,
    "t": ColumnType.TIMESTAMP,
    "s": ColumnType.TEXT,
    "j": ColumnType.JSON,
}
#: The Arrow type the CSV parser gives each column type.
ARROW_TYPES = {
    "i": pa.int64(),
    "f": pa.float64(),
    "b": pa.bool_(),
    "d": pa.date32(),
    "t": pa.timestamp("us", tz="UTC"),
    "s": pa.string(),
    "j": pa.string(),
}
RECEIVED = [
    # Naive UTC, as SQLite gives it back (PostgreSQL reads it in the session's zone).
    pytest.param(dt.datetime(2026, 1, 2, 3, 4, 5, 6), id="naive"),  # noqa: DTZ001
    pytest.param(dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC), id="aware"),
]


def stored_exactly(conn: Any, table: Any) -> list[tuple[Any, ...]]:
    names = [c.name for c in table.columns]
    if conn.dialect.name == "sqlite":
        # typeof() and quote() show the storage class and the exact stored text.
        listed = ", ".join(f"typeof({n}), quote({n})" for n in names)
    else:
        listed = ", ".join(f"{n}::text" for n in names)
    return [
        tuple(r)
        for r in conn.exec_driver_sql(f"SELECT {listed} FROM {table.name} ORDER BY _row_index")
    ]


@pytest.mark.parametrize("received", RECEIVED)
@pytest.mark.parametrize("arrow", [pytest.param(False, id="lists"), pytest.param(True, id="arrow")])
@pytest.mark.parametrize("count", [pytest.param(3, id="few"), pytest.param(1200, id="many")])
def test_bulk_insert_stores_what_sqlalchemy_stores(
    engine: Engine, count: int, arrow: bool, received: dt.datetime
) -> None:
    """`insert_columns` bypasses SQLAlchemy's per-row processing (multi-row inserts on SQLite,
    binary COPY on PostgreSQL for many rows, Arrow arrays as the CSV parser gives them):
    every type must still be stored exactly as a Core insert stores it."""
    rows = [BULK_VALUES[n % len(BULK_VALUES)] | {"_row_index": n} for n in range(count)]
    if arrow:  # the parser's timestamps are UTC instants
        rows = [r | {"t": r["t"] and r["t"].astimezone(dt.UTC)} for r in rows]
    stored: dict[str, list[tuple[Any, ...]]] = {}
    with engine.begin() as conn:
        for mode in ("core", "bulk"):
            table = result_table(f"results__bulk_{mode}", tuple(BULK_TYPES.items()))
            table.create(conn)
            system = {"_delivery_id": "d", "_session_id": None, "_received_at": received}
            if mode == "core":
                conn.execute(table.insert(), [system | row for row in rows])
            else:
                columns: dict[str, Any] = {
                    name: [row[name] for row in rows] for name in [*BULK_TYPES, "_row_index"]
                }
                if arrow:
                    columns = {
                        n: pa.array(v, ARROW_TYPES[n])
                        for n, v in columns.items()
                        if n in ARROW_TYPES
                    }
                    columns["_row_index"] = range(count)
                inserts.insert_columns(conn, table, count, columns, system)
            stored[mode] = stored_exactly(conn, table)
    assert stored["bulk"] == stored["core"]
    assert len(stored["bulk"]) == count


def test_a_header_named_like_a_row_note_keeps_its_own_column(
    client: TestClient, engine: Engine
) -> None:
    """`_flag` as a header and the `_flag` note of a ragged row must not share a column."""
    body = b"name,_flag\nBitcoin,yes\nEthereum,no,extra\n"
    post(client, "notes", body, "text/csv")
    with engine.connect() as conn:
        rows = (
            conn.execute(text('SELECT * FROM "results__notes" ORDER BY _row_index'))
            .mappings()
            .all()
        )
    assert [r["flag"] for r in rows] == ["yes", "no"]
    assert rows[0]["_flag"] is None
    assert rows[1]["_flag"] is not None
    assert rows[1]["_flag"].startswith("ragged")


@pytest.mark.parametrize(
    "variant", [pytest.param(False, id="records"), pytest.param(True, id="cells")]
)
@pytest.mark.parametrize("items", [pytest.param(2, id="few"), pytest.param(1500, id="many")])
def test_json_negative_zero_keeps_its_sign(
    client: TestClient, engine: Engine, items: int, variant: bool
) -> None:
    """-0.0 reads back with its sign: PostgreSQL keeps it, SQLite stores 0.0 and `_originals`
    keeps the text (keyed by the column's source key), as a CSV cell's would be."""
    doc: list[dict[str, Any]] = [
        {"v": -0.0 if i % 2 == 0 else 0.0, "n": {"w": -0.0}, "s": "x"} for i in range(items)
    ]
    if variant:  # a text variant: the column is placed cell by cell, the notes still line up
        doc.append({"v": "text", "n": {"w": 1.0}, "s": "x"})
    row = deliver(client, engine, fresh_hook("zero"), json.dumps(doc).encode())
    assert row.status == "processed", row.reason
    [table] = hook_tables(engine, row.hook).values()
    got = raw_rows(engine, table)
    if variant:
        assert got.pop()["v__v_text"] == "text"
    assert len(got) == items
    for i, stored in enumerate(got):
        notes = json.loads(stored["_originals"]) if stored.get("_originals") else {}
        for name, key, negative in (("v", '["v"]', i % 2 == 0), ("n__w", '["n", "w"]', True)):
            value = stored[name]
            assert value == 0
            if engine.dialect.name == "postgresql":
                assert math.copysign(1.0, value) == (-1.0 if negative else 1.0)
                assert "_originals" not in stored
            else:
                assert notes.get(key) == ("-0.0" if negative else None)
