"""How ``csv`` reads a text, record by record, and how a record is fitted to the columns.

Pure. Tokenising is the stdlib's; what is ours is keeping each record's raw
text, the regular grammar that says when that text need not be checked, the
repair of numbers split at their thousands separators, and the flag a record
gets when it is ragged, repaired or unparsed.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

# --- tokenising ---------------------------------------------------------------------------

# Only CR, LF and CRLF end a line for ``csv``; ``str.splitlines`` would also split on
# U+2028 and friends, which ``csv`` would then silently drop inside quoted fields.
LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")
_TERMINATOR = re.compile(r"(?:\r\n|\r|\n)\Z")
# csv's default is 128 KiB per field; a long agent-written cell must not fail the record.
FIELD_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Record:
    fields: list[str]
    raw: str  # the record's lines as in the input, without the final line terminator
    quoted: tuple[bool, ...] | None  # per field; None when the raw text is not regular CSV
    error: str | None = None


class _LineFeed:
    """Feeds ``csv.reader`` one physical line at a time and remembers what it consumed."""

    def __init__(self, text: str) -> None:
        self._lines = (match.group() for match in LINE.finditer(text))
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


def read_records(text: str) -> Iterator[Record]:
    """Non-blank records with their raw text; a record ``csv`` rejects is kept raw."""
    if len(text) > csv.field_size_limit():
        csv.field_size_limit(FIELD_LIMIT)
    feed = _LineFeed(text)
    reader = csv.reader(feed)
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield Record([], feed.take(), None, error=str(exc))
            continue
        raw = feed.take()
        if fields:
            yield Record(fields, raw, _quoting(raw, fields))


# A record exactly as regular CSV writes it: each field either quoted (any text, quotes
# doubled) or unquoted (not starting with a quote, no comma or line break). For text that
# matches ``REGULAR_TEXT``, ``csv`` splits records at the same places and every record
# passes `_quoting`, so the per-record check can be skipped. Possessive and atomic, so a
# mismatch fails in one linear pass instead of backtracking.
_FIELD = r'(?>"[^"]*+(?:""[^"]*+)*+"|[^",\r\n][^,\r\n]*+|)'
_RECORD_PATTERN = _FIELD + r"(?:," + _FIELD + r")*+"
_REGULAR_RECORD = re.compile(_RECORD_PATTERN)
REGULAR_TEXT = re.compile(r"(?:" + _RECORD_PATTERN + r"(?:\r\n|\r|\n))*+" + _RECORD_PATTERN)


class Tokens:
    """The records of a text as ``csv`` reads it, line spans kept so raw text is built on demand.

    Gives the same records as `read_records`: the same lines feed the same reader
    (``line_num`` says where each record ends), and `_quoting` runs only for
    records that do not match the regular grammar.
    """

    def __init__(self, text: str) -> None:
        if len(text) > csv.field_size_limit():
            csv.field_size_limit(FIELD_LIMIT)
        self.lines: list[str] = LINE.findall(text)
        self.regular = REGULAR_TEXT.fullmatch(text) is not None
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

    def record(self, index: int) -> Record:
        """The full `Record` (as `read_records` gives it), for the rows that need a closer look."""
        fields, _, _, error = self.records[index]
        raw = self.raw(index)
        if error is not None:
            return Record([], raw, None, error=error)
        return Record(fields, raw, _quoting(raw, fields))


def strip_bom(text: str) -> str:
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


def repair(fields: list[str], quoted: tuple[bool, ...], width: int) -> list[tuple[int, int]] | None:
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


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


@dataclass(frozen=True)
class Shaped:
    texts: list[str]
    extra: tuple[str, ...]
    raw: str | None
    flag: str | None


def shape_record(record: Record, keys: Sequence[str]) -> Shaped:
    """Fit a record to the columns: repair if unambiguous, else keep the surplus."""
    width = len(keys)
    if record.error is not None:
        return Shaped([], (), record.raw, f"unparsed: {record.error}")
    fields = record.fields
    reasons: list[str] = []
    if record.quoted is None:
        reasons.append("irregular quoting")
    if len(fields) > width and record.quoted is not None:
        spans = repair(fields, record.quoted, width)
        if spans is not None:
            fields = [",".join(fields[start:end]) for start, end in spans]
            where = ", ".join(keys[i] for i, (s, e) in enumerate(spans) if e - s > 1)
            reasons.insert(0, f"repaired: rejoined thousands separator in {where}")
    if len(fields) != width:
        reasons.insert(0, f"ragged: {_plural(len(fields), 'field')} for {_plural(width, 'column')}")
    if not reasons:
        return Shaped(fields, (), None, None)
    return Shaped(fields[:width], tuple(fields[width:]), record.raw, "; ".join(reasons))
