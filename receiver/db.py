"""Engines, migrations, and the places SQLite and PostgreSQL differ.

Every dialect difference the receiver's modules care about lives here, named
by what the caller needs rather than by the database it is on: what each
database can do (`single_writer`, `text_holds_nul`, `can_copy`,
`adds_columns_at_once`, `max_columns`), advisory locks (`lock_transaction`),
the raw driver (`driver_time`, `paramstyle`, `begin_raw_write`,
`insert_returning`), SQL forms (`insert_for`, `add_columns`, `unlocked`,
`utc_day_text`, `utc_day_sql`, `json_object_each_sql`, `json_text`,
`bytes_contain`), vacuum (`reclaim_space`) and how a database is named to a
person (`describe_url`). The migrations keep their own: they are history.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    RootTransaction,
    TextClause,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.engine import URL, make_url

from receiver.errors import SchemaOutOfDate
from receiver.settings import Settings

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.orm import QueryableAttribute
    from sqlalchemy.types import TypeEngine

#: What the functions below tell the database by: an engine, a connection, or a dialect's name.
Bind: TypeAlias = Engine | Connection | str
#: A column in a query: a Core column or an ORM model's attribute.
ColumnLike: TypeAlias = "ColumnElement[Any] | QueryableAttribute[Any]"

_MIGRATION_LOCK = 0x5EB7_0000
WRITE_OPTION = "receiver_write"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def dialect_name(bind: Bind) -> str:
    return bind if isinstance(bind, str) else bind.dialect.name


def is_sqlite(bind: Bind) -> bool:
    return dialect_name(bind) == "sqlite"


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


def insert_for(bind: Bind) -> Any:
    """The dialect's ``insert`` construct, which knows ``ON CONFLICT``."""
    if is_sqlite(bind):
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    return pg_insert


# --------------------------------------------------------------------------- what each can do


def single_writer(bind: Bind) -> bool:
    """Whether one writer at a time has the whole database (SQLite's write lock).

    Then no two transactions contend for a row: the rollup triggers update the
    rollups directly (migration 0003) and there is nothing for `receiver.rollups.fold`
    to fold.
    """
    return is_sqlite(bind)


def text_holds_nul(bind: Bind) -> bool:
    """Whether a text value may contain NUL (PostgreSQL's ``text`` refuses it)."""
    return dialect_name(bind) != "postgresql"


def can_copy(bind: Bind) -> bool:
    """Whether rows can be streamed in with binary ``COPY`` (PostgreSQL, `receiver.pgcopy`)."""
    return dialect_name(bind) == "postgresql"


def adds_columns_at_once(bind: Bind) -> bool:
    """Whether one ``ALTER TABLE`` adds many columns for the cost of one (PostgreSQL).

    SQLite adds one column per ``ALTER`` and re-reads the whole schema each
    time (5 ms a column at a thousand columns).
    """
    return dialect_name(bind) == "postgresql"


#: Columns a result table may have on each database, the receiver's own included. SQLite
#: allows 2,000; PostgreSQL 1,600, but a row must also fit its 8 KB page, and a value moved
#: out of line still takes 18 bytes there: 400 keeps every row within it.
MAX_COLUMNS = {"sqlite": 1900, "postgresql": 400}


def max_columns(bind: Bind) -> int:
    return MAX_COLUMNS[dialect_name(bind)]


# --------------------------------------------------------------------------- locks


def lock_transaction(conn: Connection, key: int, subkey: int | None = None) -> None:
    """Hold advisory lock ``key`` (or the pair ``key, subkey``) until the transaction ends.

    PostgreSQL's ``pg_advisory_xact_lock``: one bigint key, or two int4 keys
    (a key space apart from the single ones). SQLite: nothing to take, its
    write lock (`write_transaction`) already serialises writers.
    """
    if is_sqlite(conn):
        return
    if subkey is None:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
    else:
        conn.execute(
            text("SELECT pg_advisory_xact_lock(CAST(:c AS integer), CAST(:o AS integer))"),
            {"c": key, "o": subkey},
        )


# --------------------------------------------------------------------------- the raw driver


