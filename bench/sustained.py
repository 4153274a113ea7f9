"""Figure 7 (issue 18): fresh results under a sustained stream, against the burst rate.

Per database, one `receiver serve` on a fresh database, and the no-store
ceiling (bench/ceiling.py) under the same uvicorn options:

1. Burst: each loaded flat out by wrk for ``--seconds`` (unique ~2 KB
   ``ai_response`` bodies, as in figure 1); the receiver's answered 200s a
   second is the burst rate, reported against the ceiling's.
2. Paced streams at fractions of that burst rate (25%, 50%, 80%), each for
   ``--sustain-seconds``, each after the previous backlog drained. wrk paces
   through a Lua ``delay()``: one schedule per wrk thread, request k due at
   start + k / rate, on whichever connection is free; overdue requests catch up
   unless over a second late (bench/load.py). A plain per-connection delay of
   connections / rate fell 4-15% short of the target against the ceiling, as
   each request's latency adds to its connection's gap.
   Measured per stream: offered and answered deliveries a second and answer
   latency (wrk); the backlog (deliveries still ``stored``) sampled once a
   second by a thread here, through the stream and the drain after it; the
   drain time; and freshness, ``processed_at - received_at`` of every delivery
   of the stream, both written by the receiver, read once it drained.
   ``received_at`` is taken before the delivery's commit and ``processed_at``
   before the processing commit, so freshness is the time from (about) the 200
   to the moment the results are queryable.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.databases import BenchDatabase, fresh_database
from bench.ingest import HOOK, TOKEN, _env, _figures, _load
from bench.load import LoadResult, run_wrk
from bench.servers import Server, free_port, receiver_argv, running, variant_argv

PACES = (0.25, 0.5, 0.8)
#: Longest wait for a backlog to drain (a stream at 80% of the burst rate for a
#: minute can leave ~170k deliveries; PostgreSQL processes ~2k/s once idle).
DRAIN_TIMEOUT_S = 300.0
SAMPLE_EVERY_S = 1.0
#: The backlog "grew" when it rose over the stream's second half by more than
#: this share of the answered rate (a pipeline 1% behind ingest).
GROWTH_TOLERANCE = 0.01


def backlog(conn: Any, dialect: str) -> int:
    """Deliveries committed and not yet processed (``ix_deliveries_status`` answers it)."""
    row = conn.execute("SELECT count(*) FROM deliveries WHERE status = 'stored'").fetchone()
    count: int = row[0]
    if dialect == "postgresql":
        conn.rollback()  # the next count sees new commits
    return count


class BacklogSampler:
    """The backlog once a second, in a thread with its own connection, until stopped."""

    def __init__(self, db: BenchDatabase) -> None:
        self.db = db
        self.series: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backlog-sampler", daemon=True)
        self._started = 0.0

    def _run(self) -> None:
        with contextlib.closing(self.db.connect()) as conn:
            tick = 0
            while not self._stop.is_set():
                self.series.append(
                    (round(time.monotonic() - self._started, 2), backlog(conn, self.db.dialect))
                )
                tick += 1
                self._stop.wait(max(0.0, self._started + tick * SAMPLE_EVERY_S - time.monotonic()))

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def elapsed(self) -> float:
        return round(time.monotonic() - self._started, 2)

    def at(self, seconds: float) -> int:
        """The last sample taken at or before ``seconds`` after the start."""
        return next((n for t, n in reversed(self.series) if t <= seconds), 0)


def wait_drained(db: BenchDatabase, timeout: float) -> tuple[float | None, int]:
    """Seconds until the backlog is 0 (None past ``timeout``), and the backlog then."""
    started = time.monotonic()
    with contextlib.closing(db.connect()) as conn:
        while True:
            left = backlog(conn, db.dialect)
            elapsed = time.monotonic() - started
            if left == 0:
                return round(elapsed, 2), 0
            if elapsed > timeout:
                return None, left
            time.sleep(0.2)


def _stamp(db: BenchDatabase, when: dt.datetime) -> Any:
    """A UTC time as the receiver stores it (SQLite: naive ISO text, which sorts)."""
    if db.dialect == "sqlite":
        return when.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
    return when


def freshness(db: BenchDatabase, since: dt.datetime, until: dt.datetime) -> dict[str, Any]:
    """``processed_at - received_at`` over the deliveries received in ``[since, until]``."""
    if db.dialect == "sqlite":
        lag = "(julianday(processed_at) - julianday(received_at)) * 86400.0"
        mark = "?"
    else:
        lag = "extract(epoch FROM processed_at - received_at)"
        mark = "%s"
    where = f"hook = {mark} AND received_at >= {mark} AND received_at <= {mark}"
    params = (HOOK, _stamp(db, since), _stamp(db, until))
    with contextlib.closing(db.connect()) as conn:
        lags = sorted(
            float(row[0])
            for row in conn.execute(
                f"SELECT {lag} FROM deliveries WHERE {where} AND processed_at IS NOT NULL", params
            ).fetchall()
        )
        total = conn.execute(f"SELECT count(*) FROM deliveries WHERE {where}", params).fetchone()[0]
        in_stream = conn.execute(
            f"SELECT count(*) FROM deliveries WHERE {where} AND processed_at <= {mark}",
            (*params, _stamp(db, until)),
        ).fetchone()[0]
        if db.dialect == "postgresql":
            conn.rollback()
    return {
        "deliveries": total,
        "unprocessed": total - len(lags),
        "processed_during_stream": in_stream,
        "p50_s": _quantile(lags, 0.50),
        "p99_s": _quantile(lags, 0.99),
        "max_s": round(lags[-1], 3) if lags else None,
    }


def _quantile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank quantile of sorted values."""
    if not ordered:
        return None
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 3)


