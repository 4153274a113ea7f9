"""It loses nothing: a live `receiver serve` killed, stopped, cut off, flooded and lied to.

Every test drives a real server process over real HTTP and checks the
database afterwards: each delivery that got a 2xx is there, byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select, text

from receiver.db import create_db_engine
from receiver.models import Delivery, Task
from receiver.settings import Settings
from receiver.spool import SUFFIX
from tests.conftest import TOKEN, _pg_url, drop_pg_database, fresh_pg_database
from tests.live import ServerProcess, live_server

pytestmark = pytest.mark.slow


@dataclass
class Sent:
    body: bytes
    content_type: str
    query: str
    status_code: int | None = None
    answer: dict[str, Any] | None = None


def full_response(task: str, message: dict[str, Any] | None = None) -> bytes:
    """A WebRun full_response delivery for ``task``."""
    return json.dumps(
        {
            "type": "task_completed",
            "sessionId": "sess-reliability",
            "taskId": task,
            "data": {"message": json.dumps(message or {"title": task, "price": 1.5})},
            "usage": {"inputTokens": 10, "outputTokens": 5, "computeTime": 1.0, "cost": 0.001},
            "completedAt": "2024-01-15T10:30:00.000Z",
        }
    ).encode()


def mixed(n: int, tag: str) -> list[Sent]:
    """JSON deliveries and raw binary bodies (invalid UTF-8), each different."""
    out: list[Sent] = []
    for i in range(n):
        if i % 2:
            body = b"\xff\xfe" + os.urandom(64) + f"{tag}-{i}".encode()
            out.append(Sent(body, "application/octet-stream", f"i={i}"))
        else:
            out.append(Sent(full_response(f"{tag}-{i}"), "application/json", f"i={i}"))
    return out


async def send_all(
    urls: Sequence[str],
    deliveries: Sequence[Sent],
    *,
    hook: str = "rel",
    connections: int = 1000,
    after: Callable[[int], None] | None = None,
    progress: dict[str, int] | None = None,
) -> None:
    """POST every delivery at once (round robin over ``urls``); record each answer in place.

    ``after(n)`` runs as the n-th answer arrives; ``progress`` counts requests
    ``issued`` (about to be written to a connection) and ``done``.
    """
    progress = {"issued": 0, "done": 0} if progress is None else progress

    async def on_request(request: httpx.Request) -> None:
        progress["issued"] += 1

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(
        limits=limits,
        timeout=httpx.Timeout(60, pool=None),  # queued behind busy connections is not late
        event_hooks={"request": [on_request]},
    ) as client:

        async def one(i: int, d: Sent) -> None:
            url = f"{urls[i % len(urls)]}/hooks/{hook}?{d.query}"
            headers = {"authorization": TOKEN, "content-type": d.content_type}
            try:
                response = await client.post(url, content=d.body, headers=headers)
            except httpx.TransportError:
                pass  # the server died under it: no answer, no promise
            else:
                d.status_code = response.status_code
                if response.status_code == 200:
                    d.answer = response.json()
            finally:
                progress["done"] += 1
                if after is not None:
                    after(progress["done"])

        await asyncio.gather(*(one(i, d) for i, d in enumerate(deliveries)))


def stored_rows(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {r.id: r for r in conn.execute(select(Delivery.__table__))}


def wait_settled(
    engine: Engine, data_dir: Path, timeout: float = 60.0, *, processed: bool = True
) -> None:
    """Wait until the spool is empty and (if ``processed``) no delivery awaits processing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spooled = list((data_dir / "spool").glob(f"*{SUFFIX}"))
        waiting = 0
        if processed:
            with engine.connect() as conn:
                waiting = (
                    conn.scalar(
                        select(func.count())
                        .select_from(Delivery)
                        .where(Delivery.status == "stored")
                    )
                    or 0
                )
        if not spooled and waiting == 0:
            return
        time.sleep(0.2)
    raise TimeoutError(f"not settled: {len(spooled)} spooled, {waiting} unprocessed")


def assert_all_kept(engine: Engine, sent: Sequence[Sent], *, processed: bool = True) -> int:
    """Every 2xx delivery is in the database with its exact bytes; returns how many."""
    rows = stored_rows(engine)
    acknowledged = [d for d in sent if d.status_code == 200]
    for d in acknowledged:
        assert d.answer is not None
        row = rows.get(d.answer["delivery_id"])
        assert row is not None, f"acknowledged delivery {d.answer} is missing"
        assert row.body == d.body
        assert row.content_type == d.content_type
        assert row.query_string == d.query
        if processed:
            assert row.status in {"processed", "quarantined", "duplicate"}
    return len(acknowledged)


