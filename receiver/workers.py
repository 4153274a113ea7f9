"""The one shape of background thread the receiver runs: a queue and a sentinel.

The ledger writer and the pipeline both take items from a queue in their own
daemon thread; `stop` puts ``None`` on the queue and waits, so everything
queued before it is finished first.
"""

from __future__ import annotations

import queue
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueWorker(Generic[T]):
    """Runs `_run` in a named daemon thread; items arrive on ``self._queue``."""

    thread_name = "worker"

    def __init__(self, items: queue.SimpleQueue[T | None] | queue.Queue[T | None]) -> None:
        self._queue = items
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish what is queued, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        raise NotImplementedError
