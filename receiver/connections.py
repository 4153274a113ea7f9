"""Connections bounded: a request head must arrive in time, and open connections are capped.

uvicorn closes a keep-alive connection left idle and times out nothing else:
a client that sends part of a head, or nothing, holds its descriptor for ever,
and a few hundred of them exhaust the process's open-file limit so that every
new delivery fails at the TCP level, unlogged. `BoundedHttpProtocol` is
uvicorn's httptools protocol with two additions, driven by the
`ConnectionLimits` the app's lifespan hands it (``app_state``):

- a connection must deliver a complete request head within ``head_seconds``
  of opening (and of its previous response): otherwise it is closed;
- at most ``max_connections`` are open, below the file limit. A new one past
  the cap first evicts the oldest connection still waiting for its head (a
  stalled client, or an idle keep-alive one), so ordinary deliveries keep
  getting in during a slowloris; only when every connection is busy with a
  request is the new one refused with ``503`` and ``Retry-After`` (logged,
  counted in ``/metrics``).

Partial bodies are the endpoint's business (``408`` after 15 s, receiver.endpoints).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import OrderedDict
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("receiver.connections")

#: Key of the `ConnectionLimits` in the lifespan state uvicorn hands every protocol.
LIMITS_KEY = "receiver.connection_limits"
#: Descriptors left for everything but client connections: database, spool, logs, imports.
RESERVED_FILES = 128
#: Seconds a refused client is asked to wait.
RETRY_AFTER_SECONDS = 1
_REFUSAL_BODY = b'{"error":"too many open connections"}'
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: application/json\r\n"
    + f"retry-after: {RETRY_AFTER_SECONDS}\r\n".encode()
    + f"content-length: {len(_REFUSAL_BODY)}\r\n".encode()
    + b"connection: close\r\n\r\n"
    + _REFUSAL_BODY
)


def default_max_connections() -> int:
    """The open-file limit less `RESERVED_FILES` (at least 16)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(16, soft - RESERVED_FILES)


class ConnectionLimits:
    """The cap and the head deadline, and what they did (read by /metrics)."""

    def __init__(self, max_connections: int, head_seconds: float) -> None:
        self.max_connections = max_connections
        self.head_seconds = head_seconds
        self.open = 0
        self.refused = 0
        self.evicted = 0
        self.head_timeouts = 0
        #: Connections waiting for a request head, oldest first.
        self.waiting: OrderedDict[BoundedHttpProtocol, None] = OrderedDict()
        self._logged_at = 0.0
        self._unlogged = 0

    def make_room(self) -> bool:
        """Below the cap, or made so by closing the oldest connection waiting for its head."""
        if self.open < self.max_connections:
            return True
        if not self.waiting:
            return False
        oldest, _ = self.waiting.popitem(last=False)
        self.evicted += 1
        oldest.close_waiting()
        return True

    def note_refused(self) -> None:
        """Count a refusal; log at most one line a second (a flood must not flood the log)."""
        self.refused += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= 1.0:
            log.warning(
                "refused %d connection(s) with 503: %d open, all busy (cap %d)",
                self._unlogged,
                self.open,
                self.max_connections,
            )
            self._logged_at, self._unlogged = now, 0


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol under `ConnectionLimits` (none in the state: unchanged)."""

    _limits: ConnectionLimits | None = None
    _head_timer: asyncio.TimerHandle | None = None
    _refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        limits: Any = self.app_state.get(LIMITS_KEY)
        if not isinstance(limits, ConnectionLimits):
            super().connection_made(transport)
            return
        if not limits.make_room():
            self._refused = True
            limits.note_refused()
            transport.write(REFUSAL)
            transport.close()
            return
        self._limits = limits
        limits.open += 1
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        if self._limits is not None:
            self._head_arrived()
            self._limits.open -= 1
            self._limits = None
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._head_arrived()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_head()

    def close_waiting(self) -> None:
        """Close this connection, which has not sent a request head (evicted or timed out)."""
        self._head_arrived()
        self.transport.close()

    def _await_head(self) -> None:
        limits = self._limits
        if limits is None:
            return
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(limits.head_seconds, self._head_timed_out)
        limits.waiting[self] = None
        limits.waiting.move_to_end(self)

    def _head_arrived(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._limits is not None:
            self._limits.waiting.pop(self, None)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._limits is not None:
            self._limits.head_timeouts += 1
        self.close_waiting()
