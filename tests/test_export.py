"""Parquet export read back with pyarrow, DuckDB and pandas, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, func, select
from starlette.testclient import TestClient

from receiver import export as export_module
from receiver.cli import main
from receiver.errors import ReceiverError
from receiver.export import PARTITION_KEY, Dataset, datasets, export
from receiver.models import Delivery, Task
from tests.conftest import DELIVERIES, post

NOW = dt.timedelta(0)
CASES = sorted(p.with_suffix("") for p in DELIVERIES.glob("*.json"))


def settle(engine: Engine, timeout: float = 20.0) -> None:
    """Wait until the pipeline has processed every stored delivery."""
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            pending = conn.scalar(
                select(func.count()).select_from(Delivery).where(Delivery.status == "stored")
            )
        if not pending:
            return
        assert time.monotonic() < deadline, "the pipeline did not finish"
        time.sleep(0.02)


def post_cases(client: TestClient, engine: Engine, stems: list[Path]) -> None:
    for stem in stems:
        case = json.loads(stem.with_suffix(".json").read_text())
        body = stem.with_suffix(".body").read_bytes()
        post(client, "catalogue", body, case["content_type"], query=f"project=p{stem.name[:2]}")
    settle(engine)


def post_items(client: TestClient, engine: Engine, items: list[dict[str, Any]]) -> None:
    post(client, "items", json.dumps(items).encode(), "application/json", query="project=shop")
    settle(engine)


def numeric(dataset: Dataset) -> list[str]:
    return [
        f.name
        for f in dataset.schema()
        if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
    ]


def database_facts(engine: Engine, dataset: Dataset) -> tuple[int, dict[str, float | None]]:
    """Row count and the sum of every numeric column, as the database computes them."""
    columns = numeric(dataset)
    table = dataset.table
    with engine.connect() as conn:
        row = conn.execute(
            select(func.count(), *(func.sum(table.c[c]) for c in columns)).select_from(table)
        ).one()
    sums = {
        c: None if v is None else float(v) if isinstance(v, Decimal) else v
        for c, v in zip(columns, row[1:], strict=True)
    }
    return row[0], sums


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def parquet_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def snapshot(out: Path) -> tuple[list[str], bytes]:
    """Every file a reader could see, and the manifest's exact bytes."""
    return parquet_files(out), (out / "_manifest.json").read_bytes()


def check_readback(engine: Engine, out: Path) -> dict[str, int]:
    """Every dataset read back by pyarrow, DuckDB and pandas equals the database."""
    counts = {}
    for dataset in datasets(engine):
        expected_rows, expected_sums = database_facts(engine, dataset)
        counts[dataset.name] = expected_rows
        path = out / dataset.name
        if expected_rows == 0:
            assert not path.exists() or not list(path.rglob("*.parquet")), dataset.name
            continue
        schema = dataset.schema()

        # pyarrow: one dataset over every file, the schema unified across files.
        files = pads.dataset(path, format="parquet", partitioning="hive")
        partition = pa.schema([pa.field(PARTITION_KEY, pa.string())])
        unified = pa.unify_schemas([*(pq.read_schema(f) for f in files.files), partition])
        table = pads.dataset(path, format="parquet", partitioning="hive", schema=unified).to_table()
        assert table.num_rows == expected_rows, dataset.name
        for f in schema:
            assert table.schema.field(f.name).type == f.type, (dataset.name, f.name)
        for c, value in expected_sums.items():
            got = pc.sum(table.column(c)).as_py()
            assert close(got, value), (dataset.name, c, got, value)
        # The partition key is each row's UTC day of the dataset's time column.
        days = table.column(dataset.time_column).cast(pa.date32(), safe=False).to_pylist()
        assert table.column(PARTITION_KEY).to_pylist() == [str(d) for d in days]

        # DuckDB: union_by_name over the Hive layout.
        glob = f"{path}/**/*.parquet"
        sums = ", ".join(f'sum("{c}")' for c in expected_sums) or "1"
        row = duckdb.execute(
            f"SELECT count(*), {sums} FROM read_parquet('{glob}',"
            " hive_partitioning = true, union_by_name = true)"
        ).fetchall()[0]
        assert row[0] == expected_rows, dataset.name
        for (c, value), got in zip(expected_sums.items(), row[1:], strict=True):
            assert close(None if got is None else float(got), value), (dataset.name, c)
        described = duckdb.execute(
            f"DESCRIBE SELECT * FROM read_parquet('{glob}', union_by_name = true)"
        ).fetchall()
        kinds = {r[0]: r[1] for r in described}
        for f in schema:
            if pa.types.is_timestamp(f.type):
                assert kinds[f.name] == "TIMESTAMP WITH TIME ZONE", f.name
            if pa.types.is_integer(f.type):
                assert kinds[f.name] == "BIGINT", f.name

        # pandas, with Arrow-backed dtypes (NULL integers stay integers) and the unified
        # schema (pandas would otherwise take the first file's columns).
        frame = pd.read_parquet(path, dtype_backend="pyarrow", schema=unified)
        assert len(frame) == expected_rows, dataset.name
        for c, value in expected_sums.items():
            got = frame[c].sum() if frame[c].notna().any() else None
            assert close(None if got is None else float(got), value), (dataset.name, c)
        for f in schema:
            if pa.types.is_timestamp(f.type):
                assert str(frame[f.name].dtype) == "timestamp[us, tz=UTC][pyarrow]"
    return counts


