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

A run holds an exclusive lock on ``DEST/.export.lock`` (``flock``) from
reading the manifest to writing it, so a second export to the same local
folder fails at once with `DestinationBusy`; the OS drops the lock when its
holder dies, so a killed run never blocks the next one, which deletes the
temporary files the killed run left. Remote destinations (``s3://``) are not
locked: pyarrow has no conditional write to build a lock object on.

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

Both databases are read with ADBC, straight into Arrow with no Python object
per value. PostgreSQL in this process (libpq ``COPY``). SQLite in a child
process (`serve_sqlite_reads`) that streams Arrow IPC back through a pipe: the
ADBC SQLite driver bundles its own SQLite library, and two SQLite libraries
in one process break SQLite's POSIX locking (closing either's file
descriptor drops the other's locks). That is also why this module imports
SQLAlchemy and the receiver's models only inside functions: the child imports
it and stays small.

Readers: DuckDB ``read_parquet('DEST/t/**/*.parquet', union_by_name = true)``;
pyarrow ``dataset(..., partitioning="hive", schema=<unified>)``; pandas
``read_parquet(DEST/t, schema=<unified>)`` (pandas otherwise takes the first
file's columns when a table grew between runs; an explicit schema needs a
``date_`` string field to keep the partition column).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import glob
import io
import json
import os
import queue
import re
import struct
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Literal, cast

import pyarrow as pa
import pyarrow.compute as pc

from receiver.errors import DestinationBusy, ReceiverError

if TYPE_CHECKING:
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    from sqlalchemy import Engine, Table
    from sqlalchemy import types as sqltypes

MANIFEST = "_manifest.json"
#: A run's commit plan (renames, deletions, manifest), written before its first rename when it
#: replaces files, and completed by the next run if the run died before finishing it.
JOURNAL = ".export-journal.json"
#: The manifest's format: 2 since partitions are ``date_=`` (1 wrote ``date=``).
FORMAT = 2
#: The Hive partition key: a name no exported column can have (see the module docstring).
PARTITION_KEY = "date_"
#: Held (``flock``) by the run exporting to a local folder; hidden from readers and globs.
LOCK = ".export.lock"
#: A staged file's name (`_Run.stage`, `_Run.write_atomically`): ``.<name>.<run id>.tmp``.
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")
ROW_GROUP_ROWS = 128 * 1024
#: Read batch sizes: measured, 64 Ki rows (SQLite) or 16 MB (PostgreSQL, ADBC's default)
#: cost 30-50 MB more peak memory at 1M rows for no speed.
_SQLITE_BATCH_ROWS = 16 * 1024
_POSTGRESQL_BATCH_BYTES = 4 << 20
#: Batches the reader thread may hold ahead of the writer (memory: a few batches).
_READ_AHEAD = 2
#: The SQLite child's pipe: Linux's default 64 KiB costs a context switch per 64 KiB.
_PIPE_BYTES = 1 << 20

Progress = Callable[[str, int], None]


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
    from sqlalchemy import types as sqltypes

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
    from sqlalchemy import Column, MetaData, Table, select

    from receiver.columns import ColumnType
    from receiver.models import (
        Delivery,
        ResultColumn,
        ResultTable,
        Task,
        TaskEvent,
        TaskFile,
        TaskNetwork,
    )
    from receiver.rollups import VIEWS
    from receiver.schema import TableInfo

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
    out += [Dataset(name, view, "day", "rewrite") for name, view in VIEWS.items()]
    return out


def open_destination(dest: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and root path for a local folder or a URI (``s3://bucket/prefix``)."""
    import pyarrow.fs as pafs

    if "://" in dest:
        fs, path = pafs.FileSystem.from_uri(dest)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(dest)


def read_manifest(fs: pafs.FileSystem, root: str) -> dict[str, Any]:
    """The destination's manifest, or an empty one before the first run."""

    path = f"{root}/{MANIFEST}"
    if not _exists(fs, path):
        return {"format": FORMAT, "partition_key": PARTITION_KEY, "watermarks": {}, "runs": []}
    with fs.open_input_stream(path) as stream:
        manifest: dict[str, Any] = json.loads(stream.read())
    if manifest.get("format") == 1:
        raise ReceiverError(
            f"{root} holds an export in the old layout (partitions date=..., which hide a result"
            f" column named date from Hive readers); export to a new folder, which gets every"
            f" row again in the current layout ({PARTITION_KEY}=...), and delete the old one"
        )
    if manifest.get("format") != FORMAT:
        raise ReceiverError(f"{path}: manifest format {manifest.get('format')!r} is not {FORMAT}")
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
    from receiver.db import utcnow

    fs, root = (filesystem, dest.rstrip("/")) if filesystem is not None else open_destination(dest)
    with destination_lock(fs, root) as locked:
        complete_journal(fs, root)  # first: it names temporary files still to be renamed
        if locked:
            _delete_temporaries(root)
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
            processed_until = utcnow() - lag
            until = export_until(engine, lag)
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
            rewrites = _reprocessed_days(engine, manifest, running, lowers, since, processed_until)
            seen = _exported_recently(
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
                    [_relative(root, s.temporary), _relative(root, s.final)] for s in run.staged
                ],
                "deletions": [_relative(root, path) for path in replaced],
                "manifest": manifest,
            }
            if replaced:  # a crash between renames and deletions would show both: journal it
                run.write_atomically(f"{root}/{JOURNAL}", json.dumps(plan).encode())
        except BaseException:
            run.abort()
            raise
        _apply(fs, root, plan, run.run_id)
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


def _relative(root: str, path: str) -> str:
    return path.removeprefix(root + "/")


def complete_journal(fs: pafs.FileSystem, root: str) -> bool:
    """Finish the commit of a run that died after writing its journal; whether there was one."""

    path = f"{root}/{JOURNAL}"
    if not _exists(fs, path):
        return False
    with fs.open_input_stream(path) as stream:
        plan: dict[str, Any] = json.loads(stream.read())
    _apply(fs, root, plan, uuid.uuid4().hex[:12])
    return True


def _apply(fs: pafs.FileSystem, root: str, plan: dict[str, Any], run_id: str) -> None:
    """Renames, then deletions, then the manifest, then the journal goes: each step redoable."""

    for temporary, final in plan["renames"]:
        source = f"{root}/{temporary}"
        if _exists(fs, source):
            fs.move(source, f"{root}/{final}")
        elif not _exists(fs, f"{root}/{final}"):
            raise ReceiverError(f"{root}/{JOURNAL}: {temporary} and {final} are both missing")
    _delete_replaced(fs, [f"{root}/{p}" for p in plan["deletions"]])
    _write_atomically(
        fs, f"{root}/{MANIFEST}", json.dumps(plan["manifest"], indent=2).encode(), run_id
    )
    if plan["deletions"]:
        fs.delete_file(f"{root}/{JOURNAL}")


def _delete_replaced(fs: pafs.FileSystem, paths: list[str]) -> None:
    """Delete the files rewritten days replaced (already gone: deleted by an earlier try)."""

    for path in paths:
        if _exists(fs, path):
            fs.delete_file(path)


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    import pyarrow.fs as pafs

    return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)


def _write_atomically(fs: pafs.FileSystem, path: str, data: bytes, run_id: str) -> None:
    directory, name = path.rsplit("/", 1)
    temporary = f"{directory}/.{name}.{run_id}.tmp"
    fs.create_dir(directory, recursive=True)
    with fs.open_output_stream(temporary) as stream:
        stream.write(data)
    fs.move(temporary, path)


@contextlib.contextmanager
def destination_lock(fs: pafs.FileSystem, root: str) -> Iterator[bool]:
    """Hold ``root``'s export lock; yields whether there is one (local folders only).

    ``flock`` on ``root/.export.lock``, not waited for: a second export to the
    same folder raises `DestinationBusy` at once. The file stays; the lock goes
    with the descriptor, so also when the holder is killed.
    """
    import pyarrow.fs as pafs

    if not isinstance(fs, pafs.LocalFileSystem):
        yield False  # no conditional write in pyarrow's S3 to build a lock on
        return
    from receiver.db import utcnow

    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, LOCK)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 256, 0).decode("utf-8", "replace").strip()
            raise DestinationBusy(
                f"another export to {root} is running ({holder or 'holder unknown'});"
                f" try again once it has finished"
            ) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()}, since {utcnow().isoformat()}\n".encode(), 0)
        yield True
    finally:
        os.close(descriptor)  # releases the lock


