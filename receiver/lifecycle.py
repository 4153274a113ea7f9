"""A task's lifecycle, and its ``tasks`` row as the fold of its ``task_events``. Pure.

WebRun tasks go ``pending``/``running`` -> ``guardrail`` (a pause, maybe several)
-> ``completed`` | ``failed``, but deliveries arrive in any order: a guardrail
webhook may land after the completion it preceded. So the row is not "what the
last delivery said" but a fold that ranks what every delivery said, and gives
the same row whatever order they came in:

- the status is the furthest one reported (a final status never goes back);
- the usage is the one reported with that furthest status that carried usage
  (running usage is "so far" and gives way to the final one), ``usage_status``
  saying which it was;
- every other field comes from the highest-ranked delivery that gave it.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from receiver.classify import Kind, TaskStatus

#: How far along the lifecycle a status is; no status (an ``ai_response``) is nowhere.
STATUS_RANK: dict[str | None, int] = {
    None: 0,
    TaskStatus.PENDING: 1,
    TaskStatus.RUNNING: 2,
    TaskStatus.GUARDRAIL: 3,
    TaskStatus.FAILED: 4,
    TaskStatus.COMPLETED: 5,
}
#: Among deliveries of the same status, whose word counts most: the full record first.
KIND_RANK: dict[str, int] = {
    Kind.FULL_RESPONSE: 5,
    Kind.FAILURE: 4,
    Kind.GUARDRAIL: 3,
    Kind.RUNNING: 2,
    Kind.JUST_PING: 1,
    Kind.AI_RESPONSE: 0,
}
USAGE = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "compute_time_s",
    "completion_time_s",
    "cost_usd",
)
#: Fields taken whole from the best-ranked event that has them.
PICKED = ("output_type", "error", "error_code")


def task_key(session_id: str | None, task_id: str | None, delivery_id: str) -> str:
    """The ``tasks`` primary key: ``[session_id, task_id]``, or, with no task id at all,
    ``[null, null, delivery_id]`` (a task nobody can name is one task per delivery)."""
    if task_id is None:
        return json.dumps([None, None, delivery_id], ensure_ascii=False)
    return json.dumps([session_id, task_id], ensure_ascii=False)


def key_ids(key: str) -> tuple[str | None, str | None]:
    session_id, task_id = json.loads(key)[:2]
    return session_id, task_id


def _rank(event: Mapping[str, Any]) -> tuple[int, int]:
    return STATUS_RANK.get(event["status"], 0), KIND_RANK.get(event["kind"], 0)


def _best(events: Iterable[Mapping[str, Any]], name: str) -> Any:
    """The value of ``name`` from the best-ranked event that has one (ties: the largest)."""
    found = [(_rank(e), e[name]) for e in events if e[name] is not None]
    return max(found)[1] if found else None


def _merged_json(events: Sequence[Mapping[str, Any]], name: str) -> dict[str, Any]:
    """JSON objects merged, better-ranked events winning; order-free (ties by the text)."""
    merged: dict[str, Any] = {}
    for event in sorted((e for e in events if e[name]), key=lambda e: (_rank(e), e[name])):
        value = json.loads(event[name])
        if isinstance(value, dict):
            merged.update(value)
    return merged


def fold(key: str, events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``tasks`` row of ``key`` from its events (at least one), in any order."""
    if not events:
        raise ValueError("a task is the fold of at least one event")
    session_id, task_id = key_ids(key)
    status = max((e["status"] for e in events), key=lambda s: STATUS_RANK.get(s, 0))
    with_usage = [e for e in events if any(e[m] is not None for m in USAGE)]
    usage_status = None
    usage: dict[str, Any] = dict.fromkeys(USAGE)
    if with_usage:
        top = max(STATUS_RANK.get(e["status"], 0) for e in with_usage)
        group = [e for e in with_usage if STATUS_RANK.get(e["status"], 0) == top]
        usage_status = group[0]["status"]
        usage = {m: _best(group, m) for m in USAGE}
    guardrails = [
        (e["guardrail_type"] or "", e["guardrail_value"] or "", e)
        for e in events
        if e["guardrail_type"] is not None or e["guardrail_value"] is not None
    ]
    guardrail = max(guardrails, key=lambda g: g[:2])[2] if guardrails else None
    first: dt.datetime = min(e["received_at"] for e in events)
    last = max(events, key=lambda e: (e["received_at"], e["delivery_id"]))
    labels = _merged_json(events, "labels")
    extra = _merged_json(events, "extra")
    hook = max((_rank(e), e["hook"]) for e in events)[1]
    return {
        "task_key": key,
        "session_id": session_id,
        "task_id": task_id,
        "hook": hook,
        "status": status,
        **{name: _best(events, name) for name in PICKED},
        **usage,
        "usage_status": usage_status,
        "guardrail_type": guardrail["guardrail_type"] if guardrail else None,
        "guardrail_value": guardrail["guardrail_value"] if guardrail else None,
        "completed_at": max((e["completed_at"] for e in events if e["completed_at"]), default=None),
        "first_seen_at": first,
        "last_delivery_id": last["delivery_id"],
        "labels": json.dumps(labels, ensure_ascii=False),
        "extra": json.dumps(extra, ensure_ascii=False) if extra else None,
    }
