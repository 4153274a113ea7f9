"""Reading the database into Arrow record batches for the export, typed as it exports them.

Both databases are read with ADBC, straight into Arrow with no Python object
per value. PostgreSQL in this process (`PostgresqlReader`, libpq ``COPY``).
SQLite in a child process (`SqliteChild`, running `serve_sqlite_reads`) that
streams Arrow IPC back through a pipe: the ADBC SQLite driver bundles its own
SQLite library, and two SQLite libraries in one process break SQLite's POSIX
locking (closing either's file descriptor drops the other's locks). The child
imports this module, so it imports nothing of the receiver's but its errors,
and the ADBC drivers are imported where they are used: each process loads
only the driver it runs. `read_ahead` overlaps reading with the caller's
writing.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import io
import json
import os
import queue
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Generator, Iterator
from typing import IO, TYPE_CHECKING, Any, cast

import pyarrow as pa

from receiver.errors import ReceiverError

if TYPE_CHECKING:
    from sqlalchemy import Engine

_POSTGRESQL_BATCH_BYTES = 4 << 20


#: The SQLite child's pipe: Linux's default 64 KiB costs a context switch per 64 KiB.
_PIPE_BYTES = 1 << 20


_END = object()


def read_ahead(
    batches: Generator[pa.RecordBatch, None, None], depth: int
) -> Iterator[pa.RecordBatch]:
    """Run ``batches`` in a thread, up to ``depth`` batches ahead of the caller.

    The drivers and the Parquet writer release the GIL, so the next batches are
    read (and cast) while the caller compresses the current ones. Leaving the
    loop early stops the thread and closes ``batches`` there.
    """
    slots: queue.Queue[object] = queue.Queue(depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                slots.put(item, timeout=0.05)
                return True
        return False

    def pump() -> None:
        try:
            for batch in batches:
                if not offer(batch):
                    return
            offer(_END)
        except BaseException as error:
            offer(error)
        finally:
            batches.close()

    thread = threading.Thread(target=pump, name="export-reader", daemon=True)
    thread.start()
    try:
        while (item := slots.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()


class PostgresqlReader:
    """One ADBC connection to PostgreSQL for the run (low-level API: no pandas import)."""

    def __init__(self, engine: Engine) -> None:
        import adbc_driver_manager
        import adbc_driver_postgresql

        url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._database = adbc_driver_postgresql.connect(url)
        self._connection = adbc_driver_manager.AdbcConnection(self._database)

    def _query(self, sql: str) -> tuple[Any, pa.RecordBatchReader]:
        import adbc_driver_manager

        statement = adbc_driver_manager.AdbcStatement(self._connection)
        try:
            statement.set_options(
                **{"adbc.postgresql.batch_size_hint_bytes": str(_POSTGRESQL_BATCH_BYTES)}
            )
            statement.set_sql_query(sql)
            stream, _ = statement.execute_query()
            return statement, pa.RecordBatchReader.from_stream(stream)
        except BaseException:
            statement.close()
            raise

    def read(
        self, sql: str, params: list[dt.datetime | dt.date], schema: pa.Schema
    ) -> Generator[pa.RecordBatch, None, None]:
        # libpq streams (COPY) only queries without bind parameters, so the values
        # travel as session settings, set by one parameterised statement.
        if params:
            import adbc_driver_manager

            settings = ", ".join(
                f"set_config('receiver.export_p{i}', ${i + 1}, false)" for i in range(len(params))
            )
            statement = adbc_driver_manager.AdbcStatement(self._connection)
            try:
                statement.set_sql_query(f"SELECT {settings}")
                statement.bind(text_row([p.isoformat() for p in params]))
                stream, _ = statement.execute_query()
                pa.RecordBatchReader.from_stream(stream).read_all()
            finally:
                statement.close()
            for i, value in enumerate(params):
                kind = "timestamptz" if isinstance(value, dt.datetime) else "date"
                sql = sql.replace(
                    "?", f"CAST(current_setting('receiver.export_p{i}') AS {kind})", 1
                )
        statement, reader = self._query(sql)
        try:
            for batch in reader:
                if batch.num_rows:
                    yield conform(batch, schema)
        finally:
            reader.close()
            statement.close()

    def close(self) -> None:
        self._connection.close()
        self._database.close()


class SqliteChild:
    """A child process reading SQLite through ADBC for this run (see `serve_sqlite_reads`).

    Requests go as JSON lines on its stdin; each answer is one Arrow IPC stream
    on its stdout, already cast to the export types. Its stderr goes to a file,
    read for the message when the child fails.
    """

    def __init__(self, database: str) -> None:
        self.database = database
        self._process: subprocess.Popen[bytes] | None = None
        self._errors: IO[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        """The child, started if it is not running."""
        if self._process is None:
            package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            bootstrap = (
                f"import sys; sys.path.insert(0, {package_parent!r}); "
                "from receiver.readers import serve_sqlite_reads; serve_sqlite_reads()"
            )
            self._errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
            process = subprocess.Popen(
                [sys.executable, "-c", bootstrap],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._errors,
            )
            assert process.stdout is not None
            with contextlib.suppress(OSError):  # a larger pipe is an optimisation only
                fcntl.fcntl(process.stdout.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
            self._process = process
        return self._process

    def read(
        self, sql: str, params: list[str], schema: pa.Schema, batch_rows: int
    ) -> Generator[pa.RecordBatch, None, None]:
        process = self.start()
        assert process.stdin is not None
        assert process.stdout is not None
        request = {
            "database": self.database,
            "sql": sql,
            "params": params,
            "schema": base64.b64encode(schema.serialize().to_pybytes()).decode(),
            "batch_rows": batch_rows,
        }
        finished = False
        try:
            try:
                process.stdin.write(json.dumps(request).encode() + b"\n")
                process.stdin.flush()
                with pa.ipc.open_stream(
                    pa.PythonFile(cast(io.IOBase, process.stdout), mode="r")
                ) as reader:
                    yield from reader
            except (OSError, pa.ArrowException) as error:
                raise self._failure() from error
            finished = True
        finally:
            if not finished:  # left mid-stream: the pipe cannot be resynchronised
                self.close(kill=True)

    def _failure(self) -> ReceiverError:
        process, errors = self._process, self._errors
        assert process is not None
        assert errors is not None
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        errors.seek(0)
        lines = errors.read().decode("utf-8", "replace").strip().splitlines()
        return ReceiverError(f"the SQLite reader failed: {lines[-1] if lines else 'no message'}")

    def close(self, *, kill: bool = False) -> None:
        """End the child: idle, it ends at the end of its stdin; ``kill`` when it is mid-answer."""
        process, self._process = self._process, None
        if process is not None:
            if kill:
                process.kill()
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._errors is not None:
            self._errors.close()
            self._errors = None


def serve_sqlite_reads() -> None:
    """Child process of `SqliteChild`: answer each request line with an Arrow IPC stream.

    Runs ``sql`` with ``params`` through ADBC's SQLite driver, read only, drops
    the placeholder first row, casts to the request's schema, and writes the
    batches to stdout. On error the traceback goes to stderr and the child exits.
    """
    import adbc_driver_manager
    import adbc_driver_sqlite

    out = pa.PythonFile(cast(io.IOBase, sys.stdout.buffer), mode="w")
    databases: dict[str, tuple[Any, Any]] = {}
    try:
        for line in sys.stdin.buffer:
            request = json.loads(line)
            schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(request["schema"])))
            if request["database"] not in databases:
                database = adbc_driver_sqlite.connect(f"file:{request['database']}?mode=ro")
                databases[request["database"]] = (
                    database,
                    adbc_driver_manager.AdbcConnection(database),
                )
            _, connection = databases[request["database"]]
            statement = adbc_driver_manager.AdbcStatement(connection)
            try:
                statement.set_options(
                    **{"adbc.sqlite.query.batch_rows": str(request["batch_rows"])}
                )
                statement.set_sql_query(request["sql"])
                if request["params"]:
                    statement.bind(text_row(request["params"]))
                stream, _ = statement.execute_query()
                with (
                    pa.RecordBatchReader.from_stream(stream) as reader,
                    pa.ipc.new_stream(out, schema) as writer,
                ):
                    placeholder = True
                    for batch in reader:
                        if placeholder:
                            batch, placeholder = _without_placeholder(batch), False
                        if batch.num_rows:
                            writer.write_batch(conform(batch, schema))
                out.flush()
            finally:
                statement.close()
    finally:
        for database, connection in databases.values():
            connection.close()
            database.close()


def text_row(values: list[str]) -> pa.RecordBatch:
    """One row of text parameters from raw buffers: ``pa.array`` on Python values imports pandas."""
    columns = []
    for value in values:
        data = value.encode()
        offsets = pa.py_buffer(struct.pack("<ii", 0, len(data)))
        columns.append(pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(data)]))
    return pa.RecordBatch.from_arrays(columns, names=[f"p{i}" for i in range(len(values))])


def _without_placeholder(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The first batch of a SQLite read without its placeholder row (checked, not assumed)."""
    if batch.num_rows == 0 or any(
        batch.column(i)[0].as_py() not in ("", 0, 0.0, b"") for i in range(batch.num_columns)
    ):
        raise ReceiverError("the SQLite read did not start with its placeholder row")
    return batch.slice(1)


