"""A parsed CSV text as typed columns: the data it becomes, type inference and conversion.

Pure. A column's type is the most specific one every non-empty cell has
(integer, float, boolean, date, timestamp, else text); a conversion that would
change a cell's text keeps the original beside it, so nothing is coerced.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from receiver.columns import (
    INT64_MAX,
    INT64_MIN,
    Cell,
    ColumnType,
    sanitise_identifier,
    unique_identifier,
)

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class CsvColumn:
    """One column: a stable source key, a safe SQL name and the header as written."""

    key: str
    name: str
    original: str
    type: ColumnType


@dataclass(frozen=True)
class CsvRow:
    """One data record, typed, with whatever is needed to recover its exact text."""

    values: tuple[Cell, ...]
    originals: dict[str, str]
    extra: tuple[str, ...]
    raw: str | None
    flag: str | None


@dataclass(frozen=True)
class CsvTable:
    """The parsed table: columns in order and one row per data record."""

    columns: tuple[CsvColumn, ...]
    rows: tuple[CsvRow, ...]


#: A column's values, one per row (None for an empty cell): a list of cells, or (Arrow
#: path) an Arrow array of the column's type (`arrow_type`), which `cells` turns into cells.
ColumnValues: TypeAlias = "list[Cell] | pa.Array[Any]"


@dataclass(frozen=True)
class CsvNote:
    """What a row keeps besides its values: originals of lossy cells, surplus, raw text, flag."""

    originals: dict[str, str]
    extra: tuple[str, ...] = ()
    raw: str | None = None
    flag: str | None = None


@dataclass(frozen=True)
class CsvColumns:
    """The parsed table column by column, as the loader takes it (`CsvTable` by rows)."""

    columns: tuple[CsvColumn, ...]
    count: int
    #: One entry per column.
    values: tuple[ColumnValues, ...]
    #: Only the rows that have originals, extra cells, raw text or a flag.
    notes: dict[int, CsvNote]

    def cells(self, index: int) -> list[Cell]:
        """Column ``index`` as cells, whichever form it is held in."""
        return to_cells(self.values[index], self.columns[index].type)

    def table(self) -> CsvTable:
        by_column = [self.cells(i) for i in range(len(self.columns))]
        typed: list[tuple[Cell, ...]] = (
            list(zip(*by_column, strict=True)) if by_column else [()] * self.count
        )
        empty = CsvNote({})
        rows: list[CsvRow] = []
        for index, values in enumerate(typed):
            note = self.notes.get(index, empty)
            rows.append(CsvRow(values, note.originals, note.extra, note.raw, note.flag))
        return CsvTable(self.columns, tuple(rows))


def to_cells(values: ColumnValues, column_type: ColumnType) -> list[Cell]:
    """A column's values as cells (aware UTC datetimes for timestamps), whichever form it is in."""
    if isinstance(values, list):
        return values
    if column_type is ColumnType.TIMESTAMP:
        import pyarrow as pa

        naive: Any = values.view(pa.timestamp("us"))
        return [None if v is None else v.replace(tzinfo=dt.UTC) for v in naive.to_pylist()]
    converted: list[Cell] = values.to_pylist()
    return converted


# --- type inference -----------------------------------------------------------------------

# ASCII digits only: ``\d`` and ``int()`` accept other scripts' digits, which are text here.
INTEGER = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
# A leading-zero integer part (``007.5``) is an identifier, not a number, as for integers.
FLOAT = re.compile(r"[-+]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]+)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?"
    r"(?:Z|[+-][0-9]{2}(?::?[0-9]{2})?)?"
)
INT64_DIGITS = 19
BOOLEANS = frozenset({"true", "false"})


def _parse_int(text: str) -> int | None:
    if not INTEGER.fullmatch(text) or len(text.lstrip("+-")) > INT64_DIGITS:
        return None
    value = int(text)
    return value if INT64_MIN <= value <= INT64_MAX else None


def _parse_float(text: str) -> float | None:
    if not FLOAT.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _parse_bool(text: str) -> bool | None:
    lowered = text.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    return None


def _parse_date(text: str) -> dt.date | None:
    if not DATE.fullmatch(text):
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        return None


