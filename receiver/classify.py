"""Turn a stored body into one typed `Envelope`, whatever shape WebRun sent.

Pure: bytes and a content type in, an `Envelope` out, or `Quarantine` with
the reason. The WebRun docs disagree with themselves on field names and
nesting (``inputTokens`` / ``prompt_tokens``, cost in ``usage`` or
``data.usage``, results wrapped in ``result``, ``type`` or ``event``), so
every variant the catalogue shows is read here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from receiver.bounds import check_usage
from receiver.columns import JsonValue
from receiver.csvparse import looks_like_csv
from receiver.errors import Quarantine
from receiver.nesting import parse_within_depth


class Kind(StrEnum):
    FULL_RESPONSE = "full_response"
    AI_RESPONSE = "ai_response"
    JUST_PING = "just_ping"
    FAILURE = "failure"
    GUARDRAIL = "guardrail"
    #: A task still under way: ``status: "pending"`` / ``"active"`` / ``"running"``.
    RUNNING = "running"


class TaskStatus(StrEnum):
    """A task's lifecycle: pending/running -> guardrail (repeatable) -> completed | failed."""

    PENDING = "pending"
    RUNNING = "running"
    GUARDRAIL = "guardrail"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED)


class OutputType(StrEnum):
    TEXT = "text"
    JSON = "structured_json"
    CSV = "structured_csv"


@dataclass(frozen=True)
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    compute_time_s: float | None = None
    completion_time_s: float | None = None
    cost_usd: float | None = None


@dataclass(frozen=True)
class AgentOutput:
    """The agent's output: ``text`` as delivered (markdown, JSON text, CSV text)."""

    type: OutputType
    text: str
    value: JsonValue = None


@dataclass(frozen=True)
class Envelope:
    kind: Kind
    status: TaskStatus | None = None
    session_id: str | None = None
    task_id: str | None = None
    usage: Usage = field(default_factory=Usage)
    completed_at: dt.datetime | None = None
    error: str | None = None
    error_code: str | None = None
    guardrail_type: str | None = None
    guardrail_value: str | None = None
    output: AgentOutput | None = None
    #: Parts of the record with no column of their own (``data.files``, ``data.network``...).
    extra: dict[str, JsonValue] = field(default_factory=dict)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str) -> JsonValue:
    """Strict RFC 8259 parsing: Python's ``NaN``/``Infinity`` extensions are refused,
    and so is nesting past `receiver.nesting.MAX_JSON_DEPTH` (`TooDeep`, a quarantine)."""
    return parse_within_depth(text, _strict)


