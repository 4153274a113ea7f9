"""Turn one parsed ``structured_json`` document into relational rows.

This is the pure core of the JSON loader (dlt-style normalisation): a parsed
JSON value in, tables of typed rows out; no I/O, no SQL. Naming SQL columns,
creating tables and inserting belong to the loader, which works from the
stable *keys* produced here (JSON paths kept exactly as written), so nothing
about an untrusted key is lost by sanitising it.

Shape rules (nothing is dropped, truncated or coerced):

* A JSON object is one root row. A top-level array gives one root row per
  item (``list_index`` set). A scalar, top-level or as a list item, is a row
  with the single key ``("value",)``.
* Nested objects flatten into their row: ``{"seller": {"name": x}}`` gives key
  ``("seller", "name")``, suggested name ``seller__name``.
* A list becomes a child table whose path is the parent table's path plus the
  list's key (``("top",)``, ``("top", "tags")``, ``("seller", "addresses")``);
  each item is one child row linked by ``parent_index``. The table is created
  even when the list is empty, so the field is not forgotten.
* Lists of lists: an inner list is a row whose "value" is a list, so it
  becomes a child table of that row with ``"value"`` appended to the path
  (``{"matrix": [[1, 2]]}`` gives tables ``("matrix",)`` and
  ``("matrix", "value")``). Like dlt, a dict item with a "value" field and a
  scalar item of the same list share the ``("value",)`` column.
* An empty object as a value adds no column and no cell; it holds no data.
* ``null`` is kept: the key is present in the row's ``values`` with ``None``.
  A column seen only with nulls in this document is left out of
  ``FlatTable.columns`` (its type is unknown); the loader decides whether to
  create it.
* Depth: the root object (or each top-level array item) is level 1 and every
  nested object or list adds one. A container that would sit deeper than
  ``max_depth`` is not descended into: its compact JSON text is stored under
  the key at the cut (``("value",)`` for a list item) and the row records the
  key in ``json_keys``. The walk is iterative and the JSON encoder falls back
  to an iterative one, so hostile nesting cannot raise ``RecursionError``.
* Types: see `value_type`. An int outside int64 is stored as ``str(value)``
  (type TEXT; every digit kept); non-finite floats (not valid JSON) become
  TEXT too. When one column gets values of several types in one document its
  type is the first non-null one and each cell keeps its own Python type; the
  loader routes misfits to variant columns (`FlatRow.cell_type` tells it each
  cell's type, including which strings are JSON text).
* A table is identified by ``(parent_path, path)``. In the rare document where
  one path is reached both through a nested object and through a list item
  (``{"s": {"a": [1]}}`` next to ``{"s": [{"a": [2]}]}``), two tables share a
  ``path`` with different ``parent_path``, because ``parent_index`` points into
  different parent tables.
"""

from __future__ import annotations

import functools
import json
import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Any, TypeAlias, cast

from receiver.columns import INT64_MAX, INT64_MIN, Cell, ColumnType, JsonValue, sanitise_identifier

Key: TypeAlias = tuple[str, ...]

_TEXT = ColumnType.TEXT

#: Key of a scalar (or cut) list item, and path suffix of a list inside a list.
VALUE_KEY: Key = ("value",)


@dataclass(frozen=True)
class FlatColumn:
    """One column of a table: its exact JSON path, a suggested name, and type."""

    key: Key
    name: str
    type: ColumnType


@dataclass
class FlatRow:
    """One row; ``values`` maps column keys to cells (``None`` for JSON null)."""

    index: int
    parent_index: int | None
    list_index: int | None
    values: dict[Key, Cell]
    #: Keys whose cell is JSON text from a depth cut (a plain ``str`` otherwise).
    json_keys: set[Key] = field(default_factory=set)

    def cell_type(self, key: Key) -> ColumnType | None:
        """The type of this row's own cell, so the loader can spot misfits."""
        if key in self.json_keys:
            return ColumnType.JSON
        cell = self.values.get(key)
        if isinstance(cell, bool | int | float | str) or cell is None:
            return value_type(cell)
        raise TypeError(f"unexpected cell type {type(cell).__name__}")  # pragma: no cover


