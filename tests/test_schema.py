"""Result-table catalog: declared schemas, evolution, variants, concurrent evolvers."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import Engine, inspect, select
from starlette.testclient import TestClient

from receiver.columns import ColumnType, JsonValue
from receiver.db import write_transaction
from receiver.ledger import Ledger, RawDelivery
from receiver.models import Delivery, Hook
from receiver.processing import process_delivery
from receiver.rows import flatten
from receiver.schema import catalog_for, forget_catalogs, json_schema_tables
from tests.readback import cells, column_map, deliver, hook_tables, raw_rows, run_cli

T, F, INT, B, J = (
    ColumnType.TEXT,
    ColumnType.FLOAT,
    ColumnType.INTEGER,
    ColumnType.BOOLEAN,
    ColumnType.JSON,
)

PRODUCT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "price": {"type": "number"},
        "stock": {"type": ["integer", "null"]},
        "inStock": {"type": "boolean"},
        "seller": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "rating": {"$ref": "#/$defs/rating"}},
        },
        "tags": {"type": "array", "items": {"type": "string"}},
        "offers": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"shop": {"type": "string"}, "price": {"type": "number"}},
            },
        },
        "anything": {},
    },
    "required": ["name", "price"],
    "$defs": {"rating": {"anyOf": [{"type": "number"}, {"type": "null"}]}},
}


def declared(schema: Any, max_depth: int = 5) -> dict[tuple[str, ...], dict[tuple[str, ...], str]]:
    return {
        t.path: {k: c.type.value for k, c in t.columns.items()}
        for t in json_schema_tables(schema, max_depth=max_depth)
    }


# --------------------------------------------------------------------------- pure schema walk


def test_json_schema_maps_types_nesting_and_lists() -> None:
    assert declared(PRODUCT_SCHEMA) == {
        (): {
            ("name",): T,
            ("price",): F,
            ("stock",): INT,
            ("inStock",): B,
            ("seller", "name"): T,
            ("seller", "rating"): F,
        },
        ("tags",): {("value",): T},
        ("offers",): {("shop",): T, ("price",): F},
    }


def test_json_schema_tables_match_flatten_of_a_fitting_document() -> None:
    """Declared tables and columns are exactly those a fitting document produces."""
    document: JsonValue = {
        "name": "Widget",
        "price": 9.5,
        "stock": 3,
        "inStock": True,
        "seller": {"name": "ACME", "rating": 4.5},
        "tags": ["a"],
        "offers": [{"shop": "x", "price": 1.0}],
        "deep": {"a": {"b": {"c": [{"d": 1}]}}},
    }
    schema = {
        **PRODUCT_SCHEMA,
        "properties": {
            **PRODUCT_SCHEMA["properties"],
            "deep": {
                "type": "object",
                "properties": {
                    "a": {
                        "type": "object",
                        "properties": {
                            "b": {
                                "type": "object",
                                "properties": {
                                    "c": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {"d": {"type": "integer"}},
                                        },
                                    }
                                },
                            }
                        },
                    }
                },
            },
        },
    }
    for depth in (1, 2, 3, 4, 5, 6):
        flat = {
            t.path: {k: c.type.value for k, c in t.columns.items()}
            for t in flatten(document, max_depth=depth)
        }
        assert declared(schema, depth) == flat, depth


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        pytest.param(
            {
                "type": "array",
                "items": {"type": "object", "properties": {"a": {"type": "integer"}}},
            },
            {(): {("a",): INT}},
            id="top-level-array-of-objects",
        ),
        pytest.param(
            {"type": "array", "items": {"type": "number"}}, {(): {("value",): F}}, id="scalars"
        ),
        pytest.param(
            {"properties": {"m": {"items": {"items": {"type": "integer"}}}}},
            {(): {}, ("m",): {}, ("m", "value"): {("value",): INT}},
            id="list-of-lists-without-type",
        ),
        pytest.param(
            {"properties": {"x": {"type": ["string", "integer"]}, "y": {"enum": [1, "a"]}}},
            {(): {}},
            id="open-types-left-to-data",
        ),
        pytest.param(
            {"properties": {"r": {"$ref": "#/properties/r"}, "s": {"$ref": "http://x/y"}}},
            {(): {}},
            id="ref-loop-and-remote-ref",
        ),
        pytest.param(
            {"properties": {"o": {"oneOf": [{"type": "null"}, {"type": "boolean"}]}}},
            {(): {("o",): B}},
            id="nullable-oneOf",
        ),
        pytest.param("not a schema", {(): {}}, id="not-a-schema"),
    ],
)
def test_json_schema_edge_shapes(schema: Any, expected: Any) -> None:
    assert declared(schema) == expected


def test_json_schema_depth_cut_is_a_json_column() -> None:
    schema = {
        "properties": {
            "a": {"properties": {"b": {"properties": {"c": {"type": "string"}}}}},
            "l": {"type": "array", "items": {"type": "string"}},
        }
    }
    assert declared(schema, max_depth=1) == {(): {("a",): J, ("l",): J}}
    assert declared(schema, max_depth=2) == {
        (): {("a", "b"): J},
        ("l",): {("value",): T},
    }


# --------------------------------------------------------------------------- hooks add --schema


@pytest.fixture
def cli(db_url: str) -> Callable[..., Result]:
    """``receiver`` commands against the test database."""
    return functools.partial(run_cli, db_url)


def write_schema(tmp_path: Path, schema: Any) -> str:
    path = tmp_path / f"schema-{abs(hash(json.dumps(schema)))}.json"
    path.write_text(json.dumps(schema))
    return str(path)


def sql_columns(engine: Engine, table: str) -> list[str]:
    return [c["name"] for c in inspect(engine).get_columns(table)]


def test_hooks_add_json_schema_creates_typed_columns(
    cli: Callable[..., Result], tmp_path: Path, client: TestClient, engine: Engine
) -> None:
    cli("hooks", "add", "products", "--schema", write_schema(tmp_path, PRODUCT_SCHEMA))
    tables = hook_tables(engine, "products")
    assert set(tables) == {(), ("tags",), ("offers",)}
    root = tables[()]
    types = {key: t for key, _, t in column_map(engine, root).values()}
    assert types == {
        ("name",): "text",
        ("price",): "float",
        ("stock",): "integer",
        ("inStock",): "boolean",
        ("seller", "name"): "text",
        ("seller", "rating"): "float",
    }
    assert sql_columns(engine, root)[-6:] == [
        "name",
        "price",
        "stock",
        "in_stock",
        "seller__name",
        "seller__rating",
    ]
    sql_types = {c["name"]: c["type"] for c in inspect(engine).get_columns(root)}
    assert sql_types["price"].python_type is float
    assert sql_types["stock"].python_type is int
    assert sql_types["in_stock"].python_type is bool
    before = {t: column_map(engine, t) for t in tables.values()}
    listing = cli("tables").stdout
    for name in tables.values():
        assert name in listing

    payload = {
        "name": "Widget",
        "price": 12,
        "stock": None,
        "inStock": True,
        "seller": {"name": "ACME", "rating": 4.5},
        "tags": ["x", "y"],
        "offers": [{"shop": "s", "price": 1.25}],
    }
    row = deliver(client, engine, "products", json.dumps(payload).encode())
    assert row.status == "processed", row.reason
    assert {t: column_map(engine, t) for t in tables.values()} == before  # nothing new
    [got] = cells(engine, root)
    assert got == {
        ("name",): "Widget",
        ("price",): 12.0,
        ("inStock",): True,
        ("seller", "name"): "ACME",
        ("seller", "rating"): 4.5,
    }
    assert [r[("value",)] for r in cells(engine, tables[("tags",)])] == ["x", "y"]
    assert cells(engine, tables[("offers",)]) == [{("shop",): "s", ("price",): 1.25}]


def test_hooks_add_csv_list_fixes_columns_order_and_names(
    cli: Callable[..., Result], tmp_path: Path, client: TestClient, engine: Engine
) -> None:
    columns = ["Product Name", "price", "in stock?", "price"]
    cli("hooks", "add", "csvlist", "--schema", write_schema(tmp_path, columns))
    [table] = hook_tables(engine, "csvlist").values()
    with engine.connect() as conn:
        hook = conn.execute(select(Hook.__table__).where(Hook.name == "csvlist")).one()
    assert (hook.output_type, hook.output_schema) == ("structured_csv", columns)

    # No header: the registered columns apply; numbers are typed by the data.
    first = deliver(client, engine, "csvlist", b"Widget,9.5,true,10\n", "text/csv")
    assert first.status == "processed", first.reason
    # A header repeating the list (any case) is skipped, not loaded as a row.
    second = b"product name,PRICE,In Stock?,price\nGadget,1,false,2\n"
    assert deliver(client, engine, "csvlist", second, "text/csv").status == "processed"
    names = sql_columns(engine, table)
    assert names[names.index("product_name") :] == ["product_name", "price", "in_stock", "price_2"]
    by_name = column_map(engine, table)
    assert [by_name[n][0] for n in ("product_name", "price", "in_stock", "price_2")] == [
        ("Product Name",),
        ("price",),
        ("in stock?",),
        ("price#2",),
    ]
    assert by_name["price"][2] == "float"
    rows = sorted(cells(engine, table), key=lambda r: str(r[("Product Name",)]))
    assert rows == [
        {("Product Name",): "Gadget", ("price",): 1.0, ("in stock?",): False, ("price#2",): 2},
        {("Product Name",): "Widget", ("price",): 9.5, ("in stock?",): True, ("price#2",): 10},
    ]


def test_invalid_payload_quarantined_then_loaded_after_schema_fix(
    cli: Callable[..., Result], tmp_path: Path, client: TestClient, engine: Engine
) -> None:
    strict = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    cli("hooks", "add", "strict", "--schema", write_schema(tmp_path, strict))
    good = deliver(client, engine, "strict", b'{"n": 1}')
    bad = deliver(client, engine, "strict", b'{"n": "one", "extra": [1]}')
    assert good.status == "processed"
    assert bad.status == "quarantined"
    assert "does not match the hook's schema" in bad.reason
    assert "n: 'one' is not of type 'integer'" in bad.reason
    root = hook_tables(engine, "strict")[()]
    assert cells(engine, root) == [{("n",): 1}]  # the bad payload left no rows

    relaxed = {"type": "object", "properties": {"n": {"type": ["integer", "string"]}}}
    cli("hooks", "add", "strict", "--schema", write_schema(tmp_path, relaxed))
    result = cli("reprocess", "--quarantined")
    assert json.loads(result.stdout.splitlines()[-1]) == {"deliveries": 1, "processed": 1}
    with engine.connect() as conn:
        assert conn.scalar(select(Delivery.status).where(Delivery.id == bad.id)) == "processed"
    rows = {r["_delivery_id"]: r for r in raw_rows(engine, root)}
    assert rows[good.id]["n"] == 1
    assert rows[bad.id]["n__v_text"] == "one"  # the integer column keeps its type
    extra = hook_tables(engine, "strict")[("extra",)]
    assert cells(engine, extra) == [{("value",): 1}]


# --------------------------------------------------------------------------- evolution


def test_new_key_adds_column_and_conflicts_go_to_variants(
    client: TestClient, engine: Engine
) -> None:
    docs: list[Any] = [
        {"id": 1, "score": 1.5, "ok": True, "note": "a"},
        {"id": 2, "score": "high", "ok": "yes", "note": 7, "added": {"x": 1}},
        {"id": 2**70, "score": 2, "ok": 1, "note": None, "added": {"x": "1"}},
        {"id": 3.0, "score": False, "ok": False, "note": [1, {"a": None}], "deep": {"a": {"b": 1}}},
    ]
    for doc in docs:
        row = deliver(client, engine, "evolve", json.dumps(doc).encode())
        assert row.status == "processed", row.reason
    root = hook_tables(engine, "evolve")[()]
    columns = column_map(engine, root)
    assert {(k, v) for k, v, _ in columns.values()} >= {
        (("id",), None),
        (("id",), "text"),  # 2**70 is kept as its exact digits
        (("id",), "float"),
        (("score",), None),
        (("score",), "text"),
        (("score",), "boolean"),
        (("ok",), "text"),
        (("ok",), "integer"),
        (("note",), "integer"),
        (("added", "x"), None),
        (("added", "x"), "text"),
        (("deep", "a", "b"), None),
    }
    names = {(k, v): n for n, (k, v, _) in columns.items()}
    assert names[(("score",), "text")] == "score__v_text"
    rows = cells(engine, root)
    assert rows[0] == {("id",): 1, ("score",): 1.5, ("ok",): True, ("note",): "a"}
    assert rows[1] == {
        ("id",): 2,
        ("score",): "high",
        ("ok",): "yes",
        ("note",): 7,
        ("added", "x"): 1,
    }
    # An int into a float column is stored as that float (exact up to 2**53).
    assert rows[2] == {("id",): str(2**70), ("score",): 2.0, ("ok",): 1, ("added", "x"): "1"}
    assert type(rows[3][("id",)]) is float
    assert rows[3][("score",)] is False
    assert rows[3][("ok",)] is False
    assert rows[3][("deep", "a", "b")] == 1
    notes = hook_tables(engine, "evolve")[("note",)]
    assert len(cells(engine, notes)) == 2


def test_json_text_never_shares_a_column_with_strings(
    settings: Any, engine: Engine, tmp_path: Path
) -> None:
    from dataclasses import replace

    from receiver.app import create_app

    with TestClient(create_app(replace(settings, max_depth=1), engine=engine)) as client:
        deliver(client, engine, "cut", b'{"a": "plain", "b": {"deep": 1}}')
        deliver(client, engine, "cut", b'{"a": {"deep": 2}, "b": "{\\"deep\\": 1}"}')
    root = hook_tables(engine, "cut")[()]
    columns = column_map(engine, root)
    assert columns["a"][2] == "text"
    assert columns["a__v_json"][2] == "json"
    assert columns["b"][2] == "json"
    assert columns["b__v_text"][2] == "text"
    rows = raw_rows(engine, root)
    assert (rows[0]["a"], rows[0]["b"]) == ("plain", '{"deep":1}')
    assert (rows[1]["a__v_json"], rows[1]["b__v_text"]) == ('{"deep":2}', '{"deep": 1}')


# --------------------------------------------------------------------------- concurrent evolution

_WORKER = """
import json, sys, time
from pathlib import Path
from receiver.db import create_db_engine
from receiver.processing import process_delivery
from receiver.settings import Settings

