"""Fresh, throwaway databases for one figure: a SQLite file or a ``bench_<random>`` PostgreSQL db.

Each one is migrated with the receiver's own migrations when asked, and
dropped (or deleted) afterwards, so a run never touches anyone else's data.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from receiver.models import Task

PG_SERVER = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@dataclass(frozen=True)
class BenchDatabase:
    """Where a fresh database lives: ``dialect`` is ``sqlite`` or ``postgresql``."""

    dialect: str
    #: For SQLite the file path; for PostgreSQL a libpq URL (psycopg, ADBC).
    location: str

    @property
    def sqlalchemy_url(self) -> str:
        """The URL the receiver is configured with (``RECEIVER_DATABASE_URL``)."""
        if self.dialect == "sqlite":
            return f"sqlite:///{self.location}"
        return self.location.replace("postgresql://", "postgresql+psycopg://", 1)

    def connect(self) -> Any:
        """A raw DBAPI connection through the database's own driver."""
        if self.dialect == "sqlite":
            conn = sqlite3.connect(self.location, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            return conn
        return psycopg.connect(self.location)


@contextlib.contextmanager
def fresh_database(dialect: str, *, migrate: bool = True) -> Iterator[BenchDatabase]:
    """A new empty database, migrated to head when ``migrate``; removed on exit."""
    if dialect == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix="bench-", dir=os.environ.get("BENCH_TMP")))
        db = BenchDatabase("sqlite", str(folder / "receiver.db"))
        try:
            if migrate:
                _upgrade(db)
            yield db
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    name = f"bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_SERVER, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    db = BenchDatabase("postgresql", f"{PG_SERVER.rsplit('/', 1)[0]}/{name}")
    try:
        if migrate:
            _upgrade(db)
        yield db
    finally:
        with psycopg.connect(PG_SERVER, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _upgrade(db: BenchDatabase) -> None:
    """`receiver db upgrade`, in process: the same Alembic migrations the CLI runs."""
    from receiver.db import create_db_engine, upgrade
    from receiver.settings import Settings

    engine = create_db_engine(Settings(database_url=db.sqlalchemy_url))
    try:
        upgrade(engine)
    finally:
        engine.dispose()


#: The seeded row tuples follow the model's column order (`task_rows` yields them so).
TASK_COLUMNS = tuple(c.name for c in Task.__table__.columns)
_HOOKS = ("products", "prices", "news", "jobs", "leads")
_STATUSES = ("completed",) * 17 + ("failed", "failed", "guardrail")
_START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def task_rows(start: int, count: int, dialect: str) -> Iterator[tuple[Any, ...]]:
    """Deterministic, varied task rows spread over ~180 days (5 hooks, some failures)."""
    for i in range(start, start + count):
        when = _START + dt.timedelta(seconds=i * 15.552 % (180 * 86400))
        naive = when.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
        stamp: Any = naive if dialect == "sqlite" else when  # SQLAlchemy's text format
        status = _STATUSES[i % len(_STATUSES)]
        inp, out = 1000 + i % 9000, 200 + i % 3000
        cost = None if i % 97 == 0 else round((inp * 0.8 + out * 3.2) / 1e6, 6)
        yield (
            f"s{i:08x}:t{i:08x}",
            f"s{i:08x}",
            f"t{i:08x}",
            _HOOKS[i % len(_HOOKS)],
            status,
            "structured_json",
            inp,
            out,
            inp + out,
            (i % 600) / 10,
            (i % 900) / 10,
            cost,
            "agent gave up" if status == "failed" else None,
            "E_TIMEOUT" if status == "failed" else None,
            "pii" if status == "guardrail" else None,
            "email" if status == "guardrail" else None,
            stamp,
            stamp,
            f"0190{i:028x}"[:36],
            f'{{"project": "p{i % 7}"}}',
            None,
        )


DELIVERY_COLUMNS = (
    "id",
    "hook",
    "received_at",
    "body",
    "body_sha256",
    "body_size",
    "content_type",
    "headers",
    "query_string",
    "labels",
    "dedupe_key",
    "first_key",
    "status",
    "kind",
    "task_id",
)


def delivery_of(task: tuple[Any, ...], i: int) -> tuple[Any, ...]:
    """The (processed, body-elided) delivery a seeded task row names as its last one."""
    body = b'{"seeded": true}'
    key = f"{i:064x}"
    return (
        task[18],
        task[3],
        task[17],
        body,
        key,
        len(body),
        "application/json",
        "[]",
        "",
        "{}",
        key,
        key,
        "processed",
        "full_response",
        task[2],
    )


def seed_tasks(db: BenchDatabase, count: int, chunk: int = 50_000) -> None:
    """Insert ``count`` tasks, and the delivery each names as its last, straight into the
    migrated schema (``executemany`` on SQLite, ``COPY`` on PostgreSQL)."""
    columns = ", ".join(TASK_COLUMNS)
    dcolumns = ", ".join(DELIVERY_COLUMNS)
    with contextlib.closing(db.connect()) as conn:
        if db.dialect == "sqlite":
            conn.execute("PRAGMA synchronous=OFF")  # seeding only: not what is measured
            marks = ", ".join("?" * len(TASK_COLUMNS))
            dmarks = ", ".join("?" * len(DELIVERY_COLUMNS))
            conn.execute("BEGIN")
            for start in range(0, count, chunk):
                rows = list(task_rows(start, min(chunk, count - start), "sqlite"))
                conn.executemany(f"INSERT INTO tasks ({columns}) VALUES ({marks})", rows)
                conn.executemany(
                    f"INSERT INTO deliveries ({dcolumns}) VALUES ({dmarks})",
                    (delivery_of(r, start + n) for n, r in enumerate(rows)),
                )
            conn.execute("COMMIT")
            return
        with conn.cursor() as cur:
            with cur.copy(f"COPY tasks ({columns}) FROM STDIN") as copy:
                for row in task_rows(0, count, "postgresql"):
                    copy.write_row(row)
            with cur.copy(f"COPY deliveries ({dcolumns}) FROM STDIN") as copy:
                for n, row in enumerate(task_rows(0, count, "postgresql")):
                    copy.write_row(delivery_of(row, n))
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE tasks")
        conn.execute("VACUUM ANALYZE deliveries")