#: Typed literals for the placeholder row, by how SQLite stores the column.
SQLITE_PLACEHOLDERS: dict[pa.DataType, str] = {
    pa.string(): "''",
    pa.int64(): "0",
    pa.float64(): "0.0",
    pa.large_binary(): "X''",
}


def sqlite_path(engine: Engine) -> str:
    path = engine.url.database
    if not path or path == ":memory:":
        raise ValueError("exporting needs an SQLite database file, not an in-memory database")
    return os.path.abspath(path)


def stored_type(type_: pa.DataType) -> pa.DataType:
    """How SQLite stores a column of export type ``type_``: times as text, booleans as 0/1."""
    if pa.types.is_timestamp(type_) or pa.types.is_date(type_):
        return pa.string()
    if pa.types.is_boolean(type_):
        return pa.int64()
    return type_


def sqlite_param(value: dt.datetime | dt.date) -> str:
    """A bound time as SQLite stores it (SQLAlchemy's naive UTC text), a date as ISO text."""
    if isinstance(value, dt.datetime):
        return (
            value.astimezone(dt.UTC)
            .replace(tzinfo=None)
            .isoformat(sep=" ", timespec="microseconds")
        )
    return value.isoformat()


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """Cast what the driver returned to the export types (SQLite: text times, 0/1 booleans)."""
    arrays = []
    for f in schema:
        column = batch.column(f.name)
        if pa.types.is_timestamp(f.type) and not pa.types.is_timestamp(column.type):
            column = column.cast(pa.timestamp("us")).cast(f.type)
        elif pa.types.is_timestamp(f.type) and column.type.tz is None:
            column = column.cast(f.type)
        arrays.append(column if column.type == f.type else column.cast(f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
