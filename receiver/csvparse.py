"""Turn agent-written CSV text into a typed table without losing anything.

WebRun agents hand back ``structured_csv`` that is often slightly broken
(unquoted ``$95,360.97``, ragged rows, stray quotes). This module is a pure
core: text in, typed table out. Tokenising is left to the stdlib ``csv``
module; only the repair and the type inference are hand-written. Every
conversion that changes the text keeps the original, and every record that is
repaired, ragged or malformed keeps its raw text, so nothing is silently
dropped or coerced.

Big tables take a fast path that gives the same table as the careful one
(``parse_csv(..., careful=True)``, property-tested against it): one grammar
match over the whole text stands in for checking every record against its raw
text, and types are inferred and converted a column at a time. No pyarrow:
the stdlib tokeniser is not what costs here, the Python objects are.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from receiver.columns import (
    INT64_MAX,
    INT64_MIN,
    Cell,
    ColumnType,
    sanitise_identifier,
    unique_identifier,
)

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
    tokens = _Tokens(_strip_bom(text))
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
            return CsvTable((), ())
        headers = tokens.records[0][0]
        records = range(1, len(tokens.records))
    specs = _columns(headers)
    keys = [key for key, _, _ in specs]
    width = len(keys)
    texts: list[list[str]] = []
    notes: dict[int, _Shaped] = {}  # row -> its shape, for rows with extra, raw text or a flag
    regular = tokens.regular
    for index in records:
        fields, _, _, error = tokens.records[index]
        if error is None and len(fields) == width and (regular or tokens.is_regular(index)):
            texts.append(fields)
            continue
        shaped = _shape(tokens.record(index), keys)
        notes[len(texts)] = shaped
        got = shaped.texts
        texts.append(got if len(got) == width else [*got, *[""] * (width - len(got))])
    by_column: list[Sequence[str]] = list(zip(*texts, strict=True)) or [() for _ in specs]
    inferred = [_typed_column(cells) for cells in by_column]
    columns = tuple(
        CsvColumn(key=key, name=name, original=original, type=column_type)
        for (key, name, original), (column_type, _) in zip(specs, inferred, strict=True)
    )
    values: list[list[Cell]] = []
    originals: dict[int, dict[str, str]] = {}
    for column, column_texts, (_, parsed) in zip(columns, by_column, inferred, strict=True):
        converted, lossy = _convert_column(column_texts, column.type, parsed)
        values.append(converted)
        for row in lossy:
            originals.setdefault(row, {})[column.key] = column_texts[row]
    # No columns at all (an empty header) still gives one row per record.
    row_values: list[tuple[Cell, ...]] = list(zip(*values, strict=True)) if values else []
    if not values:
        row_values = [()] * len(texts)
    rows: list[CsvRow] = []
    for index, typed in enumerate(row_values):
        note = notes.get(index)
        kept = originals.get(index, {})
        if note is None:
            rows.append(CsvRow(typed, kept, (), None, None))
        else:
            rows.append(CsvRow(typed, kept, note.extra, note.raw, note.flag))
    return CsvTable(columns, tuple(rows))


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
