"""Load an output's rows into its hook's result tables.

structured_json goes through `rows.flatten`, structured_csv through
`csvparse.parse_csv`; both end here as plain dicts keyed by catalogued
column names. A cell that does not fit its column's type goes to the
variant column ``<name>__v_<type>``: never coerced, never dropped. JSON
text from a depth cut and a plain string never share a column, so a reader
can always tell them apart. Large batches go to PostgreSQL through ``COPY``
(`insert_rows` is the one place that knows).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jsonschema
from psycopg import sql as pgsql
from sqlalchemy import Connection, Table, delete, select

from receiver.classify import Output, OutputType
from receiver.columns import ColumnType
from receiver.csvparse import parse_csv
from receiver.errors import Quarantine
from receiver.models import ResultTable
from receiver.rows import FlatColumn, FlatTable, Key, flatten
from receiver.schema import (
    ROW_NOTES,
    Catalog,
    TableInfo,
    fits,
    result_table,
    source_key,
)

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
) -> int:
    """Insert the rows of ``output``; returns how many rows were written."""
    if output.type == OutputType.TEXT:
        return 0
    catalog = Catalog(conn, hook)
    system = {"_delivery_id": delivery_id, "_session_id": session_id, "_task_id": task_id}
    system["_received_at"] = received_at  # type: ignore[assignment]
    with _collector_paused(len(output.text)):
        if output.type == OutputType.JSON:
            validate(output.value, schema)
            return _load_json(conn, catalog, output, system, max_depth)
        expected = schema if isinstance(schema, list) else None
        return _load_csv(conn, catalog, output.text, system, expected)


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

    def put(self, name: str, row: int, value: Any) -> None:
        column = self.columns.get(name)
        if column is None:
            column = self.columns[name] = [None] * self.rows
        column[row] = value

    def set_column(self, name: str, values: Sequence[Any], start: int = 0) -> None:
        """Store ``values[start:]`` in rows ``start`` onwards (all rows by default)."""
        if start == 0:
            self.columns[name] = list(values)
            return
        column = self.columns.get(name)
        if column is None:
            column = self.columns[name] = [None] * self.rows
        column[start:] = values[start:]


# Python types whose values fit a column of each type as they are (see `schema.fits`).
_FITTING: dict[ColumnType, frozenset[type]] = {
    ColumnType.INTEGER: frozenset({int, type(None)}),
    ColumnType.FLOAT: frozenset({float, type(None)}),
    ColumnType.BOOLEAN: frozenset({bool, type(None)}),
    ColumnType.TEXT: frozenset({str, type(None)}),
    ColumnType.JSON: frozenset({str, type(None)}),
}


def _load_json(
    conn: Connection, catalog: Catalog, output: Output, system: Row, max_depth: int
) -> int:
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
        written += _insert(conn, info, cells, system, system_cells)
    return written


def _place_json_cells(
    catalog: Catalog, info: TableInfo, flat: FlatTable, keys: dict[Key, str], cells: _Cells
) -> None:
    """Cell by cell, row by row: new columns are added in the order their first cell is met."""
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
    conn: Connection, catalog: Catalog, text: str, system: Row, expected: list[str] | None
) -> int:
    parsed = parse_csv(text, expected_columns=expected)
    info = catalog.table((), None, None)
    count = len(parsed.rows)
    if not count:
        return 0
    keys = [source_key([column.key]) for column in parsed.columns]
    # Two parts: a CSV header is always one, so a header named "_flag" keeps its own column.
    note_keys = {name: source_key(["#row-note", name]) for name in ROW_NOTES}
    by_column: list[tuple[Any, ...]] = (
        list(zip(*(row.values for row in parsed.rows), strict=True)) if parsed.columns else []
    )
    cells = _Cells(count)

    def place_row(index: int, columns: list[int]) -> None:
        """Row ``index`` as the cell-by-cell path places it: the given columns, then notes."""
        csv_row = parsed.rows[index]
        for i in columns:
            column, value = parsed.columns[i], by_column[i][index]
            cell_type = column.type if value is not None else None
            name, placed = _place(
                catalog, info, keys[i], column.name, column.type, value, cell_type
            )
            cells.put(name, index, placed)
        if (
            csv_row.flag is None
            and csv_row.raw is None
            and not (csv_row.extra or csv_row.originals)
        ):
            return
        notes = {
            "_flag": csv_row.flag,
            "_raw": csv_row.raw,
            "_extra": json.dumps(list(csv_row.extra), ensure_ascii=False)
            if csv_row.extra
            else None,
            "_originals": json.dumps(csv_row.originals, ensure_ascii=False)
            if csv_row.originals
            else None,
        }
        for name, note in notes.items():
            if note is not None:
                cells.put(catalog.column(info, note_keys[name], name, ROW_NOTES[name]), index, note)

    # The first row creates the columns in order; after it, a column whose type is the
    # catalogued one stores every value as it is (no variants, no lookups), and only the
    # other columns and the row notes go cell by cell, in the same order as before.
    everything = list(range(len(parsed.columns)))
    place_row(0, everything)
    remaining: list[int] = []
    for i, column in enumerate(parsed.columns):
        name, column_type = info.columns[keys[i]]
        values = by_column[i]
        if column_type is column.type and not (
            column_type is ColumnType.TEXT and catalog.pg and _has_nul(values)
        ):
            # Row 0 stays as placed: a row note there may share the column (a header "_flag").
            cells.set_column(name, values, start=1)
        else:
            remaining.append(i)
    for index in range(1, count):
        place_row(index, remaining)
    system_cells = {"_row_index": list(range(count))}
    return _insert(conn, info, cells, system, system_cells)


def _insert(
    conn: Connection,
    info: TableInfo,
    cells: _Cells,
    system: Row,
    system_cells: dict[str, list[Any]],
) -> int:
    """Insert a batch given column by column; the system values are the same on every row."""
    insert_columns(conn, info.sqla_table(), cells.rows, {**cells.columns, **system_cells}, system)
    return cells.rows


def insert_rows(conn: Connection, table: Table, rows: list[Row]) -> None:
    """Insert ``rows`` (dicts; a missing key is NULL), as `insert_columns` does."""
    names = [c.name for c in table.columns]
    columns = {name: [row.get(name) for row in rows] for name in names}
    insert_columns(conn, table, len(rows), columns, {})


def insert_columns(
    conn: Connection,
    table: Table,
    count: int,
    columns: Mapping[str, Sequence[Any]],
    constants: Mapping[str, Any],
) -> None:
    """Insert ``count`` rows given column by column: a list of values per column name,
    else one value for every row from ``constants``, else NULL.

    PostgreSQL: ``COPY`` for big batches, else SQLAlchemy's ``executemany``.
    SQLite: one driver ``executemany`` of tuples, each value first passed
    through the column type's SQLAlchemy bind processor (a constant once), so
    what is stored is exactly what SQLAlchemy would store (timestamps as its
    naive UTC text, dates as ISO text, booleans as 0/1), without its per-row
    overhead.
    """
    if not count:
        return
    names = [c.name for c in table.columns]
    dialect = conn.dialect
    sqlite = dialect.name != "postgresql"
    ordered: list[Iterable[Any]] = []
    for column in table.columns:
        process = column.type.dialect_impl(dialect).bind_processor(dialect) if sqlite else None
        values = columns.get(column.name)
        if values is None:
            value = constants.get(column.name)
            if process is not None and value is not None:
                value = process(value)
            ordered.append(itertools.repeat(value, count))
        else:
            ordered.append(map(process, values) if process is not None else values)
    rows = list(zip(*ordered, strict=True))
    if sqlite:
        quote = dialect.identifier_preparer.quote
        insert = "INSERT INTO {} ({}) VALUES ({})".format(
            quote(table.name), ", ".join(map(quote, names)), ", ".join("?" * len(names))
        )
        conn.exec_driver_sql(insert, rows)
    elif count > COPY_THRESHOLD:
        statement = pgsql.SQL("COPY {} ({}) FROM STDIN").format(
            pgsql.Identifier(table.name), pgsql.SQL(", ").join(map(pgsql.Identifier, names))
        )
        driver = conn.connection.driver_connection
        assert driver is not None
        with driver.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)
    else:
        conn.execute(table.insert(), [dict(zip(names, row, strict=True)) for row in rows])
