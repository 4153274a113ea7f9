"""Figure 6: ingest throughput while the reconciler polls WebRun, against the receiver without it.

Two `receiver serve` processes, each on its own fresh database, loaded in turn
under the same wrk load (as in figure 1, median of ``--rounds``): the plain one
(no ``RECEIVER_WEBRUN_URL``: no outbound call at all) and one reconciling a
backlog of overdue runs against the fake WebRun (`receiver.fakewebrun`, in this
process). Its runs are seeded due across the whole measurement, and the fake
answers each poll ``active`` (so each answer is written through the ledger and
processed, and the run rescheduled), at most ``RATE`` polls a second: the
reconciler at its configured bound the whole time. Variant ``slow``: every poll
takes ``SLOW_POLL_S`` to answer (a WebRun outage seen from here), which must not
slow ingest either.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from pathlib import Path
from typing import Any

from bench.databases import BenchDatabase, fresh_database
from bench.ingest import TOKEN, _figures, _load, _median_round, wait_processed
from bench.servers import Server, free_port, receiver_argv, running
from receiver.fakewebrun import FakeTask, FakeWebRun

KEY = "bench-webrun-key"
#: Polls a second the reconciler is allowed (RECEIVER_WEBRUN_RATE).
RATE = 50
#: A poll answer's delay in the ``slow`` variant.
SLOW_POLL_S = 5.0
HOOK = "bench"


def seed_runs(db: BenchDatabase, fake: FakeWebRun, count: int, spread_s: float) -> None:
    """``count`` launched runs of tasks the fake knows as still running, due over ``spread_s``."""
    now = dt.datetime.now(dt.UTC)
    rows: list[tuple[Any, ...]] = []
    for n in range(count):
        session_id, task_id = f"sess_bench{n}", f"task_bench{n}"
        fake.tasks[task_id] = FakeTask(
            number=n,
            session_id=session_id,
            task_id=task_id,
            config={},
            started=time.monotonic(),
            ends=time.monotonic() + 10**6,
            failed=False,
            output_type="text",
            output="",
            usage={"inputTokens": 100, "outputTokens": 10, "computeTime": 1.0, "cost": 0.001},
            completed_at="",
            dropped=True,
        )
        due = now + dt.timedelta(seconds=spread_s * n / count)
        rows.append(
            (
                f"bench-run-{n}",
                HOOK,
                now,
                "tracked",
                "{}",
                session_id,
                task_id,
                due,
                due,
                "launched",
                0,
                now,
            )
        )
    sql = (
        "INSERT INTO runs (id, hook, created_at, origin, labels, session_id, task_id,"
        " expected_by, next_check_at, state, attempts, updated_at)"
        " VALUES ({})".format(", ".join(["%s" if db.dialect == "postgresql" else "?"] * 12))
    )
    with contextlib.closing(db.connect()) as conn:
        if db.dialect == "sqlite":
            rows = [
                tuple(
                    v.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, dt.datetime) else v
                    for v in row
                )
                for row in rows
            ]
            conn.execute("BEGIN")
        cursor = conn.cursor()
        cursor.executemany(sql, rows)
        conn.commit()


def _env(db: BenchDatabase, data_dir: Path, fake: FakeWebRun | None) -> dict[str, str]:
    env = {
        "RECEIVER_DATABASE_URL": db.sqlalchemy_url,
        "RECEIVER_TOKEN": TOKEN,
        "RECEIVER_DATA_DIR": str(data_dir),
    }
    if fake is not None:
        env |= {
            "RECEIVER_WEBRUN_URL": fake.url,
            "RECEIVER_WEBRUN_API_KEY": KEY,
            "RECEIVER_RECONCILE_INTERVAL_SECONDS": "0.5",
            "RECEIVER_WEBRUN_RATE": str(RATE),
            "RECEIVER_WEBRUN_CONCURRENCY": "4",
            "RECEIVER_WEBRUN_TIMEOUT_SECONDS": str(SLOW_POLL_S * 2),
        }
    return env


def run_dialect(
    dialect: str, connections: int, seconds: int, logs: Path, rounds: int, slow: bool
) -> dict[str, Any]:
    fake = FakeWebRun(api_key=KEY, poll_delay=SLOW_POLL_S if slow else 0.0)
    variant = "slow" if slow else "answering"
    with contextlib.ExitStack() as stack:
        stack.enter_context(fake.serve())
        contenders: dict[str, tuple[BenchDatabase, Server]] = {}
        for name in ("plain", "reconciling"):
            db = stack.enter_context(fresh_database(dialect))
            if name == "reconciling":
                # Enough due runs for the reconciler to be at its bound through every round.
                total_s = (seconds + 15) * (rounds + 1) + 30
                seed_runs(db, fake, RATE * int(total_s), total_s)
            port = free_port()
            log = logs / f"reconcile-{variant}-{name}-{dialect}.log"
            env = _env(db, logs / "data", fake if name == "reconciling" else None)
            server = stack.enter_context(
                running(receiver_argv(port), env, log, port=port, ready_path="/healthz")
            )
            _load(server, connections, 2)  # warm-up
            wait_processed(db, 120)
            contenders[name] = (db, server)
        per: dict[str, list[dict[str, Any]]] = {"plain": [], "reconciling": []}
        polls_before = fake.count("task")
        started = time.monotonic()
        for _ in range(rounds):
            for name, (db, server) in contenders.items():
                result = _figures(_load(server, connections, seconds))
                wait_processed(db, 120)
                per[name].append(result)
        elapsed = time.monotonic() - started
        polls = fake.count("task") - polls_before
    plain, reconciling = _median_round(per["plain"]), _median_round(per["reconciling"])
    return {
        "plain": plain,
        "reconciling": reconciling,
        "ratio": round(reconciling["deliveries_per_s"] / plain["deliveries_per_s"], 3),
        "p99_vs_plain": round(reconciling["p99_ms"] / plain["p99_ms"], 3),
        "polls": polls,
        "polls_per_s": round(polls / elapsed, 1),
        "poll_delay_s": fake.poll_delay,
        "in_flight_peak": fake.peak_polls_in_flight,
        "answers": sorted({s for _, r, s in fake.requests if r == "task"}),
    }


def run(
    dialects: list[str], connections: int, seconds: int, logs: Path, rounds: int = 3
) -> dict[str, Any]:
    """Figure 6 per dialect, with WebRun answering and with WebRun slow."""
    return {
        f"{dialect}/{variant}": run_dialect(
            dialect, connections, seconds, logs, rounds, slow=variant == "slow"
        )
        for dialect in dialects
        for variant in ("answering", "slow")
    }
