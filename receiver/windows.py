"""The export's windows: up to when a run goes, and which days it must rewrite.

``until`` stops short of the oldest delivery not yet processed and of the
last ``lag`` seconds (`export_until`). Deliveries (re)processed below a
dataset's watermark since its last run are found on the partial index over
``deliveries.processed_at`` (`reprocessed_days`), and those the last run
exported in their current state are recorded so the next run skips them
(`exported_recently`); see `receiver.export` for the whole story.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, and_, func, select, union

from receiver.db import utc_day_text, utcnow
from receiver.models import Delivery, Task
from receiver.states import DeliveryStatus

if TYPE_CHECKING:
    from receiver.export import Dataset


def export_until(engine: Engine, lag: dt.timedelta, now: dt.datetime | None = None) -> dt.datetime:
    """The end of this run's window: ``lag`` before ``now``, but before any delivery not yet
    processed."""
    until = (now or utcnow()) - lag
    with engine.connect() as conn:
        pending = conn.scalar(
            select(func.min(Delivery.received_at)).where(Delivery.status == DeliveryStatus.STORED)
        )
    if pending is not None:
        until = min(until, aware(pending))
    return until


def reprocessed_days(
    engine: Engine,
    manifest: dict[str, Any],
    running: list[Dataset],
    lowers: dict[str, dt.datetime | None],
    since: dt.datetime | None,
    processed_until: dt.datetime,
) -> dict[str, set[str]]:
    """Per dataset, the UTC days to rewrite: where deliveries it exported were (re)processed since.

    A dataset's window of ``processed_at`` runs from the mark its last run recorded
    (an older manifest: its watermark) to ``processed_until``; deliveries the last run
    exported in their current state (same ``processed_at``) do not count. One query, on
    the partial index over ``processed_at``.
    """

    marks: dict[str, str] = manifest.get("processed_marks", {})
    seen_state: dict[str, Any] = manifest.get("processed_seen") or {}
    seen: dict[str, str] = seen_state.get("deliveries", {})
    windows: dict[str, tuple[dt.datetime, dt.datetime, bool]] = {}
    for dataset in running:
        lower = lowers[dataset.name]
        mark = marks.get(dataset.name) or manifest["watermarks"].get(dataset.name)
        if lower is None or dataset.name not in manifest["watermarks"] or mark is None:
            continue  # nothing exported yet: this run writes every day it has
        applies = seen_state.get("at") is not None and seen_state.get("at") == marks.get(
            dataset.name
        )
        windows[dataset.name] = (dt.datetime.fromisoformat(mark), lower, applies)
    if not windows:
        return {}
    first = min(w[0] for w in windows.values())
    below = max(w[1] for w in windows.values())
    if first >= processed_until:
        return {}
    query = select(Delivery.id, Delivery.hook, Delivery.received_at, Delivery.processed_at).where(
        Delivery.processed_at >= first,
        Delivery.processed_at < processed_until,
        Delivery.received_at < below,
    )
    if since is not None:  # rows before it are not this destination's
        query = query.where(Delivery.received_at >= since)
    with engine.connect() as conn:
        found = [
            (r.id, r.hook, aware(r.received_at), aware(r.processed_at)) for r in conn.execute(query)
        ]
    out: dict[str, set[str]] = {}
    by_ids: dict[frozenset[str], set[str]] = {}  # tasks and the rollups ask alike
    for dataset in running:
        if dataset.name not in windows or not found:
            continue
        start, lower, applies = windows[dataset.name]
        picked = [
            (id_, received)
            for id_, hook, received, processed in found
            if processed >= start
            and received < lower
            and (dataset.hook is None or hook == dataset.hook)
            and not (applies and seen.get(id_) == processed.isoformat())
        ]
        if not picked:
            continue
        if dataset.mode == "append":
            out[dataset.name] = {received.date().isoformat() for _, received in picked}
        else:  # tasks and the rollups: the days of those deliveries' tasks
            ids = frozenset(id_ for id_, _ in picked)
            if ids not in by_ids:
                by_ids[ids] = task_days(engine, ids)
            days = by_ids[ids]
            if days:
                out[dataset.name] = days
    return out


def exported_recently(
    engine: Engine,
    lowers: list[dt.datetime | None],
    until: dt.datetime,
    processed_until: dt.datetime,
) -> dict[str, str]:
    """Deliveries every running dataset exports in full, processed at or after ``processed_until``.

    Recorded so the next run, whose window starts there, does not take them for
    reprocessed: read before the datasets, so a later processing shows as a new
    ``processed_at``. Few: about the delivery rate times the lag.
    """

    if not lowers:
        return {}
    query = select(Delivery.id, Delivery.processed_at).where(
        Delivery.processed_at >= processed_until, Delivery.received_at < until
    )
    known = [lower for lower in lowers if lower is not None]
    if known:
        query = query.where(Delivery.received_at >= max(known))
    with engine.connect() as conn:
        return {r.id: aware(r.processed_at).isoformat() for r in conn.execute(query)}


def task_day(engine: Engine) -> Any:
    """A task's ``first_seen_at`` UTC day as ``YYYY-MM-DD`` text, in SQL."""

    return utc_day_text(engine, Task.first_seen_at)


#: Delivery ids per ``IN`` list when looking up their tasks.
_IDS_PER_QUERY = 500


def task_days(engine: Engine, delivery_ids: frozenset[str]) -> set[str]:
    """Days of the tasks these deliveries last updated or now belong to."""

    day = task_day(engine)
    ids = sorted(delivery_ids)
    out: set[str] = set()
    with engine.connect() as conn:
        for i in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[i : i + _IDS_PER_QUERY]
            last = select(day).where(Task.last_delivery_id.in_(chunk))
            owner = (
                select(day)
                .select_from(Task)
                .join(Delivery, and_(Delivery.hook == Task.hook, Delivery.task_id == Task.task_id))
                .where(Delivery.id.in_(chunk))
            )
            out.update(conn.scalars(union(last, owner)))
    return out


def day_ranges(days: set[str]) -> list[tuple[dt.date, dt.date]]:
    """``days`` as runs of consecutive days, first and last of each."""
    ranges: list[tuple[dt.date, dt.date]] = []
    for day in sorted(dt.date.fromisoformat(d) for d in days):
        if ranges and ranges[-1][1] + dt.timedelta(days=1) == day:
            ranges[-1] = (ranges[-1][0], day)
        else:
            ranges.append((day, day))
    return ranges


def day_start(day: dt.date, dataset: Dataset) -> dt.datetime | dt.date:
    """The bound a day starts at in the dataset's time column (a date for the rollups)."""
    if dataset.time_column == "day":
        return day
    return dt.datetime.combine(day, dt.time(), dt.UTC)


def aware(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
