"""Server processes under test: started on 127.0.0.1, watched, and always stopped.

Peak memory is the kernel's high-water mark of the server's resident set
(``VmHWM`` in ``/proc/<pid>/status``), read just before it is stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory so far (MiB), or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


@dataclass
class Server:
    """A running server: its process, base URL and log file."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def peak_rss_mb(self) -> float | None:
        return peak_rss_mb(self.pid)


def _wait_ready(server: Server, path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"server exited with {server.process.returncode}:\n{server.log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(server.url + path, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s:\n{server.log.read_text()}")


@contextlib.contextmanager
def running(
    argv: list[str], env: Mapping[str, str], log: Path, *, port: int, ready_path: str
) -> Iterator[Server]:
    """Start ``argv`` (a server listening on ``port``), wait for ``ready_path``, stop on exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )
    server = Server(process, f"http://{HOST}:{port}", log)
    try:
        _wait_ready(server, ready_path)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def receiver_argv(port: int) -> list[str]:
    """`receiver serve` exactly as a user runs it (it migrates first, then uvicorn.run)."""
    return [sys.executable, "-m", "receiver", "serve", "--host", HOST, "--port", str(port)]


def baseline_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "bench.baseline", "--port", str(port)]


def variant_argv(port: int, factory: str) -> list[str]:
    """The receiver built by a bench factory (a diagnostic variant), same uvicorn settings."""
    return [sys.executable, "-m", "bench.baseline", "--port", str(port), "--factory", factory]
