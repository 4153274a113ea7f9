"""Turn agent-written CSV text into a typed table without losing anything.

WebRun agents hand back ``structured_csv`` that is often slightly broken
(unquoted ``$95,360.97``, ragged rows, stray quotes). This module is a pure
core: text in, typed table out. Tokenising is left to the stdlib ``csv``
module; only the repair and the type inference are hand-written. Every
conversion that changes the text keeps the original, and every record that is
repaired, ragged or malformed keeps its raw text, so nothing is silently
dropped or coerced.

Where each part lives: `receiver.csvtokens` (how ``csv`` reads records, the
regular grammar, repair, fitting a record to the columns), `receiver.csvtypes`
(the parsed table, type inference and conversion), `receiver.csvarrow` (the
Arrow path), and this module (the entry points and sniffing).

Two fast paths give the same table as a careful reference (``tests/csvreference.py``,
property-tested against it): one grammar match over the whole text stands in
for checking every record against its raw text, and types are inferred and
converted a column at a time. Big texts (`ARROW_MIN_CHARS`) that are regular
and one width are also tokenised and typed with Arrow (`receiver.csvarrow`),
so no Python object is made per cell: the
values stay Arrow arrays (`CsvColumns`) all the way to the database.
Whatever Arrow might read or convert otherwise than the stdlib (ragged or
irregular records, int64 overflow, other timestamp forms, year 0) goes the
stdlib way, for the text, the column or the cell concerned.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from receiver.csvarrow import ARROW_MIN_CHARS, parse_arrow
from receiver.csvtokens import Record, Shaped, Tokens, read_records, repair, shape_record, strip_bom
from receiver.csvtypes import (
    ColumnValues,
    CsvColumn,
    CsvColumns,
    CsvNote,
    CsvRow,
    CsvTable,
    column_specs,
    convert_column,
    header_matches,
    infer_column_type,
    render_cell,
    to_cells,
    typed_column,
)

__all__ = [
    "ARROW_MIN_CHARS",
    "ColumnValues",
    "CsvColumn",
    "CsvColumns",
    "CsvRow",
    "CsvTable",
    "infer_column_type",
    "looks_like_csv",
    "parse_csv",
    "parse_csv_columns",
    "render_cell",
    "to_cells",
]


def parse_csv(text: str, expected_columns: Sequence[str] | None = None) -> CsvTable:
    """Parse CSV text into typed columns and rows.

    ``expected_columns`` (the hook's registered column list) wins over the
    text's own first record, which is skipped only if it repeats them.
    """
    return parse_csv_columns(text, expected_columns).table()


def parse_csv_columns(
    text: str, expected_columns: Sequence[str] | None = None, *, arrow: bool | None = None
) -> CsvColumns:
    """`parse_csv` column by column, the form the loader takes.

    ``arrow`` picks Arrow's tokeniser and vectorised typing (by default for
    texts from `ARROW_MIN_CHARS`); it is used only where it reads the text as
    the stdlib path does, which the tests check against the careful reference.
    """
    text = strip_bom(text)
    if arrow if arrow is not None else len(text) >= ARROW_MIN_CHARS:
        parsed = parse_arrow(text, expected_columns)
        if parsed is not None:
            return parsed
    return _parse_python(text, expected_columns)


def _parse_python(text: str, expected_columns: Sequence[str] | None) -> CsvColumns:
    """The stdlib fast path: one grammar match, raw text only where it may differ."""
    tokens = Tokens(text)
    records = range(len(tokens.records))
    headers: Sequence[str]
    if expected_columns is not None:
        headers = list(expected_columns)
        if tokens.records:
            fields, _, _, error = tokens.records[0]
            if error is None and header_matches(fields, headers):
                records = range(1, len(tokens.records))
    else:
        if not tokens.records:
            return CsvColumns((), 0, (), {})
        headers = tokens.records[0][0]
        records = range(1, len(tokens.records))
    specs = column_specs(headers)
    keys = [key for key, _, _ in specs]
    width = len(keys)
    texts: list[list[str]] = []
    shapes: dict[int, Shaped] = {}  # row -> its shape, for rows with extra, raw text or a flag
    regular = tokens.regular
    for index in records:
        fields, _, _, error = tokens.records[index]
        if error is None and len(fields) == width and (regular or tokens.is_regular(index)):
            texts.append(fields)
            continue
        shaped = shape_record(tokens.record(index), keys)
        shapes[len(texts)] = shaped
        got = shaped.texts
        texts.append(got if len(got) == width else [*got, *[""] * (width - len(got))])
    by_column: list[Sequence[str]] = list(zip(*texts, strict=True)) or [() for _ in specs]
    inferred = [typed_column(cells) for cells in by_column]
    columns = tuple(
        CsvColumn(key=key, name=name, original=original, type=column_type)
        for (key, name, original), (column_type, _) in zip(specs, inferred, strict=True)
    )
    values: list[ColumnValues] = []
    originals: dict[int, dict[str, str]] = {}
    for column, column_texts, (_, parsed) in zip(columns, by_column, inferred, strict=True):
        converted, lossy = convert_column(column_texts, column.type, parsed)
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


# --- sniffing -----------------------------------------------------------------------------

_MARKDOWN_LINE = re.compile(r"\s*(?:#{1,6}(?:\s|$)|\||[-*+]\s|>|```|~~~)")
_SENTENCE_END = re.compile(r"[.!?:;]\s*\Z")
_MAX_HEADER = 100


def looks_like_csv(text: str) -> bool:
    """Whether text the agent returned is a CSV table rather than markdown or prose.

    Used when the content type does not say; a wrong False only means the
    payload is stored as text, so the test leans towards rejecting.
    """
    text = strip_bom(text)
    if not text.strip():
        return False
    try:
        json.loads(text)
    except ValueError:
        pass
    else:
        return False
    records: list[Record] = []
    for record in read_records(text):
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
        and (len(record.fields) == width or repair(record.fields, record.quoted, width) is not None)
    )
    return fitting * 2 > len(records) - 1
