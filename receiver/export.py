"""Parquet export: each table a Hive-partitioned dataset, written incrementally and streaming.

Layout: ``DEST/<dataset>/date_=YYYY-MM-DD/<file>.parquet`` (zstd), plus
``DEST/_manifest.json``, written last, with each dataset's watermark and every
run's files and row counts. Datasets: ``tasks``, ``deliveries`` (metadata; the
body only on request), every result table, and the rollup views
``cost_daily`` and ``cost_by_label``.

The partition key is ``date_`` because no column can be named that: payload
names are sanitised to ``[a-z0-9_]`` with no leading or trailing underscore,
and the receiver's own columns start with one. With ``date=``, a result
column ``date`` was replaced by the partition value in DuckDB, pyarrow and
Polars (and refused by pandas). A leading underscore (``_date=``) would not
do: pyarrow and pandas skip directories starting with ``_`` or ``.``.
Destinations written in the old layout (manifest format 1) are refused.

One run at a time per local folder: see `receiver.destinations` (the manifest,
the commit journal and the ``flock`` lock live there).

Partitions are UTC dates. Deliveries and result rows go by the time their
delivery was received (``received_at`` / ``_received_at``) and are
append-only but for reprocessing (below): a run exports the rows received in
``[watermark, until)`` into ``part-<watermark>.parquet``, so a retried run
overwrites what an interrupted one left rather than duplicating it. A task
goes by ``first_seen_at`` (when its first delivery was received), and since
later deliveries update a task, a run rewrites whole the day partitions of
tasks whose last delivery is new (``tasks.parquet``); the rollups are
rewritten for the same days. ``until`` stops short of the oldest delivery
not yet processed (its rows do not exist yet) and of the last ``lag``
seconds (deliveries still being committed).

One run is one snapshot: every dataset is cut at ``until`` by the delivery
its rows come from (`Dataset.cut_column`): a row is in the run if that
delivery was received before ``until``. Deliveries and result rows by their
receive time; ``tasks`` by the receive time of ``last_delivery_id`` (a task
updated within the lag waits for the next run, with its delivery); a dataset
added later by the first of `CUT_COLUMNS` it has. The rollups are summed for
the run from the tasks it exports (`receiver.rollups.task_sums_sql`), not read
from the views, so they count no task the run leaves out.

Reprocessing (``receiver reprocess``) re-derives the rows of deliveries
already exported, below the watermarks. Each run records in the manifest the
``processed_at`` it looked up to (``processed_marks``, per dataset: ``P`` =
the run's start minus ``lag``); the next run looks up, on the partial index
over ``deliveries.processed_at``, the deliveries processed in ``[mark, P)``
and received before the dataset's watermark, and rewrites their UTC days
whole: for ``deliveries`` and the result tables of their hooks, every row of
the day received before ``until`` goes into the run's file and the day's
other files are deleted (a day left with no rows loses its files); for
``tasks`` and the rollups, the days of those deliveries' tasks.
``processed_at`` is set before its transaction commits, so the window ends
``lag`` before the run, as ``until`` does; a processing whose commit takes
longer than ``lag`` (less however far the receiver's clock is behind the
exporter's) is missed, the assumption ``until`` makes too. A delivery
received just before ``until`` and processed just after ``P`` was exported
as it is: the run records those (``processed_seen``, id and
``processed_at``, read before the datasets: about the delivery rate times
the lag) and the next run skips them while their ``processed_at`` is
unchanged, so ordinary traffic rewrites nothing. A run with nothing
reprocessed costs two index lookups (measured at 1M deliveries: 0.5 ms on
SQLite, 2 ms on PostgreSQL; 10,000 reprocessed: 46 ms on either). A manifest
written before these keys starts the window at the dataset's watermark:
reprocessing done before then stays unexported (export to a new folder to
get it).

Files are written under a hidden temporary name (``.<name>.<run>.tmp``,
ignored by pyarrow and by ``*.parquet`` globs) and renamed only once every
dataset is written; a failed run deletes its temporary files and leaves the
manifest as it was. A run that deletes replaced files first writes a journal
(``DEST/.export-journal.json``: its renames, deletions and new manifest);
killed after that, its renames may show beside the files they replace, and
the next run completes the journal before anything else.

Types: integers int64, floats float64 (money too: WebRun reports cost as a
JSON number and ``tasks.cost_usd`` stores a float, so a decimal would only
pretend to precision), booleans bool, timestamps ``timestamp[us, UTC]``,
dates date32, text and JSON text strings. Rows go out as Arrow record
batches written one row group at a time, so memory does not grow with the
table; a reader thread fetches the next batches while the current ones are
compressed, so reading and writing overlap.

The stages, one module each: this one plans a run and writes its SQL;
`receiver.windows` says up to when and which days to rewrite;
`receiver.readers` reads the database into Arrow (ADBC; SQLite in a child
process, and why); `receiver.partitions` writes the Parquet files;
`receiver.destinations` commits them.

Readers: DuckDB ``read_parquet('DEST/t/**/*.parquet', union_by_name = true)``;
pyarrow ``dataset(..., partitioning="hive", schema=<unified>)``; pandas
``read_parquet(DEST/t, schema=<unified>)`` (pandas otherwise takes the first
file's columns when a table grew between runs; an explicit schema needs a
``date_`` string field to keep the partition column).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import pyarrow as pa
import pyarrow.fs as pafs
from sqlalchemy import Column, Engine, MetaData, Table, select
from sqlalchemy import types as sqltypes

from receiver import destinations
from receiver.columns import ColumnType
from receiver.db import is_sqlite, utcnow
from receiver.destinations import (
    JOURNAL,
    PARTITION_KEY,
    apply_plan,
    complete_journal,
    delete_temporaries,
    destination_lock,
    open_destination,
    read_manifest,
    relative,
)
from receiver.errors import ReceiverError
from receiver.models import (
    Delivery,
    ResultColumn,
    ResultTable,
    Task,
    TaskEvent,
    TaskFile,
    TaskNetwork,
)
from receiver.partitions import PartitionWriter
from receiver.readers import (
    SQLITE_PLACEHOLDERS,
    PostgresqlReader,
    SqliteChild,
    read_ahead,
    sqlite_param,
    sqlite_path,
    stored_type,
)
from receiver.rollups import VIEWS, task_sums_sql
from receiver.schema import TableInfo
from receiver.windows import (
    day_ranges,
    day_start,
    export_until,
    exported_recently,
    reprocessed_days,
    task_day,
)

__all__ = [
    "JOURNAL",
    "PARTITION_KEY",
    "Dataset",
    "DatasetReport",
    "ExportReport",
    "arrow_type",
    "complete_journal",
    "datasets",
    "export",
    "open_destination",
    "read_manifest",
]

#: Read batch sizes: measured, 64 Ki rows (SQLite) or 16 MB (PostgreSQL, ADBC's default)
#: cost 30-50 MB more peak memory at 1M rows for no speed.
_SQLITE_BATCH_ROWS = 16 * 1024
#: Batches the reader thread may hold ahead of the writer (memory: a few batches).
_READ_AHEAD = 2

Progress = Callable[[str, int], None]

#: Columns that tie a row to its delivery, in the order `Dataset.cut_column` looks for them;
#: a ``*_received_at`` one holds the delivery's receive time, the others its id.
CUT_COLUMNS = ("_received_at", "last_delivery_id", "_delivery_id", "delivery_id")


@dataclass(frozen=True)
class Dataset:
    """One exported table or view: its columns, partitioning time, and write mode."""

    name: str
    table: Table
    time_column: str
    #: "append": new rows only; "rewrite": whole day partitions, replaced.
    mode: Literal["append", "rewrite"]
    #: A result table's hook: only its deliveries have rows in it.
    hook: str | None = None
    #: The column that cuts the dataset at the run's instant (`cut_column`); None: inferred.
    cut: str | None = None
    #: A rollup view: its rows are summed afresh from the tasks the run exports (cut by theirs).
    sums_of_tasks: bool = False

    def cut_column(self) -> str | None:
        """The column naming the delivery each row comes from: its receive time, or its id.

        Inferred from the columns when not given, so every dataset follows the rule:
        ``_received_at`` (a time), then ``last_delivery_id``, ``_delivery_id``,
        ``delivery_id`` (ids). The rollups' sums go by their tasks' ``last_delivery_id``.
        """
        if self.cut is not None:
            return self.cut
        names = {c.name for c in self.table.columns}
        return next((c for c in CUT_COLUMNS if c in names), None)

    def schema(self) -> pa.Schema:
        names = [c.name for c in self.table.columns]
        if PARTITION_KEY in names:  # sanitised names cannot end in "_": never, but never silent
            raise ReceiverError(f"{self.name}: a column is named like the partition key")
        return pa.schema([pa.field(c.name, arrow_type(c.type)) for c in self.table.columns])


@dataclass
class DatasetReport:
    """What one run wrote for one dataset."""

    rows: int = 0
    files: list[dict[str, Any]] = field(default_factory=list)
    since: str | None = None
    #: Days rewritten whole: deliveries received below the watermark were (re)processed.
    rewritten: list[str] = field(default_factory=list)
    #: Files those rewrites replaced, deleted (paths under DEST).
    replaced: list[str] = field(default_factory=list)


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
        # A task's timeline and its record's files and visited URLs, by delivery time.
        *(
            Dataset(m.__tablename__, m.__table__, "received_at", "append")  # type: ignore[arg-type]
            for m in (TaskEvent, TaskFile, TaskNetwork)
        ),
        Dataset(
            "deliveries",
            Table("deliveries", MetaData(), *delivery_columns),
            "received_at",
            "append",
            cut="received_at",
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
        Dataset(name, info.sqla_table(), "_received_at", "append", info.hook)
        for name, info in infos.items()
    ]
    out += [
        Dataset(name, view, "day", "rewrite", cut="last_delivery_id", sums_of_tasks=True)
        for name, view in VIEWS.items()
    ]
    return out


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
    now: dt.datetime | None = None,
) -> ExportReport:
    """Export what is new since the destination's manifest (or ``since``) to ``dest``.

    ``filesystem`` overrides the filesystem ``dest`` implies (``dest`` is then a
    path inside it). ``tables`` limits the run to those datasets. ``now`` is where
    ``lag`` counts back from (default: the clock), so a test can place the cut exactly.
    """

    fs, root = (filesystem, dest.rstrip("/")) if filesystem is not None else open_destination(dest)
    with destination_lock(fs, root) as locked:
        complete_journal(fs, root)  # first: it names temporary files still to be renamed
        if locked:
            delete_temporaries(root)
        run = _Run(engine, fs, root, uuid.uuid4().hex[:12], progress)
        started = utcnow()
        try:
            run.start_reader()  # its start-up overlaps the planning below
            manifest = read_manifest(fs, root)
            chosen = datasets(engine, with_bodies=with_bodies)
            if tables:
                known = {d.name for d in chosen}
                unknown = sorted(set(tables) - known)
                if unknown:
                    raise ValueError(f"no such table to export: {', '.join(unknown)}")
                chosen = [d for d in chosen if d.name in tables]
            # Before `until`: every processing that set processed_at < processed_until
            # has committed by the time the queries below run (the lag's assumption).
            clock = now or utcnow()
            processed_until = clock - lag
            until = export_until(engine, lag, clock)
            report = ExportReport(run.run_id, until, {})
            lowers: dict[str, dt.datetime | None] = {}
            for dataset in chosen:
                mark = manifest["watermarks"].get(dataset.name)
                lowers[dataset.name] = max(
                    [t for t in (since, dt.datetime.fromisoformat(mark) if mark else None) if t],
                    default=None,
                )
            running = [d for d in chosen if _before(lowers[d.name], until)]
            names = {d.name for d in running}
            rewrites = reprocessed_days(engine, manifest, running, lowers, since, processed_until)
            seen = exported_recently(
                engine, [lowers[d.name] for d in running], until, processed_until
            )
            for dataset in chosen:
                lower = lowers[dataset.name]
                if dataset.name not in names:
                    report.datasets[dataset.name] = DatasetReport(
                        since=None if lower is None else lower.isoformat()
                    )
                    continue
                report.datasets[dataset.name] = run.dataset(
                    dataset, lower, until, rewrites.get(dataset.name, set()), since
                )
            run.close_readers()
            replaced = run.replaced_files(chosen, report)
            for name in report.datasets:
                manifest["watermarks"][name] = until.isoformat()
            marks = manifest.setdefault("processed_marks", {})
            for dataset in running:
                marks[dataset.name] = processed_until.isoformat()
            manifest["processed_seen"] = {"at": processed_until.isoformat(), "deliveries": seen}
            manifest["runs"].append(
                {
                    "run_id": run.run_id,
                    "started_at": started.isoformat(),
                    "finished_at": utcnow().isoformat(),
                    "until": until.isoformat(),
                    "datasets": {name: _run_entry(r) for name, r in report.datasets.items()},
                }
            )
            plan = {
                "run_id": run.run_id,
                "renames": [
                    [relative(root, s.temporary), relative(root, s.final)] for s in run.staged
                ],
                "deletions": [relative(root, path) for path in replaced],
                "manifest": manifest,
            }
            if replaced:  # a crash between renames and deletions would show both: journal it
                run.write_atomically(f"{root}/{JOURNAL}", json.dumps(plan).encode())
        except BaseException:
            run.abort()
            raise
        apply_plan(fs, root, plan, run.run_id)
        return report


def _run_entry(report: DatasetReport) -> dict[str, Any]:
    entry: dict[str, Any] = {"since": report.since, "rows": report.rows, "files": report.files}
    if report.rewritten:
        entry["rewritten"] = report.rewritten
    if report.replaced:
        entry["replaced"] = report.replaced
    return entry


def _before(lower: dt.datetime | None, until: dt.datetime) -> bool:
    """Whether a dataset starting at ``lower`` has rows to export before ``until``."""
    return lower is None or lower < until


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
        #: Which of `receiver.readers`' two readers `_read` streams through, each with its SQL.
        self.sqlite = is_sqlite(engine)
        self.staged: list[_Staged] = []
        self.open_temporaries: set[str] = set()
        self._postgresql: PostgresqlReader | None = None
        self._sqlite_child: SqliteChild | None = None

    def start_reader(self) -> None:
        """Start the SQLite reader process now, so its start-up overlaps other work."""
        if self.sqlite and self._sqlite_child is None:
            self._sqlite_child = SqliteChild(sqlite_path(self.engine))
            self._sqlite_child.start()

    def dataset(
        self,
        dataset: Dataset,
        lower: dt.datetime | None,
        until: dt.datetime,
        rewrite: set[str],
        since: dt.datetime | None,
    ) -> DatasetReport:
        """Write the dataset's new rows, and the days in ``rewrite`` whole."""
        report = DatasetReport(since=None if lower is None else lower.isoformat())
        where: list[str] = []
        params: list[dt.datetime | dt.date] = []
        only: set[str] | None = None
        ranges: list[tuple[dt.date, dt.date]] = []
        column = self._q(dataset.time_column)
        if dataset.mode == "append":
            where = [f"{column} < ?"]
            params = [until]
            if lower is not None:
                window = f"{column} >= ?"
                window_params: list[dt.datetime | dt.date] = [lower]
                for first, last in day_ranges(rewrite):
                    start = day_start(first, dataset)
                    if since is not None:
                        start = max(cast(dt.datetime, start), since)
                    window += f" OR ({column} >= ? AND {column} < ?)"
                    window_params += [start, day_start(last + dt.timedelta(days=1), dataset)]
                where.insert(0, f"({window})")
                params[:0] = window_params
            filename = f"part-{_stamp(lower)}.parquet"
        else:
            filename = f"{dataset.name}.parquet"
            # A first run rewrites every day there is, so it needs no changed-day scan.
            if lower is not None:
                only = self._changed_days(lower, until) | rewrite
                if not only:
                    return report
                ranges = day_ranges(only)
                where = [
                    "(" + " OR ".join(f"({column} >= ? AND {column} < ?)" for _ in ranges) + ")"
                ]
                for first, last in ranges:
                    params += [
                        day_start(first, dataset),
                        day_start(last + dt.timedelta(days=1), dataset),
                    ]
        source = None
        cut_column = dataset.cut_column()
        if dataset.sums_of_tasks and cut_column is not None:
            source, where, params = self._task_sums(dataset, cut_column, ranges, until)
        elif cut_column is not None:
            where.append(self._cut(self._q(dataset.table.name), cut_column))
            params.append(until)
        report.rewritten = sorted(rewrite)
        writer = PartitionWriter(self, dataset, filename, report)
        try:
            for batch in read_ahead(self._read(dataset, where, params, source), _READ_AHEAD):
                writer.write(batch, only)
        except BaseException:
            writer.discard()
            raise
        writer.finish()
        return report

    def _q(self, name: str) -> str:
        quoted: str = self.engine.dialect.identifier_preparer.quote(name)
        return quoted

    def _cut(self, source: str, column: str) -> str:
        """The snapshot rule as SQL, one ``?`` for ``until``: the row's delivery came before it."""
        if column.endswith("received_at"):
            return f"{source}.{self._q(column)} < ?"
        return (
            f"EXISTS (SELECT 1 FROM deliveries AS cut_ WHERE cut_.id = {source}.{self._q(column)}"
            " AND cut_.received_at < ?)"
        )

    def _task_sums(
        self,
        dataset: Dataset,
        cut_column: str,
        ranges: list[tuple[dt.date, dt.date]],
        until: dt.datetime,
    ) -> tuple[str, list[str], list[dt.datetime | dt.date]]:
        """A rollup's source, summed from the tasks of its days that the run's cut lets in."""

        conditions: list[str] = []
        params: list[dt.datetime | dt.date] = []
        if ranges:
            day = "(t.first_seen_at >= ? AND t.first_seen_at < ?)"
            conditions.append("(" + " OR ".join(day for _ in ranges) + ")")
            for first, last in ranges:
                params += [
                    dt.datetime.combine(first, dt.time(), dt.UTC),
                    dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), dt.UTC),
                ]
        conditions.append(self._cut("t", cut_column))
        params.append(until)
        source = task_sums_sql(dataset.name, self.engine, " AND ".join(conditions))
        return source, [], params

    def _changed_days(self, lower: dt.datetime, until: dt.datetime) -> set[str]:
        """UTC days (first seen) of tasks whose last delivery was received in the window."""

        query = (
            select(task_day(self.engine))
            .distinct()
            .select_from(Task)
            .join(Delivery, Delivery.id == Task.last_delivery_id)
            .where(Delivery.received_at >= lower, Delivery.received_at < until)
        )
        with self.engine.connect() as conn:
            return set(conn.scalars(query))

    def _read(
        self,
        dataset: Dataset,
        where: list[str],
        params: list[dt.datetime | dt.date],
        source: str | None = None,
    ) -> Generator[pa.RecordBatch, None, None]:
        """Stream the dataset's rows in time order as batches of its Arrow schema.

        ``source`` replaces the dataset's table (a subquery, as `_task_sums` makes).
        """
        schema = dataset.schema()
        columns = ", ".join(self._q(f.name) for f in schema)
        source = source or self._q(dataset.table.name)
        order = self._q(dataset.time_column)
        if self.sqlite:
            self.start_reader()
            assert self._sqlite_child is not None
            # The first row, a typed placeholder sorted first by its empty time, fixes
            # each column's Arrow type: ADBC infers types from the first batch's values,
            # and a column that is NULL throughout it would otherwise be typed int64.
            placeholder = ", ".join(
                f"{SQLITE_PLACEHOLDERS[stored_type(f.type)]} AS {self._q(f.name)}" for f in schema
            )
            conditions = " AND ".join([f"{order} IS NOT NULL", *where])
            sql = (
                f"SELECT {placeholder} UNION ALL "
                f"SELECT {columns} FROM {source} WHERE {conditions} ORDER BY {order}"
            )
            yield from self._sqlite_child.read(
                sql, [sqlite_param(p) for p in params], schema, _SQLITE_BATCH_ROWS
            )
            return
        if self._postgresql is None:
            self._postgresql = PostgresqlReader(self.engine)
        sql = f"SELECT {columns} FROM {source}"
        if where:
            sql += f" WHERE {' AND '.join(where)}"
        yield from self._postgresql.read(f"{sql} ORDER BY {order}", params, schema)

    def stage(self, directory: str, filename: str) -> tuple[str, str]:
        self.fs.create_dir(directory, recursive=True)
        temporary = f"{directory}/.{filename}.{self.run_id}.tmp"
        self.open_temporaries.add(temporary)
        return temporary, f"{directory}/{filename}"

    def staged_file(self, temporary: str, final: str, rows: int) -> None:
        self.open_temporaries.discard(temporary)
        self.staged.append(_Staged(temporary, final, rows))

    def close_readers(self) -> None:
        """End the database readers: every dataset is written."""
        self._close()

    def replaced_files(self, chosen: list[Dataset], report: ExportReport) -> list[str]:
        """The visible files of rewritten append days that this run's files replace."""

        finals = {s.final for s in self.staged}
        doomed: list[str] = []
        for dataset in chosen:
            # "rewrite" datasets hold one file a day, of one name: its rename replaces it.
            if dataset.mode != "append" or dataset.name not in report.datasets:
                continue
            name = dataset.name
            for day in report.datasets[name].rewritten:
                directory = f"{self.root}/{name}/{PARTITION_KEY}={day}"
                selector = pafs.FileSelector(directory, allow_not_found=True)
                for info in self.fs.get_file_info(selector):
                    if (
                        info.type == pafs.FileType.File
                        and info.base_name.endswith(".parquet")
                        and not info.base_name.startswith(".")
                        and info.path not in finals
                    ):
                        doomed.append(info.path)
        for path in sorted(doomed):
            shown = relative(self.root, path)
            report.datasets[shown.split("/", 1)[0]].replaced.append(shown)
        return sorted(doomed)

    def abort(self) -> None:
        """Delete this run's temporary files; nothing it wrote becomes visible."""
        self._close()
        for path in [s.temporary for s in self.staged] + sorted(self.open_temporaries):
            with contextlib.suppress(OSError):
                self.fs.delete_file(path)
        self.staged = []
        self.open_temporaries.clear()

    def _close(self) -> None:
        if self._postgresql is not None:
            self._postgresql.close()
            self._postgresql = None
        if self._sqlite_child is not None:
            self._sqlite_child.close()
            self._sqlite_child = None

    def write_atomically(self, path: str, data: bytes) -> None:
        destinations.write_atomically(self.fs, path, data, self.run_id)