def _serve(
    stack: contextlib.ExitStack, argv: list[str], port: int, db: BenchDatabase, log: Path
) -> Server:
    env = _env(db, log.parent / "data")
    return stack.enter_context(running(argv, env, log, port=port, ready_path="/healthz"))


@contextlib.contextmanager
def _sampling(db: BenchDatabase) -> Iterator[BacklogSampler]:
    sampler = BacklogSampler(db)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()


def _stream(
    server: Server, db: BenchDatabase, connections: int, seconds: int, rate: float | None
) -> dict[str, Any]:
    """One load (paced at ``rate``, or flat out), then its drain, sampled throughout."""
    since = dt.datetime.now(dt.UTC)
    with _sampling(db) as sampler:
        load: LoadResult = run_wrk(
            f"{server.url}/hooks/{HOOK}", TOKEN, connections=connections, seconds=seconds, rate=rate
        )
        until = dt.datetime.now(dt.UTC)
        stream_s = sampler.elapsed()
        drain_s, left = wait_drained(db, DRAIN_TIMEOUT_S)
    fresh = freshness(db, since, until)
    mid, end = sampler.at(stream_s / 2), sampler.at(stream_s)
    half_s = max(stream_s / 2, SAMPLE_EVERY_S)
    growth = (end - mid) / half_s
    in_stream = [n for t, n in sampler.series if t <= stream_s]
    return {
        **({"target_per_s": round(rate, 1)} if rate is not None else {}),
        "offered_per_s": round(load.offered, 1),
        **_figures(load),
        "processed_per_s_during_stream": round(fresh["processed_during_stream"] / load.seconds, 1),
        "freshness": fresh,
        "backlog_max": max(in_stream, default=0),
        "backlog_mid": mid,
        "backlog_end": end,
        "backlog_growth_per_s": round(growth, 1),
        "backlog_grew": growth > GROWTH_TOLERANCE * load.rate,
        "drain_s": drain_s,
        "left_unprocessed": left,
        "stream_s": stream_s,
        "backlog_series": sampler.series,
    }


