"""Reading result tables back the way an analyst would: through the catalog.

Tests compare what was posted with what SQL returns, keyed by the source key
each column was catalogued with (never by the sanitised name), and with
variant columns folded back into the key they split from.
"""

from __future__ import annotations

import json
import time
from typing import Any

from click.testing import CliRunner, Result
from sqlalchemy import Engine, MetaData, Row, Table, select
from starlette.testclient import TestClient

from receiver.cli import main
from receiver.models import Delivery, Output, ResultColumn, ResultTable, Task, TaskEvent
from tests.conftest import post

#: A catalogued source key: the JSON path (or CSV header key) as a tuple.
SourceKey = tuple[str, ...]


def settle(engine: Engine, delivery_id: str, timeout: float = 20.0) -> Row[Any]:
    """Wait until the pipeline has handled ``delivery_id``; return its ledger row.

    `post` joins the pipeline queue, but the ledger answers before it submits
    the id, so the queue can still be empty when `post` returns.
    """
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            row = conn.execute(select(Delivery.__table__).where(Delivery.id == delivery_id)).one()
        if row.status != "stored" or time.monotonic() > deadline:
            return row
        time.sleep(0.01)


def deliver(
    client: TestClient,
    engine: Engine,
    hook: str,
    body: bytes,
    content_type: str | None = "application/json",
    *,
    query: str = "",
) -> Row[Any]:
    """POST over HTTP and return the delivery's ledger row once processed."""
    answer = post(client, hook, body, content_type, query=query)
    row = settle(engine, str(answer["delivery_id"]))
    assert row.status != "stored", "pipeline did not process the delivery"
    return row


def run_cli(db_url: str, *args: str) -> Result:
    """Run ``receiver ARGS`` against ``db_url`` as a user would; fails on a non-zero exit."""
    obj: dict[str, Any] = {}
    try:
        result = CliRunner().invoke(
            main, list(args), env={"RECEIVER_DATABASE_URL": db_url, "COLUMNS": "240"}, obj=obj
        )
    finally:
        if "engine" in obj:
            obj["engine"].dispose()
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def hook_tables(engine: Engine, hook: str) -> dict[SourceKey, str]:
    """The hook's result tables by JSON path (``()`` is the root table)."""
    with engine.connect() as conn:
        rows = conn.execute(select(ResultTable.__table__).where(ResultTable.hook == hook)).all()
    return {tuple(json.loads(r.path)[1]): r.table_name for r in rows}


def column_map(engine: Engine, table: str) -> dict[str, tuple[SourceKey, str | None, str]]:
    """SQL column -> (source key, variant type or None, catalogued type)."""
    out: dict[str, tuple[SourceKey, str | None, str]] = {}
    with engine.connect() as conn:
        for c in conn.execute(
            select(ResultColumn.__table__)
            .where(ResultColumn.table_name == table)
            .order_by(ResultColumn.position)
        ):
            key = json.loads(c.source_key)
            if key and isinstance(key[0], list):
                out[c.column_name] = (tuple(key[0]), key[1].removeprefix("#variant:"), c.type)
            else:
                out[c.column_name] = (tuple(key), None, c.type)
    return out


def raw_rows(engine: Engine, table: str) -> list[dict[str, Any]]:
    """Every column of every row, ordered by delivery and row index."""
    with engine.connect() as conn:
        # Reflected, so SQLite's BOOLEAN and DATETIME come back as Python types.
        reflected = Table(table, MetaData(), autoload_with=conn)
        query = select(reflected).order_by(reflected.c._delivery_id, reflected.c._row_index)
        return [dict(r) for r in conn.execute(query).mappings()]


def cells(engine: Engine, table: str) -> list[dict[SourceKey, Any]]:
    """Each row as source key -> value, variants folded in; NULLs left out.

    Fails if one key holds a value in two columns of the same row (a value
    must live in exactly one place).
    """
    columns = column_map(engine, table)
    out: list[dict[SourceKey, Any]] = []
    for row in raw_rows(engine, table):
        folded: dict[SourceKey, Any] = {}
        for name, value in row.items():
            if name.startswith("_") or value is None:
                continue
            key = columns[name][0]
            assert key not in folded, f"{key} stored twice in one row"
            folded[key] = value
        out.append(folded)
    return out


def snapshot(engine: Engine) -> dict[str, Any]:
    """Everything derived from deliveries, for before/after comparisons."""
    with engine.connect() as conn:
        tables = sorted(conn.scalars(select(ResultTable.table_name)))
        columns = sorted(tuple(r) for r in conn.execute(select(ResultColumn.__table__)))
        outputs = sorted(tuple(r) for r in conn.execute(select(Output.__table__)))
        tasks = sorted(repr(tuple(r)) for r in conn.execute(select(Task.__table__)))
        events = sorted(repr(tuple(r)) for r in conn.execute(select(TaskEvent.__table__)))
        statuses = sorted(
            tuple(r) for r in conn.execute(select(Delivery.id, Delivery.status, Delivery.reason))
        )
    contents = {t: raw_rows(engine, t) for t in tables}
    return {
        "tables": tables,
        "columns": columns,
        "contents": contents,
        "outputs": outputs,
        "tasks": tasks,
        "events": events,
        "statuses": statuses,
    }
