"""Fitting listings to a width, and progress off a terminal: pure, no database."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver.terminal import Column, Progress, fit_columns, print_listing

pytestmark = pytest.mark.pure

COLUMNS = [
    Column("id", "id", whole=True),
    Column("note", "note", drop=1),
    Column("kind", "kind", drop=2),
    Column("usd", "USD", whole=True, right=True),
]


def test_low_value_columns_go_first() -> None:
    cells = [["01a23c18-d4af", "n" * 30, "full_response", "$1,234.5678"]]
    assert fit_columns(COLUMNS, cells, 200) == [0, 1, 2, 3]
    assert fit_columns(COLUMNS, cells, 45) == [0, 2, 3]
    assert fit_columns(COLUMNS, cells, 20) == [0, 3]  # whole columns stay even when too wide


@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=40), st.floats(0, 1e9, allow_nan=False)),
        min_size=1,
        max_size=8,
    ),
    st.integers(min_value=60, max_value=120),
)
def test_a_table_fits_and_money_is_whole(rows: list[tuple[str, float]], width: int) -> None:
    out = io.StringIO()
    records = [
        {"id": f"id{n}", "note": text, "kind": "k", "usd": f"${usd:,.4f}"}
        for n, (text, usd) in enumerate(rows)
    ]
    print_listing("t", COLUMNS, records, out=out, width=width)
    lines = out.getvalue().splitlines()
    assert all(len(line) <= width for line in lines)
    for record in records:
        assert any(record["usd"] in line for line in lines)


def test_json_and_csv_carry_everything() -> None:
    records = [{"id": "x" * 300, "note": None, "kind": "k", "usd": 1.5}]
    out = io.StringIO()
    print_listing("t", COLUMNS, records, "json", out=out)
    assert json.loads(out.getvalue()) == records
    out = io.StringIO()
    print_listing("t", COLUMNS, records, "csv", out=out)
    assert out.getvalue().splitlines() == ["id,note,kind,usd", f"{'x' * 300},,k,1.5"]


def progress_lines(stderr: str, label: str) -> list[str]:
    """The progress a command wrote off a terminal, checked to be plain lines: no escapes,
    no carriage returns, nothing but ASCII (so no spinner frames nor bar glyphs)."""
    assert "\x1b" not in stderr
    assert "\r" not in stderr
    assert stderr.isascii(), stderr
    lines = stderr.splitlines()
    assert lines
    assert all(line.startswith(f"{label}: ") for line in lines), lines
    return lines


def test_progress_off_a_terminal_is_plain_lines() -> None:
    stream = io.StringIO()
    progress = Progress("reprocessing", 3, stream=stream)
    with progress.shown():
        for n in (1, 2, 3):
            progress.advance(n)
    lines = progress_lines(stream.getvalue(), "reprocessing")
    assert lines[0] == "reprocessing: started of 3"
    assert lines[-1].startswith("reprocessing: 3/3 (")


def test_progress_when_quiet_says_nothing() -> None:
    stream = io.StringIO()
    progress = Progress("exporting", None, quiet=True, stream=stream)
    with progress.shown():
        progress.advance(10, "tasks: 10 rows", key="tasks")
    assert stream.getvalue() == ""


def test_progress_names_each_new_part() -> None:
    stream = io.StringIO()
    progress = Progress("exporting", None, stream=stream)
    with progress.shown():
        progress.advance(1, "tasks: 1 rows", key="tasks")
        progress.advance(3, "deliveries: 2 rows", key="deliveries")
    text = stream.getvalue()
    assert "exporting: tasks: 1 rows" in text
    assert "exporting: deliveries: 2 rows" in text


def test_progress_takes_a_total_known_only_once_work_has_begun() -> None:
    stream = io.StringIO()
    progress = Progress("pruning", None, stream=stream)
    with progress.shown():
        progress.advance(2, "pruned 2 deliveries", total=5)
        progress.advance(5, "pruned 5 deliveries", total=5)
        # Reaching the total is the end: said at once, not when the command finishes.
        assert stream.getvalue().splitlines()[-1].startswith("pruning: pruned 5 deliveries (")
    lines = progress_lines(stream.getvalue(), "pruning")
    assert lines[:2] == ["pruning: started", lines[1]]
    assert lines[1].startswith("pruning: pruned 2 deliveries (")
    assert len(lines) == 3


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_with_a_total_keeps_its_label() -> None:
    """On a terminal the bar counts itself: its words are the label, not ``what``, once the
    total is known; before, ``what`` is what moves."""
    stream = _Terminal()
    progress = Progress("pruning", None, stream=stream)
    with progress.shown():
        progress.advance(1, "pruned 1 deliveries", total=3)
        progress.advance(3, "pruned 3 deliveries", total=3)
    shown = stream.getvalue()
    assert "\x1b" in shown  # a bar, drawn with escapes
    assert "pruning" in shown
    assert "3/3" in shown
    assert "pruned 3 deliveries" not in shown
    stream = _Terminal()
    progress = Progress("exporting", None, stream=stream)
    with progress.shown():
        progress.advance(10, "tasks: 10 rows", key="tasks")
    assert "tasks: 10 rows" in stream.getvalue()