def run_dialect(
    dialect: str,
    connections: int,
    seconds: int,
    sustain_seconds: int,
    logs: Path,
    paces: tuple[float, ...] = PACES,
) -> dict[str, Any]:
    """The burst against the ceiling, then the paced streams, on one fresh database."""
    with contextlib.ExitStack() as stack:
        db = stack.enter_context(fresh_database(dialect))
        port = free_port()
        receiver = _serve(stack, receiver_argv(port), port, db, logs / f"sustained-{dialect}.log")
        port = free_port()
        ceiling = _serve(
            stack,
            variant_argv(port, "bench.ceiling:app_from_env"),
            port,
            db,
            logs / f"sustained-ceiling-{dialect}.log",
        )
        _load(receiver, connections, 2)  # warm-up
        _load(ceiling, connections, 2)
        wait_drained(db, DRAIN_TIMEOUT_S)
        print(f"  {dialect}: burst, {seconds} s flat out", flush=True)
        bare = _figures(_load(ceiling, connections, seconds))
        burst = _stream(receiver, db, connections, seconds, None)
        rate = burst["deliveries_per_s"]
        out: dict[str, Any] = {
            "burst": burst,
            "ceiling": bare,
            "ratio_to_ceiling": round(rate / bare["deliveries_per_s"], 3),
            "paces": {},
        }
        for pace in paces:
            print(f"  {dialect}: {pace:.0%} of {rate:.0f}/s for {sustain_seconds} s", flush=True)
            step = _stream(receiver, db, connections, sustain_seconds, pace * rate)
            out["paces"][f"{pace:.0%}"] = step
            if step["drain_s"] is None:
                print(f"  not drained in {DRAIN_TIMEOUT_S:.0f} s: {step['left_unprocessed']} left")
        out["peak_rss_mb"] = receiver.peak_rss_mb()
    return out


def run(
    dialects: list[str],
    connections: int,
    seconds: int,
    sustain_seconds: int,
    logs: Path,
    paces: tuple[float, ...] = PACES,
) -> dict[str, Any]:
    """Figure 7 for each dialect."""
    return {
        dialect: run_dialect(dialect, connections, seconds, sustain_seconds, logs, paces)
        for dialect in dialects
    }


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(results: dict[str, Any]) -> str:
    """Figure 7 as a Markdown table (also pasted into bench/README.md)."""
    lines = [
        "| db | load | target/s | offered/s | answered/s | p50 / p99 ms | processed/s in stream"
        " | fresh p50 / p99 / max s | backlog max (mid -> end) | drain s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dialect, r in results.items():
        c, b = r["ceiling"], r["burst"]
        lines.append(
            f"| {dialect} | no-store ceiling, flat out | - | {c['deliveries_per_s']:.0f}"
            f" | {c['deliveries_per_s']:.0f} | {c['p50_ms']:.1f} / {c['p99_ms']:.1f}"
            " | - | - | - | - |"
        )
        rows = [(f"burst, flat out (x{r['ratio_to_ceiling']} of ceiling)", b)]
        rows += [(f"paced {pace}", step) for pace, step in r["paces"].items()]
        for label, s in rows:
            f = s["freshness"]
            grew = ", grew" if s["backlog_grew"] else ""
            drain = (
                _s(s["drain_s"])
                if s["drain_s"] is not None
                else (f"> {DRAIN_TIMEOUT_S:.0f} ({s['left_unprocessed']} left)")
            )
            lines.append(
                f"| {dialect} | {label} | {s.get('target_per_s', '-')} | {s['offered_per_s']:.0f}"
                f" | {s['deliveries_per_s']:.0f} | {s['p50_ms']:.1f} / {s['p99_ms']:.1f}"
                f" | {s['processed_per_s_during_stream']:.0f}"
                f" | {_s(f['p50_s'])} / {_s(f['p99_s'])} / {_s(f['max_s'])}"
                f" | {s['backlog_max']} ({s['backlog_mid']} -> {s['backlog_end']}{grew})"
                f" | {drain} |"
            )
    return "\n".join(lines)
