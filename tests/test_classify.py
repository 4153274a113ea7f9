"""Shape classification: every field-name variant the WebRun docs use, and nothing guessed."""

from __future__ import annotations

import contextlib
import datetime as dt
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.classify import Kind, OutputType, TaskStatus, classify, is_task_record, parse_time
from receiver.errors import Quarantine


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


# The record shapes of WebRun's API reference (Task, Poll and failure response fields),
# written out from it: none of the poll answers carries an id.
USAGE = {"inputTokens": 12450, "outputTokens": 3200, "computeTime": 5, "cost": 0.0124}
POLL_COMPLETED = {
    "success": True,
    "type": "task_completed",
    "data": {
        "message": "Found it",
        "prompt_tokens": 12450,
        "completion_tokens": 3200,
        "total_tokens": 15650,
        "completion_time": 23.5,
    },
    "usage": USAGE,
    "completedAt": "2024-01-15T10:30:00.000Z",
}
POLL_ACTIVE = {"success": True, "status": "active", "pending": True, "usage": USAGE}
POLL_GUARDRAIL = {
    "success": True,
    "type": "guardrail_trigger",
    "data": {"type": "human_input_needed", "value": "Please provide login credentials"},
}
POLL_FAILED = {
    "success": False,
    "status": "failed",
    "error": "Page took too long to load",
    "code": "NAVIGATION_TIMEOUT",
    "usage": USAGE,
}
RUN_TASK_PENDING = {
    "success": True,
    "sessionId": "s",
    "taskId": "t",
    "status": "pending",
    "pending": True,
    "pollUrl": "https://api.example.com/task/s/t",
    "message": "Task is still running; poll pollUrl for the result",
}
RUN_TASK_COMPLETE = {
    "success": True,
    "sessionId": "s",
    "taskId": "t",
    "status": "complete",
    "result": {
        "type": "task_completed",
        "data": {"message": "done", "prompt_tokens": 10, "completion_tokens": 2},
    },
}
ERROR_EVENT = {"type": "error", "taskId": "t", "message": "Browser crashed"}
WRAPPED_FAILED = {"success": False, "result": {"type": "task_failed"}, "error": "boom"}

SHAPES = [
    pytest.param(POLL_COMPLETED, Kind.FULL_RESPONSE, TaskStatus.COMPLETED, id="poll-completed"),
    pytest.param(POLL_ACTIVE, Kind.RUNNING, TaskStatus.RUNNING, id="poll-active"),
    pytest.param(POLL_GUARDRAIL, Kind.GUARDRAIL, TaskStatus.GUARDRAIL, id="poll-guardrail"),
    pytest.param(POLL_FAILED, Kind.FAILURE, TaskStatus.FAILED, id="poll-failed"),
    pytest.param(RUN_TASK_PENDING, Kind.RUNNING, TaskStatus.PENDING, id="run-task-pending"),
    pytest.param(RUN_TASK_COMPLETE, Kind.FULL_RESPONSE, TaskStatus.COMPLETED, id="wrapped"),
    pytest.param(ERROR_EVENT, Kind.FAILURE, TaskStatus.FAILED, id="error-event"),
    pytest.param(WRAPPED_FAILED, Kind.FAILURE, TaskStatus.FAILED, id="wrapped-failed"),
    pytest.param(
        {"success": True, "status": "running", "usage": {"cost": 0.1}},
        Kind.RUNNING,
        TaskStatus.RUNNING,
        id="running",
    ),
]


@pytest.mark.parametrize(("record", "kind", "status"), SHAPES)
def test_task_records_are_recognised_by_shape(
    record: dict[str, object], kind: Kind, status: TaskStatus
) -> None:
    assert is_task_record(record)
    env = classify(body(record), "application/json")
    assert (env.kind, env.status) == (kind, status)
    if kind is not Kind.FULL_RESPONSE:
        assert env.output is None  # a record that is not final has no output to load


def test_id_less_records_keep_their_usage() -> None:
    env = classify(body(POLL_FAILED), "application/json")
    assert (env.session_id, env.task_id) == (None, None)
    assert env.usage.cost_usd == 0.0124
    assert (env.error, env.error_code) == ("Page took too long to load", "NAVIGATION_TIMEOUT")
    running = classify(body(POLL_ACTIVE), "application/json")
    assert (running.usage.input_tokens, running.usage.cost_usd) == (12450, 0.0124)


def test_error_event_message_is_the_error() -> None:
    assert classify(body(ERROR_EVENT), None).error == "Browser crashed"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"type": "task_completed", "title": "x"}, id="foreign-key"),
        pytest.param({"status": "completed"}, id="status-alone"),
        pytest.param({"status": "pending", "message": "soon"}, id="status-and-message"),
        pytest.param({"type": "error", "message": "no results"}, id="error-like-output"),
        pytest.param({"type": "task_completed", "data": [1, 2]}, id="data-not-object"),
        pytest.param([{"type": "task_completed"}], id="list"),
        pytest.param("task_completed", id="string"),
        pytest.param({}, id="empty"),
    ],
)
def test_outputs_are_not_task_records(value: object) -> None:
    assert not is_task_record(value)
    assert classify(body(value), "application/json").kind is Kind.AI_RESPONSE


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
