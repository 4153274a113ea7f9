"""Turn agent-written CSV text into a typed table without losing anything.

WebRun agents hand back ``structured_csv`` that is often slightly broken
(unquoted ``$95,360.97``, ragged rows, stray quotes). This module is a pure
core: text in, typed table out. Tokenising is left to the stdlib ``csv``
module; only the repair and the type inference are hand-written. Every
conversion that changes the text keeps the original, and every record that is
repaired, ragged or malformed keeps its raw text, so nothing is silently
dropped or coerced.

Two fast paths give the same table as the careful one (``parse_csv(...,
careful=True)``, property-tested against it): one grammar match over the
whole text stands in for checking every record against its raw text, and
types are inferred and converted a column at a time. Big texts
(`ARROW_MIN_CHARS`) that are regular and one width are also tokenised and
typed with Arrow (`_parse_arrow`), so no Python object is made per cell: the
values stay Arrow arrays (`CsvColumns`) all the way to the database.
Whatever Arrow might read or convert otherwise than the stdlib (ragged or
irregular records, int64 overflow, other timestamp forms, year 0) goes the
stdlib way, for the text, the column or the cell concerned.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
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

__all__ = [
    "CsvColumn",
    "CsvRow",
    "CsvTable",
    "infer_column_type",
    "looks_like_csv",
    "parse_csv",
    "render_cell",
]


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


# --- type inference -----------------------------------------------------------------------

# ASCII digits only: ``\d`` and ``int()`` accept other scripts' digits, which are text here.
_INTEGER = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
# A leading-zero integer part (``007.5``) is an identifier, not a number, as for integers.
_FLOAT = re.compile(r"[-+]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]+)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?"
    r"(?:Z|[+-][0-9]{2}(?::?[0-9]{2})?)?"
)
_INT64_DIGITS = 19
_BOOLEANS = frozenset({"true", "false"})


def _parse_int(text: str) -> int | None:
    if not _INTEGER.fullmatch(text) or len(text.lstrip("+-")) > _INT64_DIGITS:
        return None
    value = int(text)
    return value if INT64_MIN <= value <= INT64_MAX else None


def _parse_float(text: str) -> float | None:
    if not _FLOAT.fullmatch(text):
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
    if not _DATE.fullmatch(text):
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        return None


def _parse_timestamp(text: str) -> dt.datetime | None:
    """ISO-8601 date-time as aware UTC; a naive one is taken to be UTC."""
    if not _TIMESTAMP.fullmatch(text):
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
    if _INTEGER.fullmatch(text):
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
    return _typed_column(texts)[0]


def _typed_column(texts: Sequence[str | None]) -> tuple[ColumnType, list[Cell] | None]:
    """`infer_column_type`, plus the converted values (None for empty) when it had to parse them.

    Each candidate type is tried over the whole column in turn (compiled
    patterns mapped in C, stopping at the first misfit), which gives what
    classifying every cell (`_infer_per_cell`) gives, several times faster.
    """
    cells: list[str] = list(filter(None, texts))
    if not cells:
        return ColumnType.TEXT, None
    if all(map(_FLOAT.fullmatch, cells)):
        # Only INTEGER, FLOAT or TEXT (an int64 overflow, a float overflow) are possible.
        short = max(map(len, cells)) < _INT64_DIGITS  # then no int64 overflow either
        if all(map(_INTEGER.fullmatch, cells)):
            fits = short or all(map(_fits_int64, cells))
            return (ColumnType.INTEGER if fits else ColumnType.TEXT), None
        joined = "".join(cells)
        if short and "e" not in joined and "E" not in joined:  # no float overflow possible
            return ColumnType.FLOAT, None
        for text in cells:
            if (not _fits_int64(text)) if _INTEGER.fullmatch(text) else _parse_float(text) is None:
                return ColumnType.TEXT, None
        return ColumnType.FLOAT, None
    if all(text.lower() in _BOOLEANS for text in cells):
        return ColumnType.BOOLEAN, None
    for pattern, parse, column_type in _CALENDAR:
        if all(map(pattern.fullmatch, cells)):
            values = [parse(text) if text else None for text in texts]
            if values.count(None) == len(texts) - len(cells):
                return column_type, values
            return ColumnType.TEXT, None
    return ColumnType.TEXT, None


def _fits_int64(text: str) -> bool:
    """For text matching ``_INTEGER``: whether it is an int64 (cheap for short text)."""
    return len(text) < _INT64_DIGITS or _parse_int(text) is not None


def _parse_matched_date(text: str) -> dt.date | None:
    """`_parse_date` for text already known to match ``_DATE``."""
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        return None


def _parse_matched_timestamp(text: str) -> dt.datetime | None:
    """`_parse_timestamp` for text already known to match ``_TIMESTAMP``."""
    try:
        return _as_utc(dt.datetime.fromisoformat(text))
    except (ValueError, OverflowError):
        return None


_CALENDAR: tuple[tuple[re.Pattern[str], Callable[[str], Cell], ColumnType], ...] = (
    (_DATE, _parse_matched_date, ColumnType.DATE),
    (_TIMESTAMP, _parse_matched_timestamp, ColumnType.TIMESTAMP),
)


def _infer_per_cell(texts: Sequence[str | None]) -> ColumnType:
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


def _is_negative_zero(value: Cell) -> bool:
    """SQLite stores ``-0.0`` as ``0``: keep the text so the sign is not lost."""
    return isinstance(value, float) and value == 0 and math.copysign(1.0, value) < 0


def _convert(text: str, column_type: ColumnType) -> Cell:
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


# --- tokenising ---------------------------------------------------------------------------

# Only CR, LF and CRLF end a line for ``csv``; ``str.splitlines`` would also split on
# U+2028 and friends, which ``csv`` would then silently drop inside quoted fields.
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")
_TERMINATOR = re.compile(r"(?:\r\n|\r|\n)\Z")
# csv's default is 128 KiB per field; a long agent-written cell must not fail the record.
_FIELD_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class _Record:
    fields: list[str]
    raw: str  # the record's lines as in the input, without the final line terminator
    quoted: tuple[bool, ...] | None  # per field; None when the raw text is not regular CSV
    error: str | None = None


class _LineFeed:
    """Feeds ``csv.reader`` one physical line at a time and remembers what it consumed."""

    def __init__(self, text: str) -> None:
        self._lines = (match.group() for match in _LINE.finditer(text))
        self.consumed: list[str] = []

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.consumed.append(line)
        return line

    def take(self) -> str:
        raw = "".join(self.consumed)
        self.consumed.clear()
        return _TERMINATOR.sub("", raw)


def _quoting(raw: str, fields: list[str]) -> tuple[bool, ...] | None:
    """Which fields were quoted, or None if ``raw`` is not what ``fields`` serialise to.

    The non-strict ``csv`` reader quietly drops quotes in input such as
    ``"ab"c``; checking the record against its own text catches that loss.
    """
    flags: list[bool] = []
    pos = 0
    for index, field in enumerate(fields):
        if index:
            if not raw.startswith(",", pos):
                return None
            pos += 1
        if raw.startswith('"', pos):
            quoted = '"' + field.replace('"', '""') + '"'
            if not raw.startswith(quoted, pos):
                return None
            flags.append(True)
            pos += len(quoted)
        else:
            if not raw.startswith(field, pos):
                return None
            flags.append(False)
            pos += len(field)
    return tuple(flags) if pos == len(raw) else None


def _records(text: str) -> Iterator[_Record]:
    """Non-blank records with their raw text; a record ``csv`` rejects is kept raw."""
    if len(text) > csv.field_size_limit():
        csv.field_size_limit(_FIELD_LIMIT)
    feed = _LineFeed(text)
    reader = csv.reader(feed)
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield _Record([], feed.take(), None, error=str(exc))
            continue
        raw = feed.take()
        if fields:
            yield _Record(fields, raw, _quoting(raw, fields))


# A record exactly as regular CSV writes it: each field either quoted (any text, quotes
# doubled) or unquoted (not starting with a quote, no comma or line break). For text that
# matches ``_REGULAR_TEXT``, ``csv`` splits records at the same places and every record
# passes `_quoting`, so the per-record check can be skipped. Possessive and atomic, so a
# mismatch fails in one linear pass instead of backtracking.
_FIELD = r'(?>"[^"]*+(?:""[^"]*+)*+"|[^",\r\n][^,\r\n]*+|)'
_RECORD_PATTERN = _FIELD + r"(?:," + _FIELD + r")*+"
_REGULAR_RECORD = re.compile(_RECORD_PATTERN)
_REGULAR_TEXT = re.compile(r"(?:" + _RECORD_PATTERN + r"(?:\r\n|\r|\n))*+" + _RECORD_PATTERN)


class _Tokens:
    """The records of a text as ``csv`` reads it, line spans kept so raw text is built on demand.

    Gives the same records as `_records`: the same lines feed the same reader
    (``line_num`` says where each record ends), and `_quoting` runs only for
    records that do not match the regular grammar.
    """

    def __init__(self, text: str) -> None:
        if len(text) > csv.field_size_limit():
            csv.field_size_limit(_FIELD_LIMIT)
        self.lines: list[str] = _LINE.findall(text)
        self.regular = _REGULAR_TEXT.fullmatch(text) is not None
        #: (fields, first line, end line, csv's error); blank records already dropped.
        self.records: list[tuple[list[str], int, int, str | None]] = []
        reader = csv.reader(self.lines)
        start = 0
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                self.records.append(([], start, reader.line_num, str(exc)))
            else:
                if fields:
                    self.records.append((fields, start, reader.line_num, None))
            start = reader.line_num

    def raw(self, index: int) -> str:
        _, start, end, _ = self.records[index]
        return _TERMINATOR.sub("", "".join(self.lines[start:end]))

    def is_regular(self, index: int) -> bool:
        """Whether record ``index`` has the regular form, so `_quoting` cannot fail on it."""
        return self.regular or _REGULAR_RECORD.fullmatch(self.raw(index)) is not None

    def record(self, index: int) -> _Record:
        """The full `_Record` (as `_records` gives it), for the rows that need a closer look."""
        fields, _, _, error = self.records[index]
        raw = self.raw(index)
        if error is not None:
            return _Record([], raw, None, error=error)
        return _Record(fields, raw, _quoting(raw, fields))


def _strip_bom(text: str) -> str:
    return text[1:] if text.startswith("\ufeff") else text


# --- repair -------------------------------------------------------------------------------

_THOUSANDS_HEAD = re.compile(r"[-+]?[$€£¥]?[0-9]{1,3}")
_THOUSANDS_TAIL = re.compile(r"[0-9]{3}(?:\.[0-9]+)?")
_MAX_REPAIR_WORK = 1_000_000


def _rejoins(fields: list[str], quoted: tuple[bool, ...], start: int) -> Iterator[int]:
    """Ends (exclusive) of runs from ``start`` that rejoin into a thousands-separated number.

    Only unquoted fields qualify: a quoted field cannot be an accidental split.
    """
    if quoted[start] or not _THOUSANDS_HEAD.fullmatch(fields[start]):
        return
    end = start + 1
    while end < len(fields) and not quoted[end] and _THOUSANDS_TAIL.fullmatch(fields[end]):
        end += 1
        yield end
        if "." in fields[end - 1]:
            return


def _repair(
    fields: list[str], quoted: tuple[bool, ...], width: int
) -> list[tuple[int, int]] | None:
    """The single way to rejoin runs so ``fields`` has ``width`` fields, else None.

    ``ways[i][g]`` counts (capped at 2) the segmentations of ``fields[i:]`` into
    ``g`` groups; zero or several segmentations mean the split is ambiguous.
    """
    count = len(fields)
    if width < 1 or count <= width or count * width > _MAX_REPAIR_WORK:
        return None
    ways = [[0] * (width + 1) for _ in range(count + 1)]
    step = [[0] * (width + 1) for _ in range(count + 1)]
    ways[count][0] = 1
    for start in range(count - 1, -1, -1):
        ends = [start + 1, *_rejoins(fields, quoted, start)]
        for groups in range(1, width + 1):
            total = 0
            for end in ends:
                found = ways[end][groups - 1]
                if found:
                    total += found
                    step[start][groups] = end
            ways[start][groups] = min(total, 2)
    if ways[0][width] != 1:
        return None
    spans: list[tuple[int, int]] = []
    start, groups = 0, width
    while start < count:
        end = step[start][groups]
        spans.append((start, end))
        start, groups = end, groups - 1
    return spans


# --- columns ------------------------------------------------------------------------------


def _columns(headers: Sequence[str]) -> list[tuple[str, str, str]]:
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


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


@dataclass(frozen=True)
class _Shaped:
    texts: list[str]
    extra: tuple[str, ...]
    raw: str | None
    flag: str | None


def _shape(record: _Record, keys: Sequence[str]) -> _Shaped:
    """Fit a record to the columns: repair if unambiguous, else keep the surplus."""
    width = len(keys)
    if record.error is not None:
        return _Shaped([], (), record.raw, f"unparsed: {record.error}")
    fields = record.fields
    reasons: list[str] = []
    if record.quoted is None:
        reasons.append("irregular quoting")
    if len(fields) > width and record.quoted is not None:
        spans = _repair(fields, record.quoted, width)
        if spans is not None:
            fields = [",".join(fields[start:end]) for start, end in spans]
            where = ", ".join(keys[i] for i, (s, e) in enumerate(spans) if e - s > 1)
            reasons.insert(0, f"repaired: rejoined thousands separator in {where}")
    if len(fields) != width:
        reasons.insert(0, f"ragged: {_plural(len(fields), 'field')} for {_plural(width, 'column')}")
    if not reasons:
        return _Shaped(fields, (), None, None)
    return _Shaped(fields[:width], tuple(fields[width:]), record.raw, "; ".join(reasons))


def _matches(fields: Sequence[str], expected: Sequence[str]) -> bool:
    return len(fields) == len(expected) and all(
        got.strip().casefold() == want.strip().casefold()
        for got, want in zip(fields, expected, strict=True)
    )


def parse_csv(
    text: str, expected_columns: Sequence[str] | None = None, *, careful: bool = False
) -> CsvTable:
    """Parse CSV text into typed columns and rows.

    ``expected_columns`` (the hook's registered column list) wins over the
    text's own first record, which is skipped only if it repeats them.
    ``careful=True`` takes the reference path (every record checked against its
    own text, every cell typed on its own); the default path gives the same
    table, checking raw text only where the grammar says it may differ and
    typing column by column, and is tested against it.
    """
    if careful:
        return _parse_careful(text, expected_columns)
    return parse_csv_columns(text, expected_columns).table()


def parse_csv_columns(
    text: str, expected_columns: Sequence[str] | None = None, *, arrow: bool | None = None
) -> CsvColumns:
    """`parse_csv` column by column, the form the loader takes.

    ``arrow`` picks Arrow's tokeniser and vectorised typing (by default for
    texts from `ARROW_MIN_CHARS`); it is used only where it reads the text as
    the stdlib path does, which the tests check against the careful path.
    """
    text = _strip_bom(text)
    if arrow if arrow is not None else len(text) >= ARROW_MIN_CHARS:
        parsed = _parse_arrow(text, expected_columns)
        if parsed is not None:
            return parsed
    return _parse_python(text, expected_columns)


def _parse_python(text: str, expected_columns: Sequence[str] | None) -> CsvColumns:
    """The stdlib fast path: one grammar match, raw text only where it may differ."""
    tokens = _Tokens(text)
    records = range(len(tokens.records))
    headers: Sequence[str]
    if expected_columns is not None:
        headers = list(expected_columns)
        if tokens.records:
            fields, _, _, error = tokens.records[0]
            if error is None and _matches(fields, headers):
                records = range(1, len(tokens.records))
    else:
        if not tokens.records:
            return CsvColumns((), 0, (), {})
        headers = tokens.records[0][0]
        records = range(1, len(tokens.records))
    specs = _columns(headers)
    keys = [key for key, _, _ in specs]
    width = len(keys)
    texts: list[list[str]] = []
    shapes: dict[int, _Shaped] = {}  # row -> its shape, for rows with extra, raw text or a flag
    regular = tokens.regular
    for index in records:
        fields, _, _, error = tokens.records[index]
        if error is None and len(fields) == width and (regular or tokens.is_regular(index)):
            texts.append(fields)
            continue
        shaped = _shape(tokens.record(index), keys)
        shapes[len(texts)] = shaped
        got = shaped.texts
        texts.append(got if len(got) == width else [*got, *[""] * (width - len(got))])
    by_column: list[Sequence[str]] = list(zip(*texts, strict=True)) or [() for _ in specs]
    inferred = [_typed_column(cells) for cells in by_column]
    columns = tuple(
        CsvColumn(key=key, name=name, original=original, type=column_type)
        for (key, name, original), (column_type, _) in zip(specs, inferred, strict=True)
    )
    values: list[ColumnValues] = []
    originals: dict[int, dict[str, str]] = {}
    for column, column_texts, (_, parsed) in zip(columns, by_column, inferred, strict=True):
        converted, lossy = _convert_column(column_texts, column.type, parsed)
        values.append(converted)
        for row in lossy:
            originals.setdefault(row, {})[column.key] = column_texts[row]
    notes = {
        row: CsvNote(originals.get(row, {}), shaped.extra, shaped.raw, shaped.flag)
        for row, shaped in shapes.items()
    }
    for row, kept in originals.items():
        if row not in notes:
            notes[row] = CsvNote(kept)
    return CsvColumns(columns, len(texts), tuple(values), notes)


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


def _convert_column(
    cells: Sequence[str], column_type: ColumnType, parsed: list[Cell] | None = None
) -> tuple[list[Cell], list[int]]:
    """A column's values (None for empty cells) and the rows whose text the conversion changed.

    Only for a type `infer_column_type` gave the column: every non-empty cell
    converts (as `_convert` would convert it, cell by cell). ``parsed`` is the
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
            if text and (repr(value) != text or _is_negative_zero(value))
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


