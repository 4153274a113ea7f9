"""Load an output's rows into its hook's result tables.

structured_json goes through `rows.flatten` (or, for an array of flat
objects, `rows.flat_records`), structured_csv through
`csvparse.parse_csv_columns`; both end here as columns keyed by catalogued
column names. A cell that does not fit its column's type goes to the
variant column ``<name>__v_<type>``: never coerced, never dropped. JSON
text from a depth cut and a plain string never share a column, so a reader
can always tell them apart. Whole columns whose cells all fit are placed at
once. `insert_columns` is the one place that knows how a batch reaches each
database: multi-row INSERTs on SQLite, binary ``COPY`` on PostgreSQL (built
from Arrow arrays in one buffer when the columns allow).
"""

from __future__ import annotations

import array
import contextlib
import datetime as dt
import gc
import itertools
import json
import math
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeAlias

import jsonschema
from psycopg import sql as pgsql
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Date,
    DateTime,
    Float,
    Integer,
    Table,
    Text,
    delete,
    select,
)
from sqlalchemy.types import TypeEngine

from receiver.classify import Output, OutputType
from receiver.columns import Cell, ColumnType
from receiver.csvparse import ColumnValues, CsvColumns, parse_csv_columns, to_cells
from receiver.errors import Quarantine
from receiver.models import ResultTable
from receiver.rows import FlatColumn, FlatRecords, FlatTable, Key, flat_records, flatten
from receiver.schema import (
    OVERFLOW_KEY,
    ROW_NOTES,
    Catalog,
    TableInfo,
    catalog_for,
    fits,
    is_overflow,
    result_table,
    source_key,
)

if TYPE_CHECKING:
    import pyarrow as pa

Row = dict[str, Any]

#: Above this many rows, PostgreSQL loads through COPY instead of executemany.
COPY_THRESHOLD = 1000
_TEXTUAL = frozenset({ColumnType.TEXT, ColumnType.JSON})
#: Outputs from this many characters load with the cyclic garbage collector paused.
_BIG_OUTPUT = 256 * 1024


def delete_results(conn: Connection, delivery_id: str, hook: str) -> None:
    """Remove every result row derived from ``delivery_id`` (before reprocessing it).

    The caller holds ``hook``'s load lock (`pipeline.delete_derived` takes it).
    """
    names = list(conn.scalars(select(ResultTable.table_name).where(ResultTable.hook == hook)))
    for name in names:
        table = result_table(name)
        conn.execute(delete(table).where(table.c._delivery_id == delivery_id))


def validate(value: Any, schema: Any) -> None:
    """Quarantine a structured_json output that breaks the hook's registered JSON Schema."""
    if not isinstance(schema, dict):
        return
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.path)
    )
    if errors:
        detail = "; ".join(
            f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message[:200]}" for e in errors[:5]
        )
        raise Quarantine(f"output does not match the hook's schema: {detail}")


def load_results(
    conn: Connection,
    *,
    hook: str,
    output: Output,
    delivery_id: str,
    session_id: str | None,
    task_id: str | None,
    received_at: dt.datetime,
    schema: Any,
    max_depth: int,
    held: HeldInserts | None = None,
) -> int:
    """Insert the rows of ``output``; returns how many rows were written.

    Given ``held``, small inserts wait there for the caller's `HeldInserts.flush`.
    """
    if output.type == OutputType.TEXT:
        return 0
    catalog = catalog_for(conn, hook)
    system = {"_delivery_id": delivery_id, "_session_id": session_id, "_task_id": task_id}
    system["_received_at"] = received_at  # type: ignore[assignment]
    with _collector_paused(len(output.text)):
        if output.type == OutputType.JSON:
            validate(output.value, schema)
            return _load_json(conn, catalog, output, system, max_depth, held)
        expected = schema if isinstance(schema, list) else None
        return _load_csv(conn, catalog, output.text, system, expected, held)


@contextlib.contextmanager
def _collector_paused(size: int) -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a big output loads.

    A big load allocates about a million acyclic objects (cells, rows, tuples);
    every automatic collection meanwhile walks them and the rest of the heap
    again, which cost a third of the load time. Reference counting still frees
    everything as usual; only cycles made meanwhile wait for the next collection.
    """
    if size < _BIG_OUTPUT or not gc.isenabled():  # small, or someone else paused it
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _place(
    catalog: Catalog,
    table: TableInfo,
    key: str,
    suggested: str,
    declared: ColumnType,
    value: Any,
    cell_type: ColumnType | None,
) -> tuple[str, Any]:
    """Where one cell goes (its column if it fits, else the variant column for its type)."""
    name = catalog.column(table, key, suggested, declared)
    if is_overflow(name):  # any value goes, as it is (JSON text: as the JSON it is)
        return name, _JsonText(value) if cell_type is ColumnType.JSON else value
    column_type = table.columns[key][1]
    actual = cell_type or ColumnType.TEXT
    if actual is ColumnType.TEXT and isinstance(value, str) and "\x00" in value and catalog.pg:
        # PostgreSQL text cannot hold NUL: keep the string as its JSON literal instead.
        value, actual = json.dumps(value, ensure_ascii=False), ColumnType.JSON
    same_text_kind = not (
        value is not None
        and column_type in _TEXTUAL
        and actual in _TEXTUAL
        and actual is not column_type
    )
    if fits(value, column_type) and same_text_kind:
        return name, value
    variant_key = json.dumps([json.loads(key), f"#variant:{actual.value}"])
    variant = catalog.column(table, variant_key, f"{name}__v_{actual.value}", actual)
    return variant, value


class _Cells:
    """A table's cells column by column (name -> one value per row), for one batch insert."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.columns: dict[str, list[Any]] = {}
        #: Whole columns set as they are (Arrow arrays from the CSV parser): never put into.
        self.whole: dict[str, Values] = {}

    def put(self, name: str, row: int, value: Any) -> None:
        column = self.columns.get(name)
        if column is None:
            column = self.columns[name] = [None] * self.rows
        column[row] = value

    def set_column(self, name: str, values: Values) -> None:
        """Store a whole column, replacing whatever was put in it."""
        self.columns.pop(name, None)
        self.whole[name] = values


