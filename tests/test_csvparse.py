"""Tests for the pure CSV core: conformance, round trips, inference, repair, sniffing."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import re

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from receiver.columns import MAX_IDENTIFIER, ColumnType
from receiver.csvarrow import _RE2_CANONICAL_FLOAT, _RE2_REGULAR_TEXT, _arrow_typed, parse_arrow
from receiver.csvparse import (
    ARROW_MIN_CHARS,
    CsvRow,
    CsvTable,
    infer_column_type,
    looks_like_csv,
    parse_csv,
    parse_csv_columns,
    render_cell,
    to_cells,
)
from receiver.csvtokens import REGULAR_TEXT
from receiver.csvtypes import convert_column, infer_per_cell, typed_column
from tests.corpora import SPECTRUM
from tests.csvreference import parse_careful

pytestmark = pytest.mark.pure

SPECTRUM_CASES = sorted(path.stem for path in (SPECTRUM / "csvs").glob("*.csv"))
# json/location_coordinates.json has an upstream slip; the CSV's own value is right.
SPECTRUM_FIXES = {"location_coordinates": {"Contact Phone Number": "2095257564"}}

DOCS_EXAMPLE = "name,price\nBitcoin,$95,360.97\nEthereum,$3,325.94\nTether,$0.9994\nXRP,$2.16"


def write_csv(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def row_texts(table: CsvTable, row: CsvRow) -> list[str]:
    """Each cell as the text it came from: originals where lossy, else the canonical form."""
    return [
        row.originals.get(column.key, render_cell(value))
        for column, value in zip(table.columns, row.values, strict=True)
    ]


# --- conformance --------------------------------------------------------------------------


def test_spectrum_corpus_present() -> None:
    assert len(SPECTRUM_CASES) >= 12


@pytest.mark.parametrize(
    "arrow", [pytest.param(False, id="stdlib"), pytest.param(True, id="arrow")]
)
@pytest.mark.parametrize("case", [pytest.param(name, id=name) for name in SPECTRUM_CASES])
def test_csv_spectrum(case: str, arrow: bool) -> None:
    # read_bytes: read_text would translate the CRLF cases' newlines before parsing.
    text = (SPECTRUM / "csvs" / f"{case}.csv").read_bytes().decode("utf-8")
    loaded = json.loads((SPECTRUM / "json" / f"{case}.json").read_bytes().decode("utf-8"))
    # location_coordinates.json holds a bare object rather than a list of one.
    rows: list[dict[str, str]] = loaded if isinstance(loaded, list) else [loaded]
    expected = [row | SPECTRUM_FIXES.get(case, {}) for row in rows]
    table = parse_csv_columns(text, arrow=arrow).table()
    assert [column.original for column in table.columns] == list(expected[0])
    got = [
        dict(zip([c.key for c in table.columns], row_texts(table, row), strict=True))
        for row in table.rows
    ]
    assert got == expected
    assert all(row.flag is None and row.raw is None and not row.extra for row in table.rows)


# --- round trips --------------------------------------------------------------------------

# No surrogates (text arrives as decoded UTF-8); U+FEFF only ever stripped at the very start.
CELL_TEXT = st.text(
    alphabet=st.characters(exclude_categories=["Cs"]),
    max_size=12,
)
CELL = st.one_of(
    CELL_TEXT,
    st.sampled_from(["", ",", '"', '""', "\n", "\r\n", "\r", " ", "a,b", 'say "hi"', "1,234"]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["007", "1e3", "1.50", "TRUE", "false", "2024-01-15", "-0", "+5"]),
    st.sampled_from(["2024-01-15T10:30:00.000Z", "2024-01-15 10:30", "2024-01-15T10:30+05:30"]),
)


# Per-column strategies, so typed columns (not just TEXT) round-trip too.
COLUMN_CELLS = [
    CELL,
    st.one_of(st.just(""), st.integers(min_value=-(2**63), max_value=2**63 - 1).map(str)),
    st.one_of(
        st.just(""),
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
        st.sampled_from(["1.50", "1e3", "7", "-0.0", ".5"]),
    ),
    st.sampled_from(["", "true", "FALSE", "True"]),
    st.one_of(st.just(""), st.dates().map(dt.date.isoformat)),
    st.one_of(
        st.just(""),
        st.datetimes(
            min_value=dt.datetime(1900, 1, 1),  # noqa: DTZ001 - naive bounds are required
            max_value=dt.datetime(2100, 1, 1),  # noqa: DTZ001
        ).map(lambda d: d.isoformat() + "Z"),
    ),
]


@st.composite
def tables(draw: st.DrawFn) -> list[list[str]]:
    width = draw(st.integers(min_value=1, max_value=5))
    header = draw(st.lists(CELL_TEXT, min_size=width, max_size=width))
    assume(not header[0].startswith("\ufeff"))
    cells = [draw(st.sampled_from(COLUMN_CELLS)) for _ in range(width)]
    rows = draw(st.lists(st.tuples(*cells).map(list), max_size=8))
    return [header, *rows]


@settings(max_examples=200, deadline=None)
@given(tables())
def test_writer_round_trip(table_rows: list[list[str]]) -> None:
    header, *rows = table_rows
    table = parse_csv(write_csv(table_rows))
    assert [column.original for column in table.columns] == header
    assert len(table.rows) == len(rows)
    for parsed, written in zip(table.rows, rows, strict=True):
        assert row_texts(table, parsed) == written
        assert parsed.flag is None
        assert parsed.raw is None
        assert parsed.extra == ()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=-(10**6), max_value=10**6), min_size=1))
def test_typed_columns_round_trip(numbers: list[int]) -> None:
    table = parse_csv(write_csv([["n", "x"], *[[str(n), f"{n / 7!r}"] for n in numbers]]))
    assert [c.type for c in table.columns] == [ColumnType.INTEGER, ColumnType.FLOAT]
    assert [row.values[0] for row in table.rows] == numbers
    assert all(row.originals == {} for row in table.rows)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from('ab1,"\r\n $.\ufeff'), max_size=60))
def test_arbitrary_text_never_loses_a_record(text: str) -> None:
    table = parse_csv(text)
    width = len(table.columns)
    for row in table.rows:
        assert len(row.values) == width
        assert (row.flag is None) == (row.raw is None)
        if row.raw is None:
            assert not row.extra
    looks_like_csv(text)


# --- type inference -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        pytest.param(["007"], ColumnType.TEXT, id="leading-zero"),
        pytest.param(["0", "-3", "+4"], ColumnType.INTEGER, id="ints"),
        pytest.param(["+44 20 7946 0958"], ColumnType.TEXT, id="phone"),
        pytest.param(["$95,360.97"], ColumnType.TEXT, id="currency"),
        pytest.param(["1,234"], ColumnType.TEXT, id="thousands"),
        pytest.param(["-1.2"], ColumnType.FLOAT, id="negative-float"),
        pytest.param(["0.0"], ColumnType.FLOAT, id="zero-float"),
        pytest.param(["1e3", ".5"], ColumnType.FLOAT, id="exponent"),
        pytest.param(["1", "2.5"], ColumnType.FLOAT, id="mixed-int-float"),
        pytest.param(["inf"], ColumnType.TEXT, id="inf"),
        pytest.param(["nan"], ColumnType.TEXT, id="nan"),
        pytest.param(["1e999"], ColumnType.TEXT, id="float-overflow"),
        pytest.param(["true", "FALSE", "True"], ColumnType.BOOLEAN, id="booleans"),
        pytest.param(["0", "1"], ColumnType.INTEGER, id="zero-one-not-bool"),
        pytest.param(["yes", "no"], ColumnType.TEXT, id="yes-no-not-bool"),
        pytest.param(["true", "1"], ColumnType.TEXT, id="bool-int-mix"),
        pytest.param(["2024-01-15", "1999-12-31"], ColumnType.DATE, id="dates"),
        pytest.param(["2024-02-30"], ColumnType.TEXT, id="impossible-date"),
        pytest.param(["2024-01-15T10:30:00Z"], ColumnType.TIMESTAMP, id="timestamp-z"),
        pytest.param(["2024-01-15T10:30:00.123+05:30"], ColumnType.TIMESTAMP, id="offset"),
        pytest.param(["2024-01-15 10:30"], ColumnType.TIMESTAMP, id="naive"),
        pytest.param(["2024-01-15", "2024-01-15T10:30:00Z"], ColumnType.TEXT, id="date-ts-mix"),
        pytest.param([str(2**63 - 1), str(-(2**63))], ColumnType.INTEGER, id="int64-bounds"),
        pytest.param([str(2**63)], ColumnType.TEXT, id="int64-overflow"),
        pytest.param(["1", str(2**63), "2.5"], ColumnType.TEXT, id="overflow-not-float"),
        pytest.param(["٣"], ColumnType.TEXT, id="non-ascii-digit"),
        pytest.param([" 1"], ColumnType.TEXT, id="padded"),
        pytest.param([None, "", "5"], ColumnType.INTEGER, id="empties-ignored"),
        pytest.param([None, ""], ColumnType.TEXT, id="all-empty"),
    ],
)
def test_infer_column_type(texts: list[str | None], expected: ColumnType) -> None:
    assert infer_column_type(texts) is expected


@pytest.mark.parametrize(
    ("text", "value", "lossy"),
    [
        pytest.param("1.50", 1.5, True, id="float-trailing-zero"),
        pytest.param("1e3", 1000.0, True, id="exponent"),
        pytest.param("-1.2", -1.2, False, id="float-exact"),
        pytest.param("TRUE", True, True, id="bool-upper"),
        pytest.param("false", False, False, id="bool-canonical"),
        pytest.param("+5", 5, True, id="plus-sign"),
        pytest.param("2024-01-15", dt.date(2024, 1, 15), False, id="date"),
        pytest.param(
            "2024-01-15T10:30:00.000Z",
            dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.UTC),
            True,
            id="ts-fraction",
        ),
        pytest.param(
            "2024-01-15T10:30:00Z",
            dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.UTC),
            False,
            id="ts-canonical",
        ),
        pytest.param(
            "2024-01-15T12:30:00+02:00",
            dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.UTC),
            True,
            id="ts-offset-to-utc",
        ),
        pytest.param(
            "2024-01-15 10:30:00",
            dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.UTC),
            True,
            id="ts-naive-as-utc",
        ),
    ],
)
def test_conversion_and_originals(text: str, value: object, lossy: bool) -> None:
    table = parse_csv(f"v\n{text}\n")
    (row,) = table.rows
    assert row.values == (value,)
    assert row.originals == ({"v": text} if lossy else {})
    if isinstance(value, dt.datetime):
        assert value.utcoffset() == dt.timedelta(0)


def test_ints_in_float_column_keep_original_when_rendering_differs() -> None:
    table = parse_csv("x\n5\n2.5\n9007199254740993\n")
    assert table.columns[0].type is ColumnType.FLOAT
    assert [row.values[0] for row in table.rows] == [5.0, 2.5, 9007199254740992.0]
    assert [row.originals for row in table.rows] == [
        {"x": "5"},
        {},
        {"x": "9007199254740993"},
    ]


def test_text_keeps_whitespace_and_is_never_lossy() -> None:
    table = parse_csv('a,b\n "x" ,  1\n\t,2 \n')
    assert table.columns[1].type is ColumnType.TEXT
    assert [row.values for row in table.rows] == [(' "x" ', "  1"), ("\t", "2 ")]
    assert all(row.originals == {} for row in table.rows)


# --- structure ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rows"),
    [
        pytest.param("", 0, id="empty"),
        pytest.param("a,b\n", 0, id="header-only"),
        pytest.param("\ufeffa,b\r\n1,2\r\n", 1, id="bom-crlf"),
        pytest.param("a,b\n\n1,2\n\n\n3,4\n", 2, id="blank-lines"),
        pytest.param("a,b\n1,2", 1, id="no-trailing-newline"),
    ],
)
def test_structure(text: str, rows: int) -> None:
    table = parse_csv(text)
    assert len(table.rows) == rows
    if text:
        assert [c.original for c in table.columns] == ["a", "b"]


def test_expected_columns_header_skipped_case_insensitively() -> None:
    table = parse_csv(" Name ,PRICE\nBitcoin,1\n", expected_columns=["name", "price"])
    assert [c.key for c in table.columns] == ["name", "price"]
    assert [row.values for row in table.rows] == [("Bitcoin", 1)]


def test_expected_columns_without_header_keeps_every_record() -> None:
    table = parse_csv("Bitcoin,1\nEthereum,2\n", expected_columns=["name", "price"])
    assert [c.original for c in table.columns] == ["name", "price"]
    assert [row.values for row in table.rows] == [("Bitcoin", 1), ("Ethereum", 2)]


def test_expected_columns_with_empty_text() -> None:
    table = parse_csv("", expected_columns=["a"])
    assert [c.key for c in table.columns] == ["a"]
    assert table.rows == ()


# --- repair -------------------------------------------------------------------------------


def test_docs_example_is_repaired() -> None:
    table = parse_csv(DOCS_EXAMPLE)
    assert [row.values for row in table.rows] == [
        ("Bitcoin", "$95,360.97"),
        ("Ethereum", "$3,325.94"),
        ("Tether", "$0.9994"),
        ("XRP", "$2.16"),
    ]
    first = table.rows[0]
    assert first.flag == "repaired: rejoined thousands separator in price"
    assert first.raw == "Bitcoin,$95,360.97"
    assert first.extra == ()
    assert table.rows[2].flag is None
    assert table.rows[2].raw is None


@pytest.mark.parametrize(
    ("text", "values", "extra", "flag"),
    [
        pytest.param(
            "name,n\nx,1,234,567\n",
            ("x", "1,234,567"),
            (),
            "repaired: rejoined thousands separator in n",
            id="two-separators",
        ),
        pytest.param(
            "a,b,c\n-$1,000.5,x,€2,000\n",
            ("-$1,000.5", "x", "€2,000"),
            (),
            "repaired: rejoined thousands separator in a, c",
            id="two-columns",
        ),
        pytest.param(
            "a,b\n1,234,567\n",
            (1, 234),
            ("567",),
            "ragged: 3 fields for 2 columns",
            id="ambiguous",
        ),
        pytest.param(
            'name,price\nBitcoin,"$95",360.97\n',
            ("Bitcoin", "$95"),
            ("360.97",),
            "ragged: 3 fields for 2 columns",
            id="quoted-not-rejoined",
        ),
        pytest.param(
            "a,b\nx,y,z\n",
            ("x", "y"),
            ("z",),
            "ragged: 3 fields for 2 columns",
            id="no-number",
        ),
        pytest.param(
            "a,b\nx\n",
            ("x", None),
            (),
            "ragged: 1 field for 2 columns",
            id="short",
        ),
    ],
)
def test_repair_and_ragged(
    text: str, values: tuple[object, ...], extra: tuple[str, ...], flag: str
) -> None:
    (row,) = parse_csv(text).rows
    assert row.values == values
    assert row.extra == extra
    assert row.flag == flag
    assert row.raw == text.split("\n")[1]


def test_irregular_quoting_keeps_raw() -> None:
    (row,) = parse_csv('a,b\n"x"y,1\n').rows
    assert row.raw == '"x"y,1'
    assert row.flag == "irregular quoting"


def test_unterminated_quote_keeps_raw() -> None:
    table = parse_csv('a,b\n1,"open\n2,3\n')
    (row,) = table.rows
    assert row.raw == '1,"open\n2,3'
    assert row.flag is not None
    assert "irregular quoting" in row.flag


def test_multiline_raw_is_kept_for_ragged_row() -> None:
    (row,) = parse_csv('a,b\n"x\r\ny",1,2\r\n').rows
    assert row.raw == '"x\r\ny",1,2'
    assert row.values == ("x\r\ny", 1)
    assert row.extra == ("2",)


def test_huge_field_is_parsed() -> None:
    big = "x" * 300_000
    (row,) = parse_csv(f"a,b\n{big},1\n").rows
    assert row.values == (big, 1)


# --- headers ------------------------------------------------------------------------------


def test_hostile_headers() -> None:
    headers = ['"; DROP TABLE tasks; --', "n" * 500, "🚀💰", "name", "name", "", "", "Name"]
    table = parse_csv(write_csv([headers, ["1"] * len(headers)]))
    names = [c.name for c in table.columns]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z0-9_]+", n) and len(n) <= MAX_IDENTIFIER for n in names)
    assert [c.original for c in table.columns] == headers
    keys = [c.key for c in table.columns]
    assert keys[3:7] == ["name", "name#2", "#6", "#7"]
    assert len(set(keys)) == len(keys)
    assert names[2] == "column_3"
    assert names[5] == "column_6"


def test_keys_stay_unique_when_header_mimics_suffix() -> None:
    table = parse_csv("name#2,name,name,#4,\n1,2,3,4,5\n")
    keys = [c.key for c in table.columns]
    assert len(set(keys)) == len(keys)
    assert keys[:2] == ["name#2", "name"]


# --- sniffing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(DOCS_EXAMPLE, True, id="docs-example"),
        pytest.param(
            'name,price,change_24h\n"Bitcoin",95360.97,-1.2\n"Ethereum",3325.94,0.8\n'
            '"Tether",0.9994,0.0\n',
            True,
            id="quoted-names",
        ),
        pytest.param("name,price\nBitcoin,95360.97\nEthereum,3325.94", True, id="plain"),
        pytest.param("\ufeffa,b\r\n1,2\r\n", True, id="bom-crlf"),
        pytest.param(
            "## Top Cryptocurrency Prices\n\n| Name | Price |\n|------|-------|\n"
            "| Bitcoin | $95,360.97 |\n| Ethereum | $3,325.94 |",
            False,
            id="markdown-table",
        ),
        pytest.param('a,notes\n1,"- one\n- two"\n2,x\n', True, id="markdown-in-cell"),
        pytest.param("- apples, pears\n- plums, figs\n", False, id="bullets"),
        pytest.param("* apples, pears\n* plums, figs\n", False, id="star-bullets"),
        pytest.param("Successfully searched for Anthropic on Google", False, id="prose"),
        pytest.param("Task completed successfully", False, id="prose-2"),
        pytest.param("Hello, world. This is fine.", False, id="prose-comma"),
        pytest.param("Hello, world. This is fine.\nReally, it is.\n", False, id="prose-lines"),
        pytest.param('{"a": 1}', False, id="json"),
        pytest.param('[{"a": 1, "b": 2},\n{"a": 3, "b": 4}]', False, id="json-multiline"),
        pytest.param("", False, id="empty"),
        pytest.param("a,b\n", False, id="header-only"),
        pytest.param("a\nb\nc\n", False, id="one-column"),
        pytest.param("a,b,c\n1\n2\n3,4,5\n", False, id="mostly-ragged"),
    ],
)
def test_looks_like_csv(text: str, expected: bool) -> None:
    assert looks_like_csv(text) is expected


# --- fast path = careful path -------------------------------------------------------------

# Every character the tokeniser, the repair or the inference treats specially, and NUL.
CSV_CHARS = st.sampled_from(
    [*'ab1,"\r\n $.\ufeff0-+:eET\x00', "true", "2024-01-15", ",360", "$95", ".97", "-0.0"]
)


def assert_same_table(text: str, expected_columns: list[str] | None = None) -> None:
    """The stdlib fast path and the Arrow path both give the careful path's table."""
    careful = parse_careful(text, expected_columns)
    for arrow in (False, True):
        fast = parse_csv_columns(text, expected_columns, arrow=arrow).table()
        assert fast == careful
        # Equal is not enough for cells: 1 == 1.0 == True, and -0.0 == 0.0.
        for fast_row, careful_row in zip(fast.rows, careful.rows, strict=True):
            assert [(type(v), repr(v)) for v in fast_row.values] == [
                (type(v), repr(v)) for v in careful_row.values
            ]
            assert list(fast_row.originals.items()) == list(careful_row.originals.items())


