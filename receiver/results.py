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

import datetime as dt
import json
from typing import Any

import jsonschema
from psycopg import sql as pgsql
from sqlalchemy import Connection, Table, delete, select

from receiver.classify import Output, OutputType
from receiver.columns import ColumnType
from receiver.csvparse import parse_csv
from receiver.errors import Quarantine
from receiver.models import ResultTable
from receiver.rows import flatten
from receiver.schema import (
    ROW_NOTES,
    Catalog,
    TableInfo,
    fits,
    lock_hook,
    result_table,
    source_key,
)

Row = dict[str, Any]

#: Above this many rows, PostgreSQL loads through COPY instead of executemany.
COPY_THRESHOLD = 1000
_TEXTUAL = frozenset({ColumnType.TEXT, ColumnType.JSON})


def delete_results(conn: Connection, delivery_id: str, hook: str | None = None) -> None:
    """Remove every result row derived from ``delivery_id`` (before reprocessing it)."""
    query = select(ResultTable.table_name)
    if hook is not None:
        lock_hook(conn, hook)
        query = query.where(ResultTable.hook == hook)
    names = list(conn.scalars(query))
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
    if output.type == OutputType.JSON:
        validate(output.value, schema)
        return _load_json(conn, catalog, output, system, max_depth)
    expected = schema if isinstance(schema, list) else None
    return _load_csv(conn, catalog, output.text, system, expected)


def _put(
    catalog: Catalog,
    table: TableInfo,
    row: Row,
    key: str,
    suggested: str,
    declared: ColumnType,
    value: Any,
    cell_type: ColumnType | None,
) -> None:
    """Place one cell: in its column if it fits, else in the variant column for its type."""
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
        row[name] = value
        return
    variant_key = json.dumps([json.loads(key), f"#variant:{actual.value}"])
    variant = catalog.column(table, variant_key, f"{name}__v_{actual.value}", actual)
    row[variant] = value


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
        # One JSON encoding per column, not per cell: it dominates big loads otherwise.
        keys = {key: source_key(key) for key in flat.columns}
        rows: list[Row] = []
        for flat_row in flat.rows:
            row: Row = {
                **system,
                "_row_index": flat_row.index,
                "_parent_index": flat_row.parent_index,
                "_list_index": flat_row.list_index,
            }
            for key, value in flat_row.values.items():
                column = flat.columns.get(key)
                if column is None:  # only nulls so far in this document: nothing to store
                    continue
                _put(
                    catalog,
                    info,
                    row,
                    keys[key],
                    column.name,
                    column.type,
                    value,
                    flat_row.cell_type(key),
                )
            rows.append(row)
        written += _insert(conn, info, rows)
    return written


def _load_csv(
    conn: Connection, catalog: Catalog, text: str, system: Row, expected: list[str] | None
) -> int:
    parsed = parse_csv(text, expected_columns=expected)
    info = catalog.table((), None, None)
    keys = [source_key([column.key]) for column in parsed.columns]
    note_keys = {name: source_key([name]) for name in ROW_NOTES}
    rows: list[Row] = []
    for index, csv_row in enumerate(parsed.rows):
        row: Row = {**system, "_row_index": index, "_parent_index": None, "_list_index": None}
        for column, key, value in zip(parsed.columns, keys, csv_row.values, strict=True):
            _put(
                catalog,
                info,
                row,
                key,
                column.name,
                column.type,
                value,
                column.type if value is not None else None,
            )
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
        for name, value in notes.items():
            if value is not None:
                row[catalog.column(info, note_keys[name], name, ROW_NOTES[name])] = value
        rows.append(row)
    return _insert(conn, info, rows)


def _insert(conn: Connection, info: TableInfo, rows: list[Row]) -> int:
    if not rows:
        return 0
    insert_rows(conn, info.sqla_table(), rows)
    return len(rows)


def insert_rows(conn: Connection, table: Table, rows: list[Row]) -> None:
    """Insert ``rows`` (a missing key is NULL): COPY on PostgreSQL for big batches.

    Both paths hand the driver the same Python values, so they store the same thing.
    """
    names = [c.name for c in table.columns]
    if conn.dialect.name == "postgresql" and len(rows) > COPY_THRESHOLD:
        statement = pgsql.SQL("COPY {} ({}) FROM STDIN").format(
            pgsql.Identifier(table.name), pgsql.SQL(", ").join(map(pgsql.Identifier, names))
        )
        driver = conn.connection.driver_connection
        assert driver is not None
        with driver.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row([row.get(n) for n in names])
        return
    # executemany needs every row to carry every key.
    conn.execute(table.insert(), [{n: r.get(n) for n in names} for r in rows])
