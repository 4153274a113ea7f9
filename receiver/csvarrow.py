"""The Arrow path for big CSV texts: tokenised and typed a column at a time, no object per cell.

Used only where it reads a text exactly as the stdlib path does (a regular
text of one width; whatever Arrow might convert otherwise goes the stdlib way
for the column or the cell concerned), which the tests check against the
careful reference. pyarrow is imported where it is used, so the pure stages
load without it.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from receiver.columns import ColumnType
from receiver.csvtokens import FIELD_LIMIT, LINE
from receiver.csvtypes import (
    BOOLEANS,
    DATE,
    FLOAT,
    INT64_DIGITS,
    INTEGER,
    TIMESTAMP,
    ColumnValues,
    CsvColumn,
    CsvColumns,
    CsvNote,
    column_specs,
    convert_column,
    fits_int64,
    header_matches,
    is_negative_zero,
    typed_column,
)

if TYPE_CHECKING:
    import pyarrow as pa


#: Texts from this many characters take the Arrow path by default (`parse_csv_columns`).
ARROW_MIN_CHARS = 64 * 1024


def _re2(pattern: re.Pattern[str]) -> str:
    """A fullmatch pattern as RE2 (Arrow's regex engine) spells it: anchored at both ends."""
    return f"^(?:{pattern.pattern})$"


# The grammar of `REGULAR_TEXT` without possessive or atomic groups, which RE2 lacks and this
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


def parse_arrow(text: str, expected_columns: Sequence[str] | None) -> CsvColumns | None:
    """Tokenise and type with Arrow; None where Arrow might not read the text as ``csv`` does.

    Only a regular text (`REGULAR_TEXT`) whose records all have one width
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
        csv.field_size_limit(FIELD_LIMIT)
    first = next(filter(None, csv.reader(m.group() for m in LINE.finditer(text))), None)
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
        start = 1 if header_matches(found, headers) else 0
    else:
        headers = found
    specs = column_specs(headers)
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
    """`typed_column` and `convert_column` over an Arrow string column.

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
        if FLOAT.fullmatch(first):
            if not every(_re2(FLOAT)):
                return ColumnType.TEXT, values, [], []
            integral = pc.match_substring_regex(filled, _re2(INTEGER))
            if pc.max(lengths).as_py() >= INT64_DIGITS:  # the only ones that may overflow
                long = pc.cast(pc.binary_length(filled), pa.int64())
                many = pc.greater_equal(long, _int64_scalar(INT64_DIGITS))
                suspects = filled.filter(pc.and_(integral, many))
                if not all(map(fits_int64, suspects.to_pylist())):
                    return ColumnType.TEXT, values, [], []
            if pc.all(integral).as_py():
                return _arrow_integers(values)
            return _arrow_floats(values)
        if first.lower() in BOOLEANS:
            if not every(_RE2_BOOLEAN):
                return ColumnType.TEXT, values, [], []
            exact = pc.match_substring_regex(values, "^(?:true|false)$")
            truth = pc.starts_with(values, "t", ignore_case=True)
            return _with_lossy(ColumnType.BOOLEAN, truth, values, exact)
        # Arrow's calendar has a year 0, Python's has not: such text goes the stdlib way.
        year_zero = DATE.match(first) and pc.any(pc.starts_with(filled, "0000")).as_py()
        if DATE.fullmatch(first):
            if not every(_re2(DATE)):
                return ColumnType.TEXT, values, [], []
            if not year_zero:
                return ColumnType.DATE, pc.cast(values, pa.date32()), [], []
        elif TIMESTAMP.fullmatch(first):
            if every(_RE2_ARROW_TIMESTAMP) and not year_zero:
                stamps = pc.cast(values, pa.timestamp("us", "UTC"))
                canonical = pc.and_(
                    pc.match_substring_regex(values, _RE2_CANONICAL_TIMESTAMP),
                    pc.invert(pc.ends_with(values, ".000000Z")),
                )
                return _with_lossy(ColumnType.TIMESTAMP, stamps, values, canonical)
            if not every(_re2(TIMESTAMP)):
                return ColumnType.TEXT, values, [], []
        else:
            return ColumnType.TEXT, values, [], []
    except pa.ArrowInvalid:  # a value Arrow refuses: the stdlib path decides what it is
        pass
    return _python_typed(values)


def _arrow_integers(values: Any) -> _Typed:
    """For text matching `INTEGER` that fits int64: only "+n" and "-0" are not what str gives."""
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
        if repr(value) != text or is_negative_zero(value):
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
    column_type, parsed = typed_column(texts)
    converted, lossy = convert_column(texts, column_type, parsed)
    return column_type, converted, lossy, [texts[row] for row in lossy]
