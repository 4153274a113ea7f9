"""HTTP endpoints: read the body within the limit, authenticate, record, answer.

Nothing here parses a payload: a 2xx means the raw bytes are committed, and
everything else happens after, in `pipeline`.
"""

from __future__ import annotations

import contextlib
import logging
import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from receiver.auth import Authenticator
from receiver.deadlines import Deadlines, Timeout
from receiver.errors import LedgerUnavailable, SpoolUnavailable
from receiver.hooknames import NAME_REFUSAL, HookLimit, valid_hook_name
from receiver.ledger import Ledger, RawDelivery
from receiver.memory import BodyBudget, OverBudget
from receiver.redaction import redact_headers, redact_query
from receiver.spool import Spool

log = logging.getLogger("receiver.http")

#: How long a request waits for the database before it spools (WebRun gives up after 30 s).
LEDGER_WAIT_SECONDS = 10.0
#: How long a client may take to send its body: a stuck client cannot hold a slot forever.
BODY_READ_SECONDS = 15.0
#: Seconds a client refused for want of memory is asked to wait.
RETRY_AFTER_SECONDS = 1
#: Request headers never written to the ledger.
SECRET_HEADERS = frozenset({b"authorization", b"proxy-authorization"})


class BodyTooLarge(Exception):
    pass


def _error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = None if retry_after is None else {"Retry-After": str(retry_after)}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _accepted(request: Request, delivery_id: str, status: str) -> Response:
    """The 200 for a committed (or spooled) delivery, as JSONResponse would render it.

    Built by hand because it is answered once per delivery on the event loop;
    the answer is also left on ``request.state`` for the log line and metrics.
    """
    request.state.answer = (status, delivery_id)
    body = f'{{"delivery_id":"{delivery_id}","status":"{status}"}}'.encode()
    return Response(body, media_type="application/json")