def _parse_timestamp(text: str) -> dt.datetime | None:
    """ISO-8601 date-time as aware UTC; a naive one is taken to be UTC."""
    if not TIMESTAMP.fullmatch(text):
        return None
    try:
        return _as_utc(dt.datetime.fromisoformat(text))
    except (ValueError, OverflowError):
        return None


def _as_utc(value: dt.datetime) -> dt.datetime:
    """Aware UTC; a naive value is taken to be UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def _kind(text: str) -> ColumnType:
    """The most specific type a single non-empty cell could have."""
    if INTEGER.fullmatch(text):
        # An integer that overflows int64 is an identifier, not a (lossy) float.
        return ColumnType.INTEGER if _parse_int(text) is not None else ColumnType.TEXT
    if _parse_float(text) is not None:
        return ColumnType.FLOAT
    if _parse_bool(text) is not None:
        return ColumnType.BOOLEAN
    if _parse_date(text) is not None:
        return ColumnType.DATE
    if _parse_timestamp(text) is not None:
        return ColumnType.TIMESTAMP
    return ColumnType.TEXT


def infer_column_type(texts: Sequence[str | None]) -> ColumnType:
    """The one type that every non-empty cell of a column converts to, else TEXT.

    Inference looks at the whole column so a late ``n/a`` keeps it TEXT rather
    than failing a conversion; integers mixed with floats widen to FLOAT.
    """
    return typed_column(texts)[0]


def typed_column(texts: Sequence[str | None]) -> tuple[ColumnType, list[Cell] | None]:
    """`infer_column_type`, plus the converted values (None for empty) when it had to parse them.

    Each candidate type is tried over the whole column in turn (compiled
    patterns mapped in C, stopping at the first misfit), which gives what
    classifying every cell (`infer_per_cell`) gives, several times faster.
    """
    cells: list[str] = list(filter(None, texts))
    if not cells:
        return ColumnType.TEXT, None
    if all(map(FLOAT.fullmatch, cells)):
        # Only INTEGER, FLOAT or TEXT (an int64 overflow, a float overflow) are possible.
        short = max(map(len, cells)) < INT64_DIGITS  # then no int64 overflow either
        if all(map(INTEGER.fullmatch, cells)):
            fits = short or all(map(fits_int64, cells))
            return (ColumnType.INTEGER if fits else ColumnType.TEXT), None
        joined = "".join(cells)
        if short and "e" not in joined and "E" not in joined:  # no float overflow possible
            return ColumnType.FLOAT, None
        for text in cells:
            if (not fits_int64(text)) if INTEGER.fullmatch(text) else _parse_float(text) is None:
                return ColumnType.TEXT, None
        return ColumnType.FLOAT, None
    if all(text.lower() in BOOLEANS for text in cells):
        return ColumnType.BOOLEAN, None
    for pattern, parse, column_type in _CALENDAR:
        if all(map(pattern.fullmatch, cells)):
            values = [parse(text) if text else None for text in texts]
            if values.count(None) == len(texts) - len(cells):
                return column_type, values
            return ColumnType.TEXT, None
    return ColumnType.TEXT, None


def fits_int64(text: str) -> bool:
    """For text matching ``INTEGER``: whether it is an int64 (cheap for short text)."""
    return len(text) < INT64_DIGITS or _parse_int(text) is not None


def _parse_matched_date(text: str) -> dt.date | None:
    """`_parse_date` for text already known to match ``DATE``."""
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        return None


def _parse_matched_timestamp(text: str) -> dt.datetime | None:
    """`_parse_timestamp` for text already known to match ``TIMESTAMP``."""
    try:
        return _as_utc(dt.datetime.fromisoformat(text))
    except (ValueError, OverflowError):
        return None


_CALENDAR: tuple[tuple[re.Pattern[str], Callable[[str], Cell], ColumnType], ...] = (
    (DATE, _parse_matched_date, ColumnType.DATE),
    (TIMESTAMP, _parse_matched_timestamp, ColumnType.TIMESTAMP),
)


def infer_per_cell(texts: Sequence[str | None]) -> ColumnType:
    """`infer_column_type` cell by cell: the reference the careful path keeps."""
    kinds = {_kind(text) for text in texts if text}
    if not kinds:
        return ColumnType.TEXT
    if len(kinds) == 1:
        return kinds.pop()
    if kinds == {ColumnType.INTEGER, ColumnType.FLOAT}:
        return ColumnType.FLOAT
    return ColumnType.TEXT


def render_cell(value: Cell) -> str:
    """The canonical text of a typed value; a conversion is lossy when this differs."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        text = value.isoformat()
        return text[: -len("+00:00")] + "Z" if text.endswith("+00:00") else text
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def is_negative_zero(value: Cell) -> bool:
    """SQLite stores ``-0.0`` as ``0``: keep the text so the sign is not lost."""
    return isinstance(value, float) and value == 0 and math.copysign(1.0, value) < 0


