"""Retention (`receiver.retention`, ``receiver prune``): bodies go, everything else stays."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pytest
from sqlalchemy import Engine, insert, select, text
from starlette.testclient import TestClient

from receiver import retention
from receiver.app import create_app
from receiver.db import utcnow
from receiver.export import export
from receiver.ledger import new_delivery_id
from receiver.models import Delivery
from receiver.processing import process_delivery
from receiver.settings import Settings, parse_duration
from tests.conftest import TOKEN, post
from tests.readback import deliver, run_cli, snapshot


def rows(engine: Engine) -> dict[str, dict[str, Any]]:
    """Every delivery, every column, by id."""
    with engine.connect() as conn:
        return {r.id: dict(r._mapping) for r in conn.execute(select(Delivery.__table__))}


def rollups(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        daily = sorted(repr(tuple(r)) for r in conn.execute(text("SELECT * FROM cost_daily")))
        label = sorted(repr(tuple(r)) for r in conn.execute(text("SELECT * FROM cost_by_label")))
    return [daily, label]


def body(i: int, size: int = 40) -> bytes:
    return json.dumps([{"n": i, "pad": "x" * size}]).encode()


def seed_two_batches(
    client: TestClient, engine: Engine
) -> tuple[dict[str, bytes], dict[str, bytes], str, dt.datetime]:
    """Batch one (with a quarantined delivery), the cutoff, then batch two."""
    first: dict[str, bytes] = {}
    for i in range(5):
        row = deliver(client, engine, "shop", body(i), query=f"task_id=t{i % 3}&project=p")
        first[row.id] = body(i)
    bad = deliver(client, engine, "shop", b"{not json", "application/json")
    assert bad.status == "quarantined"
    time.sleep(0.01)
    cutoff = utcnow()
    time.sleep(0.01)
    second: dict[str, bytes] = {}
    for i in range(5, 9):
        row = deliver(client, engine, "shop", body(i), query=f"task_id=t{i % 3}&project=p")
        second[row.id] = body(i)
    return first, second, bad.id, cutoff


def test_prune_between_two_batches(client: TestClient, engine: Engine) -> None:
    first, second, quarantined, cutoff = seed_two_batches(client, engine)
    before, derived, sums = rows(engine), snapshot(engine), rollups(engine)

    report = retention.prune(engine, cutoff)

    assert (report.deliveries, report.bytes) == (5, sum(len(b) for b in first.values()))
    assert report.kept == 1  # the quarantined one
    after = rows(engine)
    for delivery_id, row in after.items():
        kept = {k: v for k, v in row.items() if k not in ("body", "body_pruned_at")}
        assert kept == {k: v for k, v in before[delivery_id].items() if k in kept}
        if delivery_id in first:
            assert row["body"] == b""
            assert row["body_pruned_at"] is not None
            assert row["body_size"] == len(first[delivery_id])
            assert row["body_sha256"] == hashlib.sha256(first[delivery_id]).hexdigest()
        else:
            assert row["body_pruned_at"] is None
            assert row["body"] == before[delivery_id]["body"]
    for delivery_id, sent in second.items():
        assert after[delivery_id]["body"] == sent  # byte-exact
    assert after[quarantined]["body"] == b"{not json"
    assert snapshot(engine) == derived
    assert rollups(engine) == sums

    again = retention.prune(engine, cutoff)  # rerun: nothing left to do
    assert (again.deliveries, again.bytes) == (0, 0)

    with_quarantined = retention.prune(engine, cutoff, include_quarantined=True)
    assert with_quarantined.deliveries == 1
    assert rows(engine)[quarantined]["body_pruned_at"] is not None
    assert snapshot(engine) == derived


def test_a_duplicate_of_a_pruned_delivery_is_still_duplicate(
    client: TestClient, engine: Engine
) -> None:
    original = deliver(client, engine, "shop", body(1), query="task_id=t1")
    assert retention.prune(engine, utcnow()).deliveries == 1
    answer = post(client, "shop", body(1), query="task_id=t1")
    assert answer["status"] == "duplicate"
    assert rows(engine)[str(answer["delivery_id"])]["duplicate_of"] == original.id


def test_reprocess_skips_pruned_deliveries(client: TestClient, engine: Engine, db_url: str) -> None:
    for i in range(3):
        deliver(client, engine, "shop", body(i), query=f"task_id=t{i}")
    deliver(client, engine, "shop", b"{not json", "application/json")
    cutoff = utcnow()
    kept = deliver(client, engine, "shop", body(9), query="task_id=t9")
    retention.prune(engine, cutoff)
    derived = snapshot(engine)

    result = run_cli(db_url, "reprocess")
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts == {"deliveries": 5, "pruned": 3, "processed": 1, "quarantined": 1}
    assert snapshot(engine) == derived  # nothing emptied
    pruned = next(i for i, r in rows(engine).items() if r["body_pruned_at"] is not None)
    assert process_delivery(engine, pruned, max_depth=5).status == "pruned"
    assert process_delivery(engine, kept.id, max_depth=5).status == "processed"
    assert snapshot(engine) == derived


def test_prune_command_dry_run_and_json(client: TestClient, engine: Engine, db_url: str) -> None:
    sent = [deliver(client, engine, "shop", body(i)) for i in range(4)]
    before = rows(engine)
    dry = json.loads(
        run_cli(db_url, "prune", "--older-than", "1h", "--dry-run", "--format", "json").stdout
    )
    assert dry == dry | {"deliveries": 0, "dry_run": True}  # all newer than an hour
    time.sleep(1.1)
    dry = json.loads(
        run_cli(db_url, "prune", "--older-than", "1s", "--dry-run", "--format", "json").stdout
    )
    size = sum(r.body_size for r in sent)
    assert (dry["deliveries"], dry["bytes"], dry["dry_run"]) == (4, size, True)
    assert rows(engine) == before  # a dry run changes nothing

    result = run_cli(db_url, "prune", "--older-than", "1s", "--format", "json")
    done = json.loads(result.stdout)
    assert (done["deliveries"], done["bytes"], done["dry_run"]) == (4, size, False)
    assert "pruned 4 deliveries" in result.stderr  # plain progress lines off a terminal
    assert all(r["body_pruned_at"] is not None for r in rows(engine).values())

    table = run_cli(db_url, "prune", "--older-than", "1s")
    assert "deliveries" in table.stdout
    assert "cutoff" in table.stdout


def test_prune_command_refuses_a_bad_duration(db_url: str) -> None:
    from click.testing import CliRunner

    from receiver.cli import main

    result = CliRunner().invoke(
        main, ["prune", "--older-than", "30 days"], env={"RECEIVER_DATABASE_URL": db_url}
    )
    assert result.exit_code == 2
    assert "not a duration" in result.output


def test_deliveries_show_says_pruned(client: TestClient, engine: Engine, db_url: str) -> None:
    row = deliver(client, engine, "shop", body(1, 10), query="task_id=t1")
    shown = run_cli(db_url, "deliveries", "show", row.id).stdout
    assert '"pad": "xxxxxxxxxx"' in shown
    retention.prune(engine, utcnow())
    shown = run_cli(db_url, "deliveries", "show", row.id).stdout
    pruned_at = rows(engine)[row.id]["body_pruned_at"]
    assert f"--- body pruned at {pruned_at} (retention) ---" in shown
    assert "--- body ---" not in shown
    assert '"body_sha256"' in shown
    assert "--- task ---" in shown


def test_export_with_bodies_exports_what_is_left(
    client: TestClient, engine: Engine, tmp_path: Path
) -> None:
    first, second, quarantined, cutoff = seed_two_batches(client, engine)
    retention.prune(engine, cutoff)
    out = tmp_path / "export"
    export(engine, str(out), with_bodies=True, lag=dt.timedelta(0))
    table = pads.dataset(out / "deliveries", format="parquet", partitioning="hive").to_table()
    exported = {r["id"]: r for r in table.to_pylist()}
    assert set(exported) == set(rows(engine))
    for delivery_id in first:
        assert exported[delivery_id]["body"] == b""
        assert exported[delivery_id]["body_pruned_at"] is not None
    for delivery_id, sent in second.items():
        assert exported[delivery_id]["body"] == sent
        assert exported[delivery_id]["body_pruned_at"] is None
    assert exported[quarantined]["body"] == b"{not json"


def seed_direct(engine: Engine, count: int, *, size: int = 100, age: dt.timedelta) -> None:
    """``count`` processed deliveries received ``age`` ago, by direct INSERTs (no HTTP)."""
    received = utcnow() - age
    batch: list[dict[str, Any]] = []
    with engine.begin() as conn:
        for i in range(count):
            data = f"{i:08d}".encode() + os.urandom(size // 2).hex().encode()[: size - 8]
            digest = hashlib.sha256(data).hexdigest()
            batch.append(
                {
                    "id": new_delivery_id(received),
                    "hook": "seeded",
                    "received_at": received,
                    "body": data,
                    "body_sha256": digest,
                    "body_size": len(data),
                    "content_type": "application/json",
                    "headers": "[]",
                    "query_string": "",
                    "labels": "{}",
                    "dedupe_key": digest,
                    "first_key": digest,
                    "status": "processed",
                }
            )
            if len(batch) == 5000:
                conn.execute(insert(Delivery), batch)
                batch = []
        if batch:
            conn.execute(insert(Delivery), batch)


def pruned_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(text("SELECT count(*) FROM deliveries WHERE body_pruned_at IS NOT NULL"))
            or 0
        )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_vacuum_makes_the_sqlite_file_smaller(engine: Engine, db_url: str) -> None:
    seed_direct(engine, 3000, size=4000, age=dt.timedelta(hours=1))
    path = Path(str(engine.url.database))
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    size = path.stat().st_size
    report = json.loads(
        run_cli(db_url, "prune", "--older-than", "30m", "--vacuum", "--format", "json").stdout
    )
    assert report["deliveries"] == 3000
    vacuum = report["vacuum"]
    assert vacuum["method"] == "VACUUM"
    assert vacuum["bytes_after"] < vacuum["bytes_before"] / 2
    assert path.stat().st_size < size / 2


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_vacuum_on_postgresql_reports_sizes(engine: Engine) -> None:
    seed_direct(engine, 500, size=4000, age=dt.timedelta(hours=1))
    retention.prune(engine, utcnow())
    report = retention.vacuum(engine)
    assert report.method == "VACUUM (ANALYZE) deliveries"
    assert report.bytes_before > 0
    assert report.bytes_after > 0


def test_two_prunes_at_once_share_the_work(engine: Engine) -> None:
    seed_direct(engine, 4000, age=dt.timedelta(hours=1))
    reports: list[retention.PruneReport] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            reports.append(retention.prune(engine, utcnow(), batch_size=100))
        except BaseException as error:  # pragma: no cover - shown by the assert below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sum(r.deliveries for r in reports) == 4000  # each body pruned once
    assert pruned_count(engine) == 4000


def test_ingest_keeps_answering_during_a_prune_of_100000(
    client: TestClient, engine: Engine
) -> None:
    seed_direct(engine, 100_000, age=dt.timedelta(days=2))
    done = threading.Event()
    reports: list[retention.PruneReport] = []

    def run() -> None:
        try:
            reports.append(retention.prune(engine, utcnow() - dt.timedelta(days=1)))
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    answers: list[tuple[int, str]] = []
    try:
        while not done.is_set() or len(answers) < 20:
            response = client.post(
                "/hooks/live",
                content=body(len(answers)),
                headers={"authorization": TOKEN, "content-type": "application/json"},
            )
            answers.append((response.status_code, response.json()["status"]))
    finally:
        thread.join()
    assert reports[0].deliveries == 100_000
    assert pruned_count(engine) == 100_000
    assert len(answers) >= 20
    assert all(a == (200, "stored") for a in answers), set(answers)
    spool = client.app.state.settings.data_dir / "spool"  # type: ignore[attr-defined]
    assert not list(spool.glob("*"))


def test_serve_prunes_at_start_when_retention_is_set(settings: Settings, engine: Engine) -> None:
    seed_direct(engine, 300, age=dt.timedelta(days=40))
    seed_direct(engine, 10, age=dt.timedelta(days=1))
    configured = Settings(
        database_url=settings.database_url,
        tokens=settings.tokens,
        data_dir=settings.data_dir,
        retention=dt.timedelta(days=30),
    )
    app = create_app(configured, engine=engine)
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while pruned_count(engine) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pruned_count(engine) == 300
        answer = post(client, "shop", body(1))
        assert answer["status"] == "stored"
    worker = app.state.retention
    assert worker is not None
    assert worker.runs == 1
    assert pruned_count(engine) == 300  # the recent ten keep their bodies


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("90s", dt.timedelta(seconds=90), id="seconds"),
        pytest.param("15m", dt.timedelta(minutes=15), id="minutes"),
        pytest.param("12h", dt.timedelta(hours=12), id="hours"),
        pytest.param("30d", dt.timedelta(days=30), id="days"),
        pytest.param("2w", dt.timedelta(weeks=2), id="weeks"),
    ],
)
def test_parse_duration(value: str, expected: dt.timedelta) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize("value", ["", "30", "d", "0d", "-1d", "1.5h", "30 days", "1y"])
def test_parse_duration_refuses(value: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(value)


def test_retention_setting() -> None:
    assert Settings.from_env({}).retention is None
    assert Settings.from_env({"RECEIVER_RETENTION": "30d"}).retention == dt.timedelta(days=30)
    with pytest.raises(ValueError, match="RECEIVER_RETENTION"):
        Settings.from_env({"RECEIVER_RETENTION": "forever"})


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_prune_shows_a_progress_bar_on_a_terminal(engine: Engine, db_url: str) -> None:
    import pty
    import subprocess
    import sys

    seed_direct(engine, 1200, age=dt.timedelta(hours=1))
    controller, terminal = pty.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "receiver", "prune", "--older-than", "30m", "--format", "json"],
            env={**os.environ, "RECEIVER_DATABASE_URL": db_url},
            stdout=subprocess.PIPE,
            stderr=terminal,
            timeout=120,
            check=True,
        )
        os.close(terminal)
        shown = b""
        with contextlib.suppress(OSError):  # EIO once the child's end is closed and read
            while chunk := os.read(controller, 65536):
                shown += chunk
    finally:
        os.close(controller)
    assert json.loads(result.stdout)["deliveries"] == 1200
    assert b"pruning" in shown  # rich's bar, not the plain lines
    assert b"pruned 1,200 deliveries" not in shown