# Python types whose values fit a column of each type as they are (see `schema.fits`).
_FITTING: dict[ColumnType, frozenset[type]] = {
    ColumnType.INTEGER: frozenset({int, type(None)}),
    ColumnType.FLOAT: frozenset({float, type(None)}),
    ColumnType.BOOLEAN: frozenset({bool, type(None)}),
    ColumnType.TEXT: frozenset({str, type(None)}),
    ColumnType.JSON: frozenset({str, type(None)}),
}


def _load_json(
    conn: Connection,
    catalog: Catalog,
    output: Output,
    system: Row,
    max_depth: int,
    held: HeldInserts | None,
) -> int:
    records = flat_records(output.value)
    if records is not None:
        written = _load_records(conn, catalog, records, system, held)
        if written is not None:
            return written
    flat_tables = flatten(output.value, max_depth=max_depth)
    infos: dict[tuple[Any, ...], TableInfo] = {}
    written = 0
    for flat in flat_tables:
        parent = infos.get((flat.parent_path,)) if flat.parent_path is not None else None
        info = catalog.table(flat.path, flat.parent_path, parent)
        infos[(flat.path,)] = info
        if not flat.rows:
            continue
        # One JSON encoding per column, not per cell: it dominates big loads otherwise.
        keys = {key: source_key(key) for key in flat.columns}
        cells = _Cells(len(flat.rows))
        if not _place_json_columns(catalog, info, flat, keys, cells):
            cells = _Cells(len(flat.rows))
            _place_json_cells(catalog, info, flat, keys, cells)
        system_cells: dict[str, list[Any]] = {
            "_row_index": [row.index for row in flat.rows],
            "_parent_index": [row.parent_index for row in flat.rows],
            "_list_index": [row.list_index for row in flat.rows],
        }
        _note_negative_zeros(catalog, info, cells)
        written += _insert(conn, info, cells, system, system_cells, held)
    return written


def _load_records(
    conn: Connection,
    catalog: Catalog,
    records: FlatRecords,
    system: Row,
    held: HeldInserts | None,
) -> int | None:
    """`_load_json` for a top-level array of flat objects, whole columns at a time.

    As `_place_json_columns` does for `flatten`'s root table; None (having
    written nothing) when a cell would not go to its column as it is.
    """
    info = catalog.table((), None, None)
    keys = {key: source_key(key) for key in records.columns}
    planned: list[tuple[Key, FlatColumn, ColumnType]] = []
    for key, column in records.columns.items():
        found = info.columns.get(keys[key])
        column_type = found[1] if found is not None else column.type
        # A JSON column (from a depth cut) takes JSON text only: plain strings are variants.
        if column_type is ColumnType.JSON or not _fits_as_is(
            records.values[key], column_type, False, catalog.pg
        ):
            return None
        planned.append((key, column, column_type))
    catalog.columns(info, [(keys[key], column.name, column.type) for key, column, _ in planned])
    for key, column, column_type in planned:
        catalog.column(info, keys[key], column.name, column.type)
        if info.columns[keys[key]][1] is not column_type:  # another process got there first
            return None
    cells = _Cells(records.count)
    for key, _, _ in planned:
        cells.set_column(info.columns[keys[key]][0], records.values[key])
    rows = range(records.count)
    _note_negative_zeros(catalog, info, cells)
    system_cells = {"_row_index": rows, "_list_index": rows}
    return _insert(conn, info, cells, system, system_cells, held)


#: The catalog key of `_originals` in tables of JSON rows: not a list of strings, so no
#: JSON path can have it (a CSV header is one part, so CSV notes use ``["#row-note", name]``).
JSON_ORIGINALS_KEY = json.dumps([["#row-note"], "_originals"])


