"""``data.files`` and ``data.network``: typed rows of their own, nothing dropped."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow.parquet as pq
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from receiver.attachments import file_rows, network_rows
from receiver.columns import JsonValue
from receiver.export import export
from receiver.models import TaskFile, TaskNetwork
from receiver.processing import process_deliveries
from tests.conftest import DELIVERIES
from tests.readback import deliver

WHEN = dt.datetime(2024, 1, 15, 10, 0, tzinfo=dt.UTC)
SAMPLE = (DELIVERIES / "14-full-response-files-network.body").read_bytes()


def test_file_rows_type_what_fits_and_keep_the_rest() -> None:
    files: JsonValue = [
        {"source": "download", "downloadUrl": "u", "filename": "a.pdf", "timestamp": 1705314600000},
        {"filename": 7, "timestamp": "soon", "size": 10},
        "odd",
    ]
    rows = file_rows(files, delivery_id="d", received_at=WHEN)
    assert [r["position"] for r in rows] == [0, 1, 2]
    assert rows[0]["timestamp"] == dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.UTC)
    assert (rows[0]["download_url"], rows[0]["extra"]) == ("u", None)
    assert rows[1]["filename"] is None
    assert rows[1]["timestamp"] is None
    assert json.loads(rows[1]["extra"]) == {"filename": 7, "timestamp": "soon", "size": 10}
    assert json.loads(rows[2]["extra"]) == {"item": "odd"}


def test_network_rows_one_per_visited_url() -> None:
    network: JsonValue = [
        {"id": "n1", "taskId": "t", "urls": [{"url": "a", "timestamp": 0}, {"url": "b"}]},
        {"id": "n2", "method": "GET"},
    ]
    rows = network_rows(network, delivery_id="d", received_at=WHEN)
    assert [(r["row_index"], r["entry_index"], r["url_index"]) for r in rows] == [
        (0, 0, 0),
        (1, 0, 1),
        (2, 1, None),
    ]
    assert [r["url"] for r in rows] == ["a", "b", None]
    assert rows[0]["timestamp"] == dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    assert json.loads(rows[2]["extra"]) == {"method": "GET"}


def test_sample_files_and_network_land_linked_to_the_task_and_export(
    client: TestClient, engine: Engine, tmp_path: Path
) -> None:
    row = deliver(client, engine, "files", SAMPLE)
    assert row.status == "processed", row.reason
    with engine.connect() as conn:
        [file] = conn.execute(select(TaskFile)).all()
        [visit] = conn.execute(select(TaskNetwork)).all()
    assert (file.task_key, file.filename, file.source) == (
        '["s-11", "t-11"]',
        "report.pdf",
        "download",
    )
    assert file.download_url == "https://files.example.com/f/1"
    assert file.timestamp.replace(tzinfo=dt.UTC) == dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.UTC)
    assert (visit.task_key, visit.network_id, visit.network_task_id) == (
        '["s-11", "t-11"]',
        "n1",
        "t-11",
    )
    assert visit.url == "https://example.com/"
    assert visit.timestamp.replace(tzinfo=dt.UTC) == dt.datetime(
        2024, 1, 15, 10, 29, 50, tzinfo=dt.UTC
    )

    export(engine, str(tmp_path / "out"), lag=dt.timedelta(0))
    files = pq.read_table(tmp_path / "out" / "task_files").to_pylist()
    network = pq.read_table(tmp_path / "out" / "task_network").to_pylist()
    assert [f["filename"] for f in files] == ["report.pdf"]
    assert files[0]["timestamp"] == dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.UTC)
    assert [n["url"] for n in network] == ["https://example.com/"]
    events = pq.read_table(tmp_path / "out" / "task_events").to_pylist()
    assert [(e["delivery_id"], e["cost_usd"]) for e in events] == [(row.id, 0.0009)]

    # Reprocessing replaces them, never doubles them.
    process_deliveries(engine, [row.id], max_depth=5)
    with engine.connect() as conn:
        assert len(conn.execute(select(TaskFile)).all()) == 1
        assert len(conn.execute(select(TaskNetwork)).all()) == 1
