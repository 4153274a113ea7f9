"""Diagnostic variants of the receiver, built without editing it, to locate its costs.

Each is an app factory for ``python -m bench.baseline --factory bench.variants:NAME``.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.applications import Starlette

import receiver.app
from receiver.settings import Settings


class _IdlePipeline:
    """Stands in for `receiver.pipeline.Pipeline`: accepts ids and processes nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def submit(self, delivery_ids: Iterable[str]) -> None:
        for _ in delivery_ids:
            pass

    def submit_unprocessed(self) -> int:
        return 0


def receiver_without_pipeline() -> Starlette:
    """The receiver's HTTP edge and ledger only: what ingest costs with processing deferred."""
    # Swapped on the module, in this process only: the receiver itself is not edited.
    setattr(receiver.app, "Pipeline", _IdlePipeline)  # noqa: B010
    return receiver.app.create_app(Settings.from_env())