def begin_raw_write(bind: Bind, cursor: Any) -> None:
    """Begin a transaction that writes on a raw DBAPI cursor, as `write_transaction` does.

    SQLite's raw connections are in autocommit (`create_db_engine`): ``BEGIN
    IMMEDIATE`` takes the write lock now. psycopg begins one by itself.
    """
    if is_sqlite(bind):
        cursor.execute("BEGIN IMMEDIATE")


def insert_returning(
    bind: Bind, cursor: Any, head: str, tail: str, rows: Sequence[tuple[Any, ...]]
) -> list[Any]:
    """Run ``head (?, ...) tail`` for each of ``rows`` through a raw DBAPI cursor, where
    ``head`` is ``INSERT INTO t (...) VALUES`` and ``tail`` ends in a ``RETURNING`` of
    one column; that column of each row returned.

    On PostgreSQL one statement for all the rows, through psycopg's `RawCursor`:
    its ``$n`` placeholders skip the client-side parsing that psycopg does not
    cache for long statements (a third of the ledger writer's time per delivery,
    measured). SQLite is in-process: a statement per row costs nothing extra.
    """
    if not rows:
        return []
    width = len(rows[0])
    if is_sqlite(bind):
        statement = f"{head}({', '.join('?' * width)}){tail}"
        returned = []
        for row in rows:
            cursor.execute(statement, row)
            found = cursor.fetchone()
            if found is not None:
                returned.append(found[0])
        return returned
    import psycopg

    raw = psycopg.RawCursor(cursor.connection)
    raw.execute(_numbered_insert(head, tail, width, len(rows)), [v for row in rows for v in row])
    return [found[0] for found in raw.fetchall()]


@functools.cache
def _numbered_insert(head: str, tail: str, width: int, rows: int) -> str:
    """A multi-row INSERT in PostgreSQL's own ``$n`` placeholders."""
    values = ", ".join(
        "(" + ", ".join(f"${r * width + c}" for c in range(1, width + 1)) + ")" for r in range(rows)
    )
    return f"{head}{values}{tail}"


# --------------------------------------------------------------------------- SQL forms


def add_columns(
    conn: Connection, table: str, columns: Sequence[tuple[str, TypeEngine[Any]]]
) -> None:
    """``ALTER TABLE ADD COLUMN`` each of ``columns``, tolerating those another process added.

    PostgreSQL adds them in one statement, ``ADD COLUMN IF NOT EXISTS``;
    SQLite, which has no ``IF NOT EXISTS`` there, looks each one up and adds
    it with an ``ALTER`` of its own.
    """
    if not columns:
        return
    quote = conn.dialect.identifier_preparer.quote
    if not is_sqlite(conn):
        clauses = ", ".join(
            f"ADD COLUMN IF NOT EXISTS {quote(n)} {t.compile(dialect=conn.dialect)}"
            for n, t in columns
        )
        conn.execute(text(f"ALTER TABLE {quote(table)} {clauses}"))
        return
    for column, type_ in columns:
        existing = {row[1] for row in conn.execute(text(f"PRAGMA table_info({quote(table)})"))}
        if column not in existing:
            sql_type = type_.compile(dialect=conn.dialect)
            conn.execute(text(f"ALTER TABLE {quote(table)} ADD COLUMN {quote(column)} {sql_type}"))


def unlocked(
    bind: Bind, key: ColumnLike, candidates: ColumnElement[bool], condition: ColumnElement[bool]
) -> ColumnElement[bool]:
    """The rows ``candidates`` picks that no other transaction holds, as a condition on
    ``key``, so an update of them waits for no one.

    PostgreSQL: those that also meet ``condition``, locked ``FOR UPDATE SKIP
    LOCKED`` (the caller applies ``condition`` itself as well: a row may have
    changed before it was locked). SQLite's one writer holds the whole
    database, so no row is held by another: ``candidates`` itself.
    """
    if is_sqlite(bind):
        return candidates
    locked = select(key).where(candidates, condition).with_for_update(skip_locked=True)
    return key.in_(locked.scalar_subquery())


def utc_day_text(bind: Bind, column: ColumnLike) -> ColumnElement[str]:
    """A stored time's UTC day as ``YYYY-MM-DD`` text (SQLite stores naive UTC text)."""
    if is_sqlite(bind):
        return func.substr(column, 1, 10)
    return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")


