"""The spool: a delivery the database cannot take is kept on disk, answered 2xx, drained later."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import resource
import signal
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select
from starlette.testclient import TestClient

from receiver.app import create_app
from receiver.db import create_db_engine
from receiver.errors import SpoolUnavailable
from receiver.ledger import RawDelivery, write_deliveries
from receiver.models import Delivery
from receiver.settings import Settings
from receiver.spool import Spool, SpoolDrainer, decode, encode
from tests.conftest import TOKEN, _pg_url, drop_pg_database, fresh_pg_database
from tests.live import TcpProxy

text = st.text(st.characters(codec="latin-1"), max_size=40)
deliveries = st.builds(
    RawDelivery,
    hook=st.text(min_size=1, max_size=20),
    body=st.binary(max_size=2000),
    content_type=st.none() | text,
    headers=st.lists(st.tuples(text, text), max_size=5).map(tuple),
    query_string=text,
    received_at=st.datetimes(timezones=st.just(dt.UTC)),
    create_hook=st.booleans(),
)


@given(deliveries)
def test_a_spool_file_round_trips_every_field(delivery: RawDelivery) -> None:
    again = decode(encode(delivery))
    assert again == delivery
    assert again.body == delivery.body
    assert again.received_at == delivery.received_at


def raw(i: int, body: bytes | None = None) -> RawDelivery:
    return RawDelivery(
        hook="spooled",
        body=body if body is not None else b'{"n": %d}' % i,
        content_type="application/json",
        headers=(("x-n", str(i)),),
        query_string=f"n={i}",
    )


def test_backlog_oldest_age_and_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert spool.backlog() == 0
    assert spool.oldest_age_seconds() is None
    written = [raw(i) for i in range(5)]
    for d in written:
        spool.append(d)
    assert spool.backlog() == 5
    age = spool.oldest_age_seconds()
    assert age is not None
    assert 0 <= age < 60
    assert [spool.load(p).id for p in spool.pending()] == [d.id for d in written]


def test_a_damaged_file_is_set_aside_never_deleted(db_url: str, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    good, bad = spool.append(raw(1)), spool.append(raw(2))
    damaged = bytearray(bad.read_bytes())
    damaged[-40] ^= 0xFF
    bad.write_bytes(bytes(damaged))
    engine = create_db_engine(Settings(database_url=db_url))
    try:
        assert SpoolDrainer(spool, engine).drain_once() == 1
        assert not good.exists()
        assert (spool.rejected_dir / bad.name).read_bytes() == bytes(damaged)
        assert "checksum" in (spool.rejected_dir / f"{bad.name}.reason").read_text()
        assert spool.backlog() == 0
    finally:
        engine.dispose()


def test_an_unwritable_spool_refuses_instead_of_pretending(tmp_path: Path) -> None:
    (tmp_path / "spool").write_text("a file where the folder should be")
    with pytest.raises(SpoolUnavailable):
        Spool(tmp_path / "spool").append(raw(1))


def test_a_full_disk_leaves_no_half_written_file(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes writes past 4 KiB fail like ENOSPC would."""
    spool = Spool(tmp_path / "spool")
    spool.append(raw(0))  # the folder exists
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
    try:
        with pytest.raises(SpoolUnavailable):
            spool.append(raw(1, os.urandom(100_000)))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert sorted(p.name for p in spool.directory.iterdir()) == [spool.pending()[0].name]


def test_a_crash_between_commit_and_delete_does_not_double(db_url: str, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    again = raw(3)
    batch = [raw(1), raw(2), again, dataclasses.replace(again, id="copy-of-3")]
    for d in batch:
        spool.append(d)
    engine = create_db_engine(Settings(database_url=db_url))
    try:
        # The drainer committed the first two, then died before deleting their files.
        conn = engine.raw_connection()
        cursor = conn.cursor()
        write_deliveries(engine, cursor, batch[:2])
        cursor.close()
        conn.commit()
        conn.close()
        assert SpoolDrainer(spool, engine).drain_once() == 4
        assert spool.backlog() == 0
        with engine.connect() as c:
            rows = {r.id: r for r in c.execute(select(Delivery.__table__))}
    finally:
        engine.dispose()
    assert sorted(rows) == sorted(d.id for d in batch)
    assert {d.id: rows[d.id].body for d in batch} == {d.id: d.body for d in batch}
    assert [rows[d.id].status for d in batch] == ["stored", "stored", "stored", "duplicate"]
    assert rows["copy-of-3"].duplicate_of == again.id


# --- the receiver during an outage --------------------------------------------------------


def post_many(client: TestClient, bodies: list[bytes]) -> list[tuple[int, dict[str, str]]]:
    def one(body: bytes) -> tuple[int, dict[str, str]]:
        r = client.post("/hooks/outage", content=body, headers={"authorization": TOKEN})
        return r.status_code, r.json()

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, bodies))


