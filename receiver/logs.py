"""One log line per delivery: hook, status, size, time taken, delivery id.

Plain (``key=value``) or JSON (``RECEIVER_LOG_FORMAT=json``). A line is built
from a `DeliveryLine`, which has no field for a header or a body, so neither
a token nor a payload can reach the log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from typing import TextIO

#: Logger of the per-delivery lines; everything the receiver logs is under ``receiver``.
DELIVERY_LOGGER = "receiver.deliveries"
_HANDLER_NAME = "receiver-log-handler"
#: Longest hook name written to a line (a refused one can be anything).
_MAX_HOOK = 128


def _plain_value(value: object) -> str:
    text = str(value)
    if text and text.isprintable() and " " not in text and '"' not in text and "=" not in text:
        return text
    return json.dumps(text)


@dataclass(frozen=True, slots=True)
class DeliveryLine:
    """What is logged about one POST to ``/hooks/{name}``.

    Logged as the record's message itself, so the plain text is only built
    when a plain handler formats it: this runs once per delivery, on the
    event loop.
    """

    hook: str
    status: str  # stored | duplicate | spooled | rejected
    http_status: int
    size: int | None
    ms: float
    delivery_id: str | None = None
    reason: str | None = None

    def fields(self) -> dict[str, object]:
        return {
            "hook": self.hook[:_MAX_HOOK],
            "status": self.status,
            "http_status": self.http_status,
            "size": self.size,
            "ms": round(self.ms, 1),
            "delivery_id": self.delivery_id,
            "reason": self.reason,
        }

    def plain(self) -> str:
        parts = [
            f"{key}={_plain_value(value)}"
            for key, value in self.fields().items()
            if value is not None
        ]
        return "delivery " + " ".join(parts)

    __str__ = plain


def log_delivery(line: DeliveryLine) -> None:
    logger = logging.getLogger(DELIVERY_LOGGER)
    if logger.isEnabledFor(logging.INFO):
        logger.info(line, extra={"delivery": line.fields()})


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a delivery line carries its fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        delivery = getattr(record, "delivery", None)
        if isinstance(delivery, dict):
            out["event"] = "delivery"
            out.update(delivery)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


#: Longest a line waits in the buffer (warnings and errors are written at once).
FLUSH_SECONDS = 0.1
#: Most bytes of lines held for the writer: past it a line is dropped (and counted).
MAX_BUFFERED_BYTES = 1 << 20


class BufferedStderrHandler(logging.StreamHandler[TextIO]):
    """Lines to stderr, written out in batches by a thread of their own.

    Python's stderr is line buffered: a write per line, and each write lets go
    of the GIL, which the ledger and pipeline threads then hold for up to a
    switch interval. At a few thousand deliveries a second that cost a fifth of
    ingest throughput (bench, PostgreSQL). Here `emit` only appends the line to
    a bounded buffer; a writer thread writes it out at most `FLUSH_SECONDS`
    later (warnings and errors wake it at once, close writes everything).

    Only the writer thread ever touches the stream, so a log that cannot be
    written (a closed pipe, a full disk, a reader that stopped reading) stalls
    or fails that thread alone: the lines are dropped and counted in `dropped`
    (``receiver_log_lines_dropped_total``), never raised into a request, the
    ledger or the pipeline. A ``kill -9`` can lose the last tenth of a second
    of log lines, never a delivery.
    """

    def __init__(
        self, interval: float = FLUSH_SECONDS, max_buffered: int = MAX_BUFFERED_BYTES
    ) -> None:
        stream = open(  # noqa: SIM115 - lives as long as the handler; fd 2 is not ours to close
            sys.stderr.fileno(),
            "w",
            buffering=1 << 16,
            encoding="utf-8",
            errors="backslashreplace",
            closefd=False,
        )
        super().__init__(stream)
        self.interval = interval
        self.max_buffered = max_buffered
        #: Lines that could not be written (or held), since start.
        self.dropped = 0
        self._lines: list[str] = []
        self._size = 0
        self._buffer_lock = threading.Lock()
        self._stream_lock = threading.Lock()
        self._wake = threading.Event()
        self._written = threading.Condition()
        self._writes = 0
        threading.Thread(target=self._write_periodically, name="log-writer", daemon=True).start()

    def flush(self) -> None:
        """Have the writer write what is buffered (`logging.shutdown` calls this at exit)."""
        self.flush_now()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:  # a record that cannot be formatted: not the caller's problem
            self._drop(1)
            return
        with self._buffer_lock:
            if self._size + len(line) > self.max_buffered:
                self.dropped += 1
                return
            self._lines.append(line)
            self._size += len(line)
        if record.levelno >= logging.WARNING:
            self._wake.set()

    def _drop(self, lines: int) -> None:
        with self._buffer_lock:
            self.dropped += lines

    def flush_now(self, timeout: float = 1.0) -> None:
        """Have the writer write what is buffered; wait for it up to ``timeout`` seconds."""
        with self._written:
            target = self._writes + 1
            self._wake.set()
            self._written.wait_for(lambda: self._writes >= target, timeout)

    def setStream(self, stream: TextIO) -> TextIO | None:
        self.flush_now()
        with self._stream_lock:
            if stream is self.stream:
                return None
            old, self.stream = self.stream, stream
            return old

    def close(self) -> None:
        self.flush_now()
        super().close()

    def _write_out(self) -> None:
        with self._buffer_lock:
            lines, self._lines, self._size = self._lines, [], 0
        if not lines:
            return
        # Not the handler's own lock: `logging.shutdown` holds that while it waits for us.
        with self._stream_lock:
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except Exception:  # stderr gone or full: nothing to tell it to
                self._drop(len(lines))
                with contextlib.suppress(Exception):  # discard what the stream still holds
                    self.stream = self._fresh(self.stream)

    @staticmethod
    def _fresh(stream: TextIO) -> TextIO:
        """A new buffered writer on ``stream``'s descriptor: the old one keeps failing bytes."""
        return open(
            stream.fileno(),
            "w",
            buffering=1 << 16,
            encoding="utf-8",
            errors="backslashreplace",
            closefd=False,
        )

    def _write_periodically(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            with contextlib.suppress(Exception):  # never let the writer die
                self._write_out()
            with self._written:
                self._writes += 1
                self._written.notify_all()


def dropped_lines() -> int:
    """Log lines the ``receiver`` handler could not write since the process started."""
    handler = next(
        (h for h in logging.getLogger("receiver").handlers if h.get_name() == _HANDLER_NAME), None
    )
    return handler.dropped if isinstance(handler, BufferedStderrHandler) else 0


def _flush_before_termination(handler: BufferedStderrHandler) -> None:
    """On SIGTERM, write the buffered lines out, then die of it as before.

    uvicorn shuts down, puts back the handler it found and raises the signal
    again; with the default handler the process dies with no ``atexit``, and
    the last lines (uvicorn's "Application shutdown complete") with it.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # someone else's handler (or ours already)

    def flush_then_die(signum: int, frame: object) -> None:
        with contextlib.suppress(Exception):
            handler.flush_now(timeout=2.0)
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

    signal.signal(signal.SIGTERM, flush_then_die)


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Send the ``receiver`` loggers to stderr in ``log_format`` (idempotent)."""
    logger = logging.getLogger("receiver")
    handler = next((h for h in logger.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = BufferedStderrHandler()
        handler.set_name(_HANDLER_NAME)
        logger.addHandler(handler)
    # uvicorn's own lines (startup, an error in the app) go the same safe way.
    server = logging.getLogger("uvicorn")
    for old in [h for h in server.handlers if h.get_name() == _HANDLER_NAME]:
        server.removeHandler(old)
    server.addHandler(handler)
    server.setLevel(logging.INFO)
    server.propagate = False
    if isinstance(handler, BufferedStderrHandler):
        _flush_before_termination(handler)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger.setLevel(level)
    logger.propagate = False
