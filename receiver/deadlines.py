"""Timeouts for the hot path that arm no timer per request.

``asyncio.timeout`` arms a timer per use: under uvloop a libuv timer started
and stopped in C plus a Python handle. With two per delivery (the body read
and the ledger wait) py-spy put them at a tenth of the event loop's time
under load (`bench.profile`). Here every timeout of one length waits in one
queue, in deadline order, and a single timer per loop ticks while any is
pending. A timeout fires up to ``resolution`` seconds late, nothing against
the 10-15 s it guards. Expiry works as in ``asyncio.timeout``: the task is
cancelled, and that cancellation surfaces as ``TimeoutError`` at the end of
the block; anyone else's cancellation stays a cancellation.
"""

from __future__ import annotations

import asyncio
import collections
from types import TracebackType

#: How often pending deadlines are checked: the most a timeout can fire late.
RESOLUTION_SECONDS = 0.25


class Deadlines:
    """The shared clock of an app; `timeout` gives the context managers."""

    def __init__(self, resolution: float = RESOLUTION_SECONDS) -> None:
        self.resolution = resolution
        # Per length, timeouts expire in the order they began.
        self._queues: dict[float, collections.deque[Timeout]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticking = False

    def timeout(self, seconds: float) -> Timeout:
        """``async with deadlines.timeout(s):`` raises ``TimeoutError`` after about ``s``."""
        return Timeout(self, seconds)

    def pending(self) -> int:
        return sum(1 for queue in self._queues.values() for t in queue if not t.finished)

    def _add(self, timeout: Timeout, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:  # served again on a new loop (tests, a new lifespan)
            self._loop, self._queues, self._ticking = loop, {}, False
        queue = self._queues.get(timeout.seconds)
        if queue is None:
            queue = self._queues[timeout.seconds] = collections.deque()
        queue.append(timeout)
        if not self._ticking:
            self._ticking = True
            loop.call_later(self.resolution, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:
            return
        now = loop.time()
        for queue in self._queues.values():
            while queue and (queue[0].finished or queue[0].deadline <= now):
                timeout = queue.popleft()
                if not timeout.finished:
                    timeout.expire()
        if any(self._queues.values()):
            loop.call_later(self.resolution, self._tick, loop)
        else:
            self._ticking = False


class Timeout:
    """One guarded block; see `Deadlines.timeout`."""

    __slots__ = ("_deadlines", "_task", "deadline", "expired", "finished", "seconds")

    def __init__(self, deadlines: Deadlines, seconds: float) -> None:
        self._deadlines = deadlines
        self.seconds = seconds
        self.deadline = 0.0
        self.expired = False
        self.finished = False
        self._task: asyncio.Task[object] | None = None

    async def __aenter__(self) -> Timeout:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        if self._task is None:
            raise RuntimeError("a Timeout must be used inside a task")
        self.deadline = loop.time() + self.seconds
        self._deadlines._add(self, loop)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finished = True
        if self.expired and exc_type is asyncio.CancelledError:
            assert self._task is not None
            if self._task.uncancel() == 0:  # ours alone: a shutdown's stays a cancellation
                raise TimeoutError from exc

    def expire(self) -> None:
        self.finished = True
        self.expired = True
        if self._task is not None:
            self._task.cancel()