@pytest.fixture(params=["sqlite", "postgresql"])
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, object]]:
    """A database URL and a context manager that takes that database away for a while.

    SQLite: another connection holds ``BEGIN EXCLUSIVE``. PostgreSQL: the
    receiver talks through a TCP proxy that is cut (the shared server is never stopped).
    """
    if request.param == "sqlite":
        path = tmp_path / "receiver.db"
        url = f"sqlite:///{path}"
        from receiver.db import upgrade

        engine = create_db_engine(Settings(database_url=url))
        upgrade(engine)
        engine.dispose()

        class Lock:
            def __enter__(self) -> None:
                self.conn = sqlite3.connect(path, isolation_level=None)
                self.conn.execute("BEGIN EXCLUSIVE")

            def __exit__(self, *exc: object) -> None:
                self.conn.execute("COMMIT")
                self.conn.close()

        yield url, Lock()
        return
    name = fresh_pg_database(request.getfixturevalue("pg_template"))
    host, port = "127.0.0.1", 5432
    try:
        with TcpProxy(host, port) as proxy:
            url = _pg_url(name).replace(f"{host}:{port}", f"{host}:{proxy.port}")

            class Cut:
                def __enter__(self) -> None:
                    proxy.cut()

                def __exit__(self, *exc: object) -> None:
                    proxy.restore()

            yield url, Cut()
    finally:
        drop_pg_database(name)


def test_an_outage_is_answered_2xx_and_drained_in_order_without_doubles(
    outage: tuple[str, object], tmp_path: Path
) -> None:
    url, down = outage
    settings = Settings(database_url=url, tokens=(TOKEN.encode(),), data_dir=tmp_path / "data")
    engine = create_db_engine(settings)
    # The SQLite lock would otherwise be waited out.
    app = create_app(settings, engine=engine, ledger_wait_seconds=0.5)
    bodies = [b'{"seq": %d, "pad": "%s"}' % (i, b"x" * i) for i in range(120)]
    answers: list[tuple[int, dict[str, str]]] = []
    try:
        with TestClient(app) as client:
            answers += post_many(client, bodies[:30])
            with down:  # type: ignore[attr-defined]
                started = time.monotonic()
                answers += post_many(client, bodies[30:90])
                backlog = app.state.spool.backlog()
                time.sleep(max(0.0, 3 - (time.monotonic() - started)))
            answers += post_many(client, bodies[90:])
            deadline = time.monotonic() + 60
            while app.state.spool.backlog() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert app.state.spool.backlog() == 0
            app.state.pipeline.join()
        # Processing that failed while the database was away resumes at the next start.
        with TestClient(create_app(settings, engine=engine)) as again:
            again.app.state.pipeline.join()  # type: ignore[attr-defined]
        with engine.connect() as conn:
            rows = list(conn.execute(select(Delivery.__table__).order_by(Delivery.id)))
            distinct = conn.scalar(select(func.count(func.distinct(Delivery.body_sha256))))
    finally:
        engine.dispose()
    assert [code for code, _ in answers] == [200] * 120
    spooled = [a["delivery_id"] for _, a in answers if a["status"] == "spooled"]
    print(f"outage: {len(spooled)} spooled, backlog at its height {backlog}")
    assert len(spooled) >= 50
    assert backlog >= 50
    by_id = {r.id: r for r in rows}
    assert len(rows) == 120 == distinct  # every delivery once, none twice
    for body, (_, answer) in zip(bodies, answers, strict=True):
        assert by_id[answer["delivery_id"]].body == body
    assert {r.status for r in rows} == {"processed"}


def test_outage_and_unwritable_spool_is_503_never_2xx(tmp_path: Path) -> None:
    path = tmp_path / "receiver.db"
    url = f"sqlite:///{path}"
    from receiver.db import upgrade

    engine = create_db_engine(Settings(database_url=url))
    upgrade(engine)
    data = tmp_path / "data"
    data.mkdir()
    (data / "spool").write_text("not a folder")
    settings = Settings(database_url=url, tokens=(TOKEN.encode(),), data_dir=data)
    app = create_app(settings, engine=engine, ledger_wait_seconds=0.3)
    try:
        with TestClient(app) as client:
            lock = sqlite3.connect(path, isolation_level=None)
            lock.execute("BEGIN EXCLUSIVE")
            try:
                r = client.post("/hooks/full", content=b"{}", headers={"authorization": TOKEN})
            finally:
                lock.execute("COMMIT")
                lock.close()
        assert r.status_code == 503
    finally:
        engine.dispose()


def test_shutdown_stops_the_drainer_and_leaves_the_rest_on_disk(
    engine: Engine, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    drainer = SpoolDrainer(spool, engine)
    drainer.start()
    drainer.stop()
    spool.append(raw(1))
    assert spool.backlog() == 1
    drainer.start()
    deadline = time.monotonic() + 10
    while spool.backlog() and time.monotonic() < deadline:
        time.sleep(0.05)
    drainer.stop()
    assert spool.backlog() == 0
