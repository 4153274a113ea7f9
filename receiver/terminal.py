"""How the CLI shows things: listings that fit the terminal, JSON and CSV with full values, and
progress that suits where the output goes.

A listing is a list of records (dicts) plus `Column` specs. As a table it fits
the terminal's width: columns of low value are dropped first, then long text
wraps; money and status are never cut. As JSON or CSV every value is whole.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import IO, Any


class Format(StrEnum):
    TABLE = "table"
    JSON = "json"
    CSV = "csv"


@dataclass(frozen=True)
class Column:
    """One column of a listing table."""

    key: str
    header: str
    #: Lower goes first when the table is too wide; 0: never dropped.
    drop: int = 0
    #: Never wrapped or shortened (money, status, ids a user copies).
    whole: bool = False
    right: bool = False
    #: The cell text; default: the value as text, "" for None.
    show: Callable[[Any], str] | None = None


def plain(value: Any) -> Any:
    """A value as JSON and CSV carry it: times in ISO 8601, the rest as they are."""
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return value


def terminal_width() -> int:
    """The terminal's columns (``COLUMNS`` when set, 80 when there is no terminal)."""
    return shutil.get_terminal_size((80, 24)).columns


def _cell(column: Column, value: Any) -> str:
    if column.show is not None:
        return column.show(value)
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def fit_columns(columns: Sequence[Column], cells: Sequence[Sequence[str]], width: int) -> list[int]:
    """Indexes of the columns kept so the table fits ``width``: the droppable ones go, lowest
    ``drop`` first, until the widest cells fit (what still does not fit then wraps)."""
    widths = [max([len(c.header), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    kept = list(range(len(columns)))

    def needed() -> int:
        return sum(widths[i] for i in kept) + 2 * (len(kept) - 1)

    for i in sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: columns[i].drop):
        if needed() <= width:
            break
        kept.remove(i)
    return kept


def print_listing(
    title: str,
    columns: Sequence[Column],
    records: Sequence[dict[str, Any]],
    format_: str = "table",
    *,
    note: str = "",
    out: IO[str] | None = None,
    width: int | None = None,
) -> None:
    """Print ``records`` as a table fitted to the terminal, or as JSON or CSV (every field of
    every record, whole)."""
    out = out or sys.stdout
    if format_ == Format.JSON:
        out.write(json.dumps([{k: plain(v) for k, v in r.items()} for r in records], indent=2))
        out.write("\n")
        return
    if format_ == Format.CSV:
        fields = list(records[0]) if records else [c.key for c in columns]
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: plain(v) for k, v in r.items()} for r in records)
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    width = width or terminal_width()
    cells = [[_cell(c, r.get(c.key)) for c in columns] for r in records]
    kept = fit_columns(columns, cells, width)
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
        collapse_padding=True,
        title_justify="left",
    )
    for i in kept:
        c = columns[i]
        longest = max([len(c.header), *(len(row[i]) for row in cells)])
        table.add_column(
            c.header,
            justify="right" if c.right else "left",
            no_wrap=c.whole,
            min_width=longest if c.whole else None,
            overflow="fold",
        )
    for row in cells:
        table.add_row(*(row[i] for i in kept))
    console = Console(file=out, width=width, highlight=False, soft_wrap=False)
    console.print(table)
    dropped = [columns[i].header for i in range(len(columns)) if i not in kept]
    if dropped:
        console.print(f"(not shown at {width} columns: {', '.join(dropped)}; see --format json)")
    if note:
        console.print(note)


def money(value: float | None) -> str:
    """USD as listings show it: unknown is said, never $0."""
    return "unknown" if value is None else f"${value:,.4f}"


def count(value: float | None, spec: str = ",") -> str:
    return "unknown" if value is None else format(value, spec)


class Progress:
    """Counts done, for a long command (every command's progress goes through it): a bar with
    counts and rate on a terminal, a plain line now and then otherwise (never spinner frames
    or escapes in a log), nothing when quiet. Always on stderr: stdout is the answer."""

    def __init__(
        self, label: str, total: int | None, *, quiet: bool = False, stream: IO[str] | None = None
    ) -> None:
        self.label = label
        self.total = total
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.done = 0
        self.started = time.monotonic()
        self._last_line = 0.0
        self._bar: Any = None
        self._task: Any = None
        self._key = ""
        self._what = ""
        self._printed = -1

    def _rate(self) -> str:
        seconds = time.monotonic() - self.started
        return f"{seconds:,.1f} s, {self.done / seconds:,.1f}/s" if seconds > 0 else ""

    def advance(
        self, done: int, what: str = "", *, key: str = "", total: int | None = None
    ) -> None:
        """``done`` so far; ``what`` says it in words; ``total`` when it is known only once
        the work has begun. Off a terminal a line is written every 2 s, when ``key`` (say,
        the table being written) changes, and at the end."""
        self.done = done
        self._what = what
        if total is not None:
            self.total = total
        if self.quiet:
            return
        if self._bar is not None:
            # With a total the bar counts itself, so it keeps the label; without, ``what``
            # is what moves.
            description = self.label if self.total is not None else what or self.label
            self._bar.update(
                self._task,
                completed=done,
                total=self.total,
                description=description,
                rate=self._rate(),
            )
            return
        now = time.monotonic()
        finished = self.total is not None and done == self.total
        if now - self._last_line >= 2.0 or key != self._key or finished:
            self._line(now)
        self._key = key

    def _line(self, now: float) -> None:
        self._last_line = now
        self._printed = self.done
        if self._what:
            text = f"{self.label}: {self._what}"
        else:
            of = f"/{self.total:,}" if self.total is not None else ""
            text = f"{self.label}: {self.done:,}{of}"
        self.stream.write(f"{text} ({self._rate()})\n")
        self.stream.flush()

    @contextmanager
    def shown(self) -> Iterator[Progress]:
        if self.quiet or not self.stream.isatty():
            if not self.quiet:
                of = f" of {self.total:,}" if self.total is not None else ""
                self.stream.write(f"{self.label}: started{of}\n")
            yield self
            if not self.quiet and self._printed != self.done:
                self._line(time.monotonic())
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import (
            Progress as RichProgress,
        )

        with RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"),
            console=Console(file=self.stream),
        ) as bar:
            self._bar = bar
            self._task = bar.add_task(self.label, total=self.total, rate="")
            try:
                yield self
            finally:
                self._bar = None
