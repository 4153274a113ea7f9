"""The ledger's hand-over: what happens after a commit never undoes it."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import Engine, select

from receiver.ledger import Ledger, RawDelivery, Recorded
from receiver.models import Delivery


def test_a_failing_hand_over_keeps_the_commit(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The pipeline is told after the commit; if telling it fails, the delivery is still
    stored and answered `stored` (the sweep processes it later), and the failure is logged."""

    def broken(deliveries: object, results: list[Recorded]) -> None:
        raise RuntimeError("pipeline gone")

    delivery = RawDelivery(
        hook="h", body=b'{"a": 1}', content_type=None, headers=(), query_string=""
    )
    ledger = Ledger(engine, on_committed=broken)
    receiver_logs = logging.getLogger("receiver")  # does not propagate to the root logger
    receiver_logs.addHandler(caplog.handler)
    ledger.start()
    try:
        [recorded] = ledger.record_sync([delivery])
    finally:
        ledger.stop()
        receiver_logs.removeHandler(caplog.handler)
    assert recorded == Recorded(delivery.id, "stored")
    with engine.connect() as conn:
        assert conn.scalar(select(Delivery.body).where(Delivery.id == delivery.id)) == delivery.body
    assert any("on_committed hook failed" in r.getMessage() for r in caplog.records)
