"""Normalise an `Envelope` into the task it speaks of: a ``task_events`` row, and the
``tasks`` row that dashboards read, refolded from all of that task's events.

Several deliveries speak of one task (a full record, a ping, a late guardrail,
a poll answer); each leaves its event, and `receiver.lifecycle.fold` makes the
row, so the row is the same whatever order they came in and a reprocess
rebuilds it. Which task an event joins is decided here (`write_events`): a bare
``task_id`` joins the one task with that id, and a later ``session_id``
completes that same row.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, case, delete, func, insert, select, update

from receiver.classify import Envelope, Kind
from receiver.db import insert_for
from receiver.lifecycle import fold
from receiver.lifecycle import task_key as lifecycle_key
from receiver.models import Task, TaskEvent, TaskFile, TaskNetwork

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
    return lifecycle_key(session_id, task_id, "")


def event_row(
    envelope: Envelope,
    *,
    hook: str,
    labels: Mapping[str, str],
    delivery_id: str,
    received_at: dt.datetime,
) -> dict[str, Any] | None:
    """The ``task_events`` row this delivery makes, or None when it speaks of no task.

    A task record always does, ids or not; an ``ai_response`` only when labelled
    with a ``task_id``. ``task_key`` is left for `write_events` to decide.
    """
    session_id, task_id = task_ids(envelope, labels)
    if envelope.kind is Kind.AI_RESPONSE and task_id is None:
        return None
    usage = envelope.usage
    return {
        "delivery_id": delivery_id,
        "task_key": None,
        "hook": hook,
        "session_id": session_id,
        "task_id": task_id,
        "received_at": received_at,
        "kind": envelope.kind.value,
        "status": envelope.status.value if envelope.status else None,
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
        "labels": json.dumps(dict(labels), ensure_ascii=False),
        "extra": json.dumps(envelope.extra, ensure_ascii=False) if envelope.extra else None,
    }


class _Known:
    """The tasks named by a batch's task ids, as they stand, so events can join them."""

    def __init__(self, conn: Connection, task_ids: set[str]) -> None:
        self.by_task: dict[str, set[str | None]] = {}
        if task_ids:
            query = select(Task.session_id, Task.task_id).where(Task.task_id.in_(task_ids))
            for session_id, task_id in conn.execute(query):
                if task_id is not None:
                    self.by_task.setdefault(task_id, set()).add(session_id)
        self.renames: list[tuple[str, str, str]] = []

    def resolve(self, session_id: str | None, task_id: str) -> str:
        sessions = self.by_task.setdefault(task_id, set())
        if session_id is None:
            # A bare task_id joins the one task with that id; none or several: its own row.
            if len(sessions) == 1:
                return lifecycle_key(next(iter(sessions)), task_id, "")
            sessions.add(None)
            return lifecycle_key(None, task_id, "")
        if session_id not in sessions and sessions == {None}:
            # The task was known by its task_id alone: this session_id completes that row.
            old = lifecycle_key(None, task_id, "")
            new = lifecycle_key(session_id, task_id, "")
            self.renames.append((old, new, session_id))
            sessions.clear()
        sessions.add(session_id)
        return lifecycle_key(session_id, task_id, "")


def write_events(conn: Connection, events: Sequence[dict[str, Any]]) -> None:
    """Store each delivery's event on the task it joins, then refold those tasks."""
    known = _Known(conn, {e["task_id"] for e in events if e["task_id"] is not None})
    for event in events:
        if event["task_id"] is None:
            event["task_key"] = lifecycle_key(None, None, event["delivery_id"])
        else:
            event["task_key"] = known.resolve(event["session_id"], event["task_id"])
    renamed = {old: new for old, new, _ in known.renames}
    for event in events:  # an earlier event of this batch may name the renamed task
        event["task_key"] = renamed.get(event["task_key"], event["task_key"])
    for old, new, session_id in known.renames:
        conn.execute(
            update(Task).where(Task.task_key == old).values(task_key=new, session_id=session_id)
        )
        for model in (TaskEvent, TaskFile, TaskNetwork):
            conn.execute(update(model).where(model.task_key == old).values(task_key=new))
    ids = [e["delivery_id"] for e in events]
    conn.execute(delete(TaskEvent).where(TaskEvent.delivery_id.in_(ids)))
    conn.execute(insert(TaskEvent), list(events))
    refold(conn, {e["task_key"] for e in events})


def delete_events(conn: Connection, delivery_id: str) -> None:
    """Forget what a delivery said about its task (a rerun, a quarantine) and refold it."""
    keys = set(conn.scalars(select(TaskEvent.task_key).where(TaskEvent.delivery_id == delivery_id)))
    if keys:
        conn.execute(delete(TaskEvent).where(TaskEvent.delivery_id == delivery_id))
        refold(conn, keys)


def refold(conn: Connection, keys: set[str]) -> None:
    """Recompute the ``tasks`` rows of ``keys`` from their events; none left: no row."""
    if not keys:
        return
    grouped: dict[str, list[dict[str, Any]]] = {}
    query = select(TaskEvent.__table__).where(
        TaskEvent.task_key.in_(bindparam("keys", expanding=True))
    )
    for row in conn.execute(query, {"keys": sorted(keys)}):
        grouped.setdefault(row.task_key, []).append(dict(row._mapping))
    gone = keys - grouped.keys()
    if gone:
        conn.execute(delete(Task).where(Task.task_key.in_(sorted(gone))))
    rows = [fold(key, grouped[key]) for key in sorted(grouped)]
    if rows:
        conn.execute(_replace(conn.dialect.name), rows)


@functools.cache
def _replace(dialect: str) -> Any:
    stmt = insert_for(dialect)(Task)
    columns = [c.name for c in Task.__table__.c if c.name != "task_key"]
    return stmt.on_conflict_do_update(
        index_elements=["task_key"], set_={c: stmt.excluded[c] for c in columns}
    )


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
