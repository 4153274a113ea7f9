"""Shape classification: every field-name variant the WebRun docs use, and nothing guessed."""

from __future__ import annotations

import contextlib
import datetime as dt
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.classify import Kind, OutputType, classify, parse_time
from receiver.errors import Quarantine

pytestmark = pytest.mark.pure


def body(value: object) -> bytes:
    return json.dumps(value).encode()


@pytest.mark.parametrize(
    ("usage", "data", "expected"),
    [
        pytest.param({"inputTokens": 5, "outputTokens": 6}, {}, (5, 6), id="camel-usage"),
        pytest.param({"input_tokens": 5, "output_tokens": 6}, {}, (5, 6), id="snake-usage"),
        pytest.param({}, {"prompt_tokens": 5, "completion_tokens": 6}, (5, 6), id="openai-data"),
        pytest.param({"inputTokens": "5"}, {"completion_tokens": 6.0}, (5, 6), id="numeric-text"),
        pytest.param({}, {}, (None, None), id="absent-stays-null"),
    ],
)
def test_token_variants(
    usage: dict[str, object], data: dict[str, object], expected: tuple[int | None, int | None]
) -> None:
    env = classify(
        body(
            {
                "type": "task_completed",
                "taskId": "t",
                "data": {"message": "x", **data},
                "usage": usage,
            }
        ),
        "application/json",
    )
    assert (env.usage.input_tokens, env.usage.output_tokens) == expected


@pytest.mark.parametrize(
    "record",
    [
        pytest.param({"usage": {"cost": 0.5}}, id="usage"),
        pytest.param({"data": {"usage": {"cost": 0.5}}}, id="data-usage"),
        pytest.param({"result": {"type": "task_completed", "usage": {"cost": 0.5}}}, id="result"),
    ],
)
def test_cost_locations(record: dict[str, object]) -> None:
    env = classify(body({"type": "task_completed", "taskId": "t", **record}), None)
    assert env.usage.cost_usd == 0.5


@pytest.mark.parametrize(
    ("usage", "reason"),
    [
        pytest.param({"cost": True}, "boolean", id="bool"),
        pytest.param({"cost": "cheap"}, "not a number", id="word"),
        pytest.param({"inputTokens": 1.5}, "whole number", id="fractional-tokens"),
        pytest.param({"inputTokens": 2**70}, "64-bit", id="huge"),
    ],
)
def test_bad_numbers_are_quarantined_not_guessed(usage: dict[str, object], reason: str) -> None:
    with pytest.raises(Quarantine, match=reason):
        classify(body({"type": "task_completed", "taskId": "t", "usage": usage}), None)


def test_ping_is_not_a_full_response() -> None:
    env = classify(body({"event": "task_completed", "sessionId": "s", "taskId": "t"}), None)
    assert env.kind is Kind.JUST_PING
    assert env.status == "completed"
    assert env.output is None


def test_output_object_with_type_key_is_not_a_task_record() -> None:
    env = classify(body({"type": "task_completed", "title": "no ids here"}), "application/json")
    assert env.kind is Kind.AI_RESPONSE
    assert env.output is not None
    assert env.output.type is OutputType.JSON


@pytest.mark.parametrize(
    ("text", "content_type", "expected"),
    [
        pytest.param(b"a,b\n1,2\n", "text/csv", OutputType.CSV, id="csv-media"),
        pytest.param(b"a,b\n1,2\n3,4", "text/plain", OutputType.CSV, id="csv-sniffed"),
        pytest.param(
            b"# Title\n\nSome text, with a comma.", "text/plain", OutputType.TEXT, id="md"
        ),
        pytest.param(
            b'"a,b\\n1,2\\n3,4"', "application/json", OutputType.CSV, id="csv-json-string"
        ),
        pytest.param(b"[1, 2]", None, OutputType.JSON, id="json-sniffed"),
        pytest.param(b"[not json", "text/plain", OutputType.TEXT, id="bracket-text"),
    ],
)
def test_output_types(text: bytes, content_type: str | None, expected: OutputType) -> None:
    output = classify(text, content_type).output
    assert output is not None
    assert output.type is expected


def test_registered_csv_wins_over_sniffing() -> None:
    output = classify(b"just one line, really", "text/plain", expected=OutputType.CSV).output
    assert output is not None
    assert output.type is OutputType.CSV


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(b"", "empty", id="empty"),
        pytest.param(b"  \n", "empty", id="blank"),
        pytest.param(b"\xff\xfe{}", "UTF-8", id="not-utf8"),
        pytest.param(b"{", "invalid JSON", id="broken-json"),
        pytest.param(b"NaN", "invalid JSON", id="nan"),
    ],
)
def test_quarantine_reasons(raw: bytes, reason: str) -> None:
    with pytest.raises(Quarantine, match=reason):
        classify(raw, "application/json")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(
            "2024-01-15T10:30:00.000Z", dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.UTC), id="ms-z"
        ),
        pytest.param(
            "2024-01-15T10:30:00Z", dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.UTC), id="z"
        ),
        pytest.param(
            "2024-01-15T12:30:00+02:00",
            dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.UTC),
            id="offset",
        ),
        pytest.param(1705314600000, dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.UTC), id="epoch-ms"),
        pytest.param("yesterday", None, id="words"),
    ],
)
def test_parse_time(value: object, expected: dt.datetime | None) -> None:
    assert parse_time(value) == expected  # type: ignore[arg-type]


def test_unparseable_completed_at_is_kept_in_extra() -> None:
    env = classify(body({"event": "task_completed", "taskId": "t", "completedAt": "soon"}), None)
    assert env.completed_at is None
    assert env.extra["completedAt"] == "soon"


@settings(max_examples=300, deadline=None)
@given(
    raw=st.binary(max_size=200),
    content_type=st.sampled_from([None, "application/json", "text/plain", "text/csv"]),
)
def test_never_raises_anything_but_quarantine(raw: bytes, content_type: str | None) -> None:
    with contextlib.suppress(Quarantine):
        classify(raw, content_type)
