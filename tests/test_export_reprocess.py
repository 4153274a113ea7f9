"""Deliveries reprocessed after they were exported: the next export rewrites their days.

`receiver reprocess` re-derives the rows of old deliveries, whose received times
lie below the export's watermarks. These tests export, change the database
through the app and the CLI (a hook schema fixed, then broken again), export
again and read every dataset back with pyarrow, DuckDB and pandas.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import duckdb
import pytest
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from receiver import destinations
from receiver.export import JOURNAL, ExportReport, export
from receiver.models import Delivery
from receiver.processing import process_delivery
from receiver.windows import aware
from tests.readback import deliver, hook_tables, run_cli
from tests.test_export import (
    CASES,
    NOW,
    check_readback,
    parquet_files,
    post_cases,
    snapshot,
)

STRICT = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
RELAXED = {"type": "object", "properties": {"n": {"type": ["integer", "string"]}}}


def set_schema(db_url: str, tmp_path: Path, schema: dict[str, Any]) -> None:
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    run_cli(db_url, "hooks", "add", "strict", "--schema", str(path))


def seed(client: TestClient, engine: Engine, db_url: str, tmp_path: Path) -> tuple[str, str]:
    """A strict hook with one good and one quarantined delivery, and another hook's rows."""
    set_schema(db_url, tmp_path, STRICT)
    good = deliver(client, engine, "strict", b'{"n": 1}')
    bad = deliver(client, engine, "strict", b'{"n": "one", "extra": [1, 2]}')
    assert (good.status, bad.status) == ("processed", "quarantined")
    deliver(client, engine, "items", b'[{"sku": "A", "price": 1.5}, {"sku": "B"}]')
    return good.id, bad.id


def exported(out: Path, dataset: str, columns: str) -> list[tuple[Any, ...]]:
    """``columns`` of every exported row of ``dataset``, as DuckDB reads the folder."""
    return duckdb.execute(
        f"SELECT {columns} FROM read_parquet('{out / dataset}/**/*.parquet',"
        " union_by_name = true) ORDER BY ALL"
    ).fetchall()


