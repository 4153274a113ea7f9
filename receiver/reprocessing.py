"""Reprocessing: rebuild derived rows from the raw ledger, for `receiver reprocess` and the console.

Choosing deliveries and running them through the pipeline again are one
library call each, so the command line and the console's "reprocess" buttons
do exactly the same thing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Engine, select

from receiver.models import Delivery
from receiver.processing import process_delivery
from receiver.states import DeliveryStatus


@dataclass(frozen=True)
class ReprocessSelection:
    """Which deliveries to reprocess; the fields combine with AND. Copies are never chosen."""

    hook: str | None = None
    since: dt.datetime | None = None
    quarantined: bool = False
    #: Only quarantined deliveries with exactly this reason.
    reason: str | None = None
    ids: Sequence[str] = ()


def select_deliveries(engine: Engine, selection: ReprocessSelection) -> list[str]:
    """The ids ``selection`` names, oldest first."""
    query = (
        select(Delivery.id)
        .where(Delivery.status != DeliveryStatus.DUPLICATE.value)
        .order_by(Delivery.id)
    )
    if selection.hook:
        query = query.where(Delivery.hook == selection.hook)
    if selection.since is not None:
        query = query.where(Delivery.received_at >= selection.since)
    if selection.quarantined or selection.reason is not None:
        query = query.where(Delivery.status == DeliveryStatus.QUARANTINED.value)
    if selection.reason is not None:
        query = query.where(Delivery.reason == selection.reason)
    if selection.ids:
        query = query.where(Delivery.id.in_(list(selection.ids)))
    with engine.connect() as conn:
        return list(conn.scalars(query))


@dataclass
class ReprocessReport:
    """How many deliveries were reprocessed and what each became."""

    deliveries: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    #: Reason of each delivery still quarantined, by id.
    reasons: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        return {"deliveries": self.deliveries, **self.outcomes}


def reprocess(
    engine: Engine,
    delivery_ids: Sequence[str],
    *,
    max_depth: int,
    progress: Callable[[int], None] | None = None,
) -> ReprocessReport:
    """Process ``delivery_ids`` again, one at a time (idempotent); ``progress`` gets each count
    done."""
    report = ReprocessReport(deliveries=len(delivery_ids))
    for done, delivery_id in enumerate(delivery_ids, 1):
        outcome = process_delivery(engine, delivery_id, max_depth=max_depth)
        report.outcomes[outcome.status] = report.outcomes.get(outcome.status, 0) + 1
        if outcome.reason is not None:
            report.reasons[delivery_id] = outcome.reason
        if progress is not None:
            progress(done)
    return report
