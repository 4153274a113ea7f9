"""One line for each error a user can cause: what went wrong and what to do.

The CLI shows `explain(error)` instead of a traceback (which stays behind
``--debug``). Driver errors are recognised by their SQLSTATE or message, and a
database URL is shown without its password.
"""

from __future__ import annotations

import re

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from receiver.db import describe_url
from receiver.errors import ReceiverError

UPGRADE_HINT = "run `receiver db upgrade`"

#: Messages that mean "this database has no receiver schema (or an older one)".
_MISSING_SCHEMA = re.compile(r"no such table|no such column|does not exist|UndefinedTable")


def where(database_url: str) -> str:
    """The database a URL names, for a person: ``PostgreSQL at host:5432/db`` or a file path."""
    try:
        url = make_url(database_url)
    except sa_exc.ArgumentError:
        return "the database (RECEIVER_DATABASE_URL does not parse as a URL)"
    return describe_url(url)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _driver_reason(error: sa_exc.DBAPIError) -> str:
    """The driver's own first line, without SQLAlchemy's wrapping or the statement."""
    reason = _first_line(str(error.orig))
    # psycopg: 'connection failed: connection to server at "..." failed: <why>'
    return reason.rsplit("failed: ", 1)[-1] if "connection" in reason else reason


def explain(error: BaseException, database_url: str | None = None) -> str | None:
    """A one-line explanation of ``error``, or None when it is not one a user can cause."""
    if isinstance(error, ReceiverError):
        return _first_line(str(error)) or type(error).__name__
    if isinstance(error, sa_exc.DBAPIError):
        reason = _driver_reason(error)
        target = where(database_url) if database_url else "the database"
        if _MISSING_SCHEMA.search(str(error.orig)):
            return f"{target} has no receiver schema or an older one ({reason}): {UPGRADE_HINT}"
        if error.connection_invalidated or isinstance(error, sa_exc.OperationalError):
            return f"cannot use {target}: {reason}"
        return f"{target} refused a statement: {reason}"
    if isinstance(error, sa_exc.ArgumentError | sa_exc.NoSuchModuleError):
        return f"RECEIVER_DATABASE_URL is not usable: {_first_line(str(error))}"
    if isinstance(error, OSError) and error.strerror:
        name = f" {error.filename}" if error.filename else ""
        return f"cannot use{name}: {error.strerror}"
    return None