def _parse_careful(text: str, expected_columns: Sequence[str] | None) -> CsvTable:
    """`parse_csv` record by record and cell by cell: the reference for the fast path."""
    records: Iterator[_Record] = _records(_strip_bom(text))
    if expected_columns is not None:
        headers = list(expected_columns)
        first = next(records, None)
        if first is not None and not (first.error is None and _matches(first.fields, headers)):
            records = _chain(first, records)
    else:
        header = next(records, None)
        if header is None:
            return CsvTable((), ())
        headers = header.fields
    specs = _columns(headers)
    keys = [key for key, _, _ in specs]
    shaped = [_shape(record, keys) for record in records]
    types = [
        _infer_per_cell([row.texts[i] if i < len(row.texts) else None for row in shaped])
        for i in range(len(specs))
    ]
    columns = tuple(
        CsvColumn(key=key, name=name, original=original, type=column_type)
        for (key, name, original), column_type in zip(specs, types, strict=True)
    )
    return CsvTable(columns, tuple(_typed_row(row, columns) for row in shaped))


def _chain(first: _Record, rest: Iterable[_Record]) -> Iterator[_Record]:
    yield first
    yield from rest


def _typed_row(row: _Shaped, columns: Sequence[CsvColumn]) -> CsvRow:
    values: list[Cell] = []
    originals: dict[str, str] = {}
    for index, column in enumerate(columns):
        text = row.texts[index] if index < len(row.texts) else ""
        if not text:
            values.append(None)
            continue
        value = _convert(text, column.type)
        if column.type is not ColumnType.TEXT and (
            render_cell(value) != text or _is_negative_zero(value)
        ):
            originals[column.key] = text
        values.append(value)
    return CsvRow(tuple(values), originals, row.extra, row.raw, row.flag)


