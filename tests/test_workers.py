"""Threads that must live survive any exception, and /readyz says when one is not running."""

from __future__ import annotations

import queue
import threading

from starlette.testclient import TestClient

from receiver.workers import QueueWorker


class Flaky(QueueWorker[int]):
    """Raises on its first item, then records every item it gets."""

    thread_name = "flaky"

    def __init__(self) -> None:
        super().__init__(queue.SimpleQueue())
        self.seen: list[int] = []
        self.done = threading.Event()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if item == 0:
                raise RuntimeError("a bug in the loop")
            self.seen.append(item)
            if item == 3:
                self.done.set()


def test_a_worker_that_raises_is_restarted() -> None:
    worker = Flaky()
    worker.start()
    for item in (0, 1, 2, 3):
        worker._queue.put(item)
    assert worker.done.wait(30)
    assert worker.seen == [1, 2, 3]
    assert worker.restarts.count == 1
    assert worker.alive()
    worker.stop()


def test_readyz_fails_while_a_worker_is_not_running(client: TestClient) -> None:
    assert client.get("/readyz").status_code == 200
    pipeline = client.app.state.pipeline  # type: ignore[attr-defined]
    pipeline.stop()  # as if its thread had died
    pipeline._thread = threading.Thread(target=lambda: None)
    pipeline._thread.start()
    pipeline._thread.join()
    answer = client.get("/readyz")
    assert answer.status_code == 503
    assert answer.json() == {"error": "not running: pipeline"}
    pipeline._thread = None