def reader_processes() -> list[int]:
    """Children of this process still running the SQLite reader (`serve_sqlite_reads`)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == os.getpid() and b"serve_sqlite_reads" in cmdline:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "export"


def test_every_dataset_reads_back_equal(client: TestClient, engine: Engine, out: Path) -> None:
    post_cases(client, engine, CASES)
    post_items(client, engine, [{"sku": "A", "price": 1.5, "qty": 2, "ok": True}])
    report = export(engine, str(out), lag=NOW)
    counts = check_readback(engine, out)
    assert counts["tasks"] == 7  # 11 names only 05's task id: it joins that task
    assert counts["deliveries"] == len(CASES) + 1
    assert any(n.startswith("results__") and c for n, c in counts.items())
    assert {n: r.rows for n, r in report.datasets.items()} == counts

    # Layout: Hive partitions by UTC date, hidden manifest, no body unless asked.
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert (out / "tasks" / f"date_={today}" / "tasks.parquet").is_file()
    assert (out / "cost_daily" / f"date_={today}" / "cost_daily.parquet").is_file()
    assert "body" not in pq.read_schema(next((out / "deliveries").rglob("*.parquet"))).names
    assert not [p for p in parquet_files(out) if ".tmp" in p]

    # Timestamps are the database's instants, as UTC.
    with engine.connect() as conn:
        seen = {r.task_key: r.first_seen_at for r in conn.execute(select(Task))}
    table = pads.dataset(out / "tasks", partitioning="hive").to_table()
    for key, when in zip(
        table.column("task_key").to_pylist(), table.column("first_seen_at").to_pylist(), strict=True
    ):
        stored = seen[key]
        assert when == (stored if stored.tzinfo else stored.replace(tzinfo=dt.UTC))
    # The cost total is the database's to the cent, unknown costs stay null.
    costs = table.column("cost_usd")
    assert costs.null_count == 1
    with engine.connect() as conn:
        total = conn.scalar(select(func.sum(Task.cost_usd)))
        assert round(pc.sum(costs).as_py(), 2) == round(float(total or 0), 2)


def test_incremental_runs_add_only_what_is_new(
    client: TestClient, engine: Engine, out: Path
) -> None:
    post_cases(client, engine, CASES[:5])
    post_items(client, engine, [{"sku": "A", "price": 1.5}, {"sku": "B", "price": 2.0}])
    first = export(engine, str(out), lag=NOW)
    files_after_first = parquet_files(out)

    # New rows, and a column the result table did not have.
    post_cases(client, engine, CASES[5:])
    post_items(client, engine, [{"sku": "C", "price": 3.0, "colour": "red"}])
    second = export(engine, str(out), lag=NOW)
    assert second.datasets["deliveries"].rows == len(CASES) - 5 + 1
    assert second.datasets["results__items"].rows == 1
    assert set(files_after_first) <= set(parquet_files(out))
    check_readback(engine, out)

    items = f"{out}/results__items/**/*.parquet"
    colours = duckdb.execute(
        f"SELECT sku, colour FROM read_parquet('{items}', union_by_name = true) ORDER BY sku"
    ).fetchall()
    assert colours == [("A", None), ("B", None), ("C", "red")]

    # Nothing new: nothing written, the watermark still moves.
    third = export(engine, str(out), lag=NOW)
    assert third.rows == 0
    assert parquet_files(out) == sorted(set(parquet_files(out)))
    manifest = json.loads((out / "_manifest.json").read_text())
    assert [r["run_id"] for r in manifest["runs"]] == [first.run_id, second.run_id, third.run_id]
    assert manifest["watermarks"]["deliveries"] == third.until.isoformat()
    assert sum(r["datasets"]["deliveries"]["rows"] for r in manifest["runs"]) == len(CASES) + 2


def test_a_task_updated_later_is_rewritten_not_duplicated(
    client: TestClient, engine: Engine, out: Path
) -> None:
    ping, full = DELIVERIES / "03-just-ping", DELIVERIES / "01-full-response-json"
    post_cases(client, engine, [ping])
    export(engine, str(out), lag=NOW)
    before = pads.dataset(out / "tasks", partitioning="hive").to_table()
    assert before.column("cost_usd").to_pylist() == [None]

    post_cases(client, engine, [full])
    export(engine, str(out), lag=NOW)
    after = pads.dataset(out / "tasks", partitioning="hive").to_table()
    assert after.column("cost_usd").to_pylist() == [0.0124]
    daily = pads.dataset(out / "cost_daily", partitioning="hive").to_table()
    assert daily.column("tasks").to_pylist() == [1]
    assert daily.column("tasks_unknown_cost").to_pylist() == [0]
    check_readback(engine, out)


def test_an_interrupted_export_leaves_no_visible_file(
    client: TestClient, engine: Engine, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    post_cases(client, engine, CASES[:3])
    export(engine, str(out), lag=NOW)
    before = snapshot(out)
    post_cases(client, engine, CASES[3:])
    post_items(client, engine, [{"sku": "A"}])

    real = pq.ParquetWriter.write_table
    calls = []

    def failing(self: pq.ParquetWriter, table: pa.Table, *args: Any, **kwargs: Any) -> None:
        calls.append(table.num_rows)
        if len(calls) == 3:
            raise OSError("disk full")
        real(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", failing)
    with pytest.raises(OSError, match="disk full"):
        export(engine, str(out), lag=NOW)
    assert snapshot(out) == before  # no new file, not even a temporary one; same manifest
    assert not reader_processes()  # a reader left mid-stream is stopped

    monkeypatch.setattr(pq.ParquetWriter, "write_table", real)
    export(engine, str(out), lag=NOW)
    check_readback(engine, out)


def test_a_run_that_died_before_its_manifest_is_redone_without_duplicates(
    client: TestClient, engine: Engine, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    post_cases(client, engine, CASES[:4])
    export(engine, str(out), lag=NOW)
    post_cases(client, engine, CASES[4:])
    real = export_module._write_atomically

    def dies(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "_write_atomically", dies)
    with pytest.raises(KeyboardInterrupt):
        export(engine, str(out), lag=NOW)
    monkeypatch.setattr(export_module, "_write_atomically", real)
    export(engine, str(out), lag=NOW)  # same window start: same file names, overwritten
    check_readback(engine, out)


def test_rows_stream_in_batches(
    client: TestClient, engine: Engine, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "ROW_GROUP_ROWS", 500)
    monkeypatch.setattr(export_module, "_SQLITE_BATCH_ROWS", 250)
    post_items(client, engine, [{"n": i, "label": f"row {i}"} for i in range(3000)])
    seen: list[tuple[str, int]] = []
    export(engine, str(out), lag=NOW, tables=["results__items"], progress=lambda *a: seen.append(a))
    assert seen[-1] == ("results__items", 3000)
    if engine.dialect.name == "sqlite":  # PostgreSQL batches by bytes (16 MB): one here
        assert [rows for _, rows in seen] == list(range(500, 3001, 500))
    (path,) = (out / "results__items").rglob("*.parquet")
    assert pq.ParquetFile(path).num_row_groups == 6
    assert pc.sum(pq.read_table(path).column("n")).as_py() == sum(range(3000))


def test_columns_empty_through_the_first_batch_keep_their_types(
    client: TestClient, engine: Engine, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ADBC's SQLite driver types each column from the first batch's values; columns
    # NULL throughout it must still come out as text, float and bool, not int64.
    monkeypatch.setattr(export_module, "_SQLITE_BATCH_ROWS", 100)
    items: list[dict[str, Any]] = [{"sku": f"s{i}"} for i in range(300)]
    items.append(
        {"sku": "late", "note": "x", "ratio": 0.5, "ok": True, "seen": "2024-05-01T10:00:00Z"}
    )
    post_items(client, engine, items)
    export(engine, str(out), lag=NOW)
    check_readback(engine, out)
    table = pads.dataset(out / "results__items", partitioning="hive").to_table()
    types = {f.name: f.type for f in table.schema}
    assert (types["note"], types["ratio"], types["ok"]) == (pa.string(), pa.float64(), pa.bool_())
    late = [r for r in table.to_pylist() if r["sku"] == "late"]
    assert [(r["note"], r["ratio"], r["ok"]) for r in late] == [("x", 0.5, True)]
    assert table.column("note").null_count == 300
    # SQLite is read by a child process: this one never loads ADBC's second SQLite library,
    # and the child ends with the run.
    assert "libadbc_driver_sqlite" not in Path("/proc/self/maps").read_text()
    assert not reader_processes()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_failing_sqlite_reader_fails_the_run_and_shows_nothing(
    client: TestClient, engine: Engine, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    post_cases(client, engine, CASES[:2])
    export(engine, str(out), lag=NOW)
    before = snapshot(out)
    post_cases(client, engine, CASES[2:4])
    monkeypatch.setattr(export_module, "_SQLITE_BATCH_ROWS", -1)  # the child's driver refuses it
    with pytest.raises(ReceiverError, match=r"SQLite reader failed: .*batch_rows"):
        export(engine, str(out), lag=NOW)
    assert snapshot(out) == before
    assert not reader_processes()
    monkeypatch.undo()
    export(engine, str(out), lag=NOW)
    check_readback(engine, out)


def test_selected_tables_and_bodies(client: TestClient, engine: Engine, out: Path) -> None:
    post_cases(client, engine, CASES[:2])
    report = export(engine, str(out), lag=NOW, tables=["deliveries"], with_bodies=True)
    assert set(report.datasets) == {"deliveries"}
    assert sorted(p.name for p in out.iterdir()) == [".export.lock", "_manifest.json", "deliveries"]
    table = pads.dataset(out / "deliveries", partitioning="hive").to_table()
    with engine.connect() as conn:
        bodies = set(conn.scalars(select(Delivery.body)))
    assert set(table.column("body").to_pylist()) == bodies
    with pytest.raises(ValueError, match="no such table"):
        export(engine, str(out), tables=["nope"])


def test_export_command(client: TestClient, engine: Engine, db_url: str, tmp_path: Path) -> None:
    post_cases(client, engine, CASES[:3])
    env = {"RECEIVER_DATABASE_URL": db_url, "RECEIVER_DATA_DIR": str(tmp_path)}
    dest = tmp_path / "cli"
    quiet = CliRunner().invoke(
        main, ["export", "--out", str(dest), "--lag", "0", "--quiet"], env=env
    )
    assert quiet.exit_code == 0, quiet.output
    assert quiet.output == ""
    assert check_readback(engine, dest)["deliveries"] == 3
    post_cases(client, engine, CASES[3:4])
    loud = CliRunner().invoke(main, ["export", "--out", str(dest), "--lag", "0"], env=env)
    assert loud.exit_code == 0, loud.output
    assert json.loads(loud.stdout.splitlines()[-1])["rows"]["deliveries"] == 1
    bad = CliRunner().invoke(main, ["export", "--out", str(dest), "--table", "x"], env=env)
    assert bad.exit_code != 0
    assert "no such table" in bad.output


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[pafs.S3FileSystem]:
    """A local S3-compatible server (moto) on a free loopback port, with a bucket."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    fs = pafs.S3FileSystem(
        access_key="test",
        secret_key="test",
        region="us-east-1",
        endpoint_override=f"127.0.0.1:{port}",
        scheme="http",
        allow_bucket_creation=True,
    )
    fs.create_dir("exports")
    yield fs
    server.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_export_to_s3(client: TestClient, engine: Engine, s3: pafs.S3FileSystem) -> None:
    post_cases(client, engine, CASES)
    export(engine, "exports/run", filesystem=s3, lag=NOW)
    for dataset in datasets(engine):
        rows, _ = database_facts(engine, dataset)
        if rows:
            read = pads.dataset(
                f"exports/run/{dataset.name}", filesystem=s3, format="parquet", partitioning="hive"
            ).to_table()
            assert read.num_rows == rows, dataset.name
    infos = s3.get_file_info(pafs.FileSelector("exports/run", recursive=True))
    names = [i.path for i in infos if i.type == pafs.FileType.File]
    assert "exports/run/_manifest.json" in names
    assert not [n for n in names if n.endswith(".tmp")]
    assert not [n for n in names if n.endswith(export_module.LOCK)]  # S3: not locked (README)
    manifest = json.loads(s3.open_input_stream("exports/run/_manifest.json").read())
    assert manifest["runs"][0]["datasets"]["tasks"]["rows"] == 7  # 11 joins 05's task