def _note_negative_zeros(catalog: Catalog, info: TableInfo, cells: _Cells) -> None:
    """SQLite stores -0.0 as 0.0: keep the text of such a cell in ``_originals``, as CSV does.

    Keyed by the column's catalogued source key; PostgreSQL keeps the sign itself.
    """
    if catalog.pg:
        return
    floats = {name: key for key, (name, kind) in info.columns.items() if kind is ColumnType.FLOAT}
    kept: dict[int, dict[str, str]] = {}
    for name, values in [*cells.columns.items(), *cells.whole.items()]:
        key = floats.get(name)
        if key is None or not isinstance(values, list) or 0.0 not in values:
            continue
        for row, value in enumerate(values):
            if type(value) is float and value == 0 and math.copysign(1.0, value) < 0:
                kept.setdefault(row, {})[key] = repr(value)
    if kept:
        name = catalog.column(info, JSON_ORIGINALS_KEY, "_originals", ROW_NOTES["_originals"])
        for row, originals in kept.items():
            cells.put(name, row, json.dumps(originals, ensure_ascii=False))


def _place_json_cells(
    catalog: Catalog, info: TableInfo, flat: FlatTable, keys: dict[Key, str], cells: _Cells
) -> None:
    """Cell by cell, row by row: new columns are added in the order their first cell is met."""
    catalog.columns(
        info, [(keys[key], column.name, column.type) for key, column in flat.columns.items()]
    )
    for position, flat_row in enumerate(flat.rows):
        for key, value in flat_row.values.items():
            column = flat.columns.get(key)
            if column is None:  # only nulls so far in this document: nothing to store
                continue
            name, placed = _place(
                catalog, info, keys[key], column.name, column.type, value, flat_row.cell_type(key)
            )
            cells.put(name, position, placed)


def _place_json_columns(
    catalog: Catalog, info: TableInfo, flat: FlatTable, keys: dict[Key, str], cells: _Cells
) -> bool:
    """Whole columns at once when every cell fits its column; False (nothing placed) if not.

    When nothing goes to a variant column, `_place_json_cells` would add the
    columns in ``flat.columns`` order (first appearance) and store every value
    as it is, which is what this does without a catalog lookup per cell.
    """
    json_keys: set[Key] = set()
    for flat_row in flat.rows:
        if flat_row.json_keys:
            json_keys |= flat_row.json_keys
    planned: list[tuple[Key, FlatColumn, ColumnType, list[Any]]] = []
    for key, column in flat.columns.items():
        found = info.columns.get(keys[key])
        column_type = found[1] if found is not None else column.type
        values = [flat_row.values.get(key) for flat_row in flat.rows]
        if not _fits_as_is(values, column_type, key in json_keys, catalog.pg):
            return False
        if column_type is ColumnType.JSON and not all(
            key in flat_row.json_keys
            for flat_row, v in zip(flat.rows, values, strict=True)
            if v is not None
        ):
            return False
        planned.append((key, column, column_type, values))
    catalog.columns(info, [(keys[k], column.name, column.type) for k, column, _, _ in planned])
    for key, column, column_type, _ in planned:
        catalog.column(info, keys[key], column.name, column.type)
        if info.columns[keys[key]][1] is not column_type:  # another process got there first
            return False
    for key, _, _, values in planned:
        cells.set_column(info.columns[keys[key]][0], values)
    return True


def _fits_as_is(values: list[Any], column_type: ColumnType, has_json: bool, pg: bool) -> bool:
    """Whether every value of a column goes into a ``column_type`` column unchanged."""
    kinds = set(map(type, values))
    if column_type is ColumnType.FLOAT and int in kinds:
        kinds.discard(int)
        if any(type(v) is int and abs(v) > 2**53 for v in values):
            return False
    if not kinds <= _FITTING.get(column_type, frozenset({type(None)})):
        return False
    if column_type is ColumnType.TEXT:
        if has_json:
            return False
        return not (pg and _has_nul(values))
    return True


def _has_nul(texts: Iterable[str | None]) -> bool:
    """Whether any of ``texts`` holds NUL, which PostgreSQL text cannot."""
    return "\x00" in "".join(filter(None, texts))


