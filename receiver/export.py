"""Parquet export: each table a Hive-partitioned dataset, written incrementally and streaming.

Layout: ``DEST/<dataset>/date=YYYY-MM-DD/<file>.parquet`` (zstd), plus
``DEST/_manifest.json``, written last, with each dataset's watermark and every
run's files and row counts. Datasets: ``tasks``, ``deliveries`` (metadata; the
body only on request), every result table, and the rollup views
``cost_daily`` and ``cost_by_label``.

Partitions are UTC dates. Deliveries and result rows go by the time their
delivery was received (``received_at`` / ``_received_at``) and are
append-only: a run exports the rows received in ``[watermark, until)`` into
``part-<watermark>.parquet``, so a retried run overwrites what an interrupted
one left rather than duplicating it. A task goes by ``first_seen_at`` (when
its first delivery was received), and since later deliveries update a task,
a run rewrites whole the day partitions of tasks whose last delivery is new
(``tasks.parquet``); the rollups are rewritten for the same days. ``until``
stops short of the oldest delivery not yet processed (its rows do not exist
yet) and of the last ``lag`` seconds (deliveries still being committed).

Files are written under a hidden temporary name (``.<name>.<run>.tmp``,
ignored by pyarrow and by ``*.parquet`` globs) and renamed only once every
dataset is written; a failed run deletes its temporary files and leaves the
manifest as it was.

Types: integers int64, floats float64 (money too: WebRun reports cost as a
JSON number and ``tasks.cost_usd`` stores a float, so a decimal would only
pretend to precision), booleans bool, timestamps ``timestamp[us, UTC]``,
dates date32, text and JSON text strings. Rows go out as Arrow record
batches written one row group at a time, so memory does not grow with the
table. PostgreSQL is read with ADBC (libpq COPY, straight into Arrow); SQLite
with the stdlib ``sqlite3`` in ``fetchmany`` batches, because the ADBC SQLite
driver bundles a second SQLite library, which is unsafe in a process that
also has the receiver's own connections open (see `_Run._read_sqlite`).

Readers: DuckDB ``read_parquet('DEST/t/**/*.parquet', union_by_name = true)``;
pyarrow ``dataset(..., partitioning="hive", schema=<unified>)``; pandas
``read_parquet(DEST/t, schema=<unified>)`` (pandas otherwise takes the first
file's columns when a table grew between runs).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from sqlalchemy import Column, Engine, MetaData, Table, func, select
from sqlalchemy import types as sqltypes

from receiver.columns import ColumnType
from receiver.db import driver_time, is_sqlite, utcnow
from receiver.models import Delivery, ResultColumn, ResultTable, Task
from receiver.rollups import VIEWS
from receiver.schema import TableInfo

MANIFEST = "_manifest.json"
ROW_GROUP_ROWS = 128 * 1024
_SQLITE_BATCH_ROWS = 64 * 1024

Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class Dataset:
    """One exported table or view: its columns, partitioning time, and write mode."""

    name: str
    table: Table
    time_column: str
    #: "append": new rows only; "rewrite": whole day partitions, replaced.
    mode: Literal["append", "rewrite"]

    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, arrow_type(c.type)) for c in self.table.columns])


@dataclass
class DatasetReport:
    """What one run wrote for one dataset."""

    rows: int = 0
    files: list[dict[str, Any]] = field(default_factory=list)
    since: str | None = None


@dataclass
class ExportReport:
    run_id: str
    until: dt.datetime
    datasets: dict[str, DatasetReport]

    @property
    def rows(self) -> int:
        return sum(d.rows for d in self.datasets.values())


def arrow_type(type_: sqltypes.TypeEngine[Any]) -> pa.DataType:
    """The Arrow type a column of SQL type ``type_`` is exported as."""
    if isinstance(type_, sqltypes.Boolean):
        return pa.bool_()
    if isinstance(type_, sqltypes.Integer):
        return pa.int64()
    if isinstance(type_, sqltypes.Float):
        return pa.float64()
    if isinstance(type_, sqltypes.DateTime):
        return pa.timestamp("us", tz="UTC")
    if isinstance(type_, sqltypes.Date):
        return pa.date32()
    if isinstance(type_, sqltypes.LargeBinary):
        return pa.large_binary()
    return pa.string()


def datasets(engine: Engine, *, with_bodies: bool = False) -> list[Dataset]:
    """Every dataset the export knows, result tables as catalogued right now."""
    delivery_columns = [
        Column(c.name, c.type)
        for c in Delivery.__table__.columns
        if with_bodies or c.name != "body"
    ]
    out = [
        Dataset("tasks", Task.__table__, "first_seen_at", "rewrite"),  # type: ignore[arg-type]
        Dataset(
            "deliveries",
            Table("deliveries", MetaData(), *delivery_columns),
            "received_at",
            "append",
        ),
    ]
    with engine.connect() as conn:
        infos = {
            t.table_name: TableInfo(t.table_name, t.hook, t.path, t.parent_table)
            for t in conn.execute(select(ResultTable.__table__).order_by(ResultTable.table_name))
        }
        for c in conn.execute(
            select(ResultColumn.__table__).order_by(ResultColumn.table_name, ResultColumn.position)
        ):
            infos[c.table_name].columns[c.source_key] = (c.column_name, ColumnType(c.type))
    out += [
        Dataset(name, info.sqla_table(), "_received_at", "append") for name, info in infos.items()
    ]
    out += [Dataset(name, view, "day", "rewrite") for name, view in VIEWS.items()]
    return out


def open_destination(dest: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and root path for a local folder or a URI (``s3://bucket/prefix``)."""
    if "://" in dest:
        fs, path = pafs.FileSystem.from_uri(dest)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(dest)