def _strict(text: str) -> JsonValue:
    value: JsonValue = json.loads(text, parse_constant=_refuse_constant)
    return value


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def classify(
    body: bytes, content_type: str | None, *, expected: OutputType | None = None
) -> Envelope:
    """Classify a delivery body; ``expected`` is the output type registered for the hook."""
    if not body.strip():
        raise Quarantine("empty body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Quarantine(f"body is not UTF-8 (byte {exc.start})") from None
    text = text.removeprefix("\ufeff")
    media = _media_type(content_type)
    is_json_media = media == "application/json" or media.endswith("+json")
    if is_json_media or text.lstrip()[:1] in ("{", "[", '"'):
        try:
            value = parse_json(text)
        except (ValueError, RecursionError) as exc:
            if is_json_media:
                raise Quarantine(f"invalid JSON: {_short(exc)}") from None
        else:
            _refuse_lone_surrogates(text, value)
            return _classify_json(value, text, expected)
    return Envelope(Kind.AI_RESPONSE, output=_text_output(text, expected, media == "text/csv"))


def _short(exc: BaseException) -> str:
    return str(exc)[:200] or type(exc).__name__


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _refuse_lone_surrogates(text: str, value: JsonValue) -> None:
    """``"\\ud800"`` parses to a string no UTF-8 database column can hold: say so up front."""
    if not _SURROGATE_ESCAPE.search(text):
        return
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise Quarantine("JSON holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)") from None


def _classify_json(value: JsonValue, text: str, expected: OutputType | None) -> Envelope:
    if is_task_record(value):
        assert isinstance(value, dict)
        return _task_record(value, expected)
    if isinstance(value, str):
        return Envelope(Kind.AI_RESPONSE, output=_text_output(value, expected, False))
    return Envelope(Kind.AI_RESPONSE, output=_json_output(value, text))


#: ``type`` / ``event`` values that mark a WebRun task record.
_MARKERS = {"task_completed", "guardrail_trigger", "task_failed", "error", "task_error"}
_ERROR_MARKERS = {"error", "task_error"}
#: ``status`` values of a WebRun task record, and the lifecycle status each means.
_STATUSES = {
    "complete": TaskStatus.COMPLETED,
    "completed": TaskStatus.COMPLETED,
    "failed": TaskStatus.FAILED,
    "pending": TaskStatus.PENDING,
    "active": TaskStatus.RUNNING,
    "running": TaskStatus.RUNNING,
}
#: Every top-level field a WebRun task record (webhook, run-task, poll answer, WebSocket
#: event) is documented with. An object with any other key is an output, not a record.
_RECORD_FIELDS = {
    "success",
    "type",
    "event",
    "sessionId",
    "taskId",
    "status",
    "pending",
    "pollUrl",
    "message",
    "result",
    "data",
    "usage",
    "completedAt",
    "completed_at",
    "error",
    "code",
    "errorCode",
}
#: Fields that, beside a ``status``, only a record has (an output may well say ``status``).
_RECORD_SIGNS = ("success", "pending", "pollUrl", "usage", "result", "sessionId", "taskId")


def is_task_record(value: object) -> bool:
    """Whether a parsed JSON body is a WebRun task record, by its shape alone.

    Completed, failed, guardrail, pending/active/running answers and error events
    are records whether or not they carry ids (poll answers never do), flat or
    wrapped under ``result``. An object with a key no record has is an output, and
    a ``status`` alone does not make a record: it needs a field only records have.
    Pure, so reconciliation can ask it of a poll answer.
    """
    if not isinstance(value, dict) or not value or not set(value) <= _RECORD_FIELDS:
        return False
    for name in ("data", "usage", "result"):
        if name in value and not isinstance(value[name], dict | None):
            return False
    result = value.get("result")
    inner = result if isinstance(result, dict) else {}
    marker = _marker(value) or _marker(inner)
    if marker in _ERROR_MARKERS:
        # ``{"type": "error", "message": ...}`` may as well be an output: an error event
        # must also carry something only a record has.
        return any(k in value for k in (*_RECORD_SIGNS, "error", "code", "errorCode"))
    if marker is not None:
        return True
    status = value.get("status")
    if isinstance(status, str) and status.lower() in _STATUSES:
        return any(isinstance(value.get(k), bool | str | dict) for k in _RECORD_SIGNS)
    # The failure shape without a status: {"success": false, "error": "...", "usage": {...}}.
    return value.get("success") is False and "error" in value and "usage" in value


def _marker(d: Mapping[str, JsonValue]) -> str | None:
    """The record's ``type`` or ``event`` marker, lower-cased, if it has one."""
    for name in ("type", "event"):
        marker = d.get(name)
        if isinstance(marker, str) and marker.lower() in _MARKERS:
            return marker.lower()
    return None


def _task_record(outer: dict[str, JsonValue], expected: OutputType | None) -> Envelope:
    result = outer.get("result")
    inner: dict[str, JsonValue] = result if isinstance(result, dict) else {}
    merged: dict[str, JsonValue] = {**outer, **inner}
    data = _obj(merged.get("data"))
    usage = _obj(inner.get("usage")) or _obj(outer.get("usage")) or _obj(data.get("usage"))
    marker = _marker(inner) or _marker(outer)
    raw_status = merged.get("status")
    status = _STATUSES.get(raw_status.lower()) if isinstance(raw_status, str) else None
    extra: dict[str, JsonValue] = {k: data[k] for k in ("files", "network") if k in data}

    completed_at = None
    raw_completed = merged.get("completedAt", merged.get("completed_at"))
    if raw_completed is not None:
        completed_at = parse_time(raw_completed)
        if completed_at is None:
            extra["completedAt"] = raw_completed

    common: dict[str, Any] = {
        "session_id": _opt_str(merged.get("sessionId")),
        "task_id": _opt_str(merged.get("taskId")),
        "completed_at": completed_at,
        "usage": _usage(usage, data),
        "extra": extra,
    }
    if marker == "guardrail_trigger":
        return Envelope(
            Kind.GUARDRAIL,
            status=TaskStatus.GUARDRAIL,
            guardrail_type=_opt_str(data.get("type")),
            guardrail_value=_opt_text(data.get("value")),
            **common,
        )
    failed = status is TaskStatus.FAILED or marker in ("task_failed", *_ERROR_MARKERS)
    if failed or (merged.get("success") is False and "error" in merged):
        error = merged.get("error")
        if error is None and marker is not None:  # an error event says it in `message`
            error = merged.get("message")
        return Envelope(
            Kind.FAILURE,
            status=TaskStatus.FAILED,
            error=_opt_text(error),
            error_code=_opt_str(merged.get("code", merged.get("errorCode"))),
            **common,
        )
    if status in (TaskStatus.PENDING, TaskStatus.RUNNING) and marker is None:
        # Still under way: its usage is "so far", and its `message` is an instruction
        # ("poll for the result"), not the agent's output.
        if isinstance(merged.get("pollUrl"), str):
            extra["pollUrl"] = merged["pollUrl"]
        return Envelope(Kind.RUNNING, status=status, **common)
    if not data and not usage and not inner:
        return Envelope(Kind.JUST_PING, status=TaskStatus.COMPLETED, **common)
    output = None
    if "message" in data:
        message = data["message"]
        if isinstance(message, str):
            output = _text_output(message, expected, False, json_allowed=True)
        elif message is not None:
            output = _json_output(message)
    return Envelope(Kind.FULL_RESPONSE, status=TaskStatus.COMPLETED, output=output, **common)


def _text_output(
    text: str, expected: OutputType | None, is_csv_media: bool, *, json_allowed: bool = False
) -> AgentOutput:
    """Decide what a text output is: JSON text (in ``data.message``), CSV, or markdown."""
    if json_allowed and (expected in (None, OutputType.JSON)) and text.lstrip()[:1] in ("{", "["):
        try:
            return _json_output(parse_json(text), text)
        except (ValueError, RecursionError):
            pass
    if expected == OutputType.CSV or is_csv_media or (expected is None and looks_like_csv(text)):
        return AgentOutput(OutputType.CSV, text)
    return AgentOutput(OutputType.TEXT, text)


def _json_output(value: JsonValue, text: str | None = None) -> AgentOutput:
    if text is None:
        text = json.dumps(value, ensure_ascii=False)
    return AgentOutput(OutputType.JSON, text, value)


def _obj(value: JsonValue) -> dict[str, JsonValue]:
    return value if isinstance(value, dict) else {}


def _first(d: Mapping[str, JsonValue], *names: str) -> tuple[str, JsonValue] | None:
    for name in names:
        if d.get(name) is not None:
            return name, d[name]
    return None


def _usage(usage: dict[str, JsonValue], data: dict[str, JsonValue]) -> Usage:
    def pick(
        kind: type[int] | type[float], *sources: tuple[dict[str, JsonValue], tuple[str, ...]]
    ) -> Any:
        for source, names in sources:
            found = _first(source, *names)
            if found is not None:
                return _number(found[0], found[1], integer=kind is int)
        return None

    usage_values = Usage(
        input_tokens=pick(
            int,
            (usage, ("inputTokens", "input_tokens", "prompt_tokens")),
            (data, ("prompt_tokens", "inputTokens", "input_tokens")),
        ),
        output_tokens=pick(
            int,
            (usage, ("outputTokens", "output_tokens", "completion_tokens")),
            (data, ("completion_tokens", "outputTokens", "output_tokens")),
        ),
        total_tokens=pick(
            int,
            (usage, ("totalTokens", "total_tokens")),
            (data, ("total_tokens", "totalTokens")),
        ),
        compute_time_s=pick(float, (usage, ("computeTime", "compute_time"))),
        completion_time_s=pick(
            float, (data, ("completion_time", "completionTime")), (usage, ("completion_time",))
        ),
        cost_usd=pick(float, (usage, ("cost", "cost_usd")), (data, ("cost",))),
    )
    check_usage(dataclasses.asdict(usage_values))
    return usage_values


def _number(name: str, value: JsonValue, *, integer: bool) -> int | float:
    """Accept a JSON number, or a numeric string; anything else is quarantined, never guessed."""
    number: int | float
    if isinstance(value, bool):
        raise Quarantine(f"{name} is a boolean, not a number")
    if isinstance(value, int | float):
        number = value
    elif isinstance(value, str):
        try:
            number = (
                int(value) if integer and value.strip().lstrip("+-").isdigit() else float(value)
            )
        except ValueError:
            raise Quarantine(f"{name} is not a number: {value[:50]!r}") from None
    else:
        raise Quarantine(f"{name} is not a number: {type(value).__name__}")
    if isinstance(number, float) and not math.isfinite(number):
        raise Quarantine(f"{name} is not a finite number")
    if integer:
        if isinstance(number, float):
            if not number.is_integer():
                raise Quarantine(f"{name} is not a whole number: {number}")
            number = int(number)
        if not -(2**63) <= number < 2**63:
            raise Quarantine(f"{name} does not fit a 64-bit integer")
    return number if integer else float(number)


def _opt_str(value: JsonValue) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise Quarantine(f"an id or code is not a string: {type(value).__name__}")


def _opt_text(value: JsonValue) -> str | None:
    """Free text fields: a non-string is kept as its JSON text rather than refused."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def parse_time(value: JsonValue) -> dt.datetime | None:
    """ISO 8601 (``Z``, offsets, milliseconds) or epoch milliseconds, as aware UTC; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            return dt.datetime.fromtimestamp(value / 1000, dt.UTC)
        except (OverflowError, ValueError, OSError):
            return None
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)
