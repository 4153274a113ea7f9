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
import dataclasses
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


@dataclasses.dataclass
class _Contender:
    """One server under test: its database, and its figures per round."""

    name: str
    db: BenchDatabase
    server: Server
    processes: bool  # has a pipeline whose backlog must drain between rounds
    rounds: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def table(self) -> str:
        return "raw" if self.name == "baseline" else "deliveries"


def _start(
    stack: contextlib.ExitStack, name: str, dialect: str, connections: int, logs: Path
) -> _Contender:
    db = stack.enter_context(fresh_database(dialect, migrate=name != "baseline"))
    port = free_port()
    argv = {
        "baseline": baseline_argv(port),
        "receiver": receiver_argv(port),
        "receiver_no_pipeline": variant_argv(port, "bench.variants:receiver_without_pipeline"),
    }[name]
    log = logs / f"ingest-{name}-{dialect}.log"
    server = stack.enter_context(
        running(argv, _env(db, logs / "data"), log, port=port, ready_path="/healthz")
    )
    _load(server, connections, 2)  # warm-up
    return _Contender(name, db, server, processes=name == "receiver")


def _measure(contender: _Contender, connections: int, seconds: int) -> dict[str, Any]:
    """One loaded run; for the receiver, also what its pipeline did during and after it."""
    before = status_counts(contender.db, contender.table)
    load = _load(contender.server, connections, seconds)
    result = _figures(load)
    if contender.processes:
        after_load = status_counts(contender.db)
        drain_s, drained = wait_processed(contender.db, DRAIN_TIMEOUT_S)
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
    return result


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median rate (figures of one real run, not a mix), plus all rates."""
    ordered = sorted(rounds, key=lambda r: r["deliveries_per_s"])
    return {**ordered[len(ordered) // 2], "rates": [r["deliveries_per_s"] for r in rounds]}


def run_dialect(
    dialect: str, connections: int, seconds: int, logs: Path, rounds: int
) -> dict[str, Any]:
    """Baseline, receiver and receiver without pipeline, each on its own fresh database,
    loaded in turn for ``rounds`` rounds: a machine that gets busier or quieter during
    the run then weighs on all three alike. Each figure is its median round."""
    with contextlib.ExitStack() as stack:
        contenders = [
            _start(stack, name, dialect, connections, logs)
            for name in ("baseline", "receiver", "receiver_no_pipeline")
        ]
        for contender in contenders:
            if contender.processes:  # the warm-up's backlog
                wait_processed(contender.db, DRAIN_TIMEOUT_S)
        for _ in range(rounds):
            for contender in contenders:
                contender.rounds.append(_measure(contender, connections, seconds))
        out: dict[str, Any] = {}
        for contender in contenders:
            totals = status_counts(
                contender.db, "raw" if contender.name == "baseline" else "deliveries"
            )
            out[contender.name] = {
                **_median_round(contender.rounds),
                "rows_committed": sum(totals.values()),
                "ok_total": sum(r["ok"] for r in contender.rounds),
                "peak_rss_mb": contender.server.peak_rss_mb(),
            }
    return out


def run(
    dialects: list[str], connections: int, seconds: int, logs: Path, rounds: int = 3
) -> dict[str, Any]:
    """Figure 1 for each dialect: baseline, receiver, receiver without pipeline, ratios."""
    out: dict[str, Any] = {}
    for dialect in dialects:
        figures = run_dialect(dialect, connections, seconds, logs, rounds)
        base, recv, edge = (
            figures["baseline"],
            figures["receiver"],
            figures["receiver_no_pipeline"],
        )
        out[dialect] = {
            **figures,
            "ratio": round(recv["deliveries_per_s"] / base["deliveries_per_s"], 3),
            "ratio_no_pipeline": round(edge["deliveries_per_s"] / base["deliveries_per_s"], 3),
            "p99_vs_baseline": round(recv["p99_ms"] / base["p99_ms"], 3),
            "rounds": rounds,
        }
    return out