@settings(max_examples=500, deadline=None)
@given(st.lists(CSV_CHARS, max_size=80).map("".join))
def test_fast_path_equals_careful_path_on_arbitrary_text(text: str) -> None:
    assert_same_table(text)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(CSV_CHARS, max_size=60).map("".join),
    st.lists(st.sampled_from(["a", "b", "1", "A ", ""]), max_size=3),
)
def test_fast_path_equals_careful_path_with_expected_columns(
    text: str, expected: list[str]
) -> None:
    assert_same_table(text, expected)


@settings(max_examples=300, deadline=None)
@given(tables(), st.data())
def test_fast_path_equals_careful_path_on_written_tables(
    table_rows: list[list[str]], data: st.DataObject
) -> None:
    text = write_csv(table_rows)
    assert_same_table(text)
    # What csv.writer writes is regular and one width: the Arrow path takes it, not the stdlib.
    assert parse_arrow(text, None) is not None
    # Break it somewhere: a stray quote, comma or line break in a random place.
    at = data.draw(st.integers(min_value=0, max_value=len(text)))
    stray = data.draw(st.sampled_from(['"', ",", "\n", "\r", '"x', '""']))
    assert_same_table(text[:at] + stray + text[at:])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.none(), CELL, *COLUMN_CELLS), max_size=8))
