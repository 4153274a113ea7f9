"""``python -m bench``: run every figure, print a table, write bench/results/latest.json."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import export, ingest, large_results, reconcile, rollups, sustained
from bench.databases import fresh_database, seed_tasks
from bench.load import require_wrk

RESULTS = Path(__file__).resolve().parent / "results"
FIGURES = ("ingest", "large", "export", "rollups", "reconcile", "sustained")


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    import sqlite3

    import psycopg

    with psycopg.connect(
        os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
    ) as c:
        row = c.execute("SHOW server_version").fetchone()
        pg = str(row[0]) if row else "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024**2, 1),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": pg,
        "kernel": platform.release(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip(),
    }


def analytics(dialects: list[str], sizes: list[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Figures 3 and 4 over one seeded database per dialect and size."""
    exports: dict[str, Any] = {}
    costs: dict[str, Any] = {}
    for dialect in dialects:
        for rows in sizes:
            with fresh_database(dialect) as db:
                started = time.perf_counter()
                seed_tasks(db, rows)
                seeded = round(time.perf_counter() - started, 1)
                print(f"  seeded {rows} tasks on {dialect} in {seeded} s", flush=True)
                exports.setdefault(dialect, {})[str(rows)] = export.measure(db, rows)
                if rows == max(sizes):
                    costs[dialect] = rollups.measure(db, rows)
    return exports, costs


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.0f}"
    return "-" if value is None else str(value)


def _rates(figures: dict[str, Any]) -> str:
    return ", ".join(f"{rate:.0f}" for rate in figures.get("rates", []))


