"""Rows into a table, on either database: the one place that knows how a batch gets there.

Multi-row ``INSERT`` statements through the driver on SQLite, ``executemany``
or binary ``COPY`` (`receiver.pgcopy`) on PostgreSQL; what is stored is what a
SQLAlchemy Core insert stores (tested). `HeldInserts` merges a batch's small
inserts into one statement per table.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeAlias

from sqlalchemy import Boolean, Column, Connection, Date, DateTime, Table
from sqlalchemy.types import TypeEngine

from receiver.columns import ColumnType
from receiver.csvtypes import to_cells
from receiver.db import can_copy
from receiver.pgcopy import copy_rows

if TYPE_CHECKING:
    import pyarrow as pa

Row = dict[str, Any]
#: A column handed to `insert_columns`: one value per row, as a sequence or an Arrow array
#: of the column's type (`csvtypes.ColumnValues`).
Values: TypeAlias = "Sequence[Any] | pa.Array[Any]"

#: Above this many rows, PostgreSQL loads through COPY instead of executemany.
COPY_THRESHOLD = 1000


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
    binary ``COPY`` for big batches (`receiver.pgcopy`), else SQLAlchemy's
    ``executemany``. Columns that would be NULL on every row are left out.
    """
    if not count:
        return
    given = [c for c in table.columns if c.name in columns or constants.get(c.name) is not None]
    rows = RowBatch(given, count, columns, constants)
    if not can_copy(conn):
        _insert_sqlite(conn, table, rows)
    elif count > COPY_THRESHOLD:
        copy_rows(conn, table, rows)
    else:
        names = [c.name for c in given]
        conn.execute(
            table.insert(), [dict(zip(names, row, strict=True)) for row in rows.python_rows()]
        )


@dataclass(frozen=True)
class RowBatch:
    """``count`` rows to insert into the ``given`` columns, held column by column: a list
    or Arrow array per name in ``columns``, else one value for every row from ``constants``."""

    given: list[Column[Any]]
    count: int
    columns: Mapping[str, Values]
    constants: Mapping[str, Any]

    def python_rows(self) -> Iterator[tuple[Any, ...]]:
        """The rows as tuples of Python values, in the order of ``given``."""
        ordered = [
            python_values(self.columns[c.name])
            if c.name in self.columns
            else itertools.repeat(self.constants[c.name], self.count)
            for c in self.given
        ]
        return zip(*ordered, strict=True)

    def slice(self, start: int, stop: int) -> RowBatch:
        columns = {name: rows_of(values, start, stop) for name, values in self.columns.items()}
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


def python_values(values: Values) -> Sequence[Any]:
    """A column as Python values (Arrow arrays as `csvtypes.to_cells` gives them)."""
    if isinstance(values, Sequence):
        return values
    import pyarrow as pa

    if pa.types.is_timestamp(values.type):
        return to_cells(values, ColumnType.TIMESTAMP)
    converted: list[Any] = values.to_pylist()
    return converted


def _insert_sqlite(conn: Connection, table: Table, rows: RowBatch) -> None:
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
        values = python_values(values)  # numbers, booleans, text: what Python gives them
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


def rows_of(values: Values, start: int, stop: int) -> Values:
    if isinstance(values, Sequence):
        return values[start:stop]
    chunk: Any = values
    return chunk.slice(start, stop - start)  # type: ignore[no-any-return]
