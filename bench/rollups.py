"""Figure 4: `receiver costs --by day` and `--by label:project` over the seeded tasks
(target: under 1 s each for 1M).

Beside them: the bare ``GROUP BY`` through the driver (by label: what the
``cost_by_label`` view of 0002 did on every read, unpacking each task's JSON
labels), and the time of ``receiver --help`` (interpreter start and imports,
paid by every command).
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
#: The label the seeded tasks carry (`bench.databases.task_rows`).
LABEL = "project"
_DAY = {
    "sqlite": "substr(first_seen_at, 1, 10)",
    "postgresql": "(first_seen_at AT TIME ZONE 'UTC')::date",
}
_LABELS = {
    "sqlite": "json_each(tasks.labels) AS l",
    "postgresql": "jsonb_each_text(tasks.labels::jsonb) AS l",
}
_SUMS = (
    "count(*), count(cost_usd), sum(input_tokens), sum(output_tokens), sum(total_tokens),"
    " sum(compute_time_s), sum(cost_usd)"
)


def _timed(db: BenchDatabase, sql: str, params: tuple[Any, ...] = ()) -> float:
    with contextlib.closing(db.connect()) as conn:
        started = time.perf_counter()
        conn.execute(sql, params).fetchall()
        return time.perf_counter() - started


def bare_group_by(db: BenchDatabase) -> float:
    day = _DAY[db.dialect]
    return _timed(
        db, f"SELECT {day} AS day, status, {_SUMS} FROM tasks GROUP BY 1, 2 ORDER BY 1, 2"
    )


def bare_label_group_by(db: BenchDatabase) -> float:
    """Tasks grouped by day, hook, status and one label's value, as the plain view did."""
    mark = "?" if db.dialect == "sqlite" else "%s"
    sql = (
        f"SELECT {_DAY[db.dialect]} AS day, hook, status, l.value, {_SUMS}"
        f" FROM tasks, {_LABELS[db.dialect]} WHERE l.key = {mark} GROUP BY 1, 2, 3, 4"
    )
    return _timed(db, sql, (LABEL,))


def _costs(db: BenchDatabase, by: str) -> dict[str, Any] | str:
    argv = [sys.executable, "-m", "receiver", "costs", "--by", by, "--format", "json"]
    recv = run_measured(argv, receiver_env(db), TIMEOUT_S)
    if recv.returncode != 0:
        return f"failed: {recv.output[-500:]}"
    return {
        "seconds": round(recv.seconds, 3),
        "peak_rss_mb": recv.peak_rss_mb,
        "output_chars": len(recv.output),
    }


def measure(db: BenchDatabase, rows: int) -> dict[str, Any]:
    result: dict[str, Any] = {
        "rows": rows,
        "bare_group_by_s": round(bare_group_by(db), 3),
        "bare_label_group_by_s": round(bare_label_group_by(db), 3),
    }
    startup = run_measured([sys.executable, "-m", "receiver", "--help"], {}, 60)
    result["cli_startup_s"] = round(startup.seconds, 3)
    if not cli_available("costs"):
        return result | {"receiver": "not available"}
    result["receiver"] = _costs(db, "day")
    result["receiver_by_label"] = by_label = _costs(db, f"label:{LABEL}")
    shown = by_label if isinstance(by_label, str) else f"{by_label['seconds']} s"
    print(
        f"  costs --by label:{LABEL}, {rows} tasks on {db.dialect}: {shown}"
        f" (bare label GROUP BY {result['bare_label_group_by_s']} s)",
        flush=True,
    )
    return result
