"""The ASGI application: `create_app(settings)` wires engine, ledger and pipeline."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.routing import Route

from receiver import endpoints
from receiver.auth import Authenticator
from receiver.db import check_schema, create_db_engine
from receiver.ledger import Ledger, Recorded
from receiver.pipeline import Pipeline
from receiver.settings import Settings
from receiver.spool import Spool, SpoolDrainer


def create_app(settings: Settings, *, engine: Engine | None = None) -> Starlette:
    """The receiver app. The schema must be migrated (`receiver db upgrade`; `serve` does it)."""
    engine = engine or create_db_engine(settings)
    pipeline = Pipeline(engine, max_depth=settings.max_depth)

    def committed(results: list[Recorded]) -> None:
        pipeline.submit(r.delivery_id for r in results if r.status == "stored")

    ledger = Ledger(engine, on_committed=committed)
    spool = Spool(settings.data_dir / "spool")
    drainer = SpoolDrainer(spool, engine, on_committed=committed)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        check_schema(engine)
        pipeline.start()
        ledger.start()
        pipeline.submit_unprocessed()
        drainer.start()  # deliveries spooled before a crash or restart go in first
        try:
            yield
        finally:
            # uvicorn has let in-flight requests finish; commit what is queued, then process it.
            drainer.stop()
            ledger.stop()
            pipeline.stop()

    routes = [
        Route("/hooks/{name}", endpoints.receive_delivery, methods=["POST"]),
        # A trailing slash is the same hook: answered, never redirected (WebRun drops a 3xx).
        Route("/hooks/{name}/", endpoints.receive_delivery, methods=["POST"]),
        Route("/healthz", endpoints.healthz, methods=["GET"]),
        Route("/readyz", endpoints.readyz, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.router.redirect_slashes = False
    app.state.settings = settings
    app.state.engine = engine
    app.state.ledger = ledger
    app.state.pipeline = pipeline
    app.state.spool = spool
    app.state.spool_drainer = drainer
    app.state.ledger_wait_seconds = endpoints.LEDGER_WAIT_SECONDS
    app.state.authenticator = Authenticator(engine, settings.tokens, settings.auth_cache_seconds)
    return app


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory`` and multi-worker `serve`: settings from the environment."""
    return create_app(Settings.from_env())
