"""Turn agent-written CSV text into a typed table without losing anything.

WebRun agents hand back ``structured_csv`` that is often slightly broken
(unquoted ``$95,360.97``, ragged rows, stray quotes). This module is a pure
core: text in, typed table out. Tokenising is left to the stdlib ``csv``
module; only the repair and the type inference are hand-written. Every
conversion that changes the text keeps the original, and every record that is
repaired, ragged or malformed keeps its raw text, so nothing is silently
dropped or coerced.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
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
        value = dt.datetime.fromisoformat(text)
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)
    except (ValueError, OverflowError):
        return None


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


def parse_csv(text: str, expected_columns: Sequence[str] | None = None) -> CsvTable:
    """Parse CSV text into typed columns and rows.

    ``expected_columns`` (the hook's registered column list) wins over the
    text's own first record, which is skipped only if it repeats them.
    """
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
        infer_column_type([row.texts[i] if i < len(row.texts) else None for row in shaped])
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