# --- the Arrow path -----------------------------------------------------------------------

#: Texts from this many characters take the Arrow path by default (`parse_csv_columns`).
ARROW_MIN_CHARS = 64 * 1024


def _re2(pattern: re.Pattern[str]) -> str:
    """A fullmatch pattern as RE2 (Arrow's regex engine) spells it: anchored at both ends."""
    return f"^(?:{pattern.pattern})$"


# The grammar of `_REGULAR_TEXT` without possessive or atomic groups, which RE2 lacks and this
# grammar does not need: a field's first character decides its form, so there is one way to
# read a text and a backtracking matcher and an automaton accept the same texts.
_RE2_FIELD = r'"[^"]*(?:""[^"]*)*"|[^",\r\n][^,\r\n]*|'
_RE2_RECORD = f"(?:{_RE2_FIELD})(?:,(?:{_RE2_FIELD}))*"
_RE2_REGULAR_TEXT = f"^(?:{_RE2_RECORD}(?:\\r\\n|\\r|\\n))*{_RE2_RECORD}$"
_RE2_BOOLEAN = "^(?:[tT][rR][uU][eE]|[fF][aA][lL][sS][eE])$"  # ASCII: what str.lower() maps
# Float text that `repr` gives back unchanged: fixed notation (|x| >= 1e-4), no superfluous
# zero, and (with the length bound) at most 15 digits, which always survive a round trip.
_RE2_CANONICAL_FLOAT = (
    r"^(?:-?[1-9][0-9]*\.(?:0|[0-9]*[1-9])|0\.0|-?0\.0{0,3}[1-9](?:[0-9]*[1-9])?)$"
)
# Timestamps Arrow parses as `_parse_timestamp` does (other forms are typed cell by cell).
_RE2_ARROW_TIMESTAMP = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?Z$"
_RE2_CANONICAL_TIMESTAMP = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{6})?Z$"
)


