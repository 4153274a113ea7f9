"""The bench's diagnostic variants stay in step with the receiver they stand in for."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from starlette.testclient import TestClient

import receiver.app
from bench.variants import receiver_without_pipeline
from receiver.models import Delivery
from receiver.pipeline import Pipeline
from tests.conftest import TOKEN


def test_the_edge_only_variant_stores_and_processes_nothing(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An idled pipeline must accept what the ledger hands it: an error logged per commit
    there once made the variant slower than the receiver it is measured against."""
    monkeypatch.setenv("RECEIVER_DATABASE_URL", db_url)
    monkeypatch.setenv("RECEIVER_TOKEN", TOKEN)
    monkeypatch.setenv("RECEIVER_DATA_DIR", str(tmp_path / "data"))
    app = receiver_without_pipeline()
    receiver_logs = logging.getLogger("receiver")  # does not propagate to the root logger
    receiver_logs.addHandler(caplog.handler)
    with TestClient(app) as client:
        for n in range(3):
            response = client.post(
                "/hooks/bench",
                content=b'{"n": %d}' % n,
                headers={"authorization": TOKEN, "content-type": "application/json"},
            )
            assert response.status_code == 200, response.text
    receiver_logs.removeHandler(caplog.handler)
    app.state.engine.dispose()
    assert getattr(receiver.app, "Pipeline") is Pipeline  # noqa: B009 - later apps process
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert list(conn.scalars(select(Delivery.status))) == ["stored"] * 3
    engine.dispose()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
