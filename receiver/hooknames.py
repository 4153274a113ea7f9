"""Which hooks may exist: a name pattern, and a limit on hooks created on first use.

A hook name is a URL path segment and becomes part of table names, so it is
held to `HOOK_NAME` (``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``: no ``.`` or ``..``,
no spaces, no ``%``-escapes of anything else); any other name is answered
``404`` with the pattern in the reason, before any lookup. A global token
creates a hook on first use, at most ``RECEIVER_MAX_HOOKS`` of them (counted
over all hooks, however made); with ``RECEIVER_CREATE_HOOKS=false`` only
hooks made by ``receiver hooks add`` receive deliveries. Both refusals are
``404`` with a reason, and counted in ``/metrics``.

The count is read from the database at most every few seconds, so with
several workers creating hooks at once the limit may be passed by a few.
"""

from __future__ import annotations

import re
import time

from sqlalchemy import Engine, func, select

from receiver.models import Hook

HOOK_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
HOOK_NAME = re.compile(HOOK_NAME_PATTERN)
MAX_HOOK_NAME = 64
DEFAULT_MAX_HOOKS = 1000
#: How long the hook count is trusted before it is read again.
COUNT_SECONDS = 5.0


def valid_hook_name(name: str) -> bool:
    return HOOK_NAME.fullmatch(name) is not None


#: The 404 reason for a name that does not match `HOOK_NAME`.
NAME_REFUSAL = f"not a hook name: hook names match {HOOK_NAME_PATTERN}"


class HookLimit:
    """Whether one more hook may be created on first use (the count cached for a few seconds)."""

    def __init__(self, engine: Engine, max_hooks: int, create_on_first_use: bool) -> None:
        self.engine = engine
        self.max_hooks = max_hooks
        self.create_on_first_use = create_on_first_use
        self.names_refused = 0
        self.over_limit = 0
        self._count = 0
        self._read_at = -COUNT_SECONDS

    def stale(self) -> bool:
        return time.monotonic() - self._read_at >= COUNT_SECONDS

    def refresh(self) -> None:
        """Read the number of hooks. Blocking I/O."""
        with self.engine.connect() as conn:
            self._count = conn.scalar(select(func.count()).select_from(Hook)) or 0
        self._read_at = time.monotonic()

    def refusal(self) -> str | None:
        """Why a new hook may not be created now, or None (and it is counted as made)."""
        if not self.create_on_first_use:
            return "unknown hook: create it first with `receiver hooks add` (RECEIVER_CREATE_HOOKS)"
        if self._count >= self.max_hooks:
            return (
                f"unknown hook, and {self.max_hooks} hooks exist (RECEIVER_MAX_HOOKS):"
                " create it with `receiver hooks add`"
            )
        self._count += 1
        return None