def read_manifest(fs: pafs.FileSystem, root: str) -> dict[str, Any]:
    """The destination's manifest, or an empty one before the first run."""
    path = f"{root}/{MANIFEST}"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return {"format": 1, "watermarks": {}, "runs": []}
    with fs.open_input_stream(path) as stream:
        manifest: dict[str, Any] = json.loads(stream.read())
    return manifest


def export(
    engine: Engine,
    dest: str,
    *,
    filesystem: pafs.FileSystem | None = None,
    since: dt.datetime | None = None,
    tables: Sequence[str] = (),
    with_bodies: bool = False,
    lag: dt.timedelta = dt.timedelta(seconds=2),
    progress: Progress | None = None,
) -> ExportReport:
    """Export what is new since the destination's manifest (or ``since``) to ``dest``.

    ``filesystem`` overrides the filesystem ``dest`` implies (``dest`` is then a
    path inside it). ``tables`` limits the run to those datasets.
    """
    fs, root = (filesystem, dest.rstrip("/")) if filesystem is not None else open_destination(dest)
    manifest = read_manifest(fs, root)
    chosen = datasets(engine, with_bodies=with_bodies)
    if tables:
        known = {d.name for d in chosen}
        unknown = sorted(set(tables) - known)
        if unknown:
            raise ValueError(f"no such table to export: {', '.join(unknown)}")
        chosen = [d for d in chosen if d.name in tables]
    until = export_until(engine, lag)
    run = _Run(engine, fs, root, uuid.uuid4().hex[:12], progress)
    report = ExportReport(run.run_id, until, {})
    started = utcnow()
    try:
        for dataset in chosen:
            mark = manifest["watermarks"].get(dataset.name)
            lower = max(
                [t for t in (since, dt.datetime.fromisoformat(mark) if mark else None) if t],
                default=None,
            )
            if lower is not None and lower >= until:
                report.datasets[dataset.name] = DatasetReport(since=lower.isoformat())
                continue
            report.datasets[dataset.name] = run.dataset(dataset, lower, until)
        run.commit()
    except BaseException:
        run.abort()
        raise
    for name in report.datasets:
        manifest["watermarks"][name] = until.isoformat()
    manifest["runs"].append(
        {
            "run_id": run.run_id,
            "started_at": started.isoformat(),
            "finished_at": utcnow().isoformat(),
            "until": until.isoformat(),
            "datasets": {
                name: {"since": r.since, "rows": r.rows, "files": r.files}
                for name, r in report.datasets.items()
            },
        }
    )
    run.write_atomically(f"{root}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
    return report


def export_until(engine: Engine, lag: dt.timedelta) -> dt.datetime:
    """The end of this run's window: ``lag`` ago, but before any delivery not yet processed."""
    until = utcnow() - lag
    with engine.connect() as conn:
        pending = conn.scalar(
            select(func.min(Delivery.received_at)).where(Delivery.status == "stored")
        )
    if pending is not None:
        until = min(until, _aware(pending))
    return until


def _aware(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _stamp(value: dt.datetime | None) -> str:
    return "0" if value is None else value.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")


@dataclass
class _Staged:
    temporary: str
    final: str
    rows: int


class _Run:
    """One export run: reads through ADBC, stages files, renames them at commit."""

    def __init__(
        self,
        engine: Engine,
        fs: pafs.FileSystem,
        root: str,
        run_id: str,
        progress: Progress | None,
    ) -> None:
        self.engine = engine
        self.fs = fs
        self.root = root
        self.run_id = run_id
        self.progress = progress
        self.sqlite = is_sqlite(engine)
        self.staged: list[_Staged] = []
        self.open_temporaries: set[str] = set()
        self._conn: Any = None

    def connection(self) -> Any:
        if self._conn is None:
            import adbc_driver_postgresql.dbapi

            url = self.engine.url.set(drivername="postgresql")
            self._conn = adbc_driver_postgresql.dbapi.connect(
                url.render_as_string(hide_password=False)
            )
        return self._conn

    def dataset(
        self, dataset: Dataset, lower: dt.datetime | None, until: dt.datetime
    ) -> DatasetReport:
        report = DatasetReport(since=None if lower is None else lower.isoformat())
        if dataset.mode == "append":
            where = [f"{self._q(dataset.time_column)} < ?"]
            params: list[dt.datetime | dt.date] = [until]
            if lower is not None:
                where.insert(0, f"{self._q(dataset.time_column)} >= ?")
                params.insert(0, lower)
            filename = f"part-{_stamp(lower)}.parquet"
            only: set[str] | None = None
        else:
            only = self._changed_days(lower, until)
            if not only:
                return report
            first = dt.date.fromisoformat(min(only))
            start: dt.datetime | dt.date = first
            if dataset.time_column != "day":
                start = dt.datetime.combine(first, dt.time(), dt.UTC)
            where, params = [f"{self._q(dataset.time_column)} >= ?"], [start]
            filename = f"{dataset.name}.parquet"
        writer = _PartitionWriter(self, dataset, filename, report)
        try:
            for batch in self._read(dataset, where, params):
                writer.write(batch, only)
        except BaseException:
            writer.discard()
            raise
        writer.finish()
        return report

    def _q(self, name: str) -> str:
        quoted: str = self.engine.dialect.identifier_preparer.quote(name)
        return quoted

    def _changed_days(self, lower: dt.datetime | None, until: dt.datetime) -> set[str]:
        """UTC days (first seen) of tasks whose last delivery was received in the window."""
        if self.sqlite:
            day = func.substr(Task.first_seen_at, 1, 10)
        else:
            day = func.to_char(func.timezone("UTC", Task.first_seen_at), "YYYY-MM-DD")
        query = (
            select(day)
            .distinct()
            .select_from(Task)
            .join(Delivery, Delivery.id == Task.last_delivery_id)
            .where(Delivery.received_at < until)
        )
        if lower is not None:
            query = query.where(Delivery.received_at >= lower)
        with self.engine.connect() as conn:
            return set(conn.scalars(query))

    def _read(
        self, dataset: Dataset, where: list[str], params: list[dt.datetime | dt.date]
    ) -> Iterator[pa.RecordBatch]:
        """Stream the dataset's rows in time order as batches of its Arrow schema."""
        schema = dataset.schema()
        columns = ", ".join(self._q(f.name) for f in schema)
        source = self._q(dataset.table.name)
        order = self._q(dataset.time_column)
        if self.sqlite:
            sql = f"SELECT {columns} FROM {source} WHERE {' AND '.join(where)} ORDER BY {order}"
            yield from self._read_sqlite(
                sql, [_sqlite_param(self.engine, p) for p in params], schema
            )
            return
        cursor = self.connection().cursor()
        try:
            # libpq streams (COPY) only queries without bind parameters, so the
            # values travel as session settings set by a parameterised statement.
            for i, value in enumerate(params):
                cursor.execute(
                    "SELECT set_config($1, $2, false)", (f"receiver.export_p{i}", value.isoformat())
                )
                cursor.fetchall()
            sql_where = " AND ".join(where)
            for i, value in enumerate(params):
                kind = "timestamptz" if isinstance(value, dt.datetime) else "date"
                sql_where = sql_where.replace(
                    "?", f"CAST(current_setting('receiver.export_p{i}') AS {kind})", 1
                )
            cursor.execute(f"SELECT {columns} FROM {source} WHERE {sql_where} ORDER BY {order}")
            for batch in cursor.fetch_record_batch():
                if batch.num_rows:
                    yield _conform(batch, schema)
        finally:
            cursor.close()

    def _read_sqlite(
        self, sql: str, params: list[str], schema: pa.Schema
    ) -> Iterator[pa.RecordBatch]:
        """Read through the stdlib ``sqlite3``, the same SQLite library the receiver writes with.

        The ADBC driver carries its own copy of SQLite, and two copies in one
        process break SQLite's POSIX locking: closing either's file descriptor
        drops the other's locks, and the last ADBC connection to close deletes
        the WAL under the receiver's open connections ("disk I/O error").
        """
        import sqlite3

        path = self.engine.url.database
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        # Build each column with its text/integer storage type, cast after (times, bools).
        stored = [_stored_type(f.type) for f in schema]
        try:
            cursor = conn.execute(sql, params)
            while rows := cursor.fetchmany(_SQLITE_BATCH_ROWS):
                arrays = [
                    pa.array(values, type=kind)
                    for values, kind in zip(zip(*rows, strict=True), stored, strict=True)
                ]
                yield _conform(pa.RecordBatch.from_arrays(arrays, names=schema.names), schema)
        finally:
            conn.close()

    def stage(self, directory: str, filename: str) -> tuple[str, str]:
        self.fs.create_dir(directory, recursive=True)
        temporary = f"{directory}/.{filename}.{self.run_id}.tmp"
        self.open_temporaries.add(temporary)
        return temporary, f"{directory}/{filename}"

    def staged_file(self, temporary: str, final: str, rows: int) -> None:
        self.open_temporaries.discard(temporary)
        self.staged.append(_Staged(temporary, final, rows))

    def commit(self) -> None:
        """Make every staged file visible, each by one rename."""
        for staged in self.staged:
            self.fs.move(staged.temporary, staged.final)
        self.staged = []
        self._close()

    def abort(self) -> None:
        """Delete this run's temporary files; nothing it wrote becomes visible."""
        for path in [s.temporary for s in self.staged] + sorted(self.open_temporaries):
            with contextlib.suppress(OSError):
                self.fs.delete_file(path)
        self.staged = []
        self.open_temporaries.clear()
        self._close()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def write_atomically(self, path: str, data: bytes) -> None:
        temporary = f"{path.rsplit('/', 1)[0]}/.{path.rsplit('/', 1)[1]}.{self.run_id}.tmp"
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(temporary) as stream:
            stream.write(data)
        self.fs.move(temporary, path)


class _PartitionWriter:
    """Writes time-ordered batches to one file per UTC date, in row groups of a useful size."""

    def __init__(self, run: _Run, dataset: Dataset, filename: str, report: DatasetReport) -> None:
        self.run = run
        self.dataset = dataset
        self.filename = filename
        self.report = report
        self.schema = dataset.schema()
        self.date: str | None = None
        self.buffer: list[pa.RecordBatch] = []
        self.buffered = 0
        self.rows = 0
        self.stream: Any = None
        self.writer: pq.ParquetWriter | None = None
        self.paths: tuple[str, str] | None = None

    def write(self, batch: pa.RecordBatch, only: set[str] | None) -> None:
        days = _days(batch.column(self.dataset.time_column))
        distinct_days: list[str | None] = days.unique().to_pylist()
        for day in distinct_days:
            if day is None or (only is not None and day not in only):
                continue
            part = (
                batch if len(distinct_days) == 1 else batch.filter(pc.equal(days, pa.scalar(day)))
            )
            if day != self.date:
                self.finish()
                self._open(day)
            self.buffer.append(part)
            self.buffered += part.num_rows
            if self.buffered >= ROW_GROUP_ROWS:
                self._flush()

    def _open(self, day: str) -> None:
        directory = f"{self.run.root}/{self.dataset.name}/date={day}"
        self.paths = self.run.stage(directory, self.filename)
        self.stream = self.run.fs.open_output_stream(self.paths[0])
        self.writer = pq.ParquetWriter(self.stream, self.schema, compression="zstd")
        self.date = day
        self.rows = 0

    def _flush(self) -> None:
        if not self.buffer or self.writer is None:
            return
        self.writer.write_table(
            pa.Table.from_batches(self.buffer, self.schema), row_group_size=ROW_GROUP_ROWS
        )
        self.rows += self.buffered
        self.report.rows += self.buffered
        self.buffer, self.buffered = [], 0
        if self.run.progress is not None:
            self.run.progress(self.dataset.name, self.report.rows)

    def finish(self) -> None:
        """Close the open file and stage it for the commit."""
        if self.writer is None or self.paths is None:
            return
        self._flush()
        self.writer.close()
        self.stream.close()
        self.writer = None
        temporary, final = self.paths
        self.run.staged_file(temporary, final, self.rows)
        self.report.files.append(
            {"path": final.removeprefix(self.run.root + "/"), "rows": self.rows}
        )

    def discard(self) -> None:
        """After an error: release the open file, left to the run's abort to delete."""
        for closable in (self.writer, self.stream):
            if closable is not None:
                # The run is failing already: its error is the one to see.
                with contextlib.suppress(Exception):
                    closable.close()
        self.writer = self.stream = None


def _days(column: pa.Array[Any]) -> pa.Array[Any]:
    """Each row's UTC date as ``YYYY-MM-DD`` text."""
    if pa.types.is_timestamp(column.type):
        column = column.cast(pa.date32(), safe=False)
    return column.cast(pa.string())


def _stored_type(type_: pa.DataType) -> pa.DataType:
    """How SQLite stores a column of export type ``type_``: times as text, booleans as 0/1."""
    if pa.types.is_timestamp(type_) or pa.types.is_date(type_):
        return pa.string()
    if pa.types.is_boolean(type_):
        return pa.int64()
    return type_


def _sqlite_param(engine: Engine, value: dt.datetime | dt.date) -> str:
    if isinstance(value, dt.datetime):
        text: str = driver_time(engine, value)
        return text
    return value.isoformat()


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
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