def utc_day_sql(bind: Bind, column: str) -> str:
    """Raw SQL for the UTC day of the stored time ``column``, as the rollups group by it:
    ``YYYY-MM-DD`` text on SQLite (naive UTC text stored), a date on PostgreSQL."""
    if is_sqlite(bind):
        return f"substr({column}, 1, 10)"
    return f"CAST({column} AT TIME ZONE 'UTC' AS date)"


def json_object_each_sql(bind: Bind, column: str) -> str:
    """Raw SQL for a table function giving the ``key`` and ``value`` of each member of the
    JSON object in text ``column``: none when it holds no object (as in migration 0005)."""
    if is_sqlite(bind):
        return f"json_each(CASE json_type({column}) WHEN 'object' THEN {column} ELSE '{{}}' END)"
    return (
        f"jsonb_each_text(CASE jsonb_typeof(CAST({column} AS jsonb))"
        f" WHEN 'object' THEN CAST({column} AS jsonb) ELSE '{{}}' END)"
    )


def json_text(bind: Bind, column: ColumnLike, key: str) -> ColumnElement[Any]:
    """Member ``key`` of the JSON object in text ``column``, any key (quotes, backslashes)."""
    if is_sqlite(bind):
        path = '$."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return func.json_extract(column, path)
    from sqlalchemy import cast
    from sqlalchemy.dialects.postgresql import JSONB

    return func.jsonb_extract_path_text(cast(column, JSONB), key)


def bytes_contain(
    bind: Engine | Connection, column: ColumnLike, needle: bytes
) -> ColumnElement[bool] | TextClause:
    """Whether the bytes in ``column`` contain ``needle`` (a BLOB on SQLite, a bytea on
    PostgreSQL, whose ``position`` wants its ``IN`` form)."""
    if is_sqlite(bind):
        return func.instr(column, needle) > 0
    name = column.compile(dialect=bind.dialect)
    return text(f"position(:needle in {name}) > 0").bindparams(needle=needle)


# --------------------------------------------------------------------------- maintenance


def reclaim_space(engine: Engine, table: str) -> tuple[str, int, int]:
    """Give the space freed in ``table`` back: the statement run, the bytes before and after.

    SQLite: a full ``VACUUM`` of the database (it was not created with
    ``auto_vacuum=INCREMENTAL``, and switching needs a full ``VACUUM`` anyway),
    then a WAL checkpoint so the file itself shrinks; the bytes are the file's
    and its WAL's. It holds the write lock throughout. PostgreSQL: plain
    ``VACUUM (ANALYZE)`` of ``table``, which takes no lock ingest waits for; it
    makes the space reusable (and returns the table's empty tail pages), where
    ``VACUUM FULL`` would lock the table. The bytes are the table's, with its
    indexes and TOAST.
    """
    if is_sqlite(engine):
        path = engine.url.database
        if not path or path == ":memory:":
            raise ValueError("vacuum needs an SQLite database file")

        def size() -> int:
            return sum(os.path.getsize(p) for p in (path, f"{path}-wal") if os.path.exists(p))

        before = size()
        # The raw connection is in autocommit (`create_db_engine`): VACUUM refuses a transaction.
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("VACUUM")
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            cursor.close()
        finally:
            raw.close()
        return "VACUUM", before, size()

    measure = f"SELECT pg_total_relation_size('{table}')"
    with engine.connect() as conn:
        before = int(conn.exec_driver_sql(measure).scalar_one())
    statement = f"VACUUM (ANALYZE) {table}"
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(statement)
        after = int(conn.exec_driver_sql(measure).scalar_one())
    return statement, before, after


def describe_url(url: URL) -> str:
    """The database ``url`` names, for a person: a file path or ``PostgreSQL at host:5432/db``."""
    if url.get_backend_name() == "sqlite":
        return f"the SQLite database {url.database or ':memory:'}"
    host = url.host or "localhost"
    port = f":{url.port}" if url.port else ""
    return f"PostgreSQL at {host}{port}/{url.database or ''}"
