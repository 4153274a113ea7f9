"""The receiver's exceptions.

ReceiverError
├── Quarantine        a stored body we cannot make sense of (kept, flagged, answered 2xx)
├── LedgerUnavailable the database cannot take the raw delivery (so it goes to the spool)
├── SpoolUnavailable  the spool cannot make it durable either (answered 503, never 2xx)
├── SpoolCorrupt      a spool file is not a complete, intact delivery (moved aside, kept)
├── SchemaOutOfDate   the database is behind the migrations (``receiver db upgrade``)
├── SettingsError     a ``RECEIVER_*`` variable has a value the receiver cannot use
├── DestinationBusy   another export to the same folder is running (``receiver export``)
└── WebRunError       WebRun's API refused or did not answer a call (``receiver run``, reconcile)
"""

from __future__ import annotations


class ReceiverError(Exception):
    """Base of everything the receiver raises on purpose."""


class Quarantine(ReceiverError):
    """The body is stored but cannot be turned into facts; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LedgerUnavailable(ReceiverError):
    """The raw delivery could not be committed."""


class SchemaOutOfDate(ReceiverError):
    """The database schema is older than this code's migrations."""


class SettingsError(ReceiverError, ValueError):
    """A setting's value is not one of those it may take (the message names the variable)."""


class SpoolUnavailable(ReceiverError):
    """The spool could not make a delivery durable (disk full, folder unwritable)."""


class SpoolCorrupt(ReceiverError):
    """A spool file is not a complete, intact delivery."""


class DestinationBusy(ReceiverError):
    """Another export to the same destination holds its lock."""


class WebRunError(ReceiverError):
    """A WebRun API call failed: ``status`` is the HTTP status (None: no answer at all)."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
