"""Diagnostic variants of the receiver, to locate its costs.

Each is an app factory for ``python -m bench.baseline --factory bench.variants:NAME``.
"""

from __future__ import annotations

from starlette.applications import Starlette

from receiver.app import create_app
from receiver.settings import Settings


def receiver_without_pipeline() -> Starlette:
    """The receiver's HTTP edge and ledger only: what ingest costs with processing deferred."""
    return create_app(Settings.from_env(), processing=False)
