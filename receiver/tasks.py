"""Normalise an `Envelope` into the one row per task that dashboards read.

Several deliveries speak of one task (a full record, then a ping); each
upsert only fills in what the new delivery knows, so a ping never erases a
cost, and the merge is one statement, safe under concurrency.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, case, func

from receiver.classify import Envelope
from receiver.db import insert_for
from receiver.models import Task

#: Columns a later delivery may fill in but never blank out.
MERGED = (
    "session_id",
    "status",
    "output_type",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "compute_time_s",
    "completion_time_s",
    "cost_usd",
    "error",
    "error_code",
    "guardrail_type",
    "guardrail_value",
    "completed_at",
    "extra",
)


def task_ids(envelope: Envelope, labels: Mapping[str, str]) -> tuple[str | None, str | None]:
    """Each id from the body, else from the URL's ``session_id``/``task_id`` labels.

    Poll answers and ``ai_response`` bodies carry no ids; the client may have put
    them (or ids of its own) in the webhook URL. No task id: ``(None, None)``.
    """
    task_id = envelope.task_id or labels.get("task_id") or labels.get("taskId") or None
    if task_id is None:
        return None, None
    session_id = envelope.session_id or labels.get("session_id") or labels.get("sessionId") or None
    return session_id, task_id


def task_key(session_id: str | None, task_id: str) -> str:
    return json.dumps([session_id, task_id], ensure_ascii=False)


def task_row(
    envelope: Envelope,
    *,
    hook: str,
    labels: Mapping[str, str],
    delivery_id: str,
    received_at: dt.datetime,
) -> dict[str, Any] | None:
    """The task row this delivery implies, or None when it names no task."""
    session_id, task_id = task_ids(envelope, labels)
    if task_id is None:
        return None
    usage = envelope.usage
    return {
        "task_key": task_key(session_id, task_id),
        "session_id": session_id,
        "task_id": task_id,
        "hook": hook,
        "status": envelope.status,
        "output_type": envelope.output.type.value if envelope.output else None,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "compute_time_s": usage.compute_time_s,
        "completion_time_s": usage.completion_time_s,
        "cost_usd": usage.cost_usd,
        "error": envelope.error,
        "error_code": envelope.error_code,
        "guardrail_type": envelope.guardrail_type,
        "guardrail_value": envelope.guardrail_value,
        "completed_at": envelope.completed_at,
        "first_seen_at": received_at,
        "last_delivery_id": delivery_id,
        "labels": json.dumps(dict(labels), ensure_ascii=False),
        "extra": json.dumps(envelope.extra, ensure_ascii=False) if envelope.extra else None,
    }


def upsert_tasks(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert each row's task, or merge the row into it (new values win, missing ones
    never erase), in turn, in as few statements as that allows.

    One statement cannot touch a row twice, so the rows go in rounds: each
    task's first row in the first, its second in the next, and so on. A round
    is one executemany (a multi-row statement where the driver allows), so a
    batch naming each task once costs one statement, and every task still sees
    its rows in order.
    """
    rounds: list[list[Mapping[str, Any]]] = []
    seen: dict[str, int] = {}
    for row in rows:
        turn = seen.get(row["task_key"], 0)
        seen[row["task_key"]] = turn + 1
        if turn == len(rounds):
            rounds.append([])
        rounds[turn].append(row)
    for batch in rounds:
        conn.execute(_upsert(conn.dialect.name), batch)


@functools.cache
def _upsert(dialect: str) -> Any:
    stmt = insert_for(dialect)(Task)
    excluded = stmt.excluded
    table = Task.__table__.c
    updates: dict[str, Any] = {c: func.coalesce(excluded[c], table[c]) for c in MERGED}
    updates["first_seen_at"] = case(
        (excluded.first_seen_at < table.first_seen_at, excluded.first_seen_at),
        else_=table.first_seen_at,
    )
    updates["last_delivery_id"] = excluded.last_delivery_id
    updates["labels"] = case((excluded.labels == "{}", table.labels), else_=excluded.labels)
    return stmt.on_conflict_do_update(index_elements=["task_key"], set_=updates)