url, go, ids = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
engine = create_db_engine(Settings(database_url=url))
while not go.exists():
    time.sleep(0.005)
print(json.dumps([process_delivery(engine, i, max_depth=5).status for i in ids]))
engine.dispose()
"""


def concurrent_docs(n: int) -> list[bytes]:
    """Documents that each add columns, variants and child rows to one table."""
    return [
        json.dumps(
            {
                "n": i,
                f"k{i % 7}": i,
                "mixed": i if i % 2 else f"s{i}",
                "nested": {f"x{i % 5}": i * 0.5},
                "items": [{"i": j, f"y{(i + j) % 4}": True} for j in range(i % 3 + 1)],
            }
        ).encode()
        for i in range(n)
    ]


def store(engine: Engine, hook: str, bodies: list[bytes]) -> list[str]:
    ledger = Ledger(engine)
    ledger.start()
    try:
        recorded = ledger.record_sync(
            [RawDelivery(hook, body, "application/json", (), "") for body in bodies]
        )
    finally:
        ledger.stop()
    return [r.delivery_id for r in recorded]


def check_concurrent_result(engine: Engine, hook: str, bodies: list[bytes]) -> None:
    with engine.connect() as conn:
        statuses = set(conn.scalars(select(Delivery.status).where(Delivery.hook == hook)))
    assert statuses == {"processed"}
    tables = hook_tables(engine, hook)
    assert set(tables) == {(), ("items",)}
    root = cells(engine, tables[()])
    items = cells(engine, tables[("items",)])
    docs = [json.loads(b) for b in bodies]
    assert len(root) == len(docs)
    assert len(items) == sum(len(d["items"]) for d in docs)
    expected_keys: set[tuple[str, ...]] = {("n",), ("mixed",)}
    expected_keys |= {(f"k{i}",) for i in range(7)} | {("nested", f"x{i}") for i in range(5)}
    assert {k for k, _, _ in column_map(engine, tables[()]).values()} == expected_keys
    by_n = {r[("n",)]: r for r in root}
    for i, doc in enumerate(docs):
        assert by_n[i][("mixed",)] == doc["mixed"]
        assert by_n[i][(f"k{i % 7}",)] == i
        assert by_n[i][("nested", f"x{i % 5}")] == i * 0.5


def test_two_processes_evolve_one_table(db_url: str, engine: Engine, tmp_path: Path) -> None:
    bodies = concurrent_docs(40)
    ids = store(engine, "race", bodies)
    go = tmp_path / "go"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, db_url, str(go), *order],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for order in (ids, ids[::-1])  # every delivery processed twice, concurrently
    ]
    go.touch()
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        assert set(json.loads(out)) == {"processed"}, err
    check_concurrent_result(engine, "race", bodies)


def test_threads_evolve_one_table(engine: Engine) -> None:
    bodies = concurrent_docs(30)
    ids = store(engine, "threads", bodies)
    start = threading.Barrier(4)

    def work(order: list[str]) -> set[str]:
        start.wait()
        return {process_delivery(engine, i, max_depth=5).status for i in order}

    orders = [ids, ids[::-1], ids[::2] + ids[1::2], ids[1::2] + ids[::2]]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, orders))
    assert results == [{"processed"}] * 4
    check_concurrent_result(engine, "threads", bodies)


def test_the_shared_catalog_forgets_what_a_rolled_back_savepoint_created(
    engine: Engine,
) -> None:
    """The pipeline shares one catalog per hook across a batch; after a savepoint rolls
    back, `forget_catalogs` makes the next load see the database as it is."""
    with engine.connect() as conn, write_transaction(conn):
        catalog = catalog_for(conn, "shared")
        assert catalog_for(conn, "shared") is catalog  # one read per transaction
        savepoint = conn.begin_nested()
        info = catalog.table(("items",), None, None)
        catalog.column(info, '["sku"]', "sku", ColumnType.TEXT)
        savepoint.rollback()
        stale = catalog_for(conn, "shared")
        assert info.identity in stale.tables  # what the rollback undid, it still believes
        forget_catalogs(conn)
        fresh = catalog_for(conn, "shared")
        assert fresh is not stale
        assert fresh.tables == {}
        again = fresh.table(("items",), None, None)  # created for real this time
        fresh.column(again, '["sku"]', "sku", ColumnType.TEXT)
    with engine.connect() as conn:
        assert catalog_for(conn, "shared") is not fresh  # a new transaction reads afresh
        assert catalog_for(conn, "shared").tables[again.identity].columns['["sku"]'][0] == "sku"
    assert "sku" in {c["name"] for c in inspect(engine).get_columns(again.name)}
