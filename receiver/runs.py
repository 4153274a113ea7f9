"""Runs: WebRun tasks the receiver launched or watches, so none goes unaccounted for.

`launch` fills in a task config's ``webhook`` (this receiver's URL for the
hook, with ``run=<id>`` so the delivery can be joined to the task; a token
valid for the hook; the ``submittedData`` mode), creates the task at WebRun
and records the run. `track` watches a task launched by another tool. The
reconciler (`receiver.reconcile`) polls WebRun for runs whose final record
has not arrived. A run's ``config`` is stored without its ``secrets``: their
values never reach a table, a log line or an export.

Example (against the fake WebRun of `receiver.fakewebrun`)::

    from receiver.runs import launch, run_token
    token = run_token(engine, settings, "shop")
    run = launch(engine, settings, client, hook="shop", config={"taskDetails": "..."}, token=token)
    print(run.id, run.session_id, run.task_id, run.state)
"""

from __future__ import annotations

import datetime as dt
import json
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Engine, insert, select, update

from receiver.correlation import RUN_LABEL
from receiver.db import utcnow
from receiver.errors import WebRunError
from receiver.ledger import new_delivery_id
from receiver.models import Delivery, Hook, Run, RunState
from receiver.settings import Settings
from receiver.states import DeliveryStatus
from receiver.webrun import WebRunClient

SUBMITTED_DATA = ("full_response", "ai_response", "just_ping")
#: WebRun's default and largest ``maxDuration``, in milliseconds.
MAX_DURATION_MS = 300_000
#: Task config keys that hold secrets: never stored.
SECRET_KEYS = frozenset({"secrets"})


@dataclass(frozen=True)
class RunInfo:
    """One row of ``runs``, as the CLI and the Python API show it."""

    id: str
    hook: str
    state: str
    origin: str
    session_id: str | None
    task_id: str | None
    created_at: dt.datetime
    expected_by: dt.datetime | None
    next_check_at: dt.datetime | None
    attempts: int
    last_error: str | None
    submitted_data: str | None
    labels: dict[str, str]
    config: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("created_at", "expected_by", "next_check_at"):
            value = out[key]
            out[key] = value.isoformat() if value is not None else None
        return out