@pytest.fixture
def db_engine(db_url: str) -> Any:
    engine = create_db_engine(Settings(database_url=db_url))
    yield engine
    engine.dispose()


def test_kill_9_with_500_in_flight_loses_no_acknowledged_delivery(
    db_url: str, db_engine: Engine, tmp_path: Path
) -> None:
    sent = mixed(1000, "kill")
    server = ServerProcess(db_url, tmp_path / "data")
    progress = {"issued": 0, "done": 0}
    at_kill: dict[str, int] = {}

    def killer() -> None:
        """Kill -9 mid-stream, once some answers are back (or many commits are in)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with db_engine.connect() as conn:
                committed = conn.scalar(select(func.count()).select_from(Delivery)) or 0
            if progress["done"] >= 30 or (committed >= 400 and progress["done"] > 0):
                server.kill()
                at_kill.update(progress, committed=committed)
                return
            time.sleep(0.002)

    try:
        server.start()
        watcher = threading.Thread(target=killer)
        watcher.start()
        asyncio.run(send_all([server.url], sent, progress=progress))
        watcher.join()
        assert at_kill, "the server was never killed"
        started = time.monotonic()
        server.start()  # same database, same data dir: the spool drains on start
        wait_settled(db_engine, server.data_dir, processed=False)
        settled = time.monotonic() - started
    finally:
        server.kill()
    acknowledged = assert_all_kept(db_engine, sent, processed=False)
    in_flight = at_kill["issued"] - at_kill["done"]
    print(
        f"kill -9 at {at_kill}: {in_flight} in flight, {acknowledged} of {len(sent)}"
        f" acknowledged and kept, spool empty {settled:.1f} s"
    )
    assert in_flight >= 500
    assert acknowledged > 0
    assert all(d.status_code in {None, 200} for d in sent)


def test_sigterm_finishes_in_flight_requests_and_stores_everything(
    db_url: str, db_engine: Engine, tmp_path: Path
) -> None:
    sent = mixed(200, "term")
    server = ServerProcess(db_url, tmp_path / "data")
    exit_code: dict[str, int] = {}

    def terminate_after(n: int) -> None:
        if n == 20 and server.process is not None:
            server.process.send_signal(15)

    try:
        server.start()
        asyncio.run(send_all([server.url], sent, after=terminate_after))
        exit_code["code"] = server.process.wait(40) if server.process else -1
    finally:
        server.kill()
    # uvicorn re-raises the signal once it has shut down cleanly.
    assert exit_code["code"] in {0, -15}, server.log()[-3000:]
    assert "Application shutdown complete" in server.log()
    # Nothing half-stored: the shutdown committed every queued delivery and processed it.
    with db_engine.connect() as conn:
        statuses = dict(
            conn.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all()
        )
    assert "stored" not in statuses
    acknowledged = assert_all_kept(db_engine, sent)
    assert acknowledged >= 20
    assert all(d.status_code in {None, 200} for d in sent)
    assert "Traceback" not in server.log()


def test_same_delivery_five_times_at_once_gives_one_task(
    db_url: str, db_engine: Engine, tmp_path: Path
) -> None:
    sent = [
        Sent(full_response(f"dup-{i}"), "application/json", f"n={i}")
        for i in range(200)
        for _ in range(5)
    ]
    with live_server(db_url, tmp_path / "data") as server:
        asyncio.run(send_all([server.url], sent, connections=200))
        wait_settled(db_engine, server.data_dir)
    assert all(d.status_code == 200 for d in sent)
    for i in range(200):
        statuses = sorted(d.answer["status"] for d in sent[i * 5 : i * 5 + 5] if d.answer)
        assert statuses == ["duplicate"] * 4 + ["stored"], i
    with db_engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Task)) == 200
        by_status = dict(
            conn.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all()
        )
    assert by_status == {"processed": 200, "duplicate": 800}
    assert_all_kept(db_engine, sent)


def test_two_processes_on_one_postgresql_with_new_columns(pg_template: str, tmp_path: Path) -> None:
    name = fresh_pg_database(pg_template)
    url = _pg_url(name)
    engine = create_db_engine(Settings(database_url=url))
    # Each task brings a column the table may not have yet, on either process.
    sent = [
        Sent(
            full_response(f"two-{i}", {"title": f"t{i}", f"field_{i % 25}": i}),
            "application/json",
            f"i={i}",
        )
        for i in range(200)
    ]
    try:
        with (
            live_server(url, tmp_path / "a") as a,
            live_server(url, tmp_path / "b") as b,
        ):
            asyncio.run(send_all([a.url, b.url], sent, hook="two", connections=100))
            wait_settled(engine, a.data_dir)
            logs = a.log() + b.log()
        assert all(d.status_code == 200 for d in sent)
        assert_all_kept(engine, sent)
        with engine.connect() as conn:
            statuses = dict(
                conn.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all()
            )
            rows = conn.execute(text('SELECT * FROM "results__two"')).mappings().all()
        assert statuses == {"processed": 200}
        assert len(rows) == 200
        assert len({r["_delivery_id"] for r in rows}) == 200
        for r in rows:
            i = int(r["title"][1:])
            assert r[f"field_{i % 25}"] == i
        assert "Traceback" not in logs
    finally:
        engine.dispose()
        drop_pg_database(name)


def _raw_exchange(port: int, request: bytes, then: Callable[[socket.socket], None]) -> bytes:
    """Send raw bytes, run ``then``, return the first response (b"" if the server hung up)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(request)
        then(s)
        answer = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return answer
            if not chunk:
                return answer
            answer += chunk
            head, sep, body = answer.partition(b"\r\n\r\n")
            for line in head.split(b"\r\n") if sep else []:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length" and len(body) >= int(value):
                    return answer


