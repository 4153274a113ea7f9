"""Tests for the pure JSON -> rows normaliser (`receiver.rows`)."""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.columns import INT64_MAX, INT64_MIN, ColumnType, JsonValue, sanitise_identifier
from receiver.rows import (
    FlatRow,
    FlatTable,
    Key,
    _dumps_iterative,
    dumps,
    flat_records,
    flatten,
    value_type,
)

pytestmark = pytest.mark.pure

# --------------------------------------------------------------------------- helpers


def table(tables: list[FlatTable], path: Key) -> FlatTable:
    found = [t for t in tables if t.path == path]
    assert len(found) == 1, f"{path}: {[t.path for t in tables]}"
    return found[0]


def values(t: FlatTable) -> list[dict[Key, Any]]:
    return [row.values for row in t.rows]


def check_links(tables: list[FlatTable]) -> None:
    """Indexes are positions, parents exist, parents come before children."""
    seen: dict[tuple[Key | None, Key], FlatTable] = {}
    for t in tables:
        for i, row in enumerate(t.rows):
            assert row.index == i
        if t.parent_path is None:
            assert t.path == ()
            assert all(row.parent_index is None for row in t.rows)
        else:
            assert t.path[: len(t.parent_path)] == t.parent_path
            assert len(t.path) > len(t.parent_path)
            parents = [p for (_, path), p in seen.items() if path == t.parent_path]
            assert parents, "parent table must come first"
            assert all(row.list_index is not None for row in t.rows)
            assert any(
                all(
                    row.parent_index is not None and row.parent_index < len(p.rows)
                    for row in t.rows
                )
                for p in parents
            )
        for key, column in t.columns.items():
            assert column.key == key
            assert column.name == "__".join(sanitise_identifier(part) for part in key)
            assert any(row.values.get(key) is not None for row in t.rows)
        seen[(t.parent_path, t.path)] = t
    assert tables[0].path == ()


def leaf_key(value: JsonValue) -> tuple[str, str]:
    return (type(value).__name__, repr(value))


def input_leaves(value: JsonValue) -> Counter[tuple[str, str]]:
    leaves: Counter[tuple[str, str]] = Counter()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        else:
            leaves[leaf_key(item)] += 1
    return leaves


def output_leaves(tables: list[FlatTable]) -> Counter[tuple[str, str]]:
    leaves: Counter[tuple[str, str]] = Counter()
    for t in tables:
        for row in t.rows:
            for key, cell in row.values.items():
                assert not isinstance(cell, dict | list)
                if key in row.json_keys:
                    assert isinstance(cell, str)
                    leaves += input_leaves(json.loads(cell))
                else:
                    assert isinstance(cell, bool | int | float | str) or cell is None
                    leaves[leaf_key(cell)] += 1
    return leaves


def deep(depth: int, inner: JsonValue = 1, *, lists: bool = False) -> JsonValue:
    """``{"a": {"a": ... inner}}`` built without recursion."""
    value = inner
    for _ in range(depth):
        value = [value] if lists else {"a": value}
    return value


# --------------------------------------------------------------------------- examples


def test_crypto_example_root_row_and_child_table() -> None:
    doc: JsonValue = {
        "top": [
            {"name": "Bitcoin", "price": "$95,187.71"},
            {"name": "Ethereum", "price": "$3,319.17"},
        ]
    }
    tables = flatten(doc)
    assert [t.path for t in tables] == [(), ("top",)]
    root, top = tables
    assert len(root.rows) == 1
    assert root.rows[0].values == {}
    assert root.columns == {}
    assert values(top) == [
        {("name",): "Bitcoin", ("price",): "$95,187.71"},
        {("name",): "Ethereum", ("price",): "$3,319.17"},
    ]
    assert [(r.parent_index, r.list_index) for r in top.rows] == [(0, 0), (0, 1)]
    assert top.parent_path == ()
    assert {k: c.type for k, c in top.columns.items()} == {
        ("name",): ColumnType.TEXT,
        ("price",): ColumnType.TEXT,
    }
    check_links(tables)