def table(results: dict[str, Any]) -> str:
    """The figures as a Markdown table (also pasted into bench/README.md)."""
    lines = ["| figure | db | receiver | baseline | ratio | target |", "|---|---|---|---|---|---|"]
    for dialect, r in results.get("ingest", {}).items():
        b, v, e = r["baseline"], r["receiver"], r["receiver_no_pipeline"]
        lines.append(
            f"| ingest deliveries/s (median of {_rates(v)}) | {dialect} | {v['deliveries_per_s']}"
            f" | {b['deliveries_per_s']} (of {_rates(b)}) | {r['ratio']} | >= 0.7 |"
        )
        lines.append(
            f"| ingest p50 / p99 ms | {dialect} | {v['p50_ms']:.0f} / {v['p99_ms']:.0f}"
            f" | {b['p50_ms']:.0f} / {b['p99_ms']:.0f} | p99 x{r['p99_vs_baseline']} | p99 <= 1x |"
        )
        lines.append(
            f"| ingest, pipeline idled (edge+ledger) | {dialect} | {e['deliveries_per_s']}"
            f" (p99 {e['p99_ms']:.0f} ms) | {b['deliveries_per_s']} | {r['ratio_no_pipeline']} |"
            " diagnostic |"
        )
        lines.append(
            f"| processed/s during load / idle | {dialect} | {v.get('processed_per_s_during_load')}"
            f" / {v.get('processed_per_s_idle')} (backlog {v.get('backlog_at_end_of_load')},"
            f" drained in {v.get('drain_s')} s) | - | - | keep up |"
        )
        lines.append(
            f"| server peak RSS MB (ingest) | {dialect} | {_cell(v['peak_rss_mb'])}"
            f" | {_cell(b['peak_rss_mb'])} | - | - |"
        )
    for dialect, r in results.get("large", {}).items():
        for kind, label in (("csv", "50k-row CSV"), ("json", "20k-object JSON")):
            k = r[kind]
            target = "<= 2x, < 2 s" if kind == "csv" else "<= 2x"
            lines.append(
                f"| {label} to queryable s | {dialect} | {k['receiver']['queryable_s']}"
                f" ({k['receiver']['rows']} rows, {k['receiver']['status']})"
                f" | {k['baseline']['queryable_s']} | x{k['ratio']} | {target} |"
            )
            alike = k.get("like_for_like")
            if alike is not None:
                lines.append(
                    f"| {label}, against a baseline keeping what the receiver keeps | {dialect}"
                    f" | {k['receiver']['queryable_s']} | {alike['queryable_s']}"
                    f" | x{alike['ratio']} | diagnostic |"
                )
        lines.append(
            f"| server peak RSS MB (large) | {dialect} | {_cell(r['server_peak_rss_mb'])}"
            " | - | - | - |"
        )
    for dialect, per in results.get("export", {}).items():
        for rows, r in per.items():
            b, v = r["baseline"], r["receiver"]
            if isinstance(v, str):
                lines.append(
                    f"| export {rows} rows | {dialect} | {v} | {b['rows_per_s']} rows/s | - | - |"
                )
                continue
            lines.append(
                f"| export {rows} rows: rows/s | {dialect} | {v['rows_per_s']} ({v['rows']} rows)"
                f" | {b['rows_per_s']} | {r['ratio']} | >= 0.7 |"
            )
            lines.append(
                f"| export {rows} rows: peak RSS MB | {dialect} | {_cell(v['peak_rss_mb'])}"
                f" | {_cell(b['peak_rss_mb'])} | - | < 300, flat |"
            )
    for dialect, r in results.get("rollups", {}).items():
        for by, key, bare in (
            ("day", "receiver", "bare_group_by_s"),
            (f"label:{rollups.LABEL}", "receiver_by_label", "bare_label_group_by_s"),
        ):
            v = r.get(key, "not measured")
            shown = v if isinstance(v, str) else f"{v['seconds']} s"
            lines.append(
                f"| costs --by {by}, {r['rows']} tasks | {dialect} | {shown}"
                f" | bare GROUP BY {r.get(bare)} s; CLI start {r['cli_startup_s']} s"
                " | - | < 1 s |"
            )
    for key, r in results.get("reconcile", {}).items():
        dialect, variant = key.split("/")
        p, v = r["plain"], r["reconciling"]
        lines.append(
            f"| ingest deliveries/s, reconciling ({variant} WebRun: {r['polls_per_s']} polls/s,"
            f" {r['poll_delay_s']} s each) | {dialect} | {v['deliveries_per_s']}"
            f" (p99 {v['p99_ms']:.0f} ms) | {p['deliveries_per_s']} (p99 {p['p99_ms']:.0f} ms,"
            f" no WebRun) | {r['ratio']} | >= 0.9 |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", nargs="*", choices=FIGURES, default=list(FIGURES))
    parser.add_argument(
        "--db", nargs="*", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"]
    )
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per ingest run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved ingest rounds (median reported)"
    )
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=5, help="large deliveries per kind")
    parser.add_argument(
        "--sustain-seconds", type=int, default=60, help="length of each paced stream (sustained)"
    )
    parser.add_argument(
        "--paces",
        type=float,
        nargs="*",
        default=list(sustained.PACES),
        help="paced streams as fractions of the burst rate (sustained)",
    )
    args = parser.parse_args()
    if {"ingest", "reconcile", "sustained"} & set(args.only):
        require_wrk()
    logs = RESULTS / "logs"
    results: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average_at_start": os.getloadavg(),
        "machine": machine(),
        "settings": vars(args),
    }
    started = time.perf_counter()
    if "ingest" in args.only:
        print("ingest ...", flush=True)
        results["ingest"] = ingest.run(args.db, args.connections, args.seconds, logs, args.rounds)
    if "large" in args.only:
        print("large results ...", flush=True)
        results["large"] = large_results.run(args.db, logs, args.repeats)
    if "reconcile" in args.only:
        print("ingest while reconciling ...", flush=True)
        results["reconcile"] = reconcile.run(
            args.db, args.connections, args.seconds, logs, args.rounds
        )
    if "sustained" in args.only:
        print("sustained streams ...", flush=True)
        results["sustained"] = sustained.run(
            args.db, args.connections, args.seconds, args.sustain_seconds, logs, tuple(args.paces)
        )
    if {"export", "rollups"} & set(args.only):
        print("export and rollups ...", flush=True)
        exports, costs = analytics(args.db, sorted(args.sizes))
        if "export" in args.only:
            results["export"] = exports
        if "rollups" in args.only:
            results["rollups"] = costs
    results["seconds"] = round(time.perf_counter() - started, 1)
    # Other processes on the machine skew everything: the load average says how much.
    results["load_average_at_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    if "sustained" in results:
        print("\n" + sustained.table(results["sustained"]))
    print(f"\nwritten {RESULTS / 'latest.json'} in {results['seconds']} s")
    print(f"load average: {results['load_average_at_start']} -> {results['load_average_at_end']}")


if __name__ == "__main__":
    main()