def _parse_arrow(text: str, expected_columns: Sequence[str] | None) -> CsvColumns | None:
    """Tokenise and type with Arrow; None where Arrow might not read the text as ``csv`` does.

    Only a regular text (`_REGULAR_TEXT`) whose records all have one width
    qualifies: ``csv`` then reads every record cleanly (no repair, no raw
    text, no flag) and Arrow's reader splits the same fields.
    """
    if text.startswith("\ufeff"):  # a second BOM: Arrow's reader would strip it, csv keeps it
        return None
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: only the stdlib path reads those
        return None
    if not pc.all(pc.match_substring_regex(_one_string(data), _RE2_REGULAR_TEXT)).as_py():
        return None
    if len(text) > csv.field_size_limit():
        csv.field_size_limit(_FIELD_LIMIT)
    first = next(filter(None, csv.reader(m.group() for m in _LINE.finditer(text))), None)
    if first is None:
        return None
    width = len(first)
    try:
        read = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(
                autogenerate_column_names=True,  # the header is a record like the others here
                use_threads=False,  # as fast on two cores, and it leaves one to the server
                block_size=min(max(len(data), 1 << 20), 2**31 - 1),  # one block: no straddling
            ),
            # The defaults otherwise: comma, double quote, doubled quotes, no escape, blank
            # lines skipped (csv gives them as empty records, which the stdlib path drops).
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types={f"f{i}": pa.string() for i in range(width)},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid:  # a ragged record: the stdlib path shapes and flags it
        return None
    texts: list[Any] = [read.column(i).combine_chunks() for i in range(width)]
    found = [column[0].as_py() for column in texts]
    start = 1
    if expected_columns is not None:
        headers: Sequence[str] = list(expected_columns)
        if len(headers) != width:
            return None
        start = 1 if _matches(found, headers) else 0
    else:
        headers = found
    specs = _columns(headers)
    values: list[ColumnValues] = []
    columns: list[CsvColumn] = []
    originals: dict[int, dict[str, str]] = {}
    for (key, name, original), column_texts in zip(specs, texts, strict=True):
        column_type, typed, lossy, lossy_texts = _arrow_typed(column_texts.slice(start))
        columns.append(CsvColumn(key=key, name=name, original=original, type=column_type))
        values.append(typed)
        for row, kept in zip(lossy, lossy_texts, strict=True):
            originals.setdefault(row, {})[key] = kept
    notes = {row: CsvNote(kept) for row, kept in originals.items()}
    return CsvColumns(tuple(columns), read.num_rows - start, tuple(values), notes)


