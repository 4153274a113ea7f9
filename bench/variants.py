"""Diagnostic variants of the receiver, built without editing it, to locate its costs.

Each is an app factory for ``python -m bench.baseline --factory bench.variants:NAME``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from starlette.applications import Starlette

import receiver.app
from receiver.ledger import RawDelivery
from receiver.pipeline import Pipeline
from receiver.settings import Settings


class _IdlePipeline(Pipeline):
    """`receiver.pipeline.Pipeline` that accepts deliveries and processes nothing.

    A subclass, so a method the app starts calling exists here too (the variant
    must never fail where the receiver does not).
    """

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def submit(self, delivery_ids: Iterable[str]) -> None:
        pass

    def submit_committed(self, deliveries: Iterable[RawDelivery]) -> None:
        pass

    def submit_unprocessed(self, received_before: dt.datetime | None = None) -> int:
        return 0


def receiver_without_pipeline() -> Starlette:
    """The receiver's HTTP edge and ledger only: what ingest costs with processing deferred."""
    # Swapped on the module while the app is built, then put back: the receiver itself is
    # not edited, and nothing else built in this process (a test suite's apps) is idled.
    original = getattr(receiver.app, "Pipeline")  # noqa: B009 - not exported, but there
    setattr(receiver.app, "Pipeline", _IdlePipeline)  # noqa: B010
    try:
        return receiver.app.create_app(Settings.from_env())
    finally:
        setattr(receiver.app, "Pipeline", original)  # noqa: B010
