"""One log line per delivery: hook, status, size, time taken, delivery id.

Plain (``key=value``) or JSON (``RECEIVER_LOG_FORMAT=json``). A line is built
from a `DeliveryLine`, which has no field for a header or a body, so neither
a token nor a payload can reach the log.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import threading
import time
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


class BufferedStderrHandler(logging.StreamHandler[TextIO]):
    """Lines to stderr, written out in batches rather than one write(2) each.

    Python's stderr is line buffered: a write per line, and each write lets go
    of the GIL, which the ledger and pipeline threads then hold for up to a
    switch interval. At a few thousand deliveries a second that cost a fifth of
    ingest throughput (bench, PostgreSQL). Here lines gather in a 64 KiB buffer
    that a flusher thread writes out at most `FLUSH_SECONDS` later; warnings and
    errors go out at once, and so does everything on close. A ``kill -9`` can lose
    the last tenth of a second of log lines, never a delivery.
    """

    def __init__(self, interval: float = FLUSH_SECONDS) -> None:
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
        self._dirty = False
        threading.Thread(target=self._flush_periodically, name="log-flusher", daemon=True).start()

    def flush(self) -> None:
        """`emit` calls this after every line: only note that there is something to write."""
        self._dirty = True

    def flush_now(self) -> None:
        self.acquire()
        try:
            self._dirty = False
            self.stream.flush()
        finally:
            self.release()

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if record.levelno >= logging.WARNING:
            self.flush_now()

    def setStream(self, stream: TextIO) -> TextIO | None:
        self.flush_now()
        return super().setStream(stream)

    def close(self) -> None:
        self.flush_now()
        super().close()

    def _flush_periodically(self) -> None:
        while True:
            time.sleep(self.interval)
            if self._dirty:
                try:
                    self.flush_now()
                except Exception:  # stderr gone (a closed pipe): nothing to log it to
                    return


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Send the ``receiver`` loggers to stderr in ``log_format`` (idempotent)."""
    logger = logging.getLogger("receiver")
    handler = next((h for h in logger.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = BufferedStderrHandler()
        handler.set_name(_HANDLER_NAME)
        logger.addHandler(handler)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger.setLevel(level)
    logger.propagate = False
