"""`GET /metrics`: Prometheus text whose delivery counters add up once the pipeline is idle."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, select, update
from starlette.testclient import TestClient

from receiver.app import create_app
from receiver.db import create_db_engine
from receiver.ledger import RawDelivery
from receiver.metrics import Metrics, SpoolCollector
from receiver.models import Delivery
from receiver.processing import delete_derived
from receiver.settings import Settings
from receiver.spool import Spool
from tests.conftest import (
    DELIVERIES,
    PG_SERVER,
    TOKEN,
    _pg_url,
    drop_pg_database,
    fresh_pg_database,
    post,
)
from tests.live import TcpProxy

SAMPLE = (DELIVERIES / "01-full-response-json.body").read_bytes()


def scrape(text: str) -> dict[str, float]:
    """Every sample as ``name{label=value}`` -> value (``_created`` samples left out)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            key = s.name + (f"{{{labels}}}" if labels else "")
            if "le" in s.labels:
                key += f"[le={s.labels['le']}]"
            out[key] = s.value
    return out


def delivery_counts(metrics: dict[str, float]) -> dict[str, float]:
    rejected = sum(v for k, v in metrics.items() if k.startswith("receiver_deliveries_rejected"))
    return {
        "received": metrics["receiver_deliveries_received_total"],
        "stored": metrics["receiver_deliveries_stored_total"],
        "quarantined": metrics["receiver_deliveries_quarantined_total"],
        "duplicate": metrics["receiver_deliveries_duplicate_total"],
        "spooled": metrics["receiver_deliveries_spooled_total"],
        "rejected": rejected,
        "processing": metrics["receiver_deliveries_processing"],
    }


def adds_up(c: dict[str, float]) -> bool:
    parts = ("stored", "quarantined", "duplicate", "spooled", "rejected", "processing")
    return c["received"] == sum(c[p] for p in parts)


def test_counters_add_up_over_every_outcome(client: TestClient) -> None:
    post(client, "shop", SAMPLE)  # stored
    post(client, "shop", SAMPLE)  # duplicate
    post(client, "shop", b'{"sessionId": "s", "taskId": ')  # stored, then quarantined
    post(client, "shop", b"plain text", "text/plain", query="task_id=t2")  # stored
    assert client.post("/hooks/shop", content=b"{}").status_code == 401
    assert (
        client.post("/hooks/shop", content=b"{}", headers={"authorization": "x"}).status_code == 401
    )
    too_big = b"x" * (client.app.state.settings.max_body_bytes + 1)  # type: ignore[attr-defined]
    response = client.post("/hooks/shop", content=too_big, headers={"authorization": TOKEN})
    assert response.status_code == 413
    long_name = "h" * 200
    assert client.post(f"/hooks/{long_name}", headers={"authorization": TOKEN}).status_code == 404
    client.app.state.pipeline.join()  # type: ignore[attr-defined]

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    metrics = scrape(response.text)
    counts = delivery_counts(metrics)
    assert counts == {
        "received": 8,
        "stored": 2,
        "quarantined": 1,
        "duplicate": 1,
        "spooled": 0,
        "rejected": 4,
        "processing": 0,
    }
    assert adds_up(counts)
    assert metrics["receiver_deliveries_rejected_total{reason=auth}"] == 2
    assert metrics["receiver_deliveries_rejected_total{reason=size}"] == 1
    assert metrics["receiver_deliveries_rejected_total{reason=hook_name}"] == 1
    assert metrics["receiver_request_duration_seconds_count"] == 8
    assert metrics["receiver_request_duration_seconds_bucket[le=+Inf]"] == 8
    assert metrics["receiver_pipeline_processed_total{outcome=processed}"] == 2
    assert metrics["receiver_pipeline_processed_total{outcome=quarantined}"] == 1
    assert metrics["receiver_spool_backlog"] == 0


def test_backlog_processed_after_a_restart_is_not_counted_as_received(
    settings: Settings, engine: Engine
) -> None:
    """Only this process's answers are `received`; older work shows in pipeline_processed."""
    with TestClient(create_app(settings, engine=engine)) as first:
        post(first, "shop", SAMPLE)
    with engine.begin() as conn:  # as if the process died before processing it
        for delivery_id in conn.scalars(select(Delivery.id)).all():
            delete_derived(conn, delivery_id, "shop")
        conn.execute(update(Delivery).values(status="stored"))
    with TestClient(create_app(settings, engine=engine)) as second:
        second.app.state.pipeline.join()  # type: ignore[attr-defined]
        metrics = scrape(second.get("/metrics").text)
    counts = delivery_counts(metrics)
    assert counts["received"] == 0
    assert adds_up(counts)
    assert metrics["receiver_pipeline_processed_total{outcome=processed}"] == 1


@pytest.mark.parametrize("outcome", ["processed", "quarantined", "failed"])
@given(early=st.booleans())
def test_processed_before_answered_still_counts_once(outcome: str, early: bool) -> None:
    """The pipeline may finish before the request's answer is counted: either order adds up."""
    metrics = Metrics()
    if early:
        metrics.delivery_processed("d1", outcome)
        metrics.delivery_answered(200, "stored", "d1", 0.01)
    else:
        metrics.delivery_answered(200, "stored", "d1", 0.01)
        assert delivery_counts(scrape(metrics.exposition()[0].decode()))["processing"] == 1
        metrics.delivery_processed("d1", outcome)
    counts = delivery_counts(scrape(metrics.exposition()[0].decode()))
    assert adds_up(counts)
    assert counts["processing"] == 0
    assert counts["quarantined" if outcome == "quarantined" else "stored"] == 1


