"""The partition key ``date_`` never hides a result column, in any reader.

Exports used to partition by ``date=``; a result column named ``date`` then
read back as the partition's value in DuckDB, pyarrow and Polars (and failed
in pandas). These tests post such deliveries through the app, export, and
read every column back with each reader's Hive partitioning on.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import polars as pl
import pyarrow.dataset as pads
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from receiver.cli import main
from receiver.columns import sanitise_identifier, unique_identifier
from receiver.errors import ReceiverError
from receiver.export import PARTITION_KEY, datasets, export
from receiver.rows import column_name
from receiver.schema import ROW_NOTES, SYSTEM_COLUMNS
from tests.conftest import post
from tests.test_export import NOW, check_readback, settle

#: Values an analyst would be sorry to see replaced by the day they arrived.
MIXED = ["1999-12-31", "2024-02-29", "not a date"]
DATES = ["1999-12-31", "2024-02-29", "2031-07-04"]
#: Keys as close to the partition key as a payload can come.
NEAR = ["date", "date_", "_date", "Date_", "date__", "DATE", "date_=", "date_=2024-01-01"]


def full_response(session: str, objects: list[dict[str, Any]]) -> bytes:
    """A full_response delivery whose structured_json output is ``objects``."""
    return json.dumps(
        {
            "type": "task_completed",
            "sessionId": session,
            "taskId": "task_1",
            "data": {"message": json.dumps(objects)},
            "usage": {"inputTokens": 10, "outputTokens": 5, "computeTime": 1.0, "cost": 0.001},
            "completedAt": "2024-01-15T10:30:00Z",
        }
    ).encode()


def post_dated(client: TestClient, engine: Engine) -> None:
    """A structured_json task with a text ``date``, a CSV with two typed date columns."""
    objects = [{"date": d, "n": i} for i, d in enumerate(MIXED)]
    post(client, "dated", full_response("sess_dates", objects))
    csv = "date,Date,n\n" + "".join(f"{d},{d},{i}\n" for i, d in enumerate(DATES))
    post(client, "sheet", csv.encode(), "text/csv")
    near = [{key: f"{key} {i}" for key in NEAR} | {"n": i} for i in range(3)]
    post(client, "near", full_response("sess_near", near))
    settle(engine)


def stored(engine: Engine, table: str) -> dict[str, list[str]]:
    """Every payload column of ``table`` as the database holds it, in ``n`` order, as text."""
    (dataset,) = [d for d in datasets(engine) if d.name == table]
    system = {name for name, _ in SYSTEM_COLUMNS}
    columns = [c for c in dataset.table.columns if c.name not in system]
    with engine.connect() as conn:
        rows = conn.execute(select(*columns).order_by(dataset.table.c["n"])).all()
    return {c.name: [str(row[i]) for row in rows] for i, c in enumerate(columns)}


def as_text(values: list[Any]) -> list[str]:
    return [str(v) for v in values]


def read_back(path: Path, columns: list[str]) -> dict[str, dict[str, list[str]]]:
    """``columns`` at ``path`` as each reader sees them, Hive partitioning on, in ``n`` order."""
    out: dict[str, dict[str, list[str]]] = {}
    names = ", ".join(f'"{c}"' for c in columns)
    duck = duckdb.execute(
        f"SELECT {names} FROM read_parquet('{path}/**/*.parquet',"
        " hive_partitioning = true, union_by_name = true) ORDER BY n"
    ).fetchall()
    out["duckdb"] = {c: as_text([r[i] for r in duck]) for i, c in enumerate(columns)}
    arrow = pads.dataset(path, format="parquet", partitioning="hive").to_table().sort_by("n")
    out["pyarrow"] = {c: as_text(arrow.column(c).to_pylist()) for c in columns}
    frame = pd.read_parquet(path).sort_values("n")
    out["pandas"] = {c: as_text(frame[c].tolist()) for c in columns}
    lazy = pl.scan_parquet(f"{path}/**/*.parquet", hive_partitioning=True).sort("n")
    collected = lazy.select(columns).collect()
    out["polars"] = {c: as_text(collected[c].to_list()) for c in columns}
    return out


def test_result_columns_survive_every_hive_reader(
    client: TestClient, engine: Engine, tmp_path: Path
) -> None:
    post_dated(client, engine)
    out = tmp_path / "export"
    export(engine, str(out), lag=NOW)
    check_readback(engine, out)
    today = dt.datetime.now(dt.UTC).date().isoformat()

    dated = stored(engine, "results__dated")
    assert dated["date"] == MIXED  # the database kept every value, as text
    sheet = stored(engine, "results__sheet")
    assert sheet["date"] == sheet["date_2"] == DATES  # typed dates, both headers kept
    near = stored(engine, "results__near")
    assert len(near) == len(NEAR) + 1  # every near-miss key got a column of its own

    for table, expected in [
        ("results__dated", dated),
        ("results__sheet", sheet),
        ("results__near", near),
    ]:
        assert PARTITION_KEY not in expected
        for reader, got in read_back(out / table, list(expected)).items():
            assert got == expected, (table, reader)
        # The partition still says which day the rows were received, under its own name.
        days = duckdb.execute(
            f"SELECT DISTINCT CAST({PARTITION_KEY} AS VARCHAR)"
            f" FROM read_parquet('{out / table}/**/*.parquet', hive_partitioning = true)"
        ).fetchall()
        assert days == [(today,)], table


@given(st.lists(st.text(max_size=60), min_size=1, max_size=4))
def test_no_payload_name_can_be_the_partition_key(key: list[str]) -> None:
    # Sanitised names have no leading or trailing "_", so none is "date_"; nor can a
    # collision suffix, a variant suffix or a nesting join end in "_".
    name = column_name(tuple(key))
    assert not name.endswith("_")
    assert not sanitise_identifier(key[0]).endswith("_")
    assert unique_identifier(name, {name}) != PARTITION_KEY
    assert f"{name}__v_text" != PARTITION_KEY
    assert PARTITION_KEY not in {n for n, _ in SYSTEM_COLUMNS} | set(ROW_NOTES)


def test_every_dataset_schema_is_free_of_the_partition_key(
    client: TestClient, engine: Engine
) -> None:
    post_dated(client, engine)
    for dataset in datasets(engine, with_bodies=True):
        assert PARTITION_KEY not in dataset.schema().names, dataset.name


def test_a_destination_in_the_old_layout_is_refused(
    client: TestClient, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    post_dated(client, engine)
    old = tmp_path / "old"
    (old / "tasks" / "date=2024-01-15").mkdir(parents=True)
    manifest = {"format": 1, "watermarks": {"tasks": "2024-01-16T00:00:00+00:00"}, "runs": []}
    (old / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReceiverError, match=r"old layout .* export to a new folder"):
        export(engine, str(old), lag=NOW)
    env = {"RECEIVER_DATABASE_URL": db_url, "RECEIVER_DATA_DIR": str(tmp_path)}
    refused = CliRunner().invoke(main, ["export", "--out", str(old), "--quiet"], env=env)
    assert refused.exit_code == 1
    assert "old layout" in refused.output
    assert json.loads((old / "_manifest.json").read_text()) == manifest
    assert sorted(p.name for p in (old / "tasks").iterdir()) == ["date=2024-01-15"]

    new = tmp_path / "new"  # what the message says to do gets every row
    export(engine, str(new), lag=NOW)
    check_readback(engine, new)
