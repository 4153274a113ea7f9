"""Load a normalised output's rows into its hook's result tables.

`receiver.normalise` has already validated and parsed the output, before the
transaction: structured_json as `rows.flatten`'s tables (or, for an array of
flat objects, `rows.flat_records`), structured_csv as
`csvparse.parse_csv_columns`' columns. Here they become columns keyed by
catalogued column names. A cell that does not fit its column's type goes to the
variant column ``<name>__v_<type>``: never coerced, never dropped. JSON
text from a depth cut and a plain string never share a column, so a reader
can always tell them apart. Whole columns whose cells all fit are placed at
once. How a batch reaches each database is `receiver.inserts`' business
(and `receiver.pgcopy`'s, for PostgreSQL's binary ``COPY``).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, delete, select

from receiver.classify import OutputType
from receiver.columns import Cell, ColumnType
from receiver.csvtypes import ColumnValues, CsvColumns, to_cells
from receiver.inserts import HeldInserts, Row, Values, insert_columns, python_values
from receiver.models import ResultTable
from receiver.normalise import Normalised, collector_paused
from receiver.rows import FlatColumn, FlatRecords, FlatTable, Key
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

_TEXTUAL = frozenset({ColumnType.TEXT, ColumnType.JSON})


def delete_results(conn: Connection, delivery_id: str, hook: str) -> None:
    """Remove every result row derived from ``delivery_id`` (before reprocessing it).

    The caller holds ``hook``'s load lock (`pipeline.delete_derived` takes it).
    """
    names = list(conn.scalars(select(ResultTable.table_name).where(ResultTable.hook == hook)))
    for name in names:
        table = result_table(name)
        conn.execute(delete(table).where(table.c._delivery_id == delivery_id))


def load_results(
    conn: Connection,
    normalised: Normalised,
    *,
    hook: str,
    delivery_id: str,
    session_id: str | None,
    task_id: str | None,
    received_at: dt.datetime,
    held: HeldInserts | None = None,
) -> int:
    """Insert the rows of a normalised output; returns how many rows were written.

    Given ``held``, small inserts wait there for the caller's `HeldInserts.flush`.
    """
    output = normalised.output
    if output.type == OutputType.TEXT:
        return 0
    catalog = catalog_for(conn, hook)
    system = {"_delivery_id": delivery_id, "_session_id": session_id, "_task_id": task_id}
    system["_received_at"] = received_at  # type: ignore[assignment]
    with collector_paused(len(output.text)):
        if normalised.csv is not None:
            return _load_csv(conn, catalog, normalised.csv, system, held)
        return _load_json(conn, catalog, normalised, system, held)


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
    normalised: Normalised,
    system: Row,
    held: HeldInserts | None,
) -> int:
    if normalised.records is not None:
        written = _load_records(conn, catalog, normalised.records, system, held)
        if written is not None:
            return written
    flat_tables = normalised.flat_tables()
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
    parsed: CsvColumns,
    system: Row,
    held: HeldInserts | None,
) -> int:
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
        column: Sequence[Any] = (
            values if values is not None else python_values(cells.whole.pop(name))
        )
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