def test_top_level_array_of_objects() -> None:
    tables = flatten([{"sku": "A-1", "price": 9.5}, {"sku": "B-2", "price": 12}])
    assert len(tables) == 1
    root = tables[0]
    assert values(root) == [{("sku",): "A-1", ("price",): 9.5}, {("sku",): "B-2", ("price",): 12}]
    assert [(r.parent_index, r.list_index) for r in root.rows] == [(None, 0), (None, 1)]
    # Mixed float/int: first non-null type wins, cells keep their own types.
    assert root.columns[("price",)].type is ColumnType.FLOAT
    assert type(root.rows[1].values[("price",)]) is int
    assert root.rows[1].cell_type(("price",)) is ColumnType.INTEGER


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        pytest.param(
            [1, "x", None], [{("value",): 1}, {("value",): "x"}, {("value",): None}], id="scalars"
        ),
        pytest.param(
            [{"a": 1}, 2, {"value": 3}],
            [{("a",): 1}, {("value",): 2}, {("value",): 3}],
            id="mixed",
        ),
        pytest.param([], [], id="empty"),
        pytest.param([[]], [{}], id="list-of-empty-list"),
    ],
)
def test_top_level_arrays(doc: JsonValue, expected: list[dict[Key, Any]]) -> None:
    tables = flatten(doc)
    assert values(tables[0]) == expected
    assert [r.list_index for r in tables[0].rows] == list(range(len(expected)))
    check_links(tables)


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(7, id="int"),
        pytest.param("text", id="str"),
        pytest.param(None, id="null"),
        pytest.param(True, id="bool"),
        pytest.param(1.5, id="float"),
    ],
)
def test_top_level_scalar(doc: JsonValue) -> None:
    (root,) = flatten(doc)
    assert len(root.rows) == 1
    row = root.rows[0]
    assert (row.parent_index, row.list_index) == (None, None)
    assert row.values == {("value",): doc}
    assert type(row.values[("value",)]) is type(doc)


def test_nested_objects_flatten_to_path_keys() -> None:
    doc: JsonValue = {"seller": {"name": "Ann", "address": {"city": "Oslo"}}, "id": 1}
    (root,) = flatten(doc)
    assert root.rows[0].values == {
        ("seller", "name"): "Ann",
        ("seller", "address", "city"): "Oslo",
        ("id",): 1,
    }
    assert [c.name for c in root.columns.values()] == [
        "seller__name",
        "seller__address__city",
        "id",
    ]


def test_list_under_nested_object_and_list_in_items() -> None:
    doc: JsonValue = {
        "seller": {"addresses": [{"city": "Oslo"}]},
        "top": [{"tags": ["a", "b"]}, {"tags": []}, {"tags": ["c"]}],
    }
    tables = flatten(doc)
    assert [t.path for t in tables] == [(), ("seller", "addresses"), ("top",), ("top", "tags")]
    assert table(tables, ("seller", "addresses")).parent_path == ()
    tags = table(tables, ("top", "tags"))
    assert tags.parent_path == ("top",)
    assert values(tags) == [{("value",): "a"}, {("value",): "b"}, {("value",): "c"}]
    assert [(r.parent_index, r.list_index) for r in tags.rows] == [(0, 0), (0, 1), (2, 0)]
    assert values(table(tables, ("top",))) == [{}, {}, {}]
    check_links(tables)


def test_list_of_scalars_is_a_child_table() -> None:
    tables = flatten({"tags": ["x", 2, None, True]})
    tags = table(tables, ("tags",))
    assert values(tags) == [
        {("value",): "x"},
        {("value",): 2},
        {("value",): None},
        {("value",): True},
    ]
    assert tags.columns[("value",)].type is ColumnType.TEXT
    assert [tags.rows[i].cell_type(("value",)) for i in range(4)] == [
        ColumnType.TEXT,
        ColumnType.INTEGER,
        None,
        ColumnType.BOOLEAN,
    ]


def test_list_of_lists_nests_value_tables() -> None:
    tables = flatten({"matrix": [[1, 2], [], [3, [4]]]})
    assert [t.path for t in tables] == [
        (),
        ("matrix",),
        ("matrix", "value"),
        ("matrix", "value", "value"),
    ]
    assert values(table(tables, ("matrix",))) == [{}, {}, {}]
    inner = table(tables, ("matrix", "value"))
    assert [(r.parent_index, r.list_index, r.values) for r in inner.rows] == [
        (0, 0, {("value",): 1}),
        (0, 1, {("value",): 2}),
        (2, 0, {("value",): 3}),
        (2, 1, {}),
    ]
    innermost = table(tables, ("matrix", "value", "value"))
    assert [(r.parent_index, r.values) for r in innermost.rows] == [(3, {("value",): 4})]
    check_links(tables)


