"""Memory after a burst of large bodies: resident size before, at peak and settled.

``python -m bench.memory`` starts `receiver serve` on a temporary SQLite file
(``--db postgresql``: a fresh database on ``BENCH_PG``), sends ``--bodies``
bodies of ``--mib`` MiB all at once, waits until every one is processed, then
``--settle`` seconds more, and prints RSS at start, the peak (``VmHWM``) and the
settled RSS, with the body budget's own peak from ``/metrics``. The issue's
probe (50 x 9 MiB) took the server from 90 MB to 1.74 GB, and it stayed there.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx

from bench.databases import fresh_database
from bench.servers import free_port, receiver_argv, running

TOKEN = "Bearer bench-memory"


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise LookupError(field)


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise LookupError(name)


async def burst(url: str, bodies: int, size: int) -> list[int]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=bodies)) as http:

        async def one(i: int) -> int:
            body = b'{"n": %d, "x": "' % i + b"a" * (size - 32) + b'"}'
            answer = await http.post(
                f"{url}/hooks/memory",
                content=body,
                headers={"Authorization": TOKEN, "Content-Type": "application/json"},
            )
            return answer.status_code

        return await asyncio.gather(*(one(i) for i in range(bodies)))


def measure(database_url: str, data_dir: Path, bodies: int, mib: int, settle: float) -> None:
    port = free_port()
    env = {
        "RECEIVER_DATABASE_URL": database_url,
        "RECEIVER_TOKEN": TOKEN,
        "RECEIVER_DATA_DIR": str(data_dir),
    }
    log = Path(__file__).resolve().parent / "results" / "logs" / "memory.log"
    with running(receiver_argv(port), env, log, port=port, ready_path="/readyz") as server:
        time.sleep(1.0)
        start = rss_mib(server.pid)
        began = time.monotonic()
        statuses = asyncio.run(burst(server.url, bodies, mib * 2**20))
        answered = time.monotonic() - began
        deadline = time.monotonic() + 300
        while metric(server.url, "receiver_deliveries_processing") > 0:
            if time.monotonic() > deadline:
                raise TimeoutError("deliveries not processed in 300 s")
            time.sleep(0.2)
        time.sleep(settle)
        settled = rss_mib(server.pid)
        peak = rss_mib(server.pid, "VmHWM")
        budget_peak = metric(server.url, "receiver_body_budget_peak_bytes") / 2**20
        waits = metric(server.url, "receiver_body_budget_waits_total")
    codes = {code: statuses.count(code) for code in sorted(set(statuses))}
    print(
        f"| bodies | answers | answered in | RSS start | peak | settled ({settle:g} s) |"
        " budget peak | waited |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {bodies} x {mib} MiB | {codes} | {answered:.1f} s | {start:.0f} MiB | {peak:.0f} MiB"
        f" | {settled:.0f} MiB | {budget_peak:.0f} MiB | {waits:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--bodies", type=int, default=50)
    parser.add_argument("--mib", type=int, default=9)
    parser.add_argument("--settle", type=float, default=10.0)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp,
        fresh_database(args.db) as db,
    ):
        measure(db.sqlalchemy_url, Path(tmp), args.bodies, args.mib, args.settle)


if __name__ == "__main__":
    main()
