"""The one shape of background thread the receiver runs: a queue and a sentinel.

The ledger writer and the pipeline both take items from a queue in their own
daemon thread; `stop` puts ``None`` on the queue and waits, so everything
queued before it is finished first. A thread that must live is `supervised`:
an exception that escapes its loop is logged (when the log can take it) and
the loop restarted, and ``/readyz`` answers 503 while one is not running.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")

log = logging.getLogger("receiver.workers")

#: Pause before a failed loop is started again (a fault that repeats must not spin).
RESTART_SECONDS = 0.5


class Restarts:
    """How often each supervised thread was restarted after an exception (for /metrics)."""

    def __init__(self) -> None:
        self.count = 0


def supervised(
    run: Callable[[], None], name: str, restarts: Restarts, pause: float = RESTART_SECONDS
) -> Callable[[], None]:
    """``run`` restarted whenever it raises; it returns only when ``run`` returns."""

    def loop() -> None:
        while True:
            try:
                run()
                return
            except Exception:
                restarts.count += 1
                log.exception("thread %s failed; restarting it", name)
                time.sleep(pause)

    return loop


class Supervised(Protocol):
    """A background worker /readyz asks after and /metrics counts restarts of."""

    restarts: Restarts

    def alive(self) -> bool: ...


class QueueWorker(Generic[T]):
    """Runs `_run` in a named, supervised daemon thread; items arrive on ``self._queue``."""

    thread_name = "worker"

    def __init__(self, items: queue.SimpleQueue[T | None] | queue.Queue[T | None]) -> None:
        self._queue = items
        self._thread: threading.Thread | None = None
        self.restarts = Restarts()

    def start(self) -> None:
        if self._thread is None:
            target = supervised(self._run, self.thread_name, self.restarts)
            self._thread = threading.Thread(target=target, name=self.thread_name, daemon=True)
            self._thread.start()

    def alive(self) -> bool:
        """Started and running (or never started: nothing to be ready for)."""
        return self._thread is None or self._thread.is_alive()

    def stop(self) -> None:
        """Finish what is queued, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        raise NotImplementedError
