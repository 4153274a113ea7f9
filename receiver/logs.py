"""One log line per delivery: hook, status, size, time taken, delivery id.

Plain (``key=value``) or JSON (``RECEIVER_LOG_FORMAT=json``). A line is built
from a `DeliveryLine`, which has no field for a header or a body, so neither
a token nor a payload can reach the log.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass

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


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Send the ``receiver`` loggers to stderr in ``log_format`` (idempotent)."""
    logger = logging.getLogger("receiver")
    handler = next((h for h in logger.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.set_name(_HANDLER_NAME)
        logger.addHandler(handler)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger.setLevel(level)
    logger.propagate = False
