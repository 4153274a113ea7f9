"""The no-store ceiling for ingest: Starlette that checks the header, reads the body, answers.

Nothing is stored, so nothing is durable: this is what one uvicorn worker and
Starlette allow on this machine for the same POST, the limit group commit can
approach but never pass (issue 18). Served like the baseline and the variants:
``python -m bench.baseline --port N --factory bench.ceiling:app_from_env``
(the same ``uvicorn.run`` call and ``UVICORN_OPTIONS`` as ``receiver serve``).
"""

from __future__ import annotations

import os

from starlette.applications import Starlette

from bench.baseline import bare_app


def create_ceiling(token: bytes) -> Starlette:
    """The bare app: 401 without the token, else 200 once the whole body is read."""
    return bare_app(token, None)


def app_from_env() -> Starlette:
    """Factory: ``BENCH_TOKEN``, the Authorization value to accept."""
    return create_ceiling(os.environ["BENCH_TOKEN"].encode())