def test_column_inference_equals_cell_by_cell(texts: list[str | None]) -> None:
    assert infer_column_type(texts) is infer_per_cell(texts)


def test_fast_path_checks_raw_text_where_the_grammar_fails() -> None:
    text = 'a,b\n"x"y,1\n"p","q"\n3,"4"\n'
    fast = parse_csv(text)
    assert fast == parse_careful(text)
    assert [row.flag for row in fast.rows] == ["irregular quoting", None, None]


# --- the Arrow path: each piece equals the stdlib piece it stands in for -----------------

#: Per column type, texts around every rule of inference and conversion.
_DIGITS = st.from_regex(r"[-+]?[0-9]{1,21}", fullmatch=True)
_DECIMALS = st.from_regex(r"[-+]?[0-9]{0,18}\.?[0-9]{0,18}(?:[eE][-+]?[0-9]{1,3})?", fullmatch=True)
_DATES = st.from_regex(r"[0-9]{4}-[0-1][0-9]-[0-3][0-9]", fullmatch=True)
_STAMPS = st.from_regex(
    r"[0-9]{4}-[0-1][0-9]-[0-3][0-9][T ][0-2][0-9]:[0-6][0-9](?::[0-6][0-9](?:\.[0-9]{1,8})?)?"
    r"(?:Z|[+-][0-2][0-9](?::?[0-5][0-9])?)?",
    fullmatch=True,
)
_FAMILIES = [
    st.one_of(_DIGITS, st.sampled_from(["0", "-0", "+0", str(2**63 - 1), str(2**63), "007"])),
    st.one_of(
        _DIGITS,
        _DECIMALS,
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
        st.sampled_from(["1e400", "-1e400", "1e-400", "0.0001", "0.00001", "-0.0", "1.50"]),
        st.sampled_from(["123456789012345.6", "1234567890123456.7", "0.1", ".5", "5.", "1e3"]),
    ),
    st.sampled_from(["true", "false", "TRUE", "False", "tRuE", "yes", "1", "t"]),
    st.one_of(_DATES, st.dates().map(str), st.sampled_from(["0000-01-01", "2024-02-29"])),
    st.one_of(
        _STAMPS,
        st.datetimes().map(lambda d: d.isoformat() + "Z"),
        st.datetimes(timezones=st.just(dt.UTC)).map(lambda d: d.isoformat()),
        st.sampled_from(["0000-01-01T00:00:00Z", "2024-01-15T10:30:00.5Z", "2024-01-15T24:00Z"]),
    ),
]


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from(_FAMILIES).flatmap(
        lambda family: st.lists(st.one_of(family, st.just("")), min_size=1, max_size=6)
    )
)
def test_arrow_typing_equals_stdlib_typing(texts: list[str]) -> None:
    expected_type, parsed = typed_column(texts)
    expected, lossy = convert_column(texts, expected_type, parsed)
    column_type, values, got_lossy, got_texts = _arrow_typed(pa.array(texts, pa.string()))
    assert column_type is expected_type
    got = to_cells(values, column_type)
    assert [(type(v), repr(v)) for v in got] == [(type(v), repr(v)) for v in expected]
    assert got_lossy == lossy
    assert got_texts == [texts[row] for row in lossy]