def without_secrets(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as it may be stored: no ``secrets``, here or in a nested ``initialTask``."""
    out = {k: v for k, v in config.items() if k not in SECRET_KEYS}
    if isinstance(out.get("initialTask"), Mapping):
        out["initialTask"] = without_secrets(out["initialTask"])
    return out


def webhook_query(run_id: str, labels: Mapping[str, str]) -> str:
    """The webhook URL's query string: ``run=<id>`` first, then the user's labels."""
    pairs = [(RUN_LABEL, run_id), *((k, v) for k, v in labels.items() if k != RUN_LABEL)]
    return urllib.parse.urlencode(pairs)


def webhook_url(public_url: str, hook: str, query: str) -> str:
    return f"{public_url.rstrip('/')}/hooks/{urllib.parse.quote(hook, safe='')}?{query}"


def _info(row: Any) -> RunInfo:
    return RunInfo(
        id=row.id,
        hook=row.hook,
        state=row.state,
        origin=row.origin,
        session_id=row.session_id,
        task_id=row.task_id,
        created_at=row.created_at,
        expected_by=row.expected_by,
        next_check_at=row.next_check_at,
        attempts=row.attempts,
        last_error=row.last_error,
        submitted_data=row.submitted_data,
        labels=json.loads(row.labels),
        config=json.loads(row.config) if row.config is not None else None,
    )


def ensure_hook(engine: Engine, hook: str) -> None:
    """Create ``hook`` if it does not exist (a token for it needs the row)."""
    with engine.begin() as conn:
        if conn.scalar(select(Hook.name).where(Hook.name == hook)) is None:
            conn.execute(insert(Hook).values(name=hook, created_at=utcnow()))


def run_token(engine: Engine, settings: Settings, hook: str) -> str:
    """The ``auth`` a launch gives WebRun: the first RECEIVER_TOKEN (valid on every hook),
    else a new token of ``hook`` (stored as its hash only, like `hooks add`'s)."""
    from receiver import auth

    ensure_hook(engine, hook)
    if settings.tokens:
        return settings.tokens[0].decode()
    return auth.add_token(engine, hook)


def launch(
    engine: Engine,
    settings: Settings,
    client: WebRunClient,
    *,
    hook: str,
    config: Mapping[str, Any],
    token: str,
    submitted_data: str = "full_response",
    labels: Mapping[str, str] | None = None,
) -> RunInfo:
    """Create a task at WebRun whose webhook comes to ``hook``, and record its run.

    The run is recorded before WebRun is called, so a webhook that arrives
    before the answer already finds it; then it gets the ids (``launched``) or
    WebRun's refusal (``launch_failed``, the reason in ``last_error``). Raises
    `WebRunError` after recording a refusal.
    """
    if submitted_data not in SUBMITTED_DATA:
        raise ValueError(f"submittedData must be one of {', '.join(SUBMITTED_DATA)}")
    labels = dict(labels or {})
    run_id = new_delivery_id()
    query = webhook_query(run_id, labels)
    sent = {
        **dict(config),
        "webhook": {
            "name": hook,
            "url": webhook_url(settings.public_url, hook, query),
            "auth": token,
            "submittedData": submitted_data,
        },
    }
    stored = without_secrets(sent)
    stored["webhook"] = {**stored["webhook"], "auth": "(a token of the hook, not stored)"}
    duration = config.get("maxDuration", MAX_DURATION_MS)
    duration_ms = duration if isinstance(duration, int | float) else MAX_DURATION_MS
    now = utcnow()
    grace = dt.timedelta(seconds=settings.reconcile_grace_seconds)
    expected_by = now + dt.timedelta(milliseconds=duration_ms) + grace
    with engine.begin() as conn:
        conn.execute(
            insert(Run).values(
                id=run_id,
                hook=hook,
                created_at=now,
                origin="launched",
                config=json.dumps(stored, ensure_ascii=False),
                submitted_data=submitted_data,
                labels=json.dumps(labels, ensure_ascii=False),
                session_id=None,
                task_id=None,
                expected_by=expected_by,
                next_check_at=expected_by,
                state=RunState.LAUNCHED,
                attempts=0,
                last_error=None,
                updated_at=now,
            )
        )
    try:
        created = client.run_task(sent)
    except WebRunError as exc:
        _set(engine, run_id, state=RunState.LAUNCH_FAILED, last_error=str(exc), next_check_at=None)
        raise
    values: dict[str, Any] = {"session_id": created.session_id, "task_id": created.task_id}
    if created.status == "complete":
        # It has finished: its webhook is due now, and the record can be polled.
        values["expected_by"] = values["next_check_at"] = utcnow() + grace
    _set(engine, run_id, **values)
    _reprocess_early(engine, settings.max_depth, hook, run_id, now)
    found = show(engine, run_id)
    assert found is not None
    return found


def _reprocess_early(
    engine: Engine, max_depth: int, hook: str, run_id: str, since: dt.datetime
) -> None:
    """Deliveries of this run processed before its ids were known get them now.

    A task that finishes within run-task's wait sends its webhook before the
    answer reaches us: processed then, an ``ai_response`` had no ids to join.
    """
    from receiver.processing import process_deliveries

    prefix = webhook_query(run_id, {})
    with engine.connect() as conn:
        early = list(
            conn.scalars(
                select(Delivery.id).where(
                    Delivery.hook == hook,
                    Delivery.received_at >= since,
                    Delivery.query_string.startswith(prefix, autoescape=True),
                    Delivery.task_id.is_(None),
                    Delivery.status != DeliveryStatus.DUPLICATE,
                )
            )
        )
    if early:
        process_deliveries(engine, early, max_depth=max_depth)


def _set(engine: Engine, run_id: str, **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == run_id).values(updated_at=utcnow(), **values))


def track(
    engine: Engine,
    settings: Settings,
    *,
    session_id: str,
    task_id: str,
    hook: str,
    max_duration_ms: int = MAX_DURATION_MS,
    created_at: dt.datetime | None = None,
) -> RunInfo:
    """Watch a task launched by another tool; an already known task keeps its run."""
    with engine.begin() as conn:
        existing = conn.scalar(
            select(Run.id).where(Run.session_id == session_id, Run.task_id == task_id)
        )
        if existing is None:
            existing = new_delivery_id()
            now = utcnow()
            grace = dt.timedelta(seconds=settings.reconcile_grace_seconds)
            expected_by = (created_at or now) + dt.timedelta(milliseconds=max_duration_ms) + grace
            conn.execute(
                insert(Run).values(
                    tracked_row(existing, hook, session_id, task_id, expected_by, now)
                )
            )
    found = show(engine, existing)
    assert found is not None
    return found


def tracked_row(
    run_id: str,
    hook: str,
    session_id: str | None,
    task_id: str,
    expected_by: dt.datetime,
    now: dt.datetime,
    *,
    labels: Mapping[str, str] | None = None,
    state: RunState = RunState.LAUNCHED,
    next_check_at: dt.datetime | None = None,
) -> dict[str, Any]:
    """The ``runs`` row of a task launched elsewhere; due at ``expected_by`` unless told."""
    return {
        "id": run_id,
        "hook": hook,
        "created_at": now,
        "origin": "tracked",
        "config": None,
        "submitted_data": None,
        "labels": json.dumps(dict(labels or {}), ensure_ascii=False),
        "session_id": session_id,
        "task_id": task_id,
        "expected_by": expected_by,
        "next_check_at": (next_check_at or expected_by) if state == RunState.LAUNCHED else None,
        "state": state,
        "attempts": 0,
        "last_error": None,
        "updated_at": now,
    }


def show(engine: Engine, run_id: str) -> RunInfo | None:
    """The run ``run_id``, or None."""
    with engine.connect() as conn:
        row = conn.execute(select(Run.__table__).where(Run.id == run_id)).first()
    return _info(row) if row is not None else None


def list_runs(
    engine: Engine,
    *,
    states: Sequence[str] = (),
    hook: str | None = None,
    limit: int = 100,
) -> list[RunInfo]:
    """The newest runs, optionally of some states and one hook."""
    query = select(Run.__table__).order_by(Run.created_at.desc(), Run.id.desc()).limit(limit)
    if states:
        query = query.where(Run.state.in_(list(states)))
    if hook is not None:
        query = query.where(Run.hook == hook)
    with engine.connect() as conn:
        return [_info(row) for row in conn.execute(query)]
