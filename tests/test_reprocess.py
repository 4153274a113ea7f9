"""``receiver reprocess`` rebuilds derived rows from the raw ledger, idempotently."""

from __future__ import annotations

import datetime as dt
import json

from sqlalchemy import Engine, text
from starlette.testclient import TestClient

from tests.conftest import DELIVERIES
from tests.readback import deliver, hook_tables, raw_rows, run_cli, snapshot


def seed(client: TestClient, engine: Engine) -> None:
    """A mix of shapes on two hooks, one delivery quarantined."""
    for case in sorted(DELIVERIES.glob("*.body")):
        meta = json.loads(case.with_suffix(".json").read_text())
        deliver(client, engine, "mixed", case.read_bytes(), meta["content_type"])
    deliver(client, engine, "other", b'[{"a": 1, "l": [1, "x"]}, {"a": "two"}]')
    bad = deliver(client, engine, "other", b"{not json", "application/json")
    assert bad.status == "quarantined"


def summary(output: str) -> dict[str, int]:
    counts: dict[str, int] = json.loads(output.strip().splitlines()[-1])
    return counts


def test_reprocess_twice_changes_nothing(client: TestClient, engine: Engine, db_url: str) -> None:
    seed(client, engine)
    before = snapshot(engine)
    assert any(before["contents"].values())
    first = run_cli(db_url, "reprocess")
    assert "reprocessing" in first.stderr  # the progress bar
    total = len(before["statuses"])
    assert summary(first.stdout) == {"deliveries": total, "processed": total - 1, "quarantined": 1}
    assert snapshot(engine) == before
    run_cli(db_url, "reprocess")
    assert snapshot(engine) == before


def test_reprocess_rebuilds_lost_rows_for_one_hook(
    client: TestClient, engine: Engine, db_url: str
) -> None:
    seed(client, engine)
    before = snapshot(engine)
    for table in hook_tables(engine, "other").values():
        with engine.begin() as conn:
            conn.execute(text(f'DELETE FROM "{table}"'))
    assert all(raw_rows(engine, t) == [] for t in hook_tables(engine, "other").values())
    result = run_cli(db_url, "reprocess", "--hook", "other")
    assert summary(result.stdout) == {"deliveries": 2, "processed": 1, "quarantined": 1}
    assert snapshot(engine) == before


def test_reprocess_filters(client: TestClient, engine: Engine, db_url: str) -> None:
    seed(client, engine)
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    assert summary(run_cli(db_url, "reprocess", "--since", later).stdout) == {"deliveries": 0}
    earlier = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    everything = summary(run_cli(db_url, "reprocess", "--since", earlier).stdout)
    assert everything["deliveries"] == len(snapshot(engine)["statuses"])
    assert summary(run_cli(db_url, "reprocess", "--quarantined").stdout) == {
        "deliveries": 1,
        "quarantined": 1,
    }
