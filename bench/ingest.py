"""Figure 1 (and 5): ingest rate, latency and server peak memory against the bare baseline.

Per database: the baseline (bench/baseline.py), `receiver serve`, and the
receiver with its pipeline idled (a diagnostic: the HTTP edge and ledger
alone), each on its own fresh database under the same wrk load. The receiver
processes each delivery after its commit in a background thread of the same
process, which competes for the 2 cores and the GIL: so the backlog left at
the end of the load and how fast it drains are reported too.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from bench.databases import BenchDatabase, fresh_database
from bench.load import LoadResult, run_wrk
from bench.servers import Server, baseline_argv, free_port, receiver_argv, running, variant_argv

TOKEN = "Bearer bench-token"
HOOK = "bench"
DRAIN_TIMEOUT_S = 120.0


def status_counts(db: BenchDatabase, table: str = "deliveries") -> dict[str, int]:
    """Rows per delivery status (the baseline's ``raw`` table counts as all ``stored``)."""
    with contextlib.closing(db.connect()) as conn:
        if table == "raw":
            return {"stored": conn.execute("SELECT count(*) FROM raw").fetchone()[0]}
        rows = conn.execute(f"SELECT status, count(*) FROM {table} GROUP BY status").fetchall()
        if db.dialect == "postgresql":
            conn.rollback()
        return dict(rows)


def wait_processed(db: BenchDatabase, timeout: float) -> tuple[float, dict[str, int]]:
    """Wait until no delivery is left ``stored`` (unprocessed); returns (seconds, counts)."""
    started = time.monotonic()
    while True:
        counts = status_counts(db)
        if counts.get("stored", 0) == 0 or time.monotonic() - started > timeout:
            return time.monotonic() - started, counts
        time.sleep(0.2)


def _load(server: Server, connections: int, seconds: int) -> LoadResult:
    return run_wrk(f"{server.url}/hooks/{HOOK}", TOKEN, connections=connections, seconds=seconds)


def _figures(load: LoadResult) -> dict[str, Any]:
    return {
        "deliveries_per_s": round(load.rate, 1),
        "ok": load.ok,
        "errors": load.errors,
        "p50_ms": load.p50_ms,
        "p90_ms": load.p90_ms,
        "p99_ms": load.p99_ms,
        "max_ms": load.max_ms,
    }


def _env(db: BenchDatabase, data_dir: Path) -> dict[str, str]:
    return {
        "RECEIVER_DATABASE_URL": db.sqlalchemy_url,
        "RECEIVER_TOKEN": TOKEN,
        "RECEIVER_DATA_DIR": str(data_dir),
        "BENCH_DIALECT": db.dialect,
        "BENCH_LOCATION": db.location,
        "BENCH_TOKEN": TOKEN,
    }


def run_baseline(dialect: str, connections: int, seconds: int, logs: Path) -> dict[str, Any]:
    with fresh_database(dialect, migrate=False) as db:
        port = free_port()
        env = _env(db, logs / "data")
        log = logs / f"ingest-baseline-{dialect}.log"
        with running(baseline_argv(port), env, log, port=port, ready_path="/healthz") as server:
            _load(server, connections, 2)  # warm-up
            load = _load(server, connections, seconds)
            peak = server.peak_rss_mb()
        stored = status_counts(db, "raw")["stored"]
    return {**_figures(load), "rows_committed": stored, "peak_rss_mb": peak}


def run_receiver(
    dialect: str, connections: int, seconds: int, logs: Path, *, pipeline: bool = True
) -> dict[str, Any]:
    """`receiver serve` (or, with ``pipeline=False``, its edge and ledger alone) under load."""
    with fresh_database(dialect) as db:
        port = free_port()
        env = _env(db, logs / "data")
        name = "receiver" if pipeline else "receiver-no-pipeline"
        argv = (
            receiver_argv(port)
            if pipeline
            else variant_argv(port, "bench.variants:receiver_without_pipeline")
        )
        log = logs / f"ingest-{name}-{dialect}.log"
        with running(argv, env, log, port=port, ready_path="/healthz") as server:
            _load(server, connections, 2)  # warm-up
            if pipeline:
                wait_processed(db, DRAIN_TIMEOUT_S)
            before = status_counts(db)
            load = _load(server, connections, seconds)
            after_load = status_counts(db)
            result = _figures(load)
            if pipeline:
                drain_s, drained = wait_processed(db, DRAIN_TIMEOUT_S)
                processed_in_load = after_load.get("processed", 0) - before.get("processed", 0)
                processed_in_drain = drained.get("processed", 0) - after_load.get("processed", 0)
                result |= {
                    "processed_per_s_during_load": round(processed_in_load / load.seconds, 1),
                    "backlog_at_end_of_load": after_load.get("stored", 0),
                    "drain_s": round(drain_s, 2),
                    "processed_per_s_idle": round(processed_in_drain / drain_s, 1)
                    if drain_s > 0.5
                    else None,
                    "left_unprocessed": drained.get("stored", 0),
                    "quarantined": drained.get("quarantined", 0),
                }
            peak = server.peak_rss_mb()
        total = sum(status_counts(db).values())
    return {**result, "rows_committed": total, "peak_rss_mb": peak}


def run(dialects: list[str], connections: int, seconds: int, logs: Path) -> dict[str, Any]:
    """Figure 1 for each dialect: baseline, receiver, receiver without pipeline, ratios."""
    out: dict[str, Any] = {}
    for dialect in dialects:
        base = run_baseline(dialect, connections, seconds, logs)
        recv = run_receiver(dialect, connections, seconds, logs)
        edge = run_receiver(dialect, connections, seconds, logs, pipeline=False)
        out[dialect] = {
            "baseline": base,
            "receiver": recv,
            "receiver_no_pipeline": edge,
            "ratio": round(recv["deliveries_per_s"] / base["deliveries_per_s"], 3),
            "ratio_no_pipeline": round(edge["deliveries_per_s"] / base["deliveries_per_s"], 3),
            "p99_vs_baseline": round(recv["p99_ms"] / base["p99_ms"], 3),
        }
    return out