async def read_body(request: Request, limit: int, declared: bytes | None, within: Timeout) -> bytes:
    """The body, refusing as soon as it passes ``limit`` whatever Content-Length claims."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async with within:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
    return b"".join(chunks)


class _Headers:
    """What the endpoint needs from the raw headers, read in one pass over them."""

    __slots__ = ("authorization", "content_length", "content_type", "kept")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.authorization: list[bytes] = []
        self.content_length: bytes | None = None
        self.content_type: str | None = None
        kept = []
        for key, value in raw:
            name = key.lower()
            if name in SECRET_HEADERS:
                if name == b"authorization":
                    self.authorization.append(value)
                continue
            if name == b"content-length" and self.content_length is None:
                self.content_length = value
            elif name == b"content-type" and self.content_type is None:
                self.content_type = value.decode("latin-1")
            kept.append((key.decode("latin-1"), value.decode("latin-1")))
        self.kept = tuple(kept)

    def token(self) -> bytes | None:
        """The raw Authorization bytes; several Authorization headers are refused."""
        return self.authorization[0] if len(self.authorization) == 1 else None


async def receive_delivery(request: Request) -> Response:
    state = request.app.state
    hook: str = request.path_params["name"]
    started = time.perf_counter()
    hooks: HookLimit = state.hook_limit
    if not valid_hook_name(hook):
        hooks.names_refused += 1
        return _error(404, NAME_REFUSAL)
    auth: Authenticator = state.authenticator
    wait: float = getattr(state, "ledger_wait_seconds", LEDGER_WAIT_SECONDS)
    lookup_failed = False
    if not auth.is_cached(hook):
        try:
            await auth.ensure_fresh(hook, wait)
        except Exception as exc:
            # The database is away: decide from the last known hashes and RECEIVER_TOKEN.
            log.warning("token lookup failed for hook %r: %s", hook, type(exc).__name__)
            lookup_failed = True
    headers = _Headers(request.scope["headers"])
    verdict = auth.check(hook, headers.token())
    if not verdict.ok:
        if lookup_failed:  # maybe a token we could not look up: not the client's fault
            return _error(503, "database unavailable")
        return _error(401, "missing or wrong Authorization")
    if verdict.create_hook:  # a global token for a hook not made yet (receiver.hooknames)
        if hooks.stale():
            try:
                await run_in_threadpool(hooks.refresh)
            except Exception:
                log.warning("counting hooks failed; the last count stands")
        refused = hooks.refusal()
        if refused is not None:
            # The hook may have been made since its tokens were cached: look again.
            with contextlib.suppress(Exception):
                await run_in_threadpool(auth.refresh, hook)
            verdict = auth.check(hook, headers.token())
            if verdict.create_hook or not verdict.ok:
                hooks.over_limit += 1
                return _error(404, refused)
    limit: int = state.settings.max_body_bytes
    declared = headers.content_length
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return _error(413, f"body larger than {limit} bytes")
    budget: BodyBudget = state.body_budget
    held = int(declared) if declared is not None and declared.isdigit() else 0
    try:
        await budget.acquire(held)
    except OverBudget:
        return _error(503, "too many large bodies in hand, retry shortly", RETRY_AFTER_SECONDS)
    try:
        return await _receive_body(request, hook, verdict.create_hook, headers, budget, started)
    finally:
        budget.release(held + getattr(request.state, "budget_extra", 0))


async def _receive_body(
    request: Request,
    hook: str,
    create_hook: bool,
    headers: _Headers,
    budget: BodyBudget,
    started: float,
) -> Response:
    """Read the body, within the budget already held for its declared size, and record it."""
    state = request.app.state
    deadlines: Deadlines = state.deadlines
    wait: float = getattr(state, "ledger_wait_seconds", LEDGER_WAIT_SECONDS)
    limit: int = state.settings.max_body_bytes
    body_seconds: float = getattr(state, "body_read_seconds", BODY_READ_SECONDS)
    try:
        body = await read_body(
            request, limit, headers.content_length, deadlines.timeout(body_seconds)
        )
    except BodyTooLarge:
        return _error(413, f"body larger than {limit} bytes")
    except ClientDisconnect:
        return _error(400, "client disconnected")
    except TimeoutError:
        return _error(408, f"body not received within {body_seconds:g} s")
    declared = headers.content_length
    extra = len(body) - (int(declared) if declared is not None and declared.isdigit() else 0)
    if extra > 0:  # no Content-Length (chunked): counted once read, bounded by the limit
        budget.hold(extra)
        request.state.budget_extra = extra
    request.state.body_size = len(body)  # for the delivery log line (receiver.logs)
    auth: Authenticator = state.authenticator
    delivery = RawDelivery(
        hook=hook,
        body=body,
        content_type=headers.content_type,
        # Credentials pasted into the URL or a header are masked first (receiver.redaction).
        headers=redact_headers(headers.kept),
        query_string=redact_query(
            request.scope.get("query_string", b"").decode("latin-1"),
            lambda raw: auth.check(hook, raw).ok,
        ),
        create_hook=create_hook,
    )
    ledger: Ledger = state.ledger
    try:
        recorded = await ledger.record(delivery, deadlines.timeout(wait))
    except LedgerUnavailable as exc:
        return await _spool(request, delivery, str(exc), started)
    # The per-delivery log line and metrics: `receiver.app.observed`.
    return _accepted(request, recorded.delivery_id, recorded.status)


async def _spool(request: Request, delivery: RawDelivery, why: str, started: float) -> Response:
    """Keep a delivery the database could not take on local disk; 2xx only once it is there."""
    spool: Spool = request.app.state.spool
    try:
        await run_in_threadpool(spool.append, delivery)
    except SpoolUnavailable as exc:
        log.error(
            "delivery lost hook=%s status=503 size=%d: %s; %s",
            delivery.hook,
            len(delivery.body),
            why,
            exc,
        )
        return _error(503, "database unavailable and spool not writable")
    log.warning(
        "delivery hook=%s status=spooled size=%d ms=%.1f id=%s: %s",
        delivery.hook,
        len(delivery.body),
        (time.perf_counter() - started) * 1e3,
        delivery.id,
        why,
    )
    return _accepted(request, delivery.id, "spooled")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    def ping() -> None:
        with request.app.state.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
            conn.rollback()

    workers = getattr(request.app.state, "workers", {})
    stopped = sorted(name for name, worker in workers.items() if not worker.alive())
    if stopped:
        return _error(503, f"not running: {', '.join(stopped)}")
    try:
        await run_in_threadpool(ping)
    except Exception:
        return _error(503, "database unavailable")
    return JSONResponse({"status": "ready"})