def statuses(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return sorted(tuple(r) for r in conn.execute(select(Delivery.id, Delivery.status)))


def rewritten(report: ExportReport) -> dict[str, list[str]]:
    return {name: r.rewritten for name, r in report.datasets.items() if r.rewritten}


def test_reprocessed_deliveries_read_back_as_the_database_has_them(
    client: TestClient, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    good, bad = seed(client, engine, db_url, tmp_path)
    out = tmp_path / "export"
    export(engine, str(out), lag=NOW)
    check_readback(engine, out)
    root = hook_tables(engine, "strict")[()]
    assert exported(out, root, "_delivery_id") == [(good,)]

    # The fix: the quarantined delivery is processed, its rows appear (in a new child table too).
    set_schema(db_url, tmp_path, RELAXED)
    run_cli(db_url, "reprocess", "--quarantined")
    extra = hook_tables(engine, "strict")[("extra",)]
    second = export(engine, str(out), lag=NOW)
    today = dt.datetime.now(dt.UTC).date().isoformat()
    # extra: new, all of it. Like deliveries, the task tables are by delivery time.
    assert rewritten(second) == {"deliveries": [today], root: [today], **_task_days(today)}
    assert second.datasets["deliveries"].replaced  # the first run's file, deleted
    check_readback(engine, out)
    assert exported(out, root, "_delivery_id") == sorted([(good,), (bad,)])
    assert exported(out, extra, "_delivery_id, value") == [(bad, 1), (bad, 2)]
    assert exported(out, "deliveries", "id, status") == statuses(engine)
    assert ("processed",) in exported(out, "deliveries", "status")
    assert not [p for p in parquet_files(out) if p.endswith(".tmp") or JOURNAL in p]

    # Broken again: the delivery is quarantined, its rows go, from the Parquet too.
    set_schema(db_url, tmp_path, STRICT)
    run_cli(db_url, "reprocess", "--hook", "strict")
    third = export(engine, str(out), lag=NOW)
    assert set(rewritten(third)) == {"deliveries", root, extra, *_task_days(today)}
    check_readback(engine, out)  # extra has no rows left: no file either
    assert exported(out, root, "_delivery_id") == [(good,)]
    assert exported(out, "deliveries", "id, status") == statuses(engine)
    assert (bad, "quarantined") in statuses(engine)


def test_reprocessing_everything_rewrites_tasks_and_rollups_too(
    client: TestClient, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    post_cases(client, engine, CASES)
    out = tmp_path / "export"
    export(engine, str(out), lag=NOW)
    files = parquet_files(out)
    run_cli(db_url, "reprocess")
    second = export(engine, str(out), lag=NOW)
    today = dt.datetime.now(dt.UTC).date().isoformat()
    expected = {n for n, r in second.datasets.items() if r.rows or r.rewritten}
    assert {"tasks", "cost_daily", "cost_by_label", "deliveries"} <= set(rewritten(second))
    assert set(rewritten(second)) == expected
    assert all(days == [today] for days in rewritten(second).values())
    # Tasks and rollups: the day's one file, replaced by its rename; the rest: one new file a day.
    assert second.datasets["tasks"].replaced == []
    assert len(parquet_files(out)) == len(files)
    check_readback(engine, out)


def test_a_run_with_nothing_reprocessed_rewrites_nothing(
    client: TestClient, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    seed(client, engine, db_url, tmp_path)
    out = tmp_path / "export"
    export(engine, str(out), lag=NOW)
    files = parquet_files(out)
    late = deliver(client, engine, "items", b'[{"sku": "C", "price": 3.0}]')
    # Processed again just before a run whose window ends 2 s before its clock, placed so
    # that the delivery was received before the cut and processed after it: that run exports
    # it as it is now, and records it, so the next run does not take it for reprocessed.
    process_delivery(engine, late.id, max_depth=5)
    with engine.connect() as conn:
        row = conn.execute(
            select(Delivery.received_at, Delivery.processed_at).where(Delivery.id == late.id)
        ).one()
    assert row.processed_at is not None
    received, processed = aware(row.received_at), aware(row.processed_at)
    assert received < processed
    lag = dt.timedelta(seconds=2)
    cut = received + (processed - received) / 2
    second = export(engine, str(out), lag=lag, now=cut + lag)
    assert second.datasets["deliveries"].rows == 1
    manifest = json.loads((out / "_manifest.json").read_text())
    assert late.id in manifest["processed_seen"]["deliveries"]
    assert rewritten(second) == {}
    third = export(engine, str(out), lag=NOW)
    assert rewritten(third) == {}
    assert third.rows == 0
    assert set(files) <= set(parquet_files(out))  # nothing replaced
    check_readback(engine, out)

    # Processed once more: now it counts.
    process_delivery(engine, late.id, max_depth=5)
    fourth = export(engine, str(out), lag=NOW)
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert rewritten(fourth) == {
        "deliveries": [today],
        "results__items": [today],
        **_task_days(today),
    }
    check_readback(engine, out)


def test_an_older_manifest_starts_the_window_at_its_watermarks(
    client: TestClient, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    good, bad = seed(client, engine, db_url, tmp_path)
    out = tmp_path / "export"
    export(engine, str(out), lag=NOW)
    path = out / "_manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["processed_marks"], manifest["processed_seen"]  # as written before them
    path.write_text(json.dumps(manifest))
    set_schema(db_url, tmp_path, RELAXED)
    run_cli(db_url, "reprocess", "--quarantined")
    second = export(engine, str(out), lag=NOW)
    assert "deliveries" in rewritten(second)
    check_readback(engine, out)
    assert exported(out, hook_tables(engine, "strict")[()], "_delivery_id") == sorted(
        [(good,), (bad,)]
    )


def test_a_run_that_dies_between_its_renames_and_deletions_is_completed_by_the_next(
    client: TestClient,
    engine: Engine,
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    good, bad = seed(client, engine, db_url, tmp_path)
    out = tmp_path / "export"
    export(engine, str(out), lag=NOW)
    before = snapshot(out)
    set_schema(db_url, tmp_path, RELAXED)
    run_cli(db_url, "reprocess", "--quarantined")
    root = hook_tables(engine, "strict")[()]

    # Dying before its journal is written: nothing visible changes.
    real_write = destinations.write_atomically

    def no_journal(fs: Any, path: str, data: bytes, run_id: str) -> None:
        if path.endswith(JOURNAL):
            raise KeyboardInterrupt
        real_write(fs, path, data, run_id)

    monkeypatch.setattr(destinations, "write_atomically", no_journal)
    with pytest.raises(KeyboardInterrupt):
        export(engine, str(out), lag=NOW)
    assert snapshot(out) == before
    monkeypatch.undo()

    # Dying right after its renames: readers would see the old and new files of the day.
    def dies(fs: Any, paths: list[str]) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(destinations, "delete_replaced", dies)
    with pytest.raises(KeyboardInterrupt):
        export(engine, str(out), lag=NOW)
    assert (out / JOURNAL).is_file()
    assert (out / "_manifest.json").read_bytes() == before[1]
    assert exported(out, root, "_delivery_id") == sorted([(good,), (good,), (bad,)])
    monkeypatch.undo()

    # The next run completes that commit first, then runs as usual.
    after = export(engine, str(out), lag=NOW)
    assert rewritten(after) == {}
    assert not (out / JOURNAL).exists()
    check_readback(engine, out)
    assert exported(out, root, "_delivery_id") == sorted([(good,), (bad,)])
    assert exported(out, "deliveries", "id, status") == statuses(engine)
    runs = json.loads((out / "_manifest.json").read_text())["runs"]
    assert len(runs) == 3  # the first, the completed one, and this one
    assert runs[1]["datasets"]["deliveries"]["replaced"]
    assert not [p for p in parquet_files(out) if p.endswith(".tmp")]


def _task_days(today: str) -> dict[str, list[str]]:
    """The task datasets kept by delivery time, rewritten like ``deliveries``."""
    return {name: [today] for name in ("task_events", "task_files", "task_network")}