@settings(max_examples=1000, deadline=None)
@given(st.lists(CSV_CHARS, max_size=80).map("".join))
def test_arrow_grammar_equals_stdlib_grammar(text: str) -> None:
    """The RE2 spelling accepts exactly the texts the possessive pattern accepts."""
    matched = pc.match_substring_regex(pa.array([text], pa.string()), _RE2_REGULAR_TEXT)
    assert matched[0].as_py() is (REGULAR_TEXT.fullmatch(text) is not None)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.floats(allow_nan=False, allow_infinity=False).map(repr), _DECIMALS))
def test_canonical_float_text_is_what_repr_gives(text: str) -> None:
    """Text the Arrow path does not check cell by cell must be exactly repr's."""
    if re.fullmatch(_RE2_CANONICAL_FLOAT.strip("^$"), text) and len(text) <= 16:
        value = float(text)
        assert repr(value) == text
        assert value != 0 or math.copysign(1.0, value) > 0  # never -0.0: its sign is kept


def test_no_other_character_lowercases_into_a_boolean() -> None:
    """The ASCII boolean pattern is `str.lower() in {"true", "false"}` only if no other
    character lowercases to letters of those words."""
    letters = set("truefals")
    found = [c for c in range(128, 0x110000) if set(chr(c).lower()) <= letters]
    assert found == []


