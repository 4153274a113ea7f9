"""The careful CSV reference: every record checked against its own text, every cell typed alone.

Only the tests use it: the fast paths (`receiver.csvparse`) must give exactly
the table it gives.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from receiver.columns import Cell, ColumnType
from receiver.csvtokens import Record, Shaped, read_records, shape_record, strip_bom
from receiver.csvtypes import (
    CsvColumn,
    CsvRow,
    CsvTable,
    column_specs,
    convert_cell,
    header_matches,
    infer_per_cell,
    is_negative_zero,
    render_cell,
)


def parse_careful(text: str, expected_columns: Sequence[str] | None = None) -> CsvTable:
    """`parse_csv` record by record and cell by cell: the reference for the fast path."""
    records: Iterator[Record] = read_records(strip_bom(text))
    if expected_columns is not None:
        headers = list(expected_columns)
        first = next(records, None)
        matched = (
            first is not None and first.error is None and header_matches(first.fields, headers)
        )
        if first is not None and not matched:
            records = _chain(first, records)
    else:
        header = next(records, None)
        if header is None:
            return CsvTable((), ())
        headers = header.fields
    specs = column_specs(headers)
    keys = [key for key, _, _ in specs]
    shaped = [shape_record(record, keys) for record in records]
    types = [
        infer_per_cell([row.texts[i] if i < len(row.texts) else None for row in shaped])
        for i in range(len(specs))
    ]
    columns = tuple(
        CsvColumn(key=key, name=name, original=original, type=column_type)
        for (key, name, original), column_type in zip(specs, types, strict=True)
    )
    return CsvTable(columns, tuple(_typed_row(row, columns) for row in shaped))


def _chain(first: Record, rest: Iterable[Record]) -> Iterator[Record]:
    yield first
    yield from rest


def _typed_row(row: Shaped, columns: Sequence[CsvColumn]) -> CsvRow:
    values: list[Cell] = []
    originals: dict[str, str] = {}
    for index, column in enumerate(columns):
        text = row.texts[index] if index < len(row.texts) else ""
        if not text:
            values.append(None)
            continue
        value = convert_cell(text, column.type)
        if column.type is not ColumnType.TEXT and (
            render_cell(value) != text or is_negative_zero(value)
        ):
            originals[column.key] = text
        values.append(value)
    return CsvRow(tuple(values), originals, row.extra, row.raw, row.flag)
