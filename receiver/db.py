"""Engines, migrations, and the few places SQLite and PostgreSQL differ.

Every dialect difference the receiver cares about lives here: connection
pragmas, how a UTC time is passed to a raw driver, the parameter style, and
"insert or ignore".
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, RootTransaction, create_engine, event
from sqlalchemy.engine import make_url

from receiver.errors import SchemaOutOfDate
from receiver.settings import Settings

if TYPE_CHECKING:
    from alembic.config import Config

_MIGRATION_LOCK = 0x5EB7_0000
WRITE_OPTION = "receiver_write"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def create_db_engine(settings: Settings) -> Engine:
    """An engine with WAL, a busy timeout and the configured ``synchronous`` on SQLite."""
    url = make_url(settings.database_url)
    kwargs: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
        kwargs["pool_size"] = 8
        # A server that goes silent (no RST) must not hang the ledger writer for ever:
        # the request spools after its own timeout, and these let the connection die.
        kwargs["connect_args"] = {
            "connect_timeout": 5,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": 30000,
        }
    # Errors are logged; their parameters would be payload values.
    engine = create_engine(url, hide_parameters=True, **kwargs)
    if url.get_backend_name() == "sqlite":
        synchronous = settings.sqlite_synchronous

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
            # SQLAlchemy emits BEGIN itself (below), so `write_transaction` can ask for IMMEDIATE.
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            immediate = conn.get_execution_options().get(WRITE_OPTION)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def write_transaction(conn: Connection) -> RootTransaction:
    """Begin a transaction that reads and then writes.

    On SQLite it takes the write lock at BEGIN: a deferred transaction that
    read first and writes later fails at once with SQLITE_BUSY_SNAPSHOT under
    WAL, whatever the busy timeout. Plain reads stay deferred and never block
    the ledger's writer.
    """
    return conn.execution_options(**{WRITE_OPTION: True}).begin()


def alembic_config(engine: Engine) -> Config:
    # Alembic is imported where it is used (~0.1 s): commands that touch no schema skip it.
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the core schema to ``revision`` through the Alembic migrations.

    Returns the revisions before and after (None: no schema). On PostgreSQL a
    session advisory lock makes receivers that start together take turns
    instead of racing through the same DDL.
    """
    from alembic import command

    if is_sqlite(engine):
        before = current_revision(engine)
        command.upgrade(alembic_config(engine), revision)
        return before, current_revision(engine)
    with engine.connect() as conn:
        conn.exec_driver_sql(f"SELECT pg_advisory_lock({_MIGRATION_LOCK})")
        conn.commit()
        try:
            before = current_revision(engine)
            command.upgrade(alembic_config(engine), revision)
            return before, current_revision(engine)
        finally:
            conn.exec_driver_sql(f"SELECT pg_advisory_unlock({_MIGRATION_LOCK})")
            conn.commit()


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at (None: no receiver schema yet)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        revision: str | None = MigrationContext.configure(conn).get_current_revision()
    return revision


def head_revision(engine: Engine) -> str | None:
    """The newest migration this code ships."""
    from alembic.script import ScriptDirectory

    head: str | None = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    return head


def check_schema(engine: Engine) -> None:
    """Raise `SchemaOutOfDate` unless the database is at the migrations' head."""
    head, current = head_revision(engine), current_revision(engine)
    if current != head:
        raise SchemaOutOfDate(
            f"the database schema is at {current or 'nothing (never migrated)'},"
            f" this receiver expects {head}: run `receiver db upgrade`"
        )


def driver_time(engine: Engine, value: dt.datetime) -> Any:
    """A UTC time in the form the raw driver stores like SQLAlchemy does."""
    if is_sqlite(engine):
        return (
            value.astimezone(dt.UTC)
            .replace(tzinfo=None)
            .isoformat(sep=" ", timespec="microseconds")
        )
    return value


def paramstyle(engine: Engine, sql: str) -> str:
    """Turn ``?`` placeholders into the raw driver's style."""
    return sql if is_sqlite(engine) else sql.replace("?", "%s")


def insert_for(engine_or_dialect: Engine | str) -> Any:
    """The dialect's ``insert`` construct, which knows ``ON CONFLICT``."""
    name = (
        engine_or_dialect if isinstance(engine_or_dialect, str) else engine_or_dialect.dialect.name
    )
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    return pg_insert
