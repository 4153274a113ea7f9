"""Figure 4: `receiver costs --by day` over the seeded tasks (target: under 1 s for 1M).

Beside it: the bare ``GROUP BY`` day through the driver, and the time of
``receiver --help`` (interpreter start and imports, paid by every command).
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

from bench.databases import BenchDatabase
from bench.export import cli_available, receiver_env
from bench.subprocesses import run_measured

TIMEOUT_S = 300.0
_DAY = {
    "sqlite": "substr(first_seen_at, 1, 10)",
    "postgresql": "(first_seen_at AT TIME ZONE 'UTC')::date",
}


def bare_group_by(db: BenchDatabase) -> float:
    sql = (
        f"SELECT {_DAY[db.dialect]} AS day, status, count(*), count(cost_usd), sum(input_tokens),"
        " sum(output_tokens), sum(total_tokens), sum(compute_time_s), sum(cost_usd)"
        " FROM tasks GROUP BY 1, 2 ORDER BY 1, 2"
    )
    with contextlib.closing(db.connect()) as conn:
        started = time.perf_counter()
        conn.execute(sql).fetchall()
        return time.perf_counter() - started


def measure(db: BenchDatabase, rows: int) -> dict[str, Any]:
    result: dict[str, Any] = {"rows": rows, "bare_group_by_s": round(bare_group_by(db), 3)}
    startup = run_measured([sys.executable, "-m", "receiver", "--help"], {}, 60)
    result["cli_startup_s"] = round(startup.seconds, 3)
    if not cli_available("costs"):
        return result | {"receiver": "not available"}
    argv = [sys.executable, "-m", "receiver", "costs", "--by", "day", "--format", "json"]
    recv = run_measured(argv, receiver_env(db), TIMEOUT_S)
    if recv.returncode != 0:
        return result | {"receiver": f"failed: {recv.output[-500:]}"}
    result["receiver"] = {
        "seconds": round(recv.seconds, 3),
        "peak_rss_mb": recv.peak_rss_mb,
        "output_chars": len(recv.output),
    }
    return result
