"""Memory bounded and returned: a budget for body bytes in hand, and giving freed memory back.

Without a bound, 50 concurrent 9 MiB bodies took a server from 90 MB to
1.7 GB, and it stayed there: every body was read, joined, handed to the
driver and held for the pipeline at once, and glibc's allocator kept the
freed memory for later. Now:

- `BodyBudget`: a request holds its body's bytes (Content-Length, or as read)
  against ``RECEIVER_MEMORY_BUDGET_BYTES`` from reading until the ledger has
  committed it. Past the budget, a new body waits (up to `BUDGET_WAIT_SECONDS`,
  inside WebRun's 30 s: the socket's flow control holds the sender) and
  then is refused with ``503`` and ``Retry-After``. Bodies below `SMALL_BODY`
  never wait: the connection cap bounds them. Bodies committed and waiting
  for the pipeline are bounded apart (``receiver.pipeline.HELD_BYTES``).
- `return_memory_to_the_os`: large allocations are kept out of the heap
  (glibc ``mallopt(M_MMAP_THRESHOLD)``: a big body is its own mapping, unmapped
  when freed), and after a burst ``malloc_trim(0)`` gives the rest back
  (at once and again over the next half minute, while the pipeline works).
  That is not enough alone: a database connection keeps the last parameters
  of each cached statement (SQLite: a copy of the body), so the ledger and the
  pipeline close a connection that wrote a `LARGE_BODY` (`closes_after`).
  Measured by ``python -m bench.memory`` (bench/README).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
import time
from collections.abc import Iterable

log = logging.getLogger("receiver.memory")

#: How long a body waits for room in the budget before it is refused.
BUDGET_WAIT_SECONDS = 20.0
#: Bodies this small are counted but never wait (the connection cap bounds them).
SMALL_BODY = 64 * 1024
#: glibc's mallopt parameter for the mmap threshold (malloc.h).
_M_MMAP_THRESHOLD = -3
#: Allocations from this size get their own mapping, returned to the OS when freed.
MMAP_THRESHOLD = 1 << 20
#: After a burst of at least this many bytes, the heap is trimmed when the budget empties.
TRIM_AFTER_BYTES = 32 * 2**20
#: When to trim after a burst (seconds): at once, then as the pipeline works through it.
TRIM_SCHEDULE = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


#: A body this large is not kept by a database connection after it is written (see
#: `closes_after`): SQLite's statements keep their last parameters, a copy of the body each.
LARGE_BODY = 1 << 20


def closes_after(sizes: Iterable[int]) -> bool:
    """Whether a connection that wrote bodies of ``sizes`` should be closed, not kept."""
    return any(size >= LARGE_BODY for size in sizes)


class OverBudget(Exception):
    """No room for a body within the budget after waiting."""


class BodyBudget:
    """Bytes of request bodies in hand, at most ``limit`` (one event loop's requests)."""

    def __init__(self, limit: int, wait_seconds: float = BUDGET_WAIT_SECONDS) -> None:
        self.limit = limit
        self.wait_seconds = wait_seconds
        self.held = 0
        self.peak = 0
        self.waited = 0
        self.refused = 0
        self._since_trim = 0
        self._freed: asyncio.Event | None = None

    async def acquire(self, size: int) -> None:
        """Hold ``size`` more bytes; wait for room, or raise `OverBudget` after waiting."""
        if size >= SMALL_BODY and self.held + size > self.limit:
            self.waited += 1
            deadline = time.monotonic() + self.wait_seconds
            while self.held + size > self.limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.refused += 1
                    raise OverBudget
                if self._freed is None:
                    self._freed = asyncio.Event()
                self._freed.clear()
                try:
                    await asyncio.wait_for(self._freed.wait(), remaining)
                except TimeoutError:
                    continue
        self.hold(size)

    def hold(self, size: int) -> None:
        """Count ``size`` bytes already in hand, without waiting."""
        self.held += size
        self.peak = max(self.peak, self.held)
        self._since_trim += size

    def release(self, size: int) -> None:
        """Give back ``size`` bytes; when the budget empties after a burst, trim the heap."""
        self.held -= size
        if self._freed is not None:
            self._freed.set()
        if self.held == 0 and self._since_trim >= TRIM_AFTER_BYTES:
            self._since_trim = 0
            threading.Thread(target=_trim_after_burst, name="malloc-trim", daemon=True).start()


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def return_memory_to_the_os() -> bool:
    """Give big allocations their own mappings (glibc only); False where there is no glibc."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def _trim_after_burst() -> None:
    began = time.monotonic()
    for at in TRIM_SCHEDULE:
        time.sleep(max(0.0, began + at - time.monotonic()))
        trim_heap()


def trim_heap() -> None:
    """``malloc_trim(0)``: give the freed pages of every arena back to the OS (glibc only)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
