"""Connections bounded: stalled heads are closed, and a slowloris does not starve deliveries.

A real `receiver serve` with its open-file limit lowered to 1,024; the stalled
connections come from this process over real TCP.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import TOKEN
from tests.live import live_server

pytestmark = pytest.mark.slow

#: A request head that never finishes.
PARTIAL_HEAD = b"POST /hooks/stalled HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def _raise_own_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def _stall(port: int, count: int, out: list[socket.socket], send: bytes = PARTIAL_HEAD) -> None:
    for i in range(count):
        s = socket.socket()
        s.settimeout(10)
        try:
            s.connect(("127.0.0.1", port))
            if i % 2 == 0:  # half send part of a head, half nothing at all
                s.sendall(send)
        except OSError:
            s.close()
            continue
        out.append(s)


def _closed_by_server(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset: closed too
        return True


def _deliver(url: str, i: int) -> int:
    with httpx.Client(timeout=30) as http:  # a new connection each time
        return http.post(
            f"{url}/hooks/ordinary",
            content=f'{{"n": {i}}}',
            headers={"Authorization": TOKEN, "Content-Type": "application/json"},
        ).status_code


def _metric(url: str, name: str) -> float:
    scrape = httpx.get(f"{url}/metrics").text
    return float(next(x for x in scrape.splitlines() if x.startswith(name + " ")).split()[-1])


def test_a_slowloris_of_thousands_does_not_starve_deliveries(db_url: str, tmp_path: Path) -> None:
    _raise_own_file_limit(8192)
    env = {"RECEIVER_HEAD_TIMEOUT_SECONDS": "3"}
    stalled: list[socket.socket] = []
    try:
        with live_server(db_url, tmp_path / "data", env=env, open_files=1024) as server:
            flood = threading.Thread(target=_stall, args=(server.port, 3000, stalled))
            flood.start()
            answers: list[int] = []
            while flood.is_alive() or len(answers) < 20:
                answers.append(_deliver(server.url, len(answers)))
            flood.join()
            assert len(stalled) > 1024  # more than the server could ever hold open
            assert set(answers) == {200}
            # Every stalled connection is closed: evicted at the cap or timed out.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if all(_closed_by_server(s) for s in stalled):
                    break
                time.sleep(0.5)
            assert all(_closed_by_server(s) for s in stalled)
            evicted = _metric(server.url, "receiver_connections_evicted_total")
            timed_out = _metric(server.url, "receiver_connections_head_timeouts_total")
            assert evicted > 0
            assert timed_out > 0
            assert evicted + timed_out >= len(stalled)
            assert _deliver(server.url, -1) == 200
            assert httpx.get(f"{server.url}/readyz").status_code == 200
    finally:
        for s in stalled:
            s.close()


def test_past_the_cap_with_every_connection_busy_the_answer_is_503_retry_after(
    db_url: str, tmp_path: Path
) -> None:
    env = {"RECEIVER_MAX_CONNECTIONS": "4", "RECEIVER_HEAD_TIMEOUT_SECONDS": "30"}
    busy: list[socket.socket] = []
    # Whole heads, bodies still to come: each connection is inside a request.
    head = (
        f"POST /hooks/busy HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\n"
        "Content-Length: 100\r\n\r\n{"
    ).encode()
    try:
        with live_server(db_url, tmp_path / "data", env=env) as server:
            _stall(server.port, 4, busy, send=head)
            for s in busy[1::2]:  # _stall sent nothing on every other one
                s.sendall(head)
            time.sleep(0.5)  # let the server read the heads
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                answer = b""
                with contextlib.suppress(OSError):
                    while chunk := s.recv(4096):
                        answer += chunk
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert b"\r\nretry-after: 1\r\n" in answer.lower()
            for s in busy:
                s.close()
            deadline = time.monotonic() + 30
            status = None
            while status != 200 and time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    status = _deliver(server.url, 0)
                time.sleep(0.2)
            assert status == 200
            assert _metric(server.url, "receiver_connections_refused_total") >= 1
    finally:
        for s in busy:
            s.close()
