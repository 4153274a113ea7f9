"""PostgreSQL's binary ``COPY``: the statement, and the wire encoding built from Arrow arrays.

A batch is written in chunks of `_COPY_CHUNK` rows; a chunk whose columns are
all Arrow arrays, ranges or plain lists is encoded a column at a time in Arrow
(`_binary_rows`), anything else goes row by row through psycopg's dumpers, and
naive datetimes through text ``COPY`` (read in the session's time zone, as an
insert reads them).
"""

from __future__ import annotations

import array
import datetime as dt
import itertools
import struct
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from psycopg import sql as pgsql
from sqlalchemy import BigInteger, Boolean, Connection, Date, DateTime, Float, Integer, Table, Text
from sqlalchemy.types import TypeEngine

if TYPE_CHECKING:
    import pyarrow as pa

    from receiver.inserts import RowBatch, Values


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


def copy_rows(conn: Connection, table: Table, rows: RowBatch) -> None:
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


def _copy_text(conn: Connection, table: Table, rows: RowBatch) -> None:
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


def _binary_rows(rows: RowBatch, pg_types: list[str]) -> memoryview | None:
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