events = st.lists(
    st.tuples(
        st.sampled_from([200, 401, 413, 404, 400, 408, 503, 500]),
        st.sampled_from(["stored", "duplicate", "spooled"]),
        st.sampled_from(["processed", "quarantined", "failed", None]),
        st.booleans(),
    ),
    max_size=40,
)


@given(events)
def test_any_interleaving_adds_up_once_idle(seq: list[tuple[int, str, str | None, bool]]) -> None:
    metrics = Metrics()
    pending: list[tuple[str, str]] = []
    for i, (http_status, status, outcome, early) in enumerate(seq):
        delivery_id = f"d{i}"
        stored = http_status == 200 and status == "stored"
        if stored and outcome and early:
            metrics.delivery_processed(delivery_id, outcome)
        metrics.delivery_answered(http_status, status, delivery_id, 0.001)
        if stored and not (outcome and early):
            pending.append((delivery_id, outcome or "processed"))
        # Drained from the spool or left from before a restart: the pipeline only.
        if not stored and outcome:
            metrics.delivery_processed(f"other{i}", outcome)
    for delivery_id, outcome in pending:
        metrics.delivery_processed(delivery_id, outcome)
    counts = delivery_counts(scrape(metrics.exposition()[0].decode()))
    assert counts["received"] == len(seq)
    assert counts["processing"] == 0
    assert adds_up(counts)


def test_spool_backlog_and_age(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    collector = SpoolCollector(lambda: spool)

    def values() -> dict[str, float]:
        return {m.name: m.samples[0].value for m in collector.collect()}

    assert values() == {"receiver_spool_backlog": 0, "receiver_spool_oldest_age_seconds": 0}
    spool.append(RawDelivery(hook="h", body=b"{}", content_type=None, headers=(), query_string=""))
    time.sleep(0.05)
    spool.append(RawDelivery(hook="h", body=b"[]", content_type=None, headers=(), query_string=""))
    now = values()
    assert now["receiver_spool_backlog"] == 2
    assert 0.05 <= now["receiver_spool_oldest_age_seconds"] < 60
    # No spool at all (an app built without one) reads as empty, not as an error.
    assert {m.samples[0].value for m in SpoolCollector(lambda: None).collect()} == {0.0}


def test_spooled_deliveries_count_once_and_drain_without_recounting(
    tmp_path: Path, pg_template: str
) -> None:
    """PostgreSQL behind a proxy we cut: answers are `spooled`; the drain adds no `received`."""
    host, port = PG_SERVER.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)
    name = fresh_pg_database(pg_template)
    try:
        with TcpProxy(host, int(port)) as proxy:
            url = _pg_url(name).replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
            settings = Settings(
                database_url=url, tokens=(TOKEN.encode(),), data_dir=tmp_path / "data"
            )
            engine = create_db_engine(settings)
            app = create_app(settings, engine=engine, ledger_wait_seconds=2.0)
            try:
                with TestClient(app) as client:
                    post(client, "shop", SAMPLE)
                    proxy.cut()
                    response = client.post(
                        "/hooks/shop",
                        content=b'{"event": "just_ping"}',
                        headers={"authorization": TOKEN},
                    )
                    assert response.json()["status"] == "spooled"
                    proxy.restore()
                    deadline = time.monotonic() + 30
                    while app.state.spool.backlog() and time.monotonic() < deadline:
                        time.sleep(0.1)
                    app.state.pipeline.join()
                    metrics = scrape(client.get("/metrics").text)
            finally:
                engine.dispose()
    finally:
        drop_pg_database(name)
    counts = delivery_counts(metrics)
    assert counts["received"] == 2
    assert counts["spooled"] == 1
    assert counts["stored"] == 1
    assert adds_up(counts)
    assert metrics["receiver_pipeline_processed_total{outcome=processed}"] == 2
    assert metrics["receiver_spool_backlog"] == 0


def test_metrics_sum_over_workers(tmp_path: Path) -> None:
    """`serve --workers 2`: whichever worker answers the scrape, it reports all deliveries."""
    import os
    import signal
    import subprocess
    import sys

    from tests.live import ROOT, free_port

    port = free_port()
    data = tmp_path / "data"
    env = {
        **os.environ,
        "RECEIVER_TOKEN": TOKEN,
        "RECEIVER_DATA_DIR": str(data),
        "RECEIVER_DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(
        [sys.executable, "-m", "receiver", "serve", "--port", str(port), "--workers", "2"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        for i in range(6):  # a fresh connection each: the kernel spreads them over workers
            answer = httpx.post(
                f"{base}/hooks/multi?i={i}", content=SAMPLE, headers={"authorization": TOKEN}
            )
            assert answer.status_code == 200, answer.text
        assert httpx.post(f"{base}/hooks/multi", content=b"{}").status_code == 401
        seen: list[dict[str, float]] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            counts = delivery_counts(scrape(httpx.get(f"{base}/metrics").text))
            seen.append(counts)
            if len(seen) >= 6 and counts["processing"] == 0:
                break
            time.sleep(0.05)
        assert seen[-1]["received"] == 7
        assert seen[-1]["stored"] + seen[-1]["quarantined"] == 6
        assert all(c["received"] == 7 for c in seen)
        assert adds_up(seen[-1])
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()
    assert (data / "metrics").is_dir()
