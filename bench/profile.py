"""Where ingest time goes: py-spy samples `receiver serve` while wrk loads it.

``python -m bench.profile [--db sqlite|postgresql] [--seconds 10] [--gil]``
writes collapsed stacks to bench/results/profile-<db>.txt (open them with
speedscope or flamegraph.pl) and prints the heaviest frames, per thread.
py-spy is a dev tool, not a dependency: ``.venv/bin/pip install py-spy``.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from bench.databases import fresh_database
from bench.ingest import HOOK, TOKEN, _env
from bench.load import run_wrk
from bench.servers import free_port, receiver_argv, running, variant_argv

RESULTS = Path(__file__).resolve().parent / "results"


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is needed: .venv/bin/pip install py-spy")
    return found


def summarise(collapsed: Path, top: int = 25, thread: str | None = None) -> str:
    """Self and inclusive sample shares per frame, and the split between threads."""
    self_samples: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        if thread is not None and thread not in frames[0]:
            continue
        total += count
        threads[frames[0]] += count
        self_samples[frames[-1]] += count
        for frame in set(frames[1:]):
            inclusive[frame] += count
    total = max(total, 1)
    out = [f"{total} samples", "threads:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in threads.most_common(8)]
    out.append("self:")
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in self_samples.most_common(top)]
    out.append("inclusive:")
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--db", default="sqlite", choices=["sqlite", "postgresql"])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--gil", action="store_true", help="only samples holding the GIL")
    parser.add_argument("--no-pipeline", action="store_true", help="idle the pipeline")
    parser.add_argument("--idle", action="store_true", help="keep samples of waiting threads")
    parser.add_argument("--thread", help="summarise only threads whose name contains this")
    args = parser.parse_args()
    spy = py_spy()
    flags = [f for f in ("gil", "idle", "no_pipeline") if getattr(args, f)]
    name = "-".join(["profile", args.db, *flags])
    collapsed = RESULTS / f"{name}.txt"
    RESULTS.mkdir(parents=True, exist_ok=True)
    with fresh_database(args.db) as db:
        port = free_port()
        argv = (
            variant_argv(port, "bench.variants:receiver_without_pipeline")
            if args.no_pipeline
            else receiver_argv(port)
        )
        log = RESULTS / "logs" / f"{name}.log"
        with running(
            argv, _env(db, RESULTS / "logs" / "data"), log, port=port, ready_path="/healthz"
        ) as server:
            record = [spy, "record", "-p", str(server.pid), "-d", str(args.seconds)]
            record += ["-r", "200", "--threads", "--format", "raw", "-o", str(collapsed)]
            if args.gil:
                record.append("--gil")
            if args.idle:
                record.append("--idle")
            spying = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            load: list[object] = []
            worker = threading.Thread(
                target=lambda: load.append(
                    run_wrk(
                        f"{server.url}/hooks/{HOOK}",
                        TOKEN,
                        connections=args.connections,
                        seconds=args.seconds,
                    )
                )
            )
            worker.start()
            worker.join()
            spying.wait(timeout=args.seconds + 60)
    print(load[0] if load else "no load result")
    print(summarise(collapsed, thread=args.thread))
    print(f"collapsed stacks: {collapsed}")


if __name__ == "__main__":
    main()