def _load_csv(
    conn: Connection,
    catalog: Catalog,
    text: str,
    system: Row,
    expected: list[str] | None,
    held: HeldInserts | None,
) -> int:
    parsed = parse_csv_columns(text, expected_columns=expected)
    info = catalog.table((), None, None)
    count = parsed.count
    if not count:
        return 0
    keys = [source_key([column.key]) for column in parsed.columns]
    # Two parts: a CSV header is always one, so a header named "_flag" keeps its own column.
    note_keys = {name: source_key(["#row-note", name]) for name in ROW_NOTES}
    cells = _Cells(count)
    as_cells: dict[int, list[Cell]] = {}

    def column_cells(i: int) -> list[Cell]:
        found = as_cells.get(i)
        if found is None:
            found = as_cells[i] = parsed.cells(i)
        return found

    def place_row(index: int, columns: Sequence[int], first: list[Cell] | None = None) -> None:
        """Row ``index`` as the cell-by-cell path places it: the given columns, then notes."""
        for i in columns:
            column = parsed.columns[i]
            value = first[i] if first is not None else column_cells(i)[index]
            cell_type = column.type if value is not None else None
            name, placed = _place(
                catalog, info, keys[i], column.name, column.type, value, cell_type
            )
            cells.put(name, index, placed)
        note = parsed.notes.get(index)
        if note is None:
            return
        notes = {
            "_flag": note.flag,
            "_raw": note.raw,
            "_extra": json.dumps(list(note.extra), ensure_ascii=False) if note.extra else None,
            "_originals": json.dumps(note.originals, ensure_ascii=False)
            if note.originals
            else None,
        }
        for name, kept in notes.items():
            if kept is not None:
                cells.put(catalog.column(info, note_keys[name], name, ROW_NOTES[name]), index, kept)

    # The first row creates the columns in order; after it, a column whose type is the
    # catalogued one stores every value as it is (no variants, no lookups), and only the
    # other columns and the row notes go cell by cell, in the same order as before.
    everything = range(len(parsed.columns))
    catalog.columns(info, [(keys[i], c.name, c.type) for i, c in enumerate(parsed.columns)])
    place_row(0, everything, [_first_cell(parsed, i) for i in everything])
    remaining: list[int] = []
    for i, column in enumerate(parsed.columns):
        name, column_type = info.columns[keys[i]]
        values = parsed.values[i]
        if column_type is column.type and not (
            column_type is ColumnType.TEXT and catalog.pg and _has_nul_values(values)
        ):
            # Row 0 went to this same column (its value fits: same type), so the whole
            # column can be set; a row note never shares it (notes have their own keys).
            cells.set_column(name, values)
        else:
            remaining.append(i)
    rows: Iterable[int] = range(1, count) if remaining else sorted(parsed.notes)
    for index in rows:
        if index:
            place_row(index, remaining)
    system_cells: dict[str, Sequence[Any]] = {"_row_index": range(count)}
    return _insert(conn, info, cells, system, system_cells, held)


def _first_cell(parsed: CsvColumns, i: int) -> Cell:
    values = parsed.values[i]
    if isinstance(values, list):
        return values[0]
    return to_cells(values.slice(0, 1), parsed.columns[i].type)[0]


def _has_nul_values(values: ColumnValues) -> bool:
    if isinstance(values, list):
        return _has_nul(values)  # type: ignore[arg-type]  # a TEXT column: str or None
    import pyarrow.compute as pc

    return bool(pc.any(pc.match_substring(values, "\x00")).as_py())


class _JsonText(str):
    """A cell's JSON text (a depth cut), bound for the overflow column as the JSON it is."""


def _gather_overflow(info: TableInfo, cells: _Cells) -> None:
    """Move the cells of keys past the column limit into the row's overflow column: one
    JSON object per row, nested by each key's path under its original names."""
    names = [n for n in (*cells.columns, *cells.whole) if is_overflow(n)]
    if not names:
        return
    types = dict(info.columns.values())
    objects: list[dict[str, Any]] = [{} for _ in range(cells.rows)]
    for name in names:
        values = cells.columns.pop(name, None)
        column: Sequence[Any] = values if values is not None else _python(cells.whole.pop(name))
        path = _overflow_path(name[1:])
        as_json = types[name] is ColumnType.JSON
        for row, value in enumerate(column):
            if value is None:
                continue
            if isinstance(value, _JsonText) or (as_json and isinstance(value, str)):
                value = json.loads(value)
            _put_path(objects[row], path, value)
    overflow = info.columns[OVERFLOW_KEY][0]
    cells.columns[overflow] = [
        json.dumps(o, ensure_ascii=False, default=str) if o else None for o in objects
    ]


def _overflow_path(key: str) -> list[str]:
    """The original names of a catalogued source key: its JSON path (or CSV header); a
    variant of a key goes where the key would."""
    parts = json.loads(key)
    if len(parts) == 2 and isinstance(parts[0], list):
        head = [str(p) for p in parts[0]]
        return head if str(parts[1]).startswith("#variant:") else [*head, str(parts[1])]
    return [str(p) for p in parts]


def _put_path(obj: dict[str, Any], path: list[str], value: Any) -> None:
    """``obj[path[0]][path[1]]... = value``; where a value already sits on the way, the
    rest of the path is joined with dots instead, so nothing is overwritten."""
    node = obj
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            node[".".join(path[i:])] = value
            return
        node = child
    node[path[-1]] = value


def _insert(
    conn: Connection,
    info: TableInfo,
    cells: _Cells,
    system: Row,
    system_cells: Mapping[str, Sequence[Any]],
    held: HeldInserts | None,
) -> int:
    """Insert a batch given column by column; the system values are the same on every row."""
    _gather_overflow(info, cells)
    everything = {**cells.columns, **cells.whole, **system_cells}
    table = info.sqla_table()
    if held is None or not held.hold(table, cells.rows, everything, system):
        insert_columns(conn, table, cells.rows, everything, system)
    return cells.rows


