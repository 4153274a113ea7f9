"""Normalise: what an agent output becomes before any database is touched.

Pure, and run before the load's transaction: validation against the hook's
registered JSON Schema, flattening JSON into tables (`receiver.rows`),
parsing and typing CSV (`receiver.csvparse`). So the write lock is held only
for the writes, and a delivery whose output cannot be normalised is
quarantined on its own, without redoing anyone else's work.

Placing cells into columns needs the hook's catalogue and stays in the load
(`receiver.results`).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jsonschema

from receiver.classify import AgentOutput, OutputType
from receiver.csvparse import parse_csv_columns
from receiver.csvtypes import CsvColumns
from receiver.errors import Quarantine
from receiver.rows import FlatRecords, FlatTable, flat_records, flatten

#: Outputs from this many characters are parsed and loaded with the cyclic collector paused.
BIG_OUTPUT = 256 * 1024


@dataclass(frozen=True)
class Normalised:
    """An output as tables: ``records`` for an array of flat objects (a column at a time),
    else ``tables`` from `rows.flatten`; ``csv`` for CSV; none of them for text."""

    output: AgentOutput
    max_depth: int
    records: FlatRecords | None = None
    tables: list[FlatTable] | None = None
    csv: CsvColumns | None = None

    def flat_tables(self) -> list[FlatTable]:
        """`flatten`'s tables, also when ``records`` was taken but the catalogue refused it."""
        if self.tables is not None:
            return self.tables
        return flatten(self.output.value, max_depth=self.max_depth)


def normalise(output: AgentOutput, schema: Any, *, max_depth: int, nul_ok: bool) -> Normalised:
    """``output`` validated and as tables; `Quarantine` with a reason when it cannot be.

    ``schema`` is what the hook registered: a JSON Schema for structured_json,
    the expected columns for structured_csv. ``nul_ok`` is False for a database
    whose text cannot hold NUL (PostgreSQL).
    """
    if not nul_ok and "\x00" in output.text:
        raise Quarantine("the output contains NUL, which PostgreSQL text cannot hold")
    if output.type == OutputType.TEXT:
        return Normalised(output, max_depth)
    with collector_paused(len(output.text)):
        if output.type == OutputType.JSON:
            validate(output.value, schema)
            records = flat_records(output.value)
            if records is not None:
                return Normalised(output, max_depth, records=records)
            return Normalised(output, max_depth, tables=flatten(output.value, max_depth=max_depth))
        expected = schema if isinstance(schema, list) else None
        return Normalised(output, max_depth, csv=parse_csv_columns(output.text, expected))


def validate(value: Any, schema: Any) -> None:
    """Quarantine a structured_json output that breaks the hook's registered JSON Schema."""
    if not isinstance(schema, dict):
        return
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.path)
    )
    if errors:
        detail = "; ".join(
            f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message[:200]}" for e in errors[:5]
        )
        raise Quarantine(f"output does not match the hook's schema: {detail}")


@contextlib.contextmanager
def collector_paused(size: int) -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a big output is parsed or loaded.

    A big output allocates about a million acyclic objects (cells, rows, tuples);
    every automatic collection meanwhile walks them and the rest of the heap
    again, which cost a third of the load time. Reference counting still frees
    everything as usual; only cycles made meanwhile wait for the next collection.
    """
    if size < BIG_OUTPUT or not gc.isenabled():  # small, or someone else paused it
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
