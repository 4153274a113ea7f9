"""The bench's diagnostic variants stay in step with the receiver they stand in for."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from starlette.testclient import TestClient

from bench.variants import receiver_without_pipeline
from receiver.models import Delivery
from tests.conftest import TOKEN


def test_the_edge_only_variant_stores_and_processes_nothing(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The edge alone must log nothing per commit: an error logged per commit there once
    made the variant slower than the receiver it is measured against."""
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
    assert "pipeline" not in app.state.workers  # /readyz does not wait for what never runs
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert list(conn.scalars(select(Delivery.status))) == ["stored"] * 3
    engine.dispose()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
