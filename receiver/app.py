"""The ASGI application: `create_app(settings)` wires engine, ledger and pipeline."""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from receiver import endpoints
from receiver.auth import Authenticator
from receiver.connections import LIMITS_KEY, ConnectionLimits, default_max_connections
from receiver.db import check_schema, create_db_engine
from receiver.deadlines import Deadlines
from receiver.hooknames import HookLimit
from receiver.ledger import Ledger, RawDelivery, Recorded
from receiver.logs import DeliveryLine, configure_logging, dropped_lines, log_delivery
from receiver.memory import BodyBudget, return_memory_to_the_os
from receiver.metrics import OTHER_REASON, REJECT_REASONS, Metrics
from receiver.openapi import openapi_document
from receiver.pipeline import Pipeline
from receiver.processor import ProcessPipeline
from receiver.retention import RetentionWorker
from receiver.settings import Settings
from receiver.spool import Spool, SpoolDrainer
from receiver.states import DeliveryStatus
from receiver.workers import Supervised

if TYPE_CHECKING:
    from receiver.reconcile import Reconciler


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    processing: bool = True,
    ledger_wait_seconds: float = endpoints.LEDGER_WAIT_SECONDS,
    body_read_seconds: float = endpoints.BODY_READ_SECONDS,
) -> Starlette:
    """The receiver app. The schema must be migrated (`receiver db upgrade`; `serve` does it).

    ``processing`` False gives the HTTP edge and the ledger alone: deliveries
    are committed and stay ``stored`` until a process with processing takes them
    (its next start, `receiver reprocess`); the bench measures ingest so. The two
    waits bound how long a request waits for the ledger before spooling and for
    its body before a 408 (shorter in tests that provoke them).
    """
    engine = engine or create_db_engine(settings)
    # The spool is read at scrape time and only if there is one.
    metrics = Metrics(
        spool=lambda: getattr(app.state, "spool", None),
        scraped={
            "receiver_log_lines_dropped_total": (
                "Log lines dropped because the log could not be written (closed, full, blocked).",
                dropped_lines,
            ),
            "receiver_connections_open": ("Open client connections.", lambda: limits.open),
            "receiver_connections_refused_total": (
                "Connections refused with 503 + Retry-After: the cap reached, all busy.",
                lambda: limits.refused,
            ),
            "receiver_connections_evicted_total": (
                "Connections closed at the cap while still waiting for a request head.",
                lambda: limits.evicted,
            ),
            "receiver_connections_head_timeouts_total": (
                "Connections closed for not sending a request head in time.",
                lambda: limits.head_timeouts,
            ),
            "receiver_body_budget_held_bytes": (
                "Bytes of request bodies in hand (read, not yet committed).",
                lambda: budget.held,
            ),
            "receiver_body_budget_peak_bytes": (
                "Most bytes of request bodies in hand at once since start.",
                lambda: budget.peak,
            ),
            "receiver_body_budget_waits_total": (
                "Large bodies that waited for room in the memory budget.",
                lambda: budget.waited,
            ),
            "receiver_body_budget_refused_total": (
                "Large bodies refused with 503 + Retry-After: no room in the budget in time.",
                lambda: budget.refused,
            ),
            "receiver_hook_names_refused_total": (
                "Deliveries to a name that is not a hook name (404).",
                lambda: hook_limit.names_refused,
            ),
            "receiver_hooks_refused_total": (
                "Deliveries to an unknown hook not created: RECEIVER_MAX_HOOKS reached or"
                " RECEIVER_CREATE_HOOKS false (404).",
                lambda: hook_limit.over_limit,
            ),
            "receiver_thread_restarts_total": (
                "Restarts of the ledger writer, pipeline and spool drainer after an exception.",
                lambda: sum(w.restarts.count for w in workers.values()),
            ),
        },
        reconciler=lambda: getattr(app.state, "reconciler", None),
    )
    pipeline: Pipeline | ProcessPipeline
    if settings.processing == "process":
        pipeline = ProcessPipeline(settings, engine, on_processed=metrics.delivery_processed)
    else:
        pipeline = Pipeline(
            engine,
            max_depth=settings.max_depth,
            max_body_bytes=settings.max_body_bytes,
            on_processed=metrics.delivery_processed,
            busy=lambda: ledger.busy(),
        )

    def committed(deliveries: Sequence[RawDelivery], results: list[Recorded]) -> None:
        if processing:
            stored = zip(deliveries, results, strict=True)
            pipeline.submit_committed(d for d, r in stored if r.status == DeliveryStatus.STORED)

    ledger = Ledger(engine, on_committed=committed)
    spool = Spool(settings.data_dir / "spool")
    drainer = SpoolDrainer(spool, engine, on_committed=committed)
    retention = (
        None
        if settings.retention is None
        else RetentionWorker(engine, settings.retention, busy=lambda: ledger.busy())
    )

    # /readyz fails while one of these is not running (receiver.workers).
    workers: dict[str, Supervised] = {"ledger-writer": ledger, "spool-drainer": drainer}
    if processing:
        workers["pipeline"] = pipeline
    hook_limit = HookLimit(engine, settings.max_hooks, settings.create_hooks)
    budget = BodyBudget(max(settings.memory_budget_bytes, settings.max_body_bytes))
    limits = ConnectionLimits(
        settings.max_connections or default_max_connections(), settings.head_timeout_seconds
    )
    # Only with RECEIVER_WEBRUN_URL set: otherwise no outbound call at all.
    reconciler = reconciler_for(settings, engine, ledger, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        check_schema(engine)
        if processing:
            pipeline.start()
        ledger.start()
        if processing:
            pipeline.submit_unprocessed()
        drainer.start()  # deliveries spooled before a crash or restart go in first
        if retention is not None:
            retention.start()
        if reconciler is not None:
            reconciler.start()
        try:
            # uvicorn hands this state to every connection (receiver.connections).
            yield {LIMITS_KEY: limits}
        finally:
            if retention is not None:
                retention.stop()
            # uvicorn has let in-flight requests finish; commit what is queued, then process it.
            if reconciler is not None:
                reconciler.stop()
                reconciler.client.close()
            drainer.stop()
            ledger.stop()
            if processing:
                pipeline.stop()

    receive = observed(endpoints.receive_delivery, metrics)
    document = openapi_document(settings.max_body_bytes)

    async def metrics_endpoint(request: Request) -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    async def openapi_endpoint(request: Request) -> Response:
        return JSONResponse(document)

    routes: list[BaseRoute] = [
        Route("/hooks/{name}", receive, methods=["POST"]),
        # A trailing slash is the same hook: answered, never redirected (WebRun drops a 3xx).
        Route("/hooks/{name}/", receive, methods=["POST"]),
        Route("/healthz", endpoints.healthz, methods=["GET"]),
        Route("/readyz", endpoints.readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi_endpoint, methods=["GET"]),
    ]
    if settings.console_token:
        from receiver.console import create_console  # Jinja2 is loaded only for a console

        async def to_console(request: Request) -> Response:
            return RedirectResponse("/console/")

        routes.append(Route("/console", to_console, methods=["GET"]))
        console = create_console(settings, engine, spool)
        routes.append(Mount("/console", app=console, name="console"))
    app = Starlette(routes=routes, lifespan=lifespan)
    app.router.redirect_slashes = False
    app.state.settings = settings
    app.state.engine = engine
    app.state.ledger = ledger
    app.state.pipeline = pipeline
    app.state.metrics = metrics
    app.state.spool = spool
    app.state.spool_drainer = drainer
    app.state.retention = retention
    app.state.connection_limits = limits
    app.state.body_budget = budget
    app.state.hook_limit = hook_limit
    app.state.workers = workers
    app.state.reconciler = reconciler
    app.state.ledger_wait_seconds = ledger_wait_seconds
    app.state.body_read_seconds = body_read_seconds
    app.state.deadlines = Deadlines()
    app.state.authenticator = Authenticator(engine, settings.tokens, settings.auth_cache_seconds)
    return app


def reconciler_for(
    settings: Settings, engine: Engine, ledger: Ledger, metrics: Metrics | None = None
) -> Reconciler | None:
    """The reconciler `serve` runs beside ingest, or None when RECEIVER_WEBRUN_URL is unset."""
    if settings.webrun_url is None:
        return None
    from receiver.reconcile import Reconciler
    from receiver.webrun import WebRunClient

    on_call = metrics.reconcile_call if metrics is not None else None
    client = WebRunClient.from_settings(settings)
    return Reconciler(engine, settings, client, ledger.record_sync, on_call=on_call)


def observed(
    endpoint: Callable[[Request], Awaitable[Response]], metrics: Metrics
) -> Callable[[Request], Awaitable[Response]]:
    """``endpoint`` counted in ``metrics`` and logged, one line per delivery, from its answer."""

    async def observe(request: Request) -> Response:
        started = time.perf_counter()
        response: Response | None = None
        try:
            response = await endpoint(request)
            return response
        finally:
            seconds = time.perf_counter() - started
            http_status = 500 if response is None else response.status_code
            status: str | None = None
            delivery_id: str | None = None
            if response is not None and http_status == 200:
                status, delivery_id = getattr(request.state, "answer", (None, None))
            metrics.delivery_answered(http_status, status, delivery_id, seconds)
            size = getattr(request.state, "body_size", None)
            declared = request.headers.get("content-length", "")
            log_delivery(
                DeliveryLine(
                    hook=request.path_params.get("name", ""),
                    status=status or "rejected",
                    http_status=http_status,
                    size=size
                    if size is not None
                    else int(declared)
                    if declared.isdigit()
                    else None,
                    ms=seconds * 1e3,
                    delivery_id=delivery_id,
                    reason=None if status else REJECT_REASONS.get(http_status, OTHER_REASON),
                )
            )

    return observe


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory`` and multi-worker `serve`: settings from the environment."""
    settings = Settings.from_env()
    configure_logging(settings.log_format)
    app = create_app(settings)
    settle_heap()
    return app


def settle_heap() -> None:
    """Keep what a server builds at start out of the cyclic collector's full passes.

    Modules, metadata and caches live as long as the process, yet every full
    collection walked them all, stalling the event loop: with them frozen the
    PostgreSQL ingest bench's p99 went from 87 to 36 ms (bench A/B, two rounds).
    For servers only: a test process that builds many apps would keep their garbage.
    """
    gc.collect()
    gc.freeze()
    return_memory_to_the_os()  # big bodies in mappings of their own (receiver.memory)