@dataclass
class FlatTable:
    """All rows of one table path produced from one document."""

    path: Key
    columns: dict[Key, FlatColumn]
    rows: list[FlatRow]
    #: Path of the table that ``parent_index`` points into; None for the root.
    parent_path: Key | None = None


def column_name(key: Key) -> str:
    """Suggested identifier for a key; the loader still resolves collisions."""
    return "__".join(sanitise_identifier(part) for part in key)


def value_type(value: JsonValue) -> ColumnType | None:
    """The column type a JSON value is stored as; None for null.

    bool is checked before int because ``bool`` subclasses ``int``. Lists and
    objects are JSON (they only land in a cell as text, after a depth cut).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return ColumnType.BOOLEAN
    if isinstance(value, int):
        return ColumnType.INTEGER if INT64_MIN <= value <= INT64_MAX else ColumnType.TEXT
    if isinstance(value, float):
        return ColumnType.FLOAT if math.isfinite(value) else ColumnType.TEXT
    if isinstance(value, str):
        return ColumnType.TEXT
    return ColumnType.JSON


def flatten(document: JsonValue, *, max_depth: int = 5) -> list[FlatTable]:
    """Normalise ``document`` into tables: root first, then children as found.

    Rows of each table are in document order, so ``index`` of a parent row is
    assigned before any of its children.
    """
    if max_depth < 1:
        raise ValueError("max_depth must be at least 1")
    return _Flattener(max_depth).run(document)


@dataclass(frozen=True)
class FlatRecords:
    """The root table `flatten` makes of a top-level array of flat objects, by column.

    Each item is one row (``index`` and ``list_index`` both its position,
    no parent); ``values`` holds every column's cells in row order, without
    a `FlatRow` per item.
    """

    columns: dict[Key, FlatColumn]
    values: dict[Key, list[Cell]]
    count: int


_SCALARS = frozenset({str, int, float, bool, type(None)})


def flat_records(document: JsonValue) -> FlatRecords | None:
    """`flatten`'s root table for a non-empty array of objects with the same keys and only
    scalar values that are cells as they are (int64 integers, finite floats); else None.

    The common shape of a big ``structured_json`` output, typed a column at a
    time instead of a cell at a time (tested against `flatten`).
    """
    if not isinstance(document, list) or not document or type(document[0]) is not dict:
        return None
    first = document[0]
    # Objects only, each with as many keys as the first and (below) all of the first's keys.
    if set(map(type, document)) != {dict} or set(map(len, document)) != {len(first)}:  # type: ignore[arg-type]
        return None
    items = cast(list[dict[str, JsonValue]], document)
    columns: dict[Key, FlatColumn] = {}
    values: dict[Key, list[Cell]] = {}
    for name in first:  # every item has the same keys: first-seen order is the first's
        try:
            column = list(map(operator.itemgetter(name), items))
        except KeyError:
            return None
        kinds = set(map(type, column))
        if not kinds <= _SCALARS or not _cells_as_they_are(column, kinds):
            return None
        column_type = value_type(next(filter(_not_none, column), None))
        if column_type is None:  # only nulls: flatten leaves the column out (type unknown)
            continue
        key = (name,)
        columns[key] = FlatColumn(key=key, name=column_name(key), type=column_type)
        values[key] = cast(list[Cell], column)  # scalars only, checked above
    return FlatRecords(columns, values, len(document))


_not_none = functools.partial(operator.is_not, None)


def _cells_as_they_are(column: list[JsonValue], kinds: set[type]) -> bool:
    """Whether no scalar of ``column`` needs converting: ints within int64, finite floats."""
    numbers = kinds & {int, float}
    if not numbers:
        return True
    if kinds - {int, float, bool, type(None)}:  # text among the numbers: look at each
        picked = [v for v in column if type(v) in numbers]
    else:
        picked = list(filter(_not_none, column)) if type(None) in kinds else column
    if float in kinds and not all(map(math.isfinite, picked)):  # type: ignore[arg-type]
        return False
    if int in kinds:
        ints: list[Any] = picked if float not in kinds else [v for v in picked if type(v) is int]
        return bool(min(ints) >= INT64_MIN and max(ints) <= INT64_MAX)
    return True


# --------------------------------------------------------------------------- internals


@dataclass
class _Builder:
    path: Key
    parent_path: Key | None
    rows: list[FlatRow] = field(default_factory=list)
    #: Every key in first-seen order (nulls included), for stable column order.
    order: dict[Key, None] = field(default_factory=dict)
    #: First non-null type per key.
    types: dict[Key, ColumnType] = field(default_factory=dict)

    def table(self) -> FlatTable:
        columns = {
            key: FlatColumn(key=key, name=column_name(key), type=self.types[key])
            for key in self.order
            if key in self.types
        }
        return FlatTable(
            path=self.path, columns=columns, rows=self.rows, parent_path=self.parent_path
        )


#: A row to create: table, JSON item, parent row index, list index, item depth.
_Job: TypeAlias = tuple[_Builder, JsonValue, int | None, int | None, int]


class _Flattener:
    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.tables: dict[tuple[Key | None, Key], _Builder] = {}

    def builder(self, path: Key, parent_path: Key | None) -> _Builder:
        found = self.tables.get((parent_path, path))
        if found is None:
            found = self.tables[(parent_path, path)] = _Builder(path, parent_path)
        return found

    def run(self, document: JsonValue) -> list[FlatTable]:
        root = self.builder((), None)
        first: Iterator[_Job]
        if isinstance(document, list):
            first = ((root, item, None, i, 1) for i, item in enumerate(document))
        else:
            first = iter([(root, document, None, None, 1)])
        # A stack of job iterators gives a pre-order walk without recursion.
        stack: list[Iterator[_Job]] = [first]
        while stack:
            job = next(stack[-1], None)
            if job is None:
                stack.pop()
                continue
            children = self.row(*job)
            if children:
                stack.append(_chain(children))
        return [builder.table() for builder in self.tables.values()]

    def row(
        self,
        table: _Builder,
        item: JsonValue,
        parent_index: int | None,
        list_index: int | None,
        depth: int,
    ) -> list[tuple[_Builder, list[JsonValue], int, int]]:
        """Create one row; return the lists found in it as pending child tables."""
        row = FlatRow(len(table.rows), parent_index, list_index, {})
        table.rows.append(row)
        children: list[tuple[_Builder, list[JsonValue], int, int]] = []
        if isinstance(item, dict) and depth <= self.max_depth:
            self.fill(table, row, item, depth, children)
        elif isinstance(item, list) and depth <= self.max_depth:
            child = self.builder(table.path + VALUE_KEY, table.path)
            children.append((child, item, row.index, depth + 1))
        else:
            self.put(table, row, VALUE_KEY, item)
        return children

    def fill(
        self,
        table: _Builder,
        row: FlatRow,
        obj: dict[str, JsonValue],
        depth: int,
        children: list[tuple[_Builder, list[JsonValue], int, int]],
    ) -> None:
        """Flatten ``obj`` (at ``depth``) into ``row``, iteratively.

        A nested object suspends its parent's item iterator and resumes it after,
        so cells keep document order; scalars of the plain JSON types (nearly every
        cell) are stored inline, the rest through `put`.
        """
        values = row.values
        order = table.order
        types = table.types
        stack: list[tuple[Key, Iterator[tuple[str, JsonValue]], int]] = [
            ((), iter(obj.items()), depth)
        ]
        while stack:
            prefix, items, level = stack[-1]
            for name, value in items:
                key = (*prefix, name)
                kind = type(value)
                if kind is str or value is None:
                    cell_type = _TEXT if kind is str else None
                elif kind is float and math.isfinite(value):  # type: ignore[arg-type]
                    cell_type = ColumnType.FLOAT
                elif kind is int and INT64_MIN <= value <= INT64_MAX:  # type: ignore[operator]
                    cell_type = ColumnType.INTEGER
                elif kind is bool:
                    cell_type = ColumnType.BOOLEAN
                elif isinstance(value, dict | list):
                    if level + 1 > self.max_depth:
                        self.put(table, row, key, value)
                    elif isinstance(value, dict):
                        stack.append((key, iter(value.items()), level + 1))
                        break  # walk the nested object now, then come back to ``items``
                    else:
                        child = self.builder(table.path + key, table.path)
                        children.append((child, value, row.index, level + 2))
                    continue
                else:
                    self.put(table, row, key, value)
                    continue
                values[key] = value  # type: ignore[assignment]  # a scalar by now
                if key not in order:
                    order[key] = None
                if cell_type is not None and key not in types:
                    types[key] = cell_type
            else:
                stack.pop()

    @staticmethod
    def put(table: _Builder, row: FlatRow, key: Key, value: JsonValue) -> None:
        """Store one cell, converting only what a cell cannot hold exactly."""
        cell: Cell
        kind = value_type(value)
        if isinstance(value, dict | list):
            cell = dumps(value)
            row.json_keys.add(key)
        elif isinstance(value, bool):
            cell = value
        elif isinstance(value, int):
            cell = value if kind is ColumnType.INTEGER else _int_text(value)
        elif isinstance(value, float):
            cell = value if kind is ColumnType.FLOAT else repr(value)
        else:
            cell = value
        row.values[key] = cell
        table.order.setdefault(key, None)
        if kind is not None:
            table.types.setdefault(key, kind)


def _chain(
    lists: list[tuple[_Builder, list[JsonValue], int, int]],
) -> Iterator[_Job]:
    for builder, items, parent_index, depth in lists:
        for i, item in enumerate(items):
            yield builder, item, parent_index, i, depth


# --------------------------------------------------------------------------- JSON text

_DIGITS_CHUNK = 1000


def _int_text(value: int) -> str:
    """Exact decimal text, even past CPython's 4300-digit ``str(int)`` limit."""
    try:
        return str(value)
    except ValueError:
        pass
    sign = "-" if value < 0 else ""
    rest = abs(value)
    base = 10**_DIGITS_CHUNK
    chunks: list[str] = []
    while rest:
        rest, low = divmod(rest, base)
        chunks.append(str(low))
    head = chunks.pop()
    return sign + head + "".join(chunk.zfill(_DIGITS_CHUNK) for chunk in reversed(chunks))