def test_mixed_list_of_objects_and_scalars() -> None:
    tables = flatten({"items": [{"a": 1}, "loose", {"a": 2, "b": [1]}]})
    items = table(tables, ("items",))
    assert values(items) == [{("a",): 1}, {("value",): "loose"}, {("a",): 2}]
    assert values(table(tables, ("items", "b"))) == [{("value",): 1}]
    assert table(tables, ("items", "b")).rows[0].parent_index == 2


def test_empty_object_and_empty_list() -> None:
    tables = flatten({"meta": {}, "rows": [], "x": 1})
    root = tables[0]
    assert root.rows[0].values == {("x",): 1}
    rows = table(tables, ("rows",))
    assert rows.rows == []
    assert rows.columns == {}


def test_nulls_keep_key_but_not_column() -> None:
    tables = flatten([{"a": None, "b": None}, {"a": 3, "b": None}, {"seller": None}])
    root = tables[0]
    assert values(root) == [
        {("a",): None, ("b",): None},
        {("a",): 3, ("b",): None},
        {("seller",): None},
    ]
    assert list(root.columns) == [("a",)]
    assert root.columns[("a",)].type is ColumnType.INTEGER


# --------------------------------------------------------------------------- depth


def test_depth_cut_stores_json_text() -> None:
    doc: JsonValue = {"l1": {"l2": {"l3": {"l4": {"l5": {"x": 1}}, "ok": 2}}}}
    (root,) = flatten(doc, max_depth=5)
    row = root.rows[0]
    assert row.values == {
        ("l1", "l2", "l3", "l4", "l5"): '{"x":1}',
        ("l1", "l2", "l3", "ok"): 2,
    }
    assert row.json_keys == {("l1", "l2", "l3", "l4", "l5")}
    assert root.columns[("l1", "l2", "l3", "l4", "l5")].type is ColumnType.JSON
    assert row.cell_type(("l1", "l2", "l3", "l4", "l5")) is ColumnType.JSON


@pytest.mark.parametrize(
    ("doc", "max_depth", "tables_expected"),
    [
        pytest.param({"a": [1, 2]}, 1, {(): [{("a",): "[1,2]"}]}, id="list-cut-at-field"),
        pytest.param(
            {"a": [{"b": "é"}, 3]},
            2,
            {(): [{}], ("a",): [{("value",): '{"b":"é"}'}, {("value",): 3}]},
            id="list-items-cut",
        ),
        pytest.param(
            [[{"k": 1}]],
            1,
            {(): [{}], ("value",): [{("value",): '{"k":1}'}]},
            id="top-level-list-of-lists",
        ),
    ],
)
def test_depth_cut_positions(
    doc: JsonValue, max_depth: int, tables_expected: dict[Key, list[dict[Key, Any]]]
) -> None:
    tables = flatten(doc, max_depth=max_depth)
    assert {t.path: values(t) for t in tables} == tables_expected


def test_max_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_depth"):
        flatten({}, max_depth=0)


@pytest.mark.parametrize(
    "lists", [pytest.param(False, id="objects"), pytest.param(True, id="lists")]
)
def test_900_deep_document_is_cut(lists: bool) -> None:
    doc = deep(900, "leaf", lists=lists)
    tables = flatten({"d": doc})
    assert input_leaves(doc) == output_leaves(tables)
    check_links(tables)


@pytest.mark.parametrize(
    "lists", [pytest.param(False, id="objects"), pytest.param(True, id="lists")]
)
def test_900_deep_document_without_cut(lists: bool) -> None:
    tables = flatten(deep(900, "leaf", lists=lists), max_depth=10_000)
    assert output_leaves(tables) == Counter({("str", "'leaf'"): 1})
    assert len(tables) == (900 if lists else 1)  # the top-level array is no table
    check_links(tables)


def test_10000_deep_hostile_document() -> None:
    doc = deep(10_000, None)
    tables = flatten(doc, max_depth=3)
    (root,) = tables
    ((key, cell),) = root.rows[0].values.items()
    assert key == ("a", "a", "a")
    assert cell == '{"a":' * 9_997 + "null" + "}" * 9_997