class HeldInserts:
    """Small inserts into result tables, held until `flush` and then made one per table.

    A batch of small deliveries then costs one statement per table instead of one
    per delivery and table (on PostgreSQL each is a round trip). Big inserts go at
    once: they gain nothing. Result tables have no foreign keys, so the order in
    which tables are flushed does not matter; columns are only ever added, so the
    latest `Table` of a name holds every column of the earlier ones.
    """

    def __init__(self, max_rows: int = COPY_THRESHOLD) -> None:
        self.max_rows = max_rows
        #: Per table name: its latest `Table`, and each held insert as (rows, columns).
        self._tables: dict[str, tuple[Table, list[tuple[int, dict[str, Sequence[Any]]]]]] = {}

    def hold(
        self, table: Table, count: int, columns: Mapping[str, Values], constants: Mapping[str, Any]
    ) -> bool:
        """Keep this insert for `flush`; False (keeping nothing) if it should go at once."""
        sequences = {name: v for name, v in columns.items() if isinstance(v, Sequence)}
        if count > self.max_rows or len(sequences) < len(columns):  # Arrow arrays: big ones
            return False
        held: dict[str, Sequence[Any]] = {
            name: [v] * count for name, v in constants.items() if v is not None
        }
        held.update(sequences)
        _, parts = self._tables.get(table.name, (table, []))
        parts.append((count, held))
        self._tables[table.name] = (table, parts)
        return True

    def flush(self, conn: Connection) -> None:
        """Insert what is held, one `insert_columns` per table (NULL where a part has no value)."""
        tables, self._tables = self._tables, {}
        for table, parts in tables.values():
            names = dict.fromkeys(name for _, held in parts for name in held)
            merged: dict[str, Values] = {
                name: [v for count, held in parts for v in held.get(name, [None] * count)]
                for name in names
            }
            insert_columns(conn, table, sum(count for count, _ in parts), merged, {})


def insert_rows(conn: Connection, table: Table, rows: list[Row]) -> None:
    """Insert ``rows`` (dicts; a missing key is NULL), as `insert_columns` does."""
    names = [c.name for c in table.columns]
    columns: dict[str, Values] = {name: [row.get(name) for row in rows] for name in names}
    insert_columns(conn, table, len(rows), columns, {})


#: A column handed to `insert_columns`: one value per row, as a sequence or an Arrow array
#: of the column's type (`csvparse.ColumnValues`).
Values: TypeAlias = "Sequence[Any] | pa.Array[Any]"

#: Rows per SQLite INSERT statement (one statement per row costs twice as much), within the
#: 999 bound variables that SQLite builds before 3.32 allow.
_ROWS_PER_INSERT = 50
_SQLITE_MAX_VARIABLES = 999


def insert_columns(
    conn: Connection,
    table: Table,
    count: int,
    columns: Mapping[str, Values],
    constants: Mapping[str, Any],
) -> None:
    """Insert ``count`` rows given column by column: a list of values per column name,
    else one value for every row from ``constants``, else NULL.

    What is stored is exactly what a SQLAlchemy Core insert stores (tested).
    SQLite: multi-row ``INSERT`` statements through the driver, each value
    passed through the column type's bind processor (or an equivalent that
    is cheaper for the common Python types), a constant once. PostgreSQL:
    binary ``COPY`` for big batches (`_copy`), else SQLAlchemy's
    ``executemany``. Columns that would be NULL on every row are left out.
    """
    if not count:
        return
    given = [c for c in table.columns if c.name in columns or constants.get(c.name) is not None]
    rows = _Rows(given, count, columns, constants)
    if conn.dialect.name != "postgresql":
        _insert_sqlite(conn, table, rows)
    elif count > COPY_THRESHOLD:
        _copy(conn, table, rows)
    else:
        names = [c.name for c in given]
        conn.execute(
            table.insert(), [dict(zip(names, row, strict=True)) for row in rows.python_rows()]
        )


@dataclass(frozen=True)
class _Rows:
    """``count`` rows to insert into the ``given`` columns, held column by column: a list
    or Arrow array per name in ``columns``, else one value for every row from ``constants``."""

    given: list[Column[Any]]
    count: int
    columns: Mapping[str, Values]
    constants: Mapping[str, Any]

    def python_rows(self) -> Iterator[tuple[Any, ...]]:
        """The rows as tuples of Python values, in the order of ``given``."""
        ordered = [
            _python(self.columns[c.name])
            if c.name in self.columns
            else itertools.repeat(self.constants[c.name], self.count)
            for c in self.given
        ]
        return zip(*ordered, strict=True)

    def slice(self, start: int, stop: int) -> _Rows:
        columns = {name: _rows_of(values, start, stop) for name, values in self.columns.items()}
        return replace(self, count=stop - start, columns=columns)

    def has_naive_datetime(self) -> bool:
        for column in self.given:
            if not isinstance(column.type, DateTime):
                continue
            values = self.columns.get(column.name)
            if values is None:
                values = [self.constants[column.name]]
            if isinstance(values, Sequence) and any(
                isinstance(v, dt.datetime) and v.tzinfo is None for v in values
            ):
                return True
        return False


def _python(values: Values) -> Sequence[Any]:
    """A column as Python values (Arrow arrays as `csvparse.to_cells` gives them)."""
    if isinstance(values, Sequence):
        return values
    import pyarrow as pa

    if pa.types.is_timestamp(values.type):
        return to_cells(values, ColumnType.TIMESTAMP)
    converted: list[Any] = values.to_pylist()
    return converted