def dumps(value: JsonValue) -> str:
    """Compact JSON text, as ``json.dumps`` writes it, at any depth.

    ``json.dumps`` recurses (RecursionError near 1000 levels) and refuses ints
    past 4300 digits; both fall back to an iterative encoder with equal output.
    """
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=False)
    except (RecursionError, ValueError):
        return _dumps_iterative(value)


def _scalar_json(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return _int_text(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    if isinstance(value, str):
        return encode_basestring(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _dumps_iterative(value: JsonValue) -> str:
    """An explicit-stack JSON encoder matching `dumps`' compact format."""
    out: list[str] = []
    active: set[int] = set()
    # Entries: ("raw", text) to emit, ("value", v) to encode, ("exit", id) to leave.
    stack: list[tuple[str, object]] = [("value", value)]
    while stack:
        kind, obj = stack.pop()
        if kind == "raw":
            out.append(str(obj))
            continue
        if kind == "exit":
            active.discard(id(obj))
            continue
        if isinstance(obj, dict | list):
            if id(obj) in active:
                raise ValueError("Circular reference detected")
            active.add(id(obj))
            stack.append(("exit", obj))
            pending: list[tuple[str, object]] = []
            if isinstance(obj, dict):
                out.append("{")
                pending.append(("raw", "}"))
                entries = list(obj.items())
                for i in range(len(entries) - 1, -1, -1):
                    key, item = entries[i]
                    pending.append(("value", item))
                    pending.append(("raw", encode_basestring(str(key)) + ":"))
                    if i:
                        pending.append(("raw", ","))
            else:
                out.append("[")
                pending.append(("raw", "]"))
                for i in range(len(obj) - 1, -1, -1):
                    pending.append(("value", obj[i]))
                    if i:
                        pending.append(("raw", ","))
            stack.extend(pending)
        else:
            out.append(_scalar_json(obj))
    return "".join(out)
