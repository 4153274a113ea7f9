"""One log line per delivery, plain or JSON, with no token and no body in it."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from receiver.logs import (
    DELIVERY_LOGGER,
    BufferedStderrHandler,
    DeliveryLine,
    JsonFormatter,
    configure_logging,
)
from tests.conftest import TOKEN, post
from tests.live import live_server

SECRET_BODY = b'{"sessionId": "s-1", "taskId": "t-1", "type": "task_completed", "x": "SECRETVALUE"}'


def delivery_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == DELIVERY_LOGGER]


def test_one_line_per_delivery_without_token_or_body(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="receiver")
    first = post(client, "shop", SECRET_BODY, query="task_id=t-1")
    post(client, "shop", SECRET_BODY, query="task_id=t-1")
    client.post("/hooks/shop", content=SECRET_BODY, headers={"authorization": "Bearer WRONG"})
    records = delivery_records(caplog)
    assert [(r.delivery["status"], r.delivery["http_status"]) for r in records] == [  # type: ignore[attr-defined]
        ("stored", 200),
        ("duplicate", 200),
        ("rejected", 401),
    ]
    fields = records[0].delivery  # type: ignore[attr-defined]
    assert fields["hook"] == "shop"
    assert fields["size"] == len(SECRET_BODY)
    assert fields["delivery_id"] == first["delivery_id"]
    assert fields["ms"] >= 0
    assert records[2].delivery["reason"] == "auth"  # type: ignore[attr-defined]
    for record in records:
        for text in (record.getMessage(), JsonFormatter().format(record)):
            assert "SECRETVALUE" not in text
            assert TOKEN.split()[1] not in text
            assert "WRONG" not in text


def test_json_and_plain_formats() -> None:
    stream = io.StringIO()
    configure_logging("json")
    logger = logging.getLogger("receiver")
    handler = logger.handlers[-1]
    assert isinstance(handler, logging.StreamHandler)
    old = handler.setStream(stream)
    try:
        line = DeliveryLine("a hook=x", "stored", 200, 12, 3.456, "id-1")
        logging.getLogger(DELIVERY_LOGGER).info(line.plain(), extra={"delivery": line.fields()})
        configure_logging("plain")  # idempotent: same handler, new format
        assert len([h for h in logger.handlers if h is handler]) == 1
        logging.getLogger(DELIVERY_LOGGER).info(line.plain(), extra={"delivery": line.fields()})
    finally:
        handler.setStream(old)
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    json_line, plain_line = stream.getvalue().splitlines()
    parsed = json.loads(json_line)
    assert parsed["event"] == "delivery"
    assert parsed["hook"] == "a hook=x"
    assert (parsed["status"], parsed["size"], parsed["ms"]) == ("stored", 12, 3.5)
    assert parsed["delivery_id"] == "id-1"
    assert plain_line.endswith(
        'delivery hook="a hook=x" status=stored http_status=200 size=12 ms=3.5 delivery_id=id-1'
    )


def test_a_refused_unprintable_hook_name_stays_on_one_line() -> None:
    line = DeliveryLine("bad\nname\x00" + "x" * 300, "rejected", 404, None, 1.0, reason="hook_name")
    assert "\n" not in line.plain()
    assert len(str(line.fields()["hook"])) == 128


def test_serve_writes_one_line_per_delivery_and_no_access_log(db_url: str, tmp_path: Path) -> None:
    """`receiver serve` as users run it: our line per delivery, not uvicorn's as well."""
    with live_server(db_url, tmp_path / "data") as server:
        answer = httpx.post(
            f"{server.url}/hooks/logged",
            content=SECRET_BODY,
            headers={"Authorization": TOKEN, "Content-Type": "application/json"},
        )
        assert answer.status_code == 200
        delivery_id = answer.json()["delivery_id"]
        deadline = time.monotonic() + 10
        while delivery_id not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = server.log()
    assert [line for line in log.splitlines() if delivery_id in line] == [
        line for line in log.splitlines() if " delivery hook=logged " in line
    ]
    assert len([line for line in log.splitlines() if delivery_id in line]) == 1
    assert "POST /hooks/logged" not in log
    assert "SECRETVALUE" not in log


