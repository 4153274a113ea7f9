"""Timed child processes with their own peak memory.

Peak memory is polled from ``/proc/<pid>/status`` ``VmHWM`` (reset at exec):
``wait4``'s ``ru_maxrss`` would be wrong here, as Linux carries the parent's
high-water mark over fork and exec, so every child of a large bench process
would report at least the bench's own size.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.servers import peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Finished:
    """A child that ran to the end: exit code, wall seconds, peak RSS (MiB), its output."""

    returncode: int
    seconds: float
    peak_rss_mb: float | None
    output: str


def run_measured(argv: list[str], env: Mapping[str, str], timeout: float) -> Finished:
    """Run ``argv`` to completion (killed after ``timeout`` s) and measure it."""
    log = ROOT / "bench" / "results" / "logs" / "child.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w+b") as out:
        started = time.perf_counter()
        process = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )
        deadline = started + timeout
        peak: float | None = None
        while True:
            now = peak_rss_mb(process.pid)
            if now is not None:
                peak = max(peak or 0.0, now)
            pid, status, _ = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, _ = os.wait4(process.pid, 0)
                break
            time.sleep(0.005)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)  # already reaped by wait4
        out.seek(0)
        output = out.read().decode("utf-8", "replace")
    return Finished(process.returncode, seconds, peak, output)
