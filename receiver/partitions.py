"""The partition writer: time-ordered Arrow batches into one Parquet file per UTC day.

Rows are written one row group at a time (`ROW_GROUP_ROWS`), so memory does
not grow with the table; each file is staged under a temporary name by the
run (`Stager`) and renamed only when the run commits.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from receiver.destinations import PARTITION_KEY
from receiver.errors import ReceiverError

if TYPE_CHECKING:
    from receiver.export import Dataset, DatasetReport, Progress


class Stager(Protocol):
    """What a writer needs of its run: where files go and how they are staged."""

    root: str
    fs: pafs.FileSystem
    progress: Progress | None

    def stage(self, directory: str, filename: str) -> tuple[str, str]: ...

    def staged_file(self, temporary: str, final: str, rows: int) -> None: ...


ROW_GROUP_ROWS = 128 * 1024


class PartitionWriter:
    """Writes time-ordered batches to one file per UTC date, in row groups of a useful size."""

    def __init__(self, run: Stager, dataset: Dataset, filename: str, report: DatasetReport) -> None:
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
