"""Live receivers for the reliability tests: a real `receiver serve` process, and a TCP proxy.

Every server is started on 127.0.0.1 with a free port and always killed in a
``finally``, so a failing test leaves nothing running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.conftest import TOKEN

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServerProcess:
    """``python -m receiver serve`` as a child process."""

    def __init__(
        self,
        database_url: str,
        data_dir: Path,
        *,
        max_body_bytes: int | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        stderr: int | None = None,
        open_files: int | None = None,
    ) -> None:
        #: A port kept across restarts (a URL WebRun was given), else a free one each start.
        self.fixed_port = port
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log_path = data_dir / f"server-{self.port}.log"
        self.env = {
            **os.environ,
            "RECEIVER_DATABASE_URL": database_url,
            "RECEIVER_TOKEN": TOKEN,
            "RECEIVER_DATA_DIR": str(data_dir),
        }
        if max_body_bytes is not None:
            self.env["RECEIVER_MAX_BODY_BYTES"] = str(max_body_bytes)
        self.env |= env or {}
        #: A descriptor for the server's stdout and stderr instead of the log file.
        self.stderr = stderr
        #: RLIMIT_NOFILE of the server process.
        self.open_files = open_files
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.fixed_port or free_port()  # a restart may not get the old port back
        self.url = f"http://127.0.0.1:{self.port}"
        limit = self.open_files

        def lower_file_limit() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "receiver", "serve", "--port", str(self.port)],
                cwd=ROOT,
                env=self.env,
                stdout=log if self.stderr is None else self.stderr,
                stderr=subprocess.STDOUT,
                preexec_fn=lower_file_limit if limit is not None else None,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"server did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, like a power cut of the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def terminate(self, timeout: float = 40.0) -> int:
        """SIGTERM and wait: the graceful shutdown path. Returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def peak_rss_kib(self) -> int:
        """VmHWM: the most resident memory the process has had."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise LookupError("VmHWM")


@contextlib.contextmanager
def live_server(
    database_url: str,
    data_dir: Path,
    *,
    max_body_bytes: int | None = None,
    env: dict[str, str] | None = None,
    stderr: int | None = None,
    open_files: int | None = None,
) -> Iterator[ServerProcess]:
    server = ServerProcess(
        database_url,
        data_dir,
        max_body_bytes=max_body_bytes,
        env=env,
        stderr=stderr,
        open_files=open_files,
    )
    try:
        server.start()
        yield server
    finally:
        server.kill()


class TcpProxy:
    """A TCP relay run in its own thread and event loop; `cut` simulates a database outage.

    Cutting closes the listening socket and every relayed connection, so the
    receiver sees resets and refused connections, as when the server goes away.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    def restore(self) -> None:
        self._call(self._listen())

    def cut(self) -> None:
        self._call(self._close_all())

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def _close_all(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()
                self._writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