def convert_cell(text: str, column_type: ColumnType) -> Cell:
    """Convert a cell that inference already accepted for ``column_type``."""
    converted: Cell
    if column_type is ColumnType.INTEGER:
        converted = _parse_int(text)
    elif column_type is ColumnType.FLOAT:
        converted = _parse_float(text)
    elif column_type is ColumnType.BOOLEAN:
        converted = _parse_bool(text)
    elif column_type is ColumnType.DATE:
        converted = _parse_date(text)
    elif column_type is ColumnType.TIMESTAMP:
        converted = _parse_timestamp(text)
    else:
        return text
    if converted is None:  # pragma: no cover - inference guarantees a conversion
        raise AssertionError(f"{text!r} is not {column_type}")
    return converted


_CONVERTERS: dict[ColumnType, Callable[[str], Cell]] = {
    ColumnType.INTEGER: int,
    ColumnType.FLOAT: float,
    ColumnType.BOOLEAN: lambda text: text.lower() == "true",
    ColumnType.DATE: dt.date.fromisoformat,
    ColumnType.TIMESTAMP: lambda text: _as_utc(dt.datetime.fromisoformat(text)),
}
# Text that `render_cell` gives back unchanged for the UTC timestamp it parses to.
_CANONICAL_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.(?!000000)[0-9]{6})?Z"
)


def convert_column(
    cells: Sequence[str], column_type: ColumnType, parsed: list[Cell] | None = None
) -> tuple[list[Cell], list[int]]:
    """A column's values (None for empty cells) and the rows whose text the conversion changed.

    Only for a type `infer_column_type` gave the column: every non-empty cell
    converts (as `convert_cell` would convert it, cell by cell). ``parsed`` is the
    values inference already made, if it made them.
    """
    if column_type is ColumnType.TEXT:
        return [text or None for text in cells], []
    if parsed is not None:
        values = parsed
    else:
        convert = _CONVERTERS[column_type]
        values = [convert(text) if text else None for text in cells]
    pairs = enumerate(zip(cells, values, strict=True))
    if column_type is ColumnType.FLOAT:
        return values, [
            row
            for row, (text, value) in pairs
            if text and (repr(value) != text or is_negative_zero(value))
        ]
    if column_type is ColumnType.TIMESTAMP:
        canonical = list(map(_CANONICAL_TIMESTAMP.fullmatch, cells))
        return values, [
            row
            for row, (text, value) in pairs
            if text and not canonical[row] and render_cell(value) != text
        ]
    render = str if column_type is ColumnType.INTEGER else render_cell
    return values, [row for row, (text, value) in pairs if text and render(value) != text]


# --- columns ------------------------------------------------------------------------------


def column_specs(headers: Sequence[str]) -> list[tuple[str, str, str]]:
    """(key, name, original) per header: keys stay traceable, names are SQL-safe."""
    keys: set[str] = set()
    names: set[str] = set()
    out: list[tuple[str, str, str]] = []
    for position, header in enumerate(headers, start=1):
        base = header or f"#{position}"
        key, n = base, 2
        while key in keys:
            key, n = f"{base}#{n}", n + 1
        keys.add(key)
        name = unique_identifier(sanitise_identifier(header, fallback=f"column_{position}"), names)
        names.add(name)
        out.append((key, name, header))
    return out


def header_matches(fields: Sequence[str], expected: Sequence[str]) -> bool:
    return len(fields) == len(expected) and all(
        got.strip().casefold() == want.strip().casefold()
        for got, want in zip(fields, expected, strict=True)
    )
