"""One export is one snapshot: every dataset of a run is cut at the same instant."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from receiver.export import Dataset, datasets, export
from receiver.models import Delivery, Task
from tests.conftest import post
from tests.readback import hook_tables, raw_rows

LAG = dt.timedelta(seconds=2)


def exported(out: Path, name: str) -> list[dict[str, Any]]:
    path = out / name
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = (
        pads.dataset(path, format="parquet", partitioning="hive").to_table().to_pylist()
    )
    return rows


def burst(client: TestClient, first: int, count: int) -> str:
    """``count`` deliveries naming ten tasks in turn (later ones update earlier tasks)."""
    last = ""
    for n in range(first, first + count):
        body = json.dumps([{"n": n, "i": i} for i in range(n % 3 + 1)]).encode()
        answer = post(client, "burst", body, query=f"task_id=t{n % 10}&team=a{n % 2}")
        last = str(answer["delivery_id"])
    return last


def check_whole(engine: Engine, out: Path) -> set[str]:
    """Every exported task's last delivery and its result rows are in the export; its tasks."""
    table = hook_tables(engine, "burst")[()]
    deliveries = {r["id"] for r in exported(out, "deliveries")}
    results = Counter(r["_delivery_id"] for r in exported(out, table))
    in_database = Counter(r["_delivery_id"] for r in raw_rows(engine, table))
    tasks = exported(out, "tasks")
    for task in tasks:
        last = task["last_delivery_id"]
        assert last in deliveries, task["task_id"]
        assert results[last] == in_database[last], task["task_id"]
    # And the other way: a delivery's result rows are exported with it, or not at all.
    for delivery_id in deliveries:
        assert results[delivery_id] == in_database[delivery_id]
    # The rollups sum exactly the exported tasks.
    days = Counter((t["first_seen_at"].date(), t["hook"], t["status"]) for t in tasks)
    daily = {(r["day"], r["hook"], r["status"]): r["tasks"] for r in exported(out, "cost_daily")}
    assert daily == dict(days)
    labels = Counter(
        (t["first_seen_at"].date(), t["hook"], t["status"], key, value)
        for t in tasks
        for key, value in json.loads(t["labels"]).items()
    )
    by_label = {
        (r["day"], r["hook"], r["status"], r["label_key"], r["label_value"]): r["tasks"]
        for r in exported(out, "cost_by_label")
    }
    assert by_label == dict(labels)
    return {t["task_id"] for t in tasks}


def test_an_export_right_after_a_burst_is_whole(
    client: TestClient, engine: Engine, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    first = 0
    for _ in range(3):
        newest = burst(client, first, 25)
        first += 25
        with engine.connect() as conn:
            held, received = conn.execute(
                select(Delivery.task_id, Delivery.received_at).where(Delivery.id == newest)
            ).one()
        # Right after the burst, however long the export takes to start: its end is
        # within the lag of the clock the export reads.
        now = received if received.tzinfo is not None else received.replace(tzinfo=dt.UTC)
        export(engine, str(out), lag=LAG, now=now)
        tasks = check_whole(engine, out)
        assert held not in tasks  # its task waits for the next run, with its delivery
    time.sleep(LAG.total_seconds() + 0.1)
    export(engine, str(out), lag=LAG)
    tasks = check_whole(engine, out)
    with engine.connect() as conn:
        assert tasks == set(conn.scalars(select(Task.task_id)))


def test_every_dataset_is_cut_by_its_delivery(engine: Engine) -> None:
    """The rule every dataset follows, result tables and datasets added later included."""
    cuts = {d.name: d.cut_column() for d in datasets(engine)}
    assert cuts["tasks"] == "last_delivery_id"
    assert cuts["deliveries"] == "received_at"
    assert cuts["cost_daily"] == "last_delivery_id"  # through the tasks it sums
    assert cuts["cost_by_label"] == "last_delivery_id"
    from sqlalchemy import Column, MetaData, String, Table

    later = Table("events", MetaData(), Column("delivery_id", String), Column("at", String))
    assert Dataset("events", later, "at", "append").cut_column() == "delivery_id"
