"""Wide outputs: past the database's column limit, keys go to the row's ``_overflow`` JSON.

Through a real `receiver serve`, with ordinary deliveries streaming in meanwhile: the wide
ones are processed (never quarantined for their width), every value is readable from SQL,
and the ordinary ones are all answered and committed, none spooled.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Connection, Engine, select, text

from receiver.db import MAX_COLUMNS
from receiver.models import Delivery, ResultColumn, ResultTable
from receiver.schema import OVERFLOW_COLUMN
from tests.conftest import TOKEN
from tests.live import live_server
from tests.readback import settle

#: Keys in the wide object on each database: past its column limit (2,000 / 1,600).
WIDE = {"sqlite": 2100, "postgresql": 1700}


def _value(i: int) -> Any:
    return [i, f"text {i}", i / 4, i % 2 == 0][i % 4]


def _catalogue(conn: Connection, table: str) -> dict[str, str]:
    """Source key -> column, for the keys of one part (a JSON key, a CSV header)."""
    out = {}
    for c in conn.execute(select(ResultColumn).where(ResultColumn.table_name == table)):
        key = json.loads(c.source_key)
        out[key[0] if len(key) == 1 and isinstance(key[0], str) else c.source_key] = c.column_name
    return out


def _row(engine: Engine, hook: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The hook's root row and its catalogue (source key -> column)."""
    with engine.connect() as conn:
        table = conn.scalar(
            select(ResultTable.table_name).where(
                ResultTable.hook == hook, ResultTable.parent_table.is_(None)
            )
        )
        assert table is not None
        catalogue = _catalogue(conn, table)
        [row] = conn.execute(text(f'SELECT * FROM "{table}"')).mappings()
    return dict(row), catalogue


def _readable(engine: Engine, hook: str, expected: dict[str, Any]) -> None:
    """Every key's value, from its column or from the overflow JSON (by SQL for a sample)."""
    row, catalogue = _row(engine, hook)
    assert OVERFLOW_COLUMN in catalogue.values()  # the overflow is catalogued
    overflow = json.loads(row[OVERFLOW_COLUMN])
    in_columns = 0
    for key, value in expected.items():
        if key in catalogue:
            assert row[catalogue[key]] == value, key
            in_columns += 1
        else:
            assert overflow[key] == value, key
    assert 0 < in_columns < len(expected)
    assert len(row) <= MAX_COLUMNS[engine.dialect.name]
    last = list(expected)[-1]
    assert last not in catalogue
    with engine.connect() as conn:
        table = conn.scalar(select(ResultTable.table_name).where(ResultTable.hook == hook))
        if engine.dialect.name == "sqlite":
            got = conn.scalar(
                text(f'SELECT json_extract(_overflow, :p) FROM "{table}"'), {"p": f'$."{last}"'}
            )
        else:
            got = conn.scalar(text(f'SELECT _overflow::jsonb -> :k FROM "{table}"'), {"k": last})
    assert got == expected[last]  # SQLite's json_extract gives a boolean as 1 or 0: equal


class _Stream(threading.Thread):
    """Ordinary small deliveries, one after another, until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.answers: list[tuple[int, str, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, headers={"authorization": TOKEN}, timeout=60) as http:
            n = 0
            while not self.stop.is_set():
                started = time.monotonic()
                response = http.post(
                    "/hooks/ordinary",
                    content=json.dumps({"n": n, "name": "x"}).encode(),
                    headers={"content-type": "application/json"},
                )
                status = response.json().get("status", "") if response.status_code == 200 else ""
                self.answers.append((response.status_code, status, time.monotonic() - started))
                n += 1
                time.sleep(0.02)


def test_wide_outputs_are_processed_while_ordinary_deliveries_flow(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    dialect = engine.dialect.name
    wide = {f"Key {i}": _value(i) for i in range(WIDE[dialect])}
    columns = 2500
    csv = (
        ",".join(f"col {i}" for i in range(columns))
        + "\n"
        + ",".join(str(i) for i in range(columns))
        + "\n"
    ).encode()
    per = MAX_COLUMNS[dialect] // 2  # three deliveries of new keys pass the limit
    growing = [{f"g{step} {i}": step * 10_000 + i for i in range(per)} for step in range(3)]

    with live_server(db_url, tmp_path / "data") as server:
        stream = _Stream(server.url)
        stream.start()
        try:
            with httpx.Client(
                base_url=server.url, headers={"authorization": TOKEN}, timeout=60
            ) as http:

                def send(hook: str, body: bytes, content_type: str) -> str:
                    response = http.post(
                        f"/hooks/{hook}", content=body, headers={"content-type": content_type}
                    )
                    assert response.status_code == 200, response.text
                    return str(response.json()["delivery_id"])

                ids = [send("wide", json.dumps(wide).encode(), "application/json")]
                ids.append(send("widecsv", csv, "text/csv"))
                for doc in growing:
                    ids.append(send("growing", json.dumps(doc).encode(), "application/json"))
                    settle(engine, ids[-1], timeout=120)
                rows = [settle(engine, i, timeout=120) for i in ids]
            time.sleep(0.5)  # a few more ordinary ones after the wide ones
        finally:
            stream.stop.set()
            stream.join(30)
    assert [r.status for r in rows] == ["processed"] * len(rows), [r.reason for r in rows]

    assert stream.answers
    assert {(code, status) for code, status, _ in stream.answers} == {
        (200, "stored")
    }  # none spooled
    with engine.connect() as conn:
        ordinary = (
            conn.execute(select(Delivery.status).where(Delivery.hook == "ordinary")).scalars().all()
        )
    assert len(ordinary) == len(stream.answers)

    _readable(engine, "wide", wide)
    _readable(engine, "widecsv", {f"col {i}": i for i in range(columns)})
    with engine.connect() as conn:
        table = str(
            conn.scalar(select(ResultTable.table_name).where(ResultTable.hook == "growing"))
        )
        found = (
            conn.execute(text(f'SELECT * FROM "{table}" ORDER BY _delivery_id')).mappings().all()
        )
        catalogue = _catalogue(conn, table)
    for doc, row in zip(growing, found, strict=True):
        overflow = json.loads(row[OVERFLOW_COLUMN] or "{}")
        for key, value in doc.items():
            assert (row[catalogue[key]] if key in catalogue else overflow[key]) == value, key
    slowest = max(seconds for *_, seconds in stream.answers)
    print(
        f"{dialect}: {len(stream.answers)} ordinary deliveries, slowest answered in {slowest:.3f} s"
    )