def test_chunked_body_over_the_limit_is_413_with_bounded_memory(
    tmp_path: Path,
) -> None:
    limit = 1024 * 1024
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with live_server(url, tmp_path / "data", max_body_bytes=limit) as server:
        before = server.peak_rss_kib()
        head = (
            b"POST /hooks/big HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: {TOKEN}\r\n".encode()
            + b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
        )
        chunk = b"x" * 65536
        sent_bytes = 0

        def stream(s: socket.socket) -> None:
            nonlocal sent_bytes
            try:  # up to 200 MB; the server answers and closes long before
                for _ in range(3200):
                    s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent_bytes += len(chunk)
            except OSError:
                pass

        answer = _raw_exchange(server.port, head, stream)
        growth_mib = (server.peak_rss_kib() - before) / 1024
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert growth_mib < 32, f"peak RSS grew by {growth_mib:.1f} MiB"

        # A Content-Length over the limit is refused before a byte of the body is read.
        lying = (
            b"POST /hooks/big HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: {TOKEN}\r\n".encode()
            + f"Content-Length: {50 * limit}\r\n\r\n".encode()
            + b"{}"
        )
        started = time.monotonic()
        answer = _raw_exchange(server.port, lying, lambda s: None)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert time.monotonic() - started < 10
        print(f"chunked 413 after {sent_bytes / 2**20:.1f} MiB sent, RSS +{growth_mib:.1f} MiB")
    engine = create_db_engine(Settings(database_url=url))
    try:
        assert stored_rows(engine) == {}
    finally:
        engine.dispose()


HOSTILE_HEADERS: list[bytes] = [
    b"X-Evil: a\x00b",
    b"X-Evil: a\x01\x7fb",
    b"Content-Type: application/json\x00",
    b"X-Long: " + b"y" * 200_000,
]


def test_raw_header_bytes_reach_the_ledger_and_hostile_ones_never_5xx(
    db_url: str, db_engine: Engine, tmp_path: Path
) -> None:
    """Bytes a test client would re-encode, sent on a socket: non-UTF-8, NUL, control, huge."""
    content_type = b"text/plain; charset=\x80\xff\xe9"
    with live_server(db_url, tmp_path / "data") as server:
        for header in HOSTILE_HEADERS:
            request = (
                b"POST /hooks/raw HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: {TOKEN}\r\n".encode()
                + header
                + b"\r\nContent-Length: 2\r\n\r\n{}"
            )
            answer = _raw_exchange(server.port, request, lambda s: None)
            # Refused by the HTTP parser (or the connection dropped), or taken: never a 5xx.
            assert not answer.startswith(b"HTTP/1.1 5"), (header[:40], answer)
            if b"X-Long" not in header:  # control bytes: refused, never stored
                assert answer[:12] in {b"HTTP/1.1 400", b""}, (header[:40], answer)
        request = (
            b"POST /hooks/raw HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + f"Authorization: {TOKEN}\r\n".encode()
            + b"Content-Type: "
            + content_type
            + b"\r\nX-Note: caf\xe9\r\nContent-Length: 4\r\n\r\n\xff\x00\xfe{"
        )
        answer = _raw_exchange(server.port, request, lambda s: None)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        delivery_id = json.loads(answer.split(b"\r\n\r\n", 1)[1])["delivery_id"]
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        assert "Traceback" not in server.log()
    row: Any = stored_rows(db_engine)[delivery_id]
    assert row.body == b"\xff\x00\xfe{"
    assert row.content_type.encode("latin-1") == content_type
    assert ["x-note", "caf\xe9"] in json.loads(row.headers)
