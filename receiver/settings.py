"""Settings: the only module that reads the environment.

`Settings.from_env()` is called once at the edge (CLI, app factory) and the
result is passed down, so tests build settings directly and nothing reads
``os.environ`` at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024

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
    ("RECEIVER_AUTH_CACHE_SECONDS", "2", "How long per-hook token hashes are cached in memory."),
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
    auth_cache_seconds: float = 2.0
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
            raise ValueError(
                "RECEIVER_SQLITE_SYNCHRONOUS must be OFF, NORMAL, FULL or EXTRA,"
                f" not {synchronous!r}"
            )
        log_format = env.get("RECEIVER_LOG_FORMAT", "plain")
        if log_format not in {"plain", "json"}:
            raise ValueError(f"RECEIVER_LOG_FORMAT must be plain or json, not {log_format!r}")
        return cls(
            database_url=url,
            tokens=tokens,
            max_body_bytes=int(env.get("RECEIVER_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)),
            data_dir=data_dir,
            sqlite_synchronous=synchronous,
            max_depth=int(env.get("RECEIVER_MAX_DEPTH", "5")),
            log_format=log_format,
            auth_cache_seconds=float(env.get("RECEIVER_AUTH_CACHE_SECONDS", "2")),
            webrun_url=env.get("RECEIVER_WEBRUN_URL") or None,
            webrun_api_key=env.get("RECEIVER_WEBRUN_API_KEY") or None,
            public_url=env.get("RECEIVER_PUBLIC_URL") or "http://127.0.0.1:8000",
            reconcile_grace_seconds=float(env.get("RECEIVER_RECONCILE_GRACE_SECONDS", "60")),
            reconcile_interval_seconds=float(env.get("RECEIVER_RECONCILE_INTERVAL_SECONDS", "5")),
            webrun_concurrency=int(env.get("RECEIVER_WEBRUN_CONCURRENCY", "4")),
            webrun_rate=float(env.get("RECEIVER_WEBRUN_RATE", "5")),
            webrun_timeout_seconds=float(env.get("RECEIVER_WEBRUN_TIMEOUT_SECONDS", "60")),
        )