def test_lines_are_written_in_batches_and_warnings_at_once() -> None:
    """Info lines wait (at most the flush interval) in a buffer; a warning goes out at once."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    handler = BufferedStderrHandler(interval=0.2)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setStream(open(write_fd, "w", buffering=1 << 16))  # noqa: SIM115 - closed below

    def pending() -> bytes:
        try:
            return os.read(read_fd, 1 << 20)
        except BlockingIOError:
            return b""

    try:
        for i in range(50):
            handler.handle(logging.makeLogRecord({"msg": f"line {i}", "levelno": logging.INFO}))
        assert pending() == b""  # nothing written yet: one write will carry them all
        deadline = time.monotonic() + 5
        seen = b""
        while seen.count(b"\n") < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
            seen += pending()
        assert seen.decode().splitlines() == [f"line {i}" for i in range(50)]
        handler.interval = 3600.0  # from now on only a warning wakes the writer
        time.sleep(0.3)  # let it start its long wait
        handler.handle(logging.makeLogRecord({"msg": "quiet", "levelno": logging.INFO}))
        handler.handle(
            logging.makeLogRecord({"msg": "careful", "levelno": logging.WARNING, "levelname": "W"})
        )
        seen = b""
        deadline = time.monotonic() + 10
        while b"careful" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
            seen += pending()
        assert seen == b"quiet\ncareful\n"
    finally:
        handler.close()
        handler.stream.close()
        os.close(read_fd)


def _traffic(url: str, n: int) -> list[tuple[int, int]]:
    """``n`` rounds of good, quarantined, unauthorised and refused deliveries: (expected, got)."""
    answers: list[tuple[int, int]] = []
    with httpx.Client(base_url=url, timeout=30) as http:
        for i in range(n):
            good = json.dumps(
                {"type": "task_completed", "taskId": f"t-{i}", "sessionId": "s", "data": {}}
            )
            for expected, body, headers in (
                (200, good, {"Authorization": TOKEN, "Content-Type": "application/json"}),
                (200, "{not json", {"Authorization": TOKEN, "Content-Type": "application/json"}),
                (401, good, {"Authorization": "Bearer wrong"}),
                (413, "x" * 5000, {"Authorization": TOKEN}),
            ):
                got = http.post(f"/hooks/logs-{i % 3}", content=body, headers=headers)
                answers.append((expected, got.status_code))
    return answers


def _all_processed(db_url: str, stored: int) -> bool:
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT status, count(*) FROM deliveries GROUP BY status"))
            counts: dict[str, int] = dict(rows.all())
    finally:
        engine.dispose()
    return sum(counts.values()) == stored and counts.get("stored", 0) == 0


def _wait_processed(db_url: str, stored: int) -> None:
    deadline = time.monotonic() + 60
    while not _all_processed(db_url, stored) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _all_processed(db_url, stored)


def _dropped(url: str) -> float:
    scrape = httpx.get(f"{url}/metrics").text
    line = next(x for x in scrape.splitlines() if x.startswith("receiver_log_lines_dropped_total"))
    return float(line.split()[-1])


@pytest.mark.slow
def test_a_closed_log_pipe_costs_no_delivery(db_url: str, tmp_path: Path) -> None:
    """The log collector goes away (stderr a pipe whose reader closed): the receiver goes on."""
    read_fd, write_fd = os.pipe()
    try:
        with live_server(db_url, tmp_path / "data", max_body_bytes=4096, stderr=write_fd) as server:
            os.close(write_fd)
            write_fd = -1
            os.close(read_fd)  # every later write to stderr is EPIPE
            read_fd = -1
            answers = _traffic(server.url, 150)
            assert [got for _, got in answers] == [expected for expected, _ in answers]
            _wait_processed(db_url, stored=300)
            assert _dropped(server.url) > 0
            assert httpx.get(f"{server.url}/readyz").status_code == 200
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)


@pytest.mark.slow
def test_a_full_log_disk_costs_no_delivery(db_url: str, tmp_path: Path) -> None:
    """stderr is a file on a 64 KiB tmpfs that fills up while deliveries flow."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        with (
            open(mount / "stderr.log", "wb") as log,
            live_server(
                db_url, tmp_path / "data", max_body_bytes=4096, stderr=log.fileno()
            ) as server,
        ):
            with contextlib.suppress(OSError), open(mount / "filler", "wb") as filler:
                while True:  # the rest of the disk
                    filler.write(b"\0" * 4096)
                    filler.flush()
            answers = _traffic(server.url, 150)
            assert [got for _, got in answers] == [expected for expected, _ in answers]
            _wait_processed(db_url, stored=300)
            assert _dropped(server.url) > 0
            assert httpx.get(f"{server.url}/readyz").status_code == 200
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