def _delete_temporaries(root: str) -> None:
    """Delete what runs that died left staged (only safe while holding the lock).

    Only this module's names are touched: ``.<file>.<run id>.tmp`` in the
    partition folders, and the manifest's and the journal's in ``root``.
    """
    doomed = glob.glob(os.path.join(glob.escape(root), f"*/{PARTITION_KEY}=*/.*.parquet.*.tmp"))
    doomed += glob.glob(os.path.join(glob.escape(root), f".{MANIFEST}.*.tmp"))
    doomed += glob.glob(os.path.join(glob.escape(root), f".{JOURNAL}.*.tmp"))
    for path in doomed:
        if _TEMPORARY.fullmatch(os.path.basename(path)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def export_until(engine: Engine, lag: dt.timedelta) -> dt.datetime:
    """The end of this run's window: ``lag`` ago, but before any delivery not yet processed."""
    from sqlalchemy import func, select

    from receiver.db import utcnow
    from receiver.models import Delivery

    until = utcnow() - lag
    with engine.connect() as conn:
        pending = conn.scalar(
            select(func.min(Delivery.received_at)).where(Delivery.status == "stored")
        )
    if pending is not None:
        until = min(until, _aware(pending))
    return until


def _reprocessed_days(
    engine: Engine,
    manifest: dict[str, Any],
    running: list[Dataset],
    lowers: dict[str, dt.datetime | None],
    since: dt.datetime | None,
    processed_until: dt.datetime,
) -> dict[str, set[str]]:
    """Per dataset, the UTC days to rewrite: where deliveries it exported were (re)processed since.

    A dataset's window of ``processed_at`` runs from the mark its last run recorded
    (an older manifest: its watermark) to ``processed_until``; deliveries the last run
    exported in their current state (same ``processed_at``) do not count. One query, on
    the partial index over ``processed_at``.
    """
    from sqlalchemy import select

    from receiver.models import Delivery

    marks: dict[str, str] = manifest.get("processed_marks", {})
    seen_state: dict[str, Any] = manifest.get("processed_seen") or {}
    seen: dict[str, str] = seen_state.get("deliveries", {})
    windows: dict[str, tuple[dt.datetime, dt.datetime, bool]] = {}
    for dataset in running:
        lower = lowers[dataset.name]
        mark = marks.get(dataset.name) or manifest["watermarks"].get(dataset.name)
        if lower is None or dataset.name not in manifest["watermarks"] or mark is None:
            continue  # nothing exported yet: this run writes every day it has
        applies = seen_state.get("at") is not None and seen_state.get("at") == marks.get(
            dataset.name
        )
        windows[dataset.name] = (dt.datetime.fromisoformat(mark), lower, applies)
    if not windows:
        return {}
    first = min(w[0] for w in windows.values())
    below = max(w[1] for w in windows.values())
    if first >= processed_until:
        return {}
    query = select(Delivery.id, Delivery.hook, Delivery.received_at, Delivery.processed_at).where(
        Delivery.processed_at >= first,
        Delivery.processed_at < processed_until,
        Delivery.received_at < below,
    )
    if since is not None:  # rows before it are not this destination's
        query = query.where(Delivery.received_at >= since)
    with engine.connect() as conn:
        found = [
            (r.id, r.hook, _aware(r.received_at), _aware(r.processed_at))
            for r in conn.execute(query)
        ]
    out: dict[str, set[str]] = {}
    task_days: dict[frozenset[str], set[str]] = {}  # tasks and the rollups ask alike
    for dataset in running:
        if dataset.name not in windows or not found:
            continue
        start, lower, applies = windows[dataset.name]
        picked = [
            (id_, received)
            for id_, hook, received, processed in found
            if processed >= start
            and received < lower
            and (dataset.hook is None or hook == dataset.hook)
            and not (applies and seen.get(id_) == processed.isoformat())
        ]
        if not picked:
            continue
        if dataset.mode == "append":
            out[dataset.name] = {received.date().isoformat() for _, received in picked}
        else:  # tasks and the rollups: the days of those deliveries' tasks
            ids = frozenset(id_ for id_, _ in picked)
            if ids not in task_days:
                task_days[ids] = _task_days(engine, ids)
            days = task_days[ids]
            if days:
                out[dataset.name] = days
    return out


def _exported_recently(
    engine: Engine,
    lowers: list[dt.datetime | None],
    until: dt.datetime,
    processed_until: dt.datetime,
) -> dict[str, str]:
    """Deliveries every running dataset exports in full, processed at or after ``processed_until``.

    Recorded so the next run, whose window starts there, does not take them for
    reprocessed: read before the datasets, so a later processing shows as a new
    ``processed_at``. Few: about the delivery rate times the lag.
    """
    from sqlalchemy import select

    from receiver.models import Delivery

    if not lowers:
        return {}
    query = select(Delivery.id, Delivery.processed_at).where(
        Delivery.processed_at >= processed_until, Delivery.received_at < until
    )
    known = [lower for lower in lowers if lower is not None]
    if known:
        query = query.where(Delivery.received_at >= max(known))
    with engine.connect() as conn:
        return {r.id: _aware(r.processed_at).isoformat() for r in conn.execute(query)}


def _task_day(engine: Engine) -> Any:
    """A task's ``first_seen_at`` UTC day as ``YYYY-MM-DD`` text, in SQL."""
    from sqlalchemy import func

    from receiver.models import Task

    if engine.dialect.name == "sqlite":
        return func.substr(Task.first_seen_at, 1, 10)
    return func.to_char(func.timezone("UTC", Task.first_seen_at), "YYYY-MM-DD")


#: Delivery ids per ``IN`` list when looking up their tasks.
_IDS_PER_QUERY = 500


def _task_days(engine: Engine, delivery_ids: frozenset[str]) -> set[str]:
    """Days of the tasks these deliveries last updated or now belong to."""
    from sqlalchemy import and_, select, union

    from receiver.models import Delivery, Task

    day = _task_day(engine)
    ids = sorted(delivery_ids)
    out: set[str] = set()
    with engine.connect() as conn:
        for i in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[i : i + _IDS_PER_QUERY]
            last = select(day).where(Task.last_delivery_id.in_(chunk))
            owner = (
                select(day)
                .select_from(Task)
                .join(Delivery, and_(Delivery.hook == Task.hook, Delivery.task_id == Task.task_id))
                .where(Delivery.id.in_(chunk))
            )
            out.update(conn.scalars(union(last, owner)))
    return out


def _day_ranges(days: set[str]) -> list[tuple[dt.date, dt.date]]:
    """``days`` as runs of consecutive days, first and last of each."""
    ranges: list[tuple[dt.date, dt.date]] = []
    for day in sorted(dt.date.fromisoformat(d) for d in days):
        if ranges and ranges[-1][1] + dt.timedelta(days=1) == day:
            ranges[-1] = (ranges[-1][0], day)
        else:
            ranges.append((day, day))
    return ranges


def _day_start(day: dt.date, dataset: Dataset) -> dt.datetime | dt.date:
    """The bound a day starts at in the dataset's time column (a date for the rollups)."""
    if dataset.time_column == "day":
        return day
    return dt.datetime.combine(day, dt.time(), dt.UTC)


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
        self.sqlite = engine.dialect.name == "sqlite"
        self.staged: list[_Staged] = []
        self.open_temporaries: set[str] = set()
        self._postgresql: _PostgresqlReader | None = None
        self._sqlite_child: _SqliteChild | None = None

    def start_reader(self) -> None:
        """Start the SQLite reader process now, so its start-up overlaps other work."""
        if self.sqlite and self._sqlite_child is None:
            self._sqlite_child = _SqliteChild(_sqlite_path(self.engine))
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
        column = self._q(dataset.time_column)
        if dataset.mode == "append":
            where = [f"{column} < ?"]
            params = [until]
            if lower is not None:
                window = f"{column} >= ?"
                window_params: list[dt.datetime | dt.date] = [lower]
                for first, last in _day_ranges(rewrite):
                    start = _day_start(first, dataset)
                    if since is not None:
                        start = max(cast(dt.datetime, start), since)
                    window += f" OR ({column} >= ? AND {column} < ?)"
                    window_params += [start, _day_start(last + dt.timedelta(days=1), dataset)]
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
                ranges = _day_ranges(only)
                where = [
                    "(" + " OR ".join(f"({column} >= ? AND {column} < ?)" for _ in ranges) + ")"
                ]
                for first, last in ranges:
                    params += [
                        _day_start(first, dataset),
                        _day_start(last + dt.timedelta(days=1), dataset),
                    ]
        report.rewritten = sorted(rewrite)
        writer = _PartitionWriter(self, dataset, filename, report)
        try:
            for batch in _read_ahead(self._read(dataset, where, params), _READ_AHEAD):
                writer.write(batch, only)
        except BaseException:
            writer.discard()
            raise
        writer.finish()
        return report

    def _q(self, name: str) -> str:
        quoted: str = self.engine.dialect.identifier_preparer.quote(name)
        return quoted

    def _changed_days(self, lower: dt.datetime, until: dt.datetime) -> set[str]:
        """UTC days (first seen) of tasks whose last delivery was received in the window."""
        from sqlalchemy import select

        from receiver.models import Delivery, Task

        query = (
            select(_task_day(self.engine))
            .distinct()
            .select_from(Task)
            .join(Delivery, Delivery.id == Task.last_delivery_id)
            .where(Delivery.received_at >= lower, Delivery.received_at < until)
        )
        with self.engine.connect() as conn:
            return set(conn.scalars(query))

    def _read(
        self, dataset: Dataset, where: list[str], params: list[dt.datetime | dt.date]
    ) -> Generator[pa.RecordBatch, None, None]:
        """Stream the dataset's rows in time order as batches of its Arrow schema."""
        schema = dataset.schema()
        columns = ", ".join(self._q(f.name) for f in schema)
        source = self._q(dataset.table.name)
        order = self._q(dataset.time_column)
        if self.sqlite:
            self.start_reader()
            assert self._sqlite_child is not None
            # The first row, a typed placeholder sorted first by its empty time, fixes
            # each column's Arrow type: ADBC infers types from the first batch's values,
            # and a column that is NULL throughout it would otherwise be typed int64.
            placeholder = ", ".join(
                f"{_SQLITE_PLACEHOLDERS[_stored_type(f.type)]} AS {self._q(f.name)}" for f in schema
            )
            conditions = " AND ".join([f"{order} IS NOT NULL", *where])
            sql = (
                f"SELECT {placeholder} UNION ALL "
                f"SELECT {columns} FROM {source} WHERE {conditions} ORDER BY {order}"
            )
            yield from self._sqlite_child.read(
                sql, [_sqlite_param(p) for p in params], schema, _SQLITE_BATCH_ROWS
            )
            return
        if self._postgresql is None:
            self._postgresql = _PostgresqlReader(self.engine)
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
        import pyarrow.fs as pafs

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
            relative = _relative(self.root, path)
            report.datasets[relative.split("/", 1)[0]].replaced.append(relative)
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
        _write_atomically(self.fs, path, data, self.run_id)


_END = object()


def _read_ahead(
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


class _PostgresqlReader:
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
                statement.bind(_text_row([p.isoformat() for p in params]))
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
                    yield _conform(batch, schema)
        finally:
            reader.close()
            statement.close()

    def close(self) -> None:
        self._connection.close()
        self._database.close()


class _SqliteChild:
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
                "from receiver.export import serve_sqlite_reads; serve_sqlite_reads()"
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
    """Child process of `_SqliteChild`: answer each request line with an Arrow IPC stream.

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
                    statement.bind(_text_row(request["params"]))
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
                            writer.write_batch(_conform(batch, schema))
                out.flush()
            finally:
                statement.close()
    finally:
        for database, connection in databases.values():
            connection.close()
            database.close()


def _text_row(values: list[str]) -> pa.RecordBatch:
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
_SQLITE_PLACEHOLDERS: dict[pa.DataType, str] = {
    pa.string(): "''",
    pa.int64(): "0",
    pa.float64(): "0.0",
    pa.large_binary(): "X''",
}


def _sqlite_path(engine: Engine) -> str:
    path = engine.url.database
    if not path or path == ":memory:":
        raise ValueError("exporting needs an SQLite database file, not an in-memory database")
    return os.path.abspath(path)


class _PartitionWriter:
    """Writes time-ordered batches to one file per UTC date, in row groups of a useful size."""

    def __init__(self, run: _Run, dataset: Dataset, filename: str, report: DatasetReport) -> None:
        self.run = run
        self.dataset = dataset
        self.filename = filename
        self.report = report
        self.schema = dataset.schema()
        self.date: str | None = None
        self.done: set[str] = set()
        self.buffer: list[pa.RecordBatch] = []
        self.buffered = 0
        self.rows = 0
        self.stream: Any = None
        self.writer: pq.ParquetWriter | None = None
        self.paths: tuple[str, str] | None = None

    def write(self, batch: pa.RecordBatch, only: set[str] | None) -> None:
        """Add a batch of rows in time order: each day's rows are one run, sliced, not copied."""
        days = _days(batch.column(self.dataset.time_column))
        runs = pc.run_end_encode(days)  # type: ignore[attr-defined]  # not in pyarrow-stubs
        start = 0
        for end, value in zip(runs.run_ends, runs.values, strict=True):
            part, start = batch.slice(start, end.as_py() - start), end.as_py()
            if not value.is_valid:
                continue
            day = value.as_py().isoformat()
            if only is not None and day not in only:
                continue
            if day != self.date:
                if day in self.done:
                    raise ReceiverError(f"{self.dataset.name}: rows out of time order at {day}")
                self.finish()
                self._open(day)
            self.buffer.append(part)
            self.buffered += part.num_rows
            while self.buffered >= ROW_GROUP_ROWS:
                self._flush(ROW_GROUP_ROWS)

    def _open(self, day: str) -> None:
        import pyarrow.parquet as pq

        directory = f"{self.run.root}/{self.dataset.name}/{PARTITION_KEY}={day}"
        self.paths = self.run.stage(directory, self.filename)
        self.stream = self.run.fs.open_output_stream(self.paths[0])
        self.writer = pq.ParquetWriter(
            self.stream, self.schema, compression="zstd", memory_pool=_memory_pool()
        )
        self.date = day
        self.done.add(day)
        self.rows = 0

    def _flush(self, rows: int | None = None) -> None:
        """Write ``rows`` buffered rows (all by default) as one row group, whatever the batches."""
        if not self.buffer or self.writer is None:
            return
        table = pa.Table.from_batches(self.buffer, self.schema)
        rows = table.num_rows if rows is None else rows
        self.writer.write_table(table.slice(0, rows), row_group_size=ROW_GROUP_ROWS)
        self.buffer = table.slice(rows).to_batches()
        self.buffered -= rows
        self.rows += rows
        self.report.rows += rows
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


def _memory_pool() -> pa.MemoryPool:
    """The allocator for the export's own buffers: the system's, which returns freed memory.

    pyarrow's default (mimalloc) keeps per-thread heaps, and batches made in the
    reader thread and freed in the writer's grow them: ~35 MB more peak at 1M rows.
    """
    return pa.system_memory_pool()


def _days(column: pa.Array[Any]) -> pa.Array[Any]:
    """Each row's UTC date (date32)."""
    if pa.types.is_timestamp(column.type):
        return column.cast(pa.date32(), safe=False)
    return column


def _stored_type(type_: pa.DataType) -> pa.DataType:
    """How SQLite stores a column of export type ``type_``: times as text, booleans as 0/1."""
    if pa.types.is_timestamp(type_) or pa.types.is_date(type_):
        return pa.string()
    if pa.types.is_boolean(type_):
        return pa.int64()
    return type_


def _sqlite_param(value: dt.datetime | dt.date) -> str:
    """A bound time as SQLite stores it (SQLAlchemy's naive UTC text), a date as ISO text."""
    if isinstance(value, dt.datetime):
        return (
            value.astimezone(dt.UTC)
            .replace(tzinfo=None)
            .isoformat(sep=" ", timespec="microseconds")
        )
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
