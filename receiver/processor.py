"""The pipeline in a process of its own (``RECEIVER_PROCESSING=process``).

One process has one GIL: in-thread processing takes its turns with the event
loop and the ledger writer, so under a sustained stream the two share one
core. `ProcessPipeline` stands in for `receiver.pipeline.Pipeline`: committed
delivery ids go to a child process over a pipe, the child runs a `Pipeline`
of its own (bodies read back from the ledger: only ids cross), and every
outcome comes back for ``/metrics`` and `join`. The ledger, its commit and
the 200 do not change: a child that dies loses nothing, it is started again
and what is still ``stored`` is queued anew.
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from typing import Any

from sqlalchemy import Engine

from receiver.ledger import RawDelivery
from receiver.pipeline import Pipeline, unprocessed_ids
from receiver.settings import Settings
from receiver.workers import RESTART_SECONDS, Restarts

log = logging.getLogger("receiver.processor")


class ProcessPipeline:
    """`Pipeline`'s interface, with the processing done in a child process."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        on_processed: Callable[[str, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        #: Told ``(delivery_id, outcome)`` for each delivery the child processed.
        self.on_processed = on_processed
        self.restarts = Restarts()
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._send = threading.Lock()
        self._done = threading.Condition()
        self._pending = 0
        self._stopping = False

    def start(self) -> None:
        if self._process is None:
            self._spawn()

    def _spawn(self) -> None:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=run_child, args=(self.settings, theirs), name="receiver-pipeline", daemon=True
        )
        process.start()
        theirs.close()
        self._process, self._conn = process, ours
        self._reader = threading.Thread(
            target=self._read, args=(ours,), name="pipeline-outcomes", daemon=True
        )
        self._reader.start()

    def submit(self, delivery_ids: Iterable[str]) -> None:
        ids = list(delivery_ids)
        if not ids or self._conn is None:
            return
        with self._done:
            self._pending += len(ids)
        try:
            with self._send:
                self._conn.send(ids)
        except OSError:  # the child is gone: `_read` restarts it and requeues what is stored
            with self._done:
                self._pending -= len(ids)

    def submit_committed(self, deliveries: Iterable[RawDelivery]) -> None:
        self.submit(d.id for d in deliveries)

    def submit_unprocessed(self, received_before: dt.datetime | None = None) -> int:
        """Queue deliveries committed but never processed (a crash, a child that died)."""
        ids = unprocessed_ids(self.engine, received_before)
        self.submit(ids)
        return len(ids)

    def held(self) -> int:
        """Bodies in hand: none (the child reads them back)."""
        return 0

    def join(self) -> None:
        """Wait until every submitted delivery has been processed (or the child is gone)."""
        with self._done:
            self._done.wait_for(lambda: self._pending <= 0 or not self.alive())

    def alive(self) -> bool:
        return self._process is None or bool(self._process.is_alive())

    def stop(self) -> None:
        """Let the child finish what it was sent, then stop it."""
        if self._process is None or self._conn is None:
            return
        self._stopping = True
        try:
            with self._send:
                self._conn.send(None)
        except OSError:
            pass
        self._process.join(60)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10)
        if self._reader is not None:
            self._reader.join(10)
        self._conn.close()
        self._process = self._conn = self._reader = None

    def _read(self, conn: Connection) -> None:
        """Outcomes from the child, until it ends; a child that dies is started again."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            delivery_id, outcome = message
            if self.on_processed is not None:
                self.on_processed(delivery_id, outcome)
            with self._done:
                self._pending -= 1
                if self._pending <= 0:
                    self._done.notify_all()
        with self._done:
            self._done.notify_all()
        if self._stopping:
            return
        self.restarts.count += 1
        code = self._process.exitcode if self._process is not None else None
        log.error("the pipeline process ended (exit code %s); starting it again", code)
        threading.Event().wait(RESTART_SECONDS)
        with self._done:
            self._pending = 0
        self._spawn()
        self.submit_unprocessed()


def run_child(settings: Settings, conn: Connection) -> None:
    """The child: a `Pipeline` fed with ids from ``conn``, its outcomes sent back."""
    from receiver.db import create_db_engine
    from receiver.logs import configure_logging

    # Ctrl-C reaches the whole process group: the parent stops this child in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(settings.log_format)
    engine = create_db_engine(settings)
    sending = threading.Lock()

    def processed(delivery_id: str, outcome: str) -> None:
        with sending:
            conn.send((delivery_id, outcome))

    pipeline = Pipeline(
        engine,
        max_depth=settings.max_depth,
        max_body_bytes=settings.max_body_bytes,
        on_processed=processed,
    )
    pipeline.start()
    try:
        while True:
            try:
                ids = conn.recv()
            except EOFError:  # the parent is gone
                break
            if ids is None:
                break
            pipeline.submit(ids)
    finally:
        pipeline.stop()
        conn.close()
        engine.dispose()