def _insert_sqlite(conn: Connection, table: Table, rows: _Rows) -> None:
    given, count, columns, constants = rows.given, rows.count, rows.columns, rows.constants
    dialect = conn.dialect
    ordered: list[Iterable[Any]] = []
    for column in given:
        process = column.type.dialect_impl(dialect).bind_processor(dialect)
        values = columns.get(column.name)
        if values is None:
            value = constants[column.name]
            ordered.append(itertools.repeat(process(value) if process else value, count))
        else:
            ordered.append(_sqlite_values(values, column.type, process))
    width = len(given)
    per = max(1, min(_ROWS_PER_INSERT, _SQLITE_MAX_VARIABLES // width))
    flat = list(itertools.chain.from_iterable(zip(*ordered, strict=True)))
    quote = dialect.identifier_preparer.quote
    head = "INSERT INTO {} ({}) VALUES ".format(
        quote(table.name), ", ".join(quote(c.name) for c in given)
    )
    row = "(" + ", ".join("?" * width) + ")"
    step = per * width
    whole = count // per * step
    if whole:
        statement = head + ", ".join([row] * per)
        conn.exec_driver_sql(statement, [tuple(flat[i : i + step]) for i in range(0, whole, step)])
    if whole < len(flat):
        statement = head + ", ".join([row] * ((len(flat) - whole) // width))
        conn.exec_driver_sql(statement, tuple(flat[whole:]))


def _sqlite_values(
    values: Values, sql_type: TypeEngine[Any], process: Callable[[Any], Any] | None
) -> Iterable[Any]:
    """What SQLite stores for a column: what ``process`` (SQLAlchemy's) gives, cheaper."""
    if not isinstance(values, Sequence):
        import pyarrow as pa
        import pyarrow.compute as pc

        if values.type == pa.timestamp("us", tz="UTC"):
            # SQLAlchemy's text: the UTC wall time with microseconds, which is how Arrow
            # writes the same instants as naive times.
            naive = values.view(pa.timestamp("us"))
            stamps: list[Any] = pc.cast(naive, pa.string()).to_pylist()
            return stamps
        if pa.types.is_date32(values.type):  # ISO text, as SQLAlchemy writes dates
            dates: list[Any] = pc.cast(values, pa.string()).to_pylist()
            return dates
        values = _python(values)  # numbers, booleans, text: what Python gives them
    if process is None:
        return values
    if isinstance(sql_type, DateTime):
        return [
            v.isoformat(" ", "microseconds")[:26] if type(v) is dt.datetime else process(v)
            for v in values
        ]
    if isinstance(sql_type, Date):
        return [v.isoformat() if type(v) is dt.date else process(v) for v in values]
    if isinstance(sql_type, Boolean) and set(map(type, values)) <= {bool, type(None)}:
        return values  # the driver binds a bool as the integer SQLAlchemy would give
    return map(process, values)


# --------------------------------------------------------------------------- PostgreSQL COPY

#: PostgreSQL's name for each result column type (`schema.SQL_TYPES`), for binary COPY.
_PG_TYPES: dict[type[TypeEngine[Any]], str] = {
    BigInteger: "int8",
    Integer: "int4",
    Float: "float8",
    Boolean: "bool",
    Date: "date",
    DateTime: "timestamptz",
    Text: "text",
}


#: Rows per Arrow-built COPY chunk: PostgreSQL reads one while the next is built.
_COPY_CHUNK = 8192


def _copy(conn: Connection, table: Table, rows: _Rows) -> None:
    """``COPY ... (FORMAT BINARY)``, in chunks built from Arrow arrays (`_binary_rows`) when
    the columns allow, else row by row through psycopg's binary dumpers; text COPY for a
    naive datetime (PostgreSQL reads those in the session's time zone, as an insert does)."""
    # The constants first.
    rows = replace(rows, given=sorted(rows.given, key=lambda c: c.name in rows.columns))
    given = rows.given
    pg_types = [_PG_TYPES[type(c.type)] for c in given]
    if "timestamptz" in pg_types and rows.has_naive_datetime():
        _copy_text(conn, table, rows)
        return
    statement = pgsql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        pgsql.Identifier(table.name),
        pgsql.SQL(", ").join(pgsql.Identifier(c.name) for c in given),
    )
    driver = conn.connection.driver_connection
    assert driver is not None
    with driver.cursor() as cursor, cursor.copy(statement) as copy:
        copy.set_types(pg_types)
        copy.write(_COPY_SIGNATURE)
        for start in range(0, rows.count, _COPY_CHUNK):
            data = _binary_rows(rows.slice(start, min(start + _COPY_CHUNK, rows.count)), pg_types)
            if data is not None:
                copy.write(data)
                continue
            # The rest row by row; psycopg then ends the stream itself.
            for row in rows.slice(start, rows.count).python_rows():
                copy.write_row(row)
            return
        copy.write(_COPY_TRAILER)


def _rows_of(values: Values, start: int, stop: int) -> Values:
    if isinstance(values, Sequence):
        return values[start:stop]
    chunk: Any = values
    return chunk.slice(start, stop - start)  # type: ignore[no-any-return]


def _copy_text(conn: Connection, table: Table, rows: _Rows) -> None:
    statement = pgsql.SQL("COPY {} ({}) FROM STDIN").format(
        pgsql.Identifier(table.name),
        pgsql.SQL(", ").join(pgsql.Identifier(c.name) for c in rows.given),
    )
    driver = conn.connection.driver_connection
    assert driver is not None
    with driver.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows.python_rows():
            copy.write_row(row)


_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, no header extension
_COPY_TRAILER = b"\xff\xff"
_NULL_FIELD = b"\xff\xff\xff\xff"
_PG_EPOCH_DAYS = 10_957  # PostgreSQL counts dates and times from 2000-01-01
_PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
#: Per binary type: the `array` typecode of its Arrow values and its byte width.
_FIXED: dict[str, tuple[str, int]] = {
    "int8": ("q", 8),
    "int4": ("i", 4),
    "float8": ("d", 8),
    "date": ("i", 4),
    "timestamptz": ("q", 8),
    "bool": ("B", 1),
}


def _binary_rows(rows: _Rows, pg_types: list[str]) -> memoryview | None:
    """``rows`` as a binary COPY stream, built a column at a time in Arrow.

    Each column becomes one array of encoded fields (length, then big-endian
    value; -1 for NULL) and the fields are joined row by row. The constants,
    which come first in ``given``, are encoded once into the prefix every row
    shares. None unless some column is an Arrow array (the CSV parser's) and
    every other one is an Arrow array of its type, a ``range``, or a list of
    text, numbers or booleans (row notes, variants).
    """
    given, count, columns, constants = rows.given, rows.count, rows.columns, rows.constants
    if all(isinstance(columns.get(c.name), Sequence | None) for c in given):
        return None  # Python values only (JSON rows): psycopg's C dumpers are quicker
    import pyarrow as pa
    import pyarrow.compute as pc

    prefix = struct.pack(">h", len(given))
    fields: list[Any] = []
    try:
        for column, pg_type in zip(given, pg_types, strict=True):
            values = columns.get(column.name)
            if values is None:
                constant = _binary_field(constants[column.name], pg_type)
                if constant is None or fields:
                    return None
                prefix += constant
                continue
            encoded = _binary_fields(values, pg_type)
            if encoded is None or len(encoded) != count:
                return None
            fields.append(encoded)
        if not fields:
            return None
        joined: Any = pc.binary_join_element_wise(
            _binary_scalar(prefix), *fields, _binary_scalar(b"")
        )
    except pa.ArrowException:  # more than 2 GiB, say: psycopg's dumpers do it row by row
        return None
    offsets = _integers(joined.buffers()[1], "i", joined.offset, len(joined) + 1)
    return memoryview(joined.buffers()[2])[offsets[0] : offsets[-1]]


def _binary_field(value: Any, pg_type: str) -> bytes | None:
    """One value in binary COPY form, or None for a Python type not handled here."""
    kind = type(value)
    if pg_type == "text" and kind is str:
        data: bytes = value.encode()
    elif pg_type in ("int8", "int4") and kind is int:
        data = struct.pack(">q" if pg_type == "int8" else ">i", value)
    elif pg_type == "float8" and kind in (float, int):
        data = struct.pack(">d", value)
    elif pg_type == "bool" and kind is bool:
        data = b"\x01" if value else b"\x00"
    elif pg_type == "date" and kind is dt.date:
        data = struct.pack(">i", (value - _PG_EPOCH.date()).days)
    elif pg_type == "timestamptz" and kind is dt.datetime and value.tzinfo is not None:
        data = struct.pack(">q", (value - _PG_EPOCH) // dt.timedelta(microseconds=1))
    else:
        return None
    return struct.pack(">i", len(data)) + data


def _binary_fields(values: Values, pg_type: str) -> Any:
    """A column's values as encoded binary COPY fields, one per row; None if not handled."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(values, range):
        if pg_type not in ("int4", "int8") or (values and max(values[0], values[-1]) >= 2**31):
            return None
        code, width = _FIXED[pg_type]
        indexes = array.array(code, values)
        if sys.byteorder == "little":
            indexes.byteswap()
        return _fixed_fields(indexes.tobytes(), width, len(values), None)
    if isinstance(values, Sequence):
        return _text_fields(values) if pg_type == "text" else _number_fields(values, pg_type)
    arrow: Any = values
    kind = arrow.type
    valid = arrow.is_valid() if arrow.null_count else None
    if pg_type == "text" and kind in (pa.string(), pa.large_string()):
        text = arrow.cast(pa.string()) if kind == pa.large_string() else arrow
        lengths = pc.cast(pc.binary_length(text), pa.int32())
        heads = _fixed_fields(_swapped(lengths, "i"), 4, len(text), None, prefix=False)
        fields = pc.binary_join_element_wise(heads, text.view(pa.binary()), _binary_scalar(b""))
        return fields if valid is None else pc.if_else(valid, fields, _binary_scalar(_NULL_FIELD))
    expected = {
        "int8": pa.int64(),
        "float8": pa.float64(),
        "bool": pa.bool_(),
        "date": pa.date32(),
        "timestamptz": pa.timestamp("us", tz="UTC"),
    }.get(pg_type)
    if expected is None or kind != expected:
        return None
    code, width = _FIXED[pg_type]
    numbers: Any = arrow
    if pg_type == "bool":
        numbers = pc.cast(arrow, pa.uint8())
    elif pg_type == "date":
        numbers = pc.subtract(arrow.view(pa.int32()), _int_scalar(_PG_EPOCH_DAYS, pa.int32()))
    elif pg_type == "timestamptz":
        epoch = (_PG_EPOCH - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
        numbers = pc.subtract(arrow.view(pa.int64()), _int_scalar(epoch, pa.int64()))
    return _fixed_fields(_swapped(numbers, code), width, len(arrow), valid)


def _text_fields(values: Sequence[Any]) -> Any:
    """Encoded fields of a list of text (row notes, mostly NULL); None if not all str/None."""
    import pyarrow as pa

    fields: list[bytes] = []
    for value in values:
        if value is None:
            fields.append(_NULL_FIELD)
        elif type(value) is str:
            data = value.encode()
            fields.append(struct.pack(">i", len(data)) + data)
        else:
            return None
    try:
        offsets = array.array("i", itertools.accumulate(map(len, fields), initial=0))
    except OverflowError:  # past 2 GiB: row by row instead
        return None
    buffers = [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(fields))]
    return pa.Array.from_buffers(pa.binary(), len(fields), buffers)


#: Per binary type, the Python types a list's values may have to be encoded by `array`.
_NUMBER_KINDS: dict[str, frozenset[type]] = {
    "int8": frozenset({int, type(None)}),
    "int4": frozenset({int, type(None)}),
    "float8": frozenset({float, int, type(None)}),  # ints in a float column fit exactly
    "bool": frozenset({bool, type(None)}),
}


def _number_fields(values: Sequence[Any], pg_type: str) -> Any:
    """Encoded fields of a list of numbers or booleans; None for other types."""
    import pyarrow as pa

    allowed = _NUMBER_KINDS.get(pg_type)
    kinds = set(map(type, values))
    if allowed is None or not kinds <= allowed:
        return None
    valid = None
    if type(None) in kinds:
        mask = pa.py_buffer(bytes(value is not None for value in values))
        valid = pa.Array.from_buffers(pa.uint8(), len(values), [None, mask]).cast(pa.bool_())
        values = [0 if value is None else value for value in values]
    code, width = _FIXED[pg_type]
    try:
        numbers = array.array(code, values)
    except OverflowError:  # not an int4: PostgreSQL would refuse it too, and say so
        return None
    if sys.byteorder == "little" and numbers.itemsize > 1:
        numbers.byteswap()
    return _fixed_fields(numbers.tobytes(), width, len(values), valid)


def _swapped(numbers: Any, code: str) -> bytes:
    """The values buffer of a fixed-width Arrow array, big-endian (nulls: whatever is there)."""
    out = _integers(numbers.buffers()[1], code, numbers.offset, len(numbers))
    if sys.byteorder == "little" and out.itemsize > 1:
        out.byteswap()
    return out.tobytes()


def _integers(buffer: Any, code: str, offset: int, count: int) -> array.array[Any]:
    """``count`` values of ``array`` typecode ``code`` from an Arrow buffer, from ``offset``."""
    out = array.array(code)
    size = out.itemsize
    out.frombytes(memoryview(buffer)[offset * size : (offset + count) * size])
    return out


def _fixed_fields(data: bytes, width: int, count: int, valid: Any, *, prefix: bool = True) -> Any:
    """Binary fields from ``count`` big-endian values of ``width`` bytes (NULL where not valid)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    fixed: Any = pa.Array.from_buffers(pa.binary(width), count, [None, pa.py_buffer(data)])
    values = fixed.cast(pa.binary())
    if not prefix:
        return values
    fields = pc.binary_join_element_wise(
        _binary_scalar(struct.pack(">i", width)), values, _binary_scalar(b"")
    )
    return fields if valid is None else pc.if_else(valid, fields, _binary_scalar(_NULL_FIELD))


def _binary_scalar(data: bytes) -> pa.Scalar[Any]:
    """An Arrow binary scalar (``pa.scalar`` would import pandas)."""
    import pyarrow as pa

    offsets = pa.py_buffer(struct.pack("<ii", 0, len(data)))
    return pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(data)])[0]


def _int_scalar(value: int, kind: pa.DataType) -> pa.Scalar[Any]:
    """An Arrow integer scalar (``pa.scalar`` would import pandas)."""
    import pyarrow as pa

    code = "q" if kind == pa.int64() else "i"
    data = array.array(code, [value]).tobytes()
    return pa.Array.from_buffers(kind, 1, [None, pa.py_buffer(data)])[0]