def test_arrow_path_falls_back_where_it_may_differ() -> None:
    ragged = "a,b\n1,2\n3\n"
    assert parse_arrow(ragged, None) is None
    assert parse_arrow('a,b\n"x"y,1\n', None) is None  # irregular quoting
    assert parse_arrow("a,b\n\ud800,1\n", None) is None  # cannot be UTF-8
    assert parse_arrow("a,b\n1,2\n", ["a"]) is None  # another width than the registered one
    assert parse_csv_columns(ragged, arrow=True).table() == parse_careful(ragged)


def test_big_texts_take_the_arrow_path() -> None:
    text = write_csv([["n", "x"], *[[str(n), f"{n / 7!r}"] for n in range(20_000)]])
    assert len(text) >= ARROW_MIN_CHARS
    parsed = parse_csv_columns(text)
    assert not isinstance(parsed.values[0], list)
    assert parsed.table() == parse_careful(text)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("\ufeff\ufeffa\r", id="header-only"),
        pytest.param("\ufeff\ufeffa,b\r\n1,2\r\n", id="with-rows"),
    ],
)
def test_a_second_bom_is_kept_by_every_path(text: str) -> None:
    """Found by Hypothesis: one BOM is the encoding's, a second is the header's text;
    Arrow's reader would strip it too, so such a text never takes the Arrow path."""
    assert_same_table(text)
    assert parse_careful(text, None).columns[0].original.startswith("\ufeff")