def test_iterative_encoder_matches_json_dumps() -> None:
    doc: JsonValue = {
        "": [1, -2.5, 1e300, True, False, None, '"q" \\ \n é 😀 \x00'],
        "x": {"y": [], "z": {}},
        "n": -(2**80),
    }
    compact = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    assert _dumps_iterative(doc) == compact
    assert dumps(doc) == compact
    assert _dumps_iterative([math.nan, math.inf, -math.inf]) == "[NaN,Infinity,-Infinity]"


def test_encoder_rejects_cycles() -> None:
    cycle: list[JsonValue] = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="Circular"):
        _dumps_iterative(cycle)
    shared: list[JsonValue] = [1]
    assert _dumps_iterative([shared, shared]) == "[[1],[1]]"


# --------------------------------------------------------------------------- keys, types


HOSTILE_KEYS = [
    "",
    "a.b",
    "a__b",
    "a b",
    "a_b",
    "😀",
    '"; DROP TABLE tasks; --',
    "x" * 500,
    "value",
    "1st",
]


def test_hostile_keys_kept_exactly() -> None:
    doc: dict[str, JsonValue] = {key: i for i, key in enumerate(HOSTILE_KEYS)}
    doc["nest"] = {key: key for key in HOSTILE_KEYS}
    (root,) = flatten(doc)
    row = root.rows[0]
    for i, key in enumerate(HOSTILE_KEYS):
        assert row.values[(key,)] == i
        assert row.values[("nest", key)] == key
    assert len(row.values) == 2 * len(HOSTILE_KEYS)
    assert root.columns[("",)].name == "col"
    assert root.columns[("a b",)].name == root.columns[("a_b",)].name == "a_b"
    assert root.columns[("nest", "😀")].name == "nest__col"
    for column in root.columns.values():
        assert len(column.name.split("__")) == len(column.key)


def test_hostile_keys_in_child_table_paths() -> None:
    tables = flatten({"; DROP TABLE x; --": [{"": 1}], "a.b": {"": [2]}})
    assert [t.path for t in tables] == [(), ("; DROP TABLE x; --",), ("a.b", "")]


@pytest.mark.parametrize(
    ("value", "cell", "kind"),
    [
        pytest.param(INT64_MAX, INT64_MAX, ColumnType.INTEGER, id="int64-max"),
        pytest.param(INT64_MIN, INT64_MIN, ColumnType.INTEGER, id="int64-min"),
        pytest.param(INT64_MAX + 1, str(INT64_MAX + 1), ColumnType.TEXT, id="above-int64"),
        pytest.param(INT64_MIN - 1, str(INT64_MIN - 1), ColumnType.TEXT, id="below-int64"),
        pytest.param(-(10**5000), "-1" + "0" * 5000, ColumnType.TEXT, id="past-str-digit-limit"),
        pytest.param(True, True, ColumnType.BOOLEAN, id="bool-not-int"),
        pytest.param(0.1, 0.1, ColumnType.FLOAT, id="float"),
        pytest.param(math.inf, "inf", ColumnType.TEXT, id="inf"),
        pytest.param(math.nan, "nan", ColumnType.TEXT, id="nan"),
        pytest.param("2024-01-01T00:00:00Z", "2024-01-01T00:00:00Z", ColumnType.TEXT, id="ts-text"),
    ],
)
def test_scalar_types(value: JsonValue, cell: Any, kind: ColumnType) -> None:
    (root,) = flatten({"v": value})
    got = root.rows[0].values[("v",)]
    assert got == cell
    assert type(got) is type(cell)
    assert root.columns[("v",)].type is kind
    assert value_type(value) is kind


def test_value_type_of_null_and_containers() -> None:
    assert value_type(None) is None
    assert value_type([]) is ColumnType.JSON
    assert value_type({}) is ColumnType.JSON


def test_big_int_inside_json_cut_keeps_digits() -> None:
    (root,) = flatten({"a": {"b": [10**5000]}}, max_depth=1)
    assert root.rows[0].values[("a",)] == '{"b":[1' + "0" * 5000 + "]}"


def test_mixed_types_first_non_null_wins() -> None:
    rows: JsonValue = [{"p": None}, {"p": "12"}, {"p": 12}, {"p": {"deep": 1}}]
    tables = flatten({"r": rows}, max_depth=3)
    r = table(tables, ("r",))
    assert r.columns[("p",)].type is ColumnType.TEXT
    assert [row.cell_type(("p",)) for row in r.rows] == [
        None,
        ColumnType.TEXT,
        ColumnType.INTEGER,
        ColumnType.JSON,
    ]
    assert values(r)[3] == {("p",): '{"deep":1}'}


