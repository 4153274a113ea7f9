"""Settings: the only module that reads the environment.

`Settings.from_env()` is called once at the edge (CLI, app factory) and the
result is passed down, so tests build settings directly and nothing reads
``os.environ`` at import time.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from receiver.errors import SettingsError

DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
_N = TypeVar("_N", int, float)
DEFAULT_MEMORY_BUDGET_BYTES = 128 * 1024 * 1024

#: One row per setting: environment variable, default (as documented), meaning.
#: The README's settings table is generated from this and a test keeps them in step.
SETTINGS_DOC: tuple[tuple[str, str, str], ...] = (
    (
        "RECEIVER_DATABASE_URL",
        "sqlite:///data/receiver.db",
        "Any SQLAlchemy URL. `postgresql+psycopg://user@host/db` is the scale path.",
    ),
    (
        "RECEIVER_TOKEN",
        "(none)",
        "Comma-separated accepted `Authorization` values (full values, e.g. `Bearer abc`),"
        " valid on every hook. Unset and no token stored: the first `serve` makes one.",
    ),
    (
        "RECEIVER_MAX_BODY_BYTES",
        str(DEFAULT_MAX_BODY_BYTES),
        "Largest accepted body; over it: 413.",
    ),
    ("RECEIVER_DATA_DIR", "data", "Folder for the SQLite file and the spool."),
    (
        "RECEIVER_SQLITE_SYNCHRONOUS",
        "FULL",
        "SQLite `synchronous` pragma: FULL survives power loss, NORMAL only process crashes.",
    ),
    ("RECEIVER_MAX_DEPTH", "5", "JSON nesting depth flattened into columns; deeper is JSON text."),
    ("RECEIVER_LOG_FORMAT", "plain", "`plain` or `json`: one log line per delivery."),
    (
        "RECEIVER_PROCESSING",
        "thread",
        "`thread`: deliveries are processed in a thread of the server process, taking turns"
        " with ingest; `process`: in a child process of each server process (another core:"
        " see bench/README.md for what each gives).",
    ),
    ("RECEIVER_AUTH_CACHE_SECONDS", "2", "How long per-hook token hashes are cached in memory."),
    (
        "RECEIVER_RETENTION",
        "(none)",
        "Keep raw bodies this long (`30d`, `12h`): `serve` prunes older ones at start and daily."
        " Unset: forever.",
    ),
    (
        "RECEIVER_CONSOLE_TOKEN",
        "(none)",
        "Opens the web console at `/console/` (sign-in form or `Authorization: Bearer ...`)."
        " Unset: no console. Never a webhook token.",
    ),
    (
        "RECEIVER_HEAD_TIMEOUT_SECONDS",
        "5",
        "A connection must send a whole request head this soon after opening (or after its"
        " last answer), else it is closed.",
    ),
    (
        "RECEIVER_MAX_CONNECTIONS",
        "0",
        "Most open client connections; 0: the open-file limit less 128. Past it the oldest"
        " connection still waiting for its head is closed, or, if all are busy, 503 + Retry-After.",
    ),
    (
        "RECEIVER_MEMORY_BUDGET_BYTES",
        str(DEFAULT_MEMORY_BUDGET_BYTES),
        "Most bytes of request bodies in hand at once (at least the body limit). Past it a large"
        " body waits up to 20 s, then 503 + Retry-After.",
    ),
    (
        "RECEIVER_MAX_HOOKS",
        "1000",
        "Most hooks; past it a global token no longer creates a hook on first use (404).",
    ),
    (
        "RECEIVER_CREATE_HOOKS",
        "true",
        "`false`: only hooks made by `receiver hooks add` receive deliveries (others 404).",
    ),
    (
        "RECEIVER_WEBRUN_URL",
        "(none)",
        "WebRun's API base (`https://...`). Unset: no outbound call at all (no `run`, no"
        " reconciliation).",
    ),
    (
        "RECEIVER_WEBRUN_API_KEY",
        "(none)",
        "WebRun API key, sent as `Authorization: Bearer`; never logged or stored.",
    ),
    (
        "RECEIVER_PUBLIC_URL",
        "http://127.0.0.1:8000",
        "Where WebRun reaches this receiver: `receiver run` writes webhook URLs under it.",
    ),
    (
        "RECEIVER_RECONCILE_GRACE_SECONDS",
        "60",
        "A run is overdue (and polled) this long after creation + `maxDuration`.",
    ),
    (
        "RECEIVER_RECONCILE_INTERVAL_SECONDS",
        "5",
        "How often the reconciler looks for due runs; also the first backoff step.",
    ),
    (
        "RECEIVER_WEBRUN_CONCURRENCY",
        "4",
        "Most outbound WebRun requests in flight at once.",
    ),
    (
        "RECEIVER_WEBRUN_RATE",
        "5",
        "Most outbound WebRun poll requests a second (task creations also wait for WebRun's"
        " 10 a minute).",
    ),
    (
        "RECEIVER_WEBRUN_TIMEOUT_SECONDS",
        "60",
        "Timeout of one outbound WebRun request (run-task may hold 50 s for the result).",
    ),
)


@dataclass(frozen=True)
class Settings:
    """Everything the receiver is configured with."""

    database_url: str
    tokens: tuple[bytes, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    data_dir: Path = field(default_factory=lambda: Path("data"))
    sqlite_synchronous: str = "FULL"
    max_depth: int = 5
    log_format: str = "plain"
    processing: str = "thread"
    auth_cache_seconds: float = 2.0
    #: Raw bodies older than this are pruned by `serve` (`receiver.retention`); None: kept.
    retention: dt.timedelta | None = None
    console_token: str | None = None
    head_timeout_seconds: float = 5.0
    max_connections: int = 0
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
    max_hooks: int = 1000
    create_hooks: bool = True
    webrun_url: str | None = None
    #: Never logged or stored: `repr` leaves it out.
    webrun_api_key: str | None = field(default=None, repr=False)
    public_url: str = "http://127.0.0.1:8000"
    reconcile_grace_seconds: float = 60.0
    reconcile_interval_seconds: float = 5.0
    webrun_concurrency: int = 4
    webrun_rate: float = 5.0
    webrun_timeout_seconds: float = 60.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the ``RECEIVER_*`` variables (``os.environ`` by default)."""
        env = os.environ if environ is None else environ
        data_dir = Path(env.get("RECEIVER_DATA_DIR", "data"))
        url = env.get("RECEIVER_DATABASE_URL") or f"sqlite:///{data_dir / 'receiver.db'}"
        tokens = tuple(
            t.strip().encode("utf-8") for t in env.get("RECEIVER_TOKEN", "").split(",") if t.strip()
        )
        synchronous = env.get("RECEIVER_SQLITE_SYNCHRONOUS", "FULL").upper()
        if synchronous not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise SettingsError(
                "RECEIVER_SQLITE_SYNCHRONOUS must be OFF, NORMAL, FULL or EXTRA,"
                f" not {synchronous!r}"
            )
        log_format = env.get("RECEIVER_LOG_FORMAT", "plain")
        if log_format not in {"plain", "json"}:
            raise SettingsError(f"RECEIVER_LOG_FORMAT must be plain or json, not {log_format!r}")
        processing = env.get("RECEIVER_PROCESSING", "thread")
        if processing not in {"thread", "process"}:
            raise SettingsError(
                f"RECEIVER_PROCESSING must be thread or process, not {processing!r}"
            )
        create_hooks = env.get("RECEIVER_CREATE_HOOKS", "true").strip().lower()
        if create_hooks not in {"true", "false", "1", "0", "yes", "no"}:
            raise SettingsError(
                f"RECEIVER_CREATE_HOOKS must be true or false, not {create_hooks!r}"
            )
        return cls(
            database_url=url,
            tokens=tokens,
            max_body_bytes=_number(env, "RECEIVER_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, int),
            data_dir=data_dir,
            sqlite_synchronous=synchronous,
            max_depth=_number(env, "RECEIVER_MAX_DEPTH", 5, int),
            log_format=log_format,
            processing=processing,
            auth_cache_seconds=_number(env, "RECEIVER_AUTH_CACHE_SECONDS", 2.0, float),
            retention=_retention(env.get("RECEIVER_RETENTION", "")),
            console_token=env.get("RECEIVER_CONSOLE_TOKEN", "").strip() or None,
            head_timeout_seconds=_number(env, "RECEIVER_HEAD_TIMEOUT_SECONDS", 5.0, float),
            max_connections=_number(env, "RECEIVER_MAX_CONNECTIONS", 0, int),
            max_hooks=_number(env, "RECEIVER_MAX_HOOKS", 1000, int),
            create_hooks=create_hooks in {"true", "1", "yes"},
            memory_budget_bytes=_number(
                env, "RECEIVER_MEMORY_BUDGET_BYTES", DEFAULT_MEMORY_BUDGET_BYTES, int
            ),
            webrun_url=env.get("RECEIVER_WEBRUN_URL") or None,
            webrun_api_key=env.get("RECEIVER_WEBRUN_API_KEY") or None,
            public_url=env.get("RECEIVER_PUBLIC_URL") or "http://127.0.0.1:8000",
            reconcile_grace_seconds=_number(env, "RECEIVER_RECONCILE_GRACE_SECONDS", 60.0, float),
            reconcile_interval_seconds=_number(
                env, "RECEIVER_RECONCILE_INTERVAL_SECONDS", 5.0, float
            ),
            webrun_concurrency=_number(env, "RECEIVER_WEBRUN_CONCURRENCY", 4, int),
            webrun_rate=_number(env, "RECEIVER_WEBRUN_RATE", 5.0, float),
            webrun_timeout_seconds=_number(env, "RECEIVER_WEBRUN_TIMEOUT_SECONDS", 60.0, float),
        )


def _number(env: Mapping[str, str], name: str, default: _N, kind: type[_N]) -> _N:
    """``env[name]`` as a non-negative ``kind``, or `SettingsError` naming the variable."""
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = kind(raw)
    except ValueError:
        noun = "whole number" if kind is int else "number"
        raise SettingsError(f"{name} must be a {noun}, not {raw!r}") from None
    if value < 0:
        raise SettingsError(f"{name} must not be negative, not {raw!r}")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"\s*(\d+)\s*([smhdw])\s*")


def parse_duration(text: str) -> dt.timedelta:
    """``90s``, ``15m``, ``12h``, ``30d`` or ``2w`` as a timedelta (a positive whole number)."""
    match = _DURATION.fullmatch(text)
    if match is None or int(match.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r} (a positive number and s, m, h, d or w: 30d)")
    return dt.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def _retention(text: str) -> dt.timedelta | None:
    if not text.strip():
        return None
    try:
        return parse_duration(text)
    except ValueError as error:
        raise SettingsError(f"RECEIVER_RETENTION: {error}") from None