def _one_string(data: bytes) -> pa.Array[Any]:
    """A one-element Arrow string array over ``data`` (``pa.array`` would import pandas)."""
    import struct

    import pyarrow as pa

    offsets = pa.py_buffer(struct.pack("<qq", 0, len(data)))
    return pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(data)])


_Typed: TypeAlias = tuple[ColumnType, ColumnValues, list[int], list[str]]


def _arrow_typed(texts: Any) -> _Typed:
    """`_typed_column` and `_convert_column` over an Arrow string column.

    Returns the type, the values, and the rows (with their texts) whose
    conversion changed the text. Whatever Arrow does not handle exactly as
    the stdlib path does (int64 overflow candidates, other timestamp forms,
    values Arrow refuses) goes to the stdlib code, for the cells or the
    column concerned.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    lengths = pc.binary_length(texts)
    present = pc.cast(lengths, pa.bool_())
    values = texts
    if not pc.all(present).as_py():
        values = pc.if_else(present, texts, pa.nulls(len(texts), texts.type))  # "" -> None
    filled = values.drop_null()
    if not len(filled):
        return ColumnType.TEXT, values, [], []

    def every(pattern: str, among: Any = filled) -> bool:
        return bool(pc.all(pc.match_substring_regex(among, pattern)).as_py())

    first: str = filled[0].as_py()
    try:
        if _FLOAT.fullmatch(first):
            if not every(_re2(_FLOAT)):
                return ColumnType.TEXT, values, [], []
            integral = pc.match_substring_regex(filled, _re2(_INTEGER))
            if pc.max(lengths).as_py() >= _INT64_DIGITS:  # the only ones that may overflow
                long = pc.cast(pc.binary_length(filled), pa.int64())
                many = pc.greater_equal(long, _int64_scalar(_INT64_DIGITS))
                suspects = filled.filter(pc.and_(integral, many))
                if not all(map(_fits_int64, suspects.to_pylist())):
                    return ColumnType.TEXT, values, [], []
            if pc.all(integral).as_py():
                return _arrow_integers(values)
            return _arrow_floats(values)
        if first.lower() in _BOOLEANS:
            if not every(_RE2_BOOLEAN):
                return ColumnType.TEXT, values, [], []
            exact = pc.match_substring_regex(values, "^(?:true|false)$")
            truth = pc.starts_with(values, "t", ignore_case=True)
            return _with_lossy(ColumnType.BOOLEAN, truth, values, exact)
        # Arrow's calendar has a year 0, Python's has not: such text goes the stdlib way.
        year_zero = _DATE.match(first) and pc.any(pc.starts_with(filled, "0000")).as_py()
        if _DATE.fullmatch(first):
            if not every(_re2(_DATE)):
                return ColumnType.TEXT, values, [], []
            if not year_zero:
                return ColumnType.DATE, pc.cast(values, pa.date32()), [], []
        elif _TIMESTAMP.fullmatch(first):
            if every(_RE2_ARROW_TIMESTAMP) and not year_zero:
                stamps = pc.cast(values, pa.timestamp("us", "UTC"))
                canonical = pc.and_(
                    pc.match_substring_regex(values, _RE2_CANONICAL_TIMESTAMP),
                    pc.invert(pc.ends_with(values, ".000000Z")),
                )
                return _with_lossy(ColumnType.TIMESTAMP, stamps, values, canonical)
            if not every(_re2(_TIMESTAMP)):
                return ColumnType.TEXT, values, [], []
        else:
            return ColumnType.TEXT, values, [], []
    except pa.ArrowInvalid:  # a value Arrow refuses: the stdlib path decides what it is
        pass
    return _python_typed(values)


def _arrow_integers(values: Any) -> _Typed:
    """For text matching `_INTEGER` that fits int64: only "+n" and "-0" are not what str gives."""
    import pyarrow as pa
    import pyarrow.compute as pc

    plus = pc.starts_with(values, "+")
    unsigned = values
    if pc.any(plus).as_py():  # Arrow's parser refuses a leading "+"
        unsigned = pc.replace_substring_regex(values, r"^\+", "")
    integers = pc.cast(unsigned, pa.int64())
    lossy = pc.or_(plus, pc.starts_with(values, "-0"))  # "-0" can only be "-0" itself
    return _with_lossy(ColumnType.INTEGER, integers, values, pc.invert(lossy))


def _arrow_floats(values: Any) -> _Typed:
    import pyarrow as pa
    import pyarrow.compute as pc

    floats = pc.cast(values, pa.float64())  # correctly rounded, as float() is
    if not pc.all(pc.is_finite(floats)).as_py():
        return ColumnType.TEXT, values, [], []
    # At most 16 characters, one of them the point: at most 15 digits.
    short = pc.less_equal(pc.cast(pc.binary_length(values), pa.int64()), _int64_scalar(16))
    canonical = pc.and_(short, pc.match_substring_regex(values, _RE2_CANONICAL_FLOAT))
    suspects = pc.indices_nonzero(pc.invert(canonical))
    rows: list[int] = []
    texts: list[str] = []
    for row, text in zip(suspects.to_pylist(), values.take(suspects).to_pylist(), strict=True):
        value = float(text)
        if repr(value) != text or _is_negative_zero(value):
            rows.append(row)
            texts.append(text)
    return ColumnType.FLOAT, floats, rows, texts


def _int64_scalar(value: int) -> pa.Scalar[Any]:
    """An Arrow int64 scalar (``pa.scalar`` would import pandas)."""
    import pyarrow as pa

    data = pa.py_buffer(value.to_bytes(8, sys.byteorder, signed=True))
    return pa.Array.from_buffers(pa.int64(), 1, [None, data])[0]


def _with_lossy(column_type: ColumnType, typed: Any, texts: Any, same: Any) -> _Typed:
    """The typed column with the rows (and texts) where ``same`` is false; nulls are not lossy."""
    import pyarrow.compute as pc

    lossy = pc.indices_nonzero(pc.invert(same))
    return column_type, typed, lossy.to_pylist(), texts.take(lossy).to_pylist()


def _python_typed(values: Any) -> _Typed:
    """The stdlib inference and conversion for one column."""
    texts = [text or "" for text in values.to_pylist()]
    column_type, parsed = _typed_column(texts)
    converted, lossy = _convert_column(texts, column_type, parsed)
    return column_type, converted, lossy, [texts[row] for row in lossy]


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


# --- sniffing -----------------------------------------------------------------------------

_MARKDOWN_LINE = re.compile(r"\s*(?:#{1,6}(?:\s|$)|\||[-*+]\s|>|```|~~~)")
_SENTENCE_END = re.compile(r"[.!?:;]\s*\Z")
_MAX_HEADER = 100


def looks_like_csv(text: str) -> bool:
    """Whether text the agent returned is a CSV table rather than markdown or prose.

    Used when the content type does not say; a wrong False only means the
    payload is stored as text, so the test leans towards rejecting.
    """
    text = _strip_bom(text)
    if not text.strip():
        return False
    try:
        json.loads(text)
    except ValueError:
        pass
    else:
        return False
    records: list[_Record] = []
    for record in _records(text):
        if record.error is not None:
            return False
        records.append(record)
    if len(records) < 2:
        return False
    # Only record starts: a quoted cell may legitimately hold a markdown list.
    if any(_MARKDOWN_LINE.match(record.raw) for record in records):
        return False
    header = records[0]
    labels = [field.strip() for field in header.fields]
    if header.quoted is None or sum(1 for label in labels if label) < 2:
        return False
    if any(len(label) > _MAX_HEADER or _SENTENCE_END.search(label) for label in labels):
        return False
    width = len(header.fields)
    fitting = sum(
        1
        for record in records[1:]
        if record.quoted is not None
        and (
            len(record.fields) == width or _repair(record.fields, record.quoted, width) is not None
        )
    )
    return fitting * 2 > len(records) - 1