def test_same_path_through_object_and_list_items_stays_apart() -> None:
    tables = flatten([{"s": {"a": [1]}}, {"s": [{"a": [2]}]}])
    got = {(t.parent_path, t.path): values(t) for t in tables}
    assert got[((), ("s", "a"))] == [{("value",): 1}]
    assert got[(("s",), ("s", "a"))] == [{("value",): 2}]
    check_links(tables)


# --------------------------------------------------------------------------- properties

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=INT64_MAX - 2, max_value=2**200),
    st.integers(min_value=-(2**200), max_value=INT64_MIN + 2),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=20), SCALARS, max_size=12))
def test_flat_objects_round_trip(doc: dict[str, JsonValue]) -> None:
    tables = flatten(doc)
    assert len(tables) == 1
    (row,) = tables[0].rows
    assert len(row.values) == len(doc)
    for key, value in doc.items():
        cell = row.values[(key,)]
        kind = tables[0].columns[(key,)].type if value is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and kind is ColumnType.TEXT:
            assert isinstance(cell, str)
            assert int(cell) == value
        else:
            assert cell == value
            assert type(cell) is type(value)
        assert kind is value_type(value)


JSON_TREES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=INT64_MIN, max_value=INT64_MAX),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.sampled_from(["", "value", "a", "a b", "a_b", "😀", "x.y"]), children, max_size=4
        ),
    ),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(JSON_TREES, st.integers(min_value=1, max_value=6))
def test_nested_documents_keep_every_leaf(doc: JsonValue, max_depth: int) -> None:
    tables = flatten(doc, max_depth=max_depth)
    assert output_leaves(tables) == input_leaves(doc)
    check_links(tables)
    assert len({(t.parent_path, t.path) for t in tables}) == len(tables)
    # Everything in a cell is JSON-encodable text or a scalar the loader can store.
    for t in tables:
        for row in t.rows:
            assert row.json_keys <= row.values.keys()
            for key in row.json_keys:
                assert key in t.columns


def test_flat_row_defaults() -> None:
    row = FlatRow(0, None, None, {("a",): 1})
    assert row.json_keys == set()
    assert row.cell_type(("a",)) is ColumnType.INTEGER


# --------------------------------------------------------------------------- flat records

RECORD_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(allow_nan=False),  # JSON's 1e400 parses to inf
    st.text(max_size=5),
)
RECORD_VALUES: st.SearchStrategy[Any] = st.one_of(
    RECORD_SCALARS, st.just({}), st.just([1]), st.just({"x": 1})
)


@st.composite
def record_lists(draw: st.DrawFn) -> list[Any]:
    keys = draw(st.lists(st.text(max_size=4), unique=True, max_size=4))
    values = st.one_of(RECORD_SCALARS, RECORD_VALUES) if draw(st.booleans()) else RECORD_SCALARS
    items: list[Any] = [
        {key: draw(values) for key in draw(st.permutations(keys))}
        for _ in range(draw(st.integers(min_value=0, max_value=6)))
    ]
    if items and draw(st.integers(0, 9)) == 0:  # now and then, a shape that is not records
        items[-1] = draw(st.sampled_from([{}, {"other": 1}, [], 5, None]))
    return items


@settings(max_examples=500, deadline=None)
@given(record_lists())
def test_flat_records_are_flattens_root_table(document: list[Any]) -> None:
    records = flat_records(document)
    tables = flatten(document)
    root = table(tables, ())
    plain = all(
        type(item) is dict
        and item.keys() == document[0].keys()
        and all(
            v is None
            or type(v) in (str, bool)
            or (type(v) is int and INT64_MIN <= v <= INT64_MAX)
            or (type(v) is float and math.isfinite(v))
            for v in item.values()
        )
        for item in document
    )
    assert (records is not None) is (bool(document) and plain)
    if records is None:
        return
    assert len(tables) == 1
    assert list(records.columns.items()) == list(root.columns.items())
    assert records.count == len(root.rows)
    for index, row in enumerate(root.rows):
        assert (row.index, row.parent_index, row.list_index) == (index, None, index)
        assert not row.json_keys
    for key in root.columns:
        expected = [row.values.get(key) for row in root.rows]
        assert [(type(v), repr(v)) for v in records.values[key]] == [
            (type(v), repr(v)) for v in expected
        ]
