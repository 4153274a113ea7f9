"""The dialect differences in `receiver.db` that have logic of their own, on both databases."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    event,
    inspect,
    select,
    text,
    update,
)

from receiver.db import (
    add_columns,
    begin_raw_write,
    bytes_contain,
    insert_returning,
    json_object_each_sql,
    json_text,
    lock_transaction,
    single_writer,
    unlocked,
    utc_day_sql,
    utc_day_text,
)

#: A label key with a dot and a backslash, which SQLite's JSON path must quote and escape. (Not a
#: double quote: SQLite 3.40's path syntax cannot name such a key, escaped or not.)
_AWKWARD_KEY = "a.b\\c"


def scratch(engine: Engine, *columns: Column[Any]) -> Table:
    table = Table("scratch", MetaData(), Column("id", Text, primary_key=True), *columns)
    table.create(engine)
    return table


def test_insert_returning_gives_the_rows_that_went_in(engine: Engine) -> None:
    table = scratch(engine, Column("n", Integer))
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": "a", "n": 1})
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        begin_raw_write(engine, cursor)
        returned = insert_returning(
            engine,
            cursor,
            "INSERT INTO scratch (id, n) VALUES ",
            " ON CONFLICT DO NOTHING RETURNING id",
            [("a", 2), ("b", 3), ("c", 4)],
        )
        cursor.close()
        raw.commit()
    finally:
        raw.close()
    assert sorted(returned) == ["b", "c"]
    with engine.connect() as conn:
        assert dict(conn.execute(select(table.c.id, table.c.n)).all()) == {
            "a": 1,
            "b": 3,
            "c": 4,
        }


def test_add_columns_tolerates_a_column_already_there(engine: Engine) -> None:
    scratch(engine)
    with engine.begin() as conn:
        add_columns(conn, "scratch", [("a", Text())])
    with engine.begin() as conn:
        add_columns(conn, "scratch", [("a", Text()), ("b", BigInteger()), ("c", Text())])
    assert [c["name"] for c in inspect(engine).get_columns("scratch")] == ["id", "a", "b", "c"]


def test_unlocked_skips_the_rows_another_transaction_holds(engine: Engine) -> None:
    table = scratch(engine, Column("n", Integer))
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "n": n} for i, n in (("a", 1), ("b", 1), ("c", 0))])
    condition = table.c.n > 0
    with engine.connect() as holder:
        # PostgreSQL: a row lock until `holder` ends; SQLite has none (a plain read).
        holder.execute(select(table.c.id).where(table.c.id == "a").with_for_update()).all()
        target = unlocked(engine, table.c.id, table.c.id.in_(["a", "b", "c"]), condition)
        statement = update(table).where(target, condition).values(n=9).returning(table.c.id)
        with engine.begin() as conn:
            updated = sorted(conn.scalars(statement))
        holder.rollback()
    assert updated == (["a", "b"] if single_writer(engine) else ["b"])


def test_lock_transaction_holds_until_the_transaction_ends(engine: Engine) -> None:
    if single_writer(engine):
        statements: list[str] = []
        event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
        with engine.begin() as conn:
            lock_transaction(conn, 7)
            lock_transaction(conn, 7, 8)
        assert not [s for s in statements if "lock" in s.lower()]
        return
    try_single = text("SELECT pg_try_advisory_xact_lock(:k)")
    try_pair = text("SELECT pg_try_advisory_xact_lock(CAST(:c AS integer), CAST(:o AS integer))")
    with engine.connect() as other:
        with engine.begin() as conn:
            lock_transaction(conn, 7)
            lock_transaction(conn, 7, 8)
            assert other.scalar(try_single, {"k": 7}) is False
            assert other.scalar(try_pair, {"c": 7, "o": 8}) is False
            assert other.scalar(try_pair, {"c": 7, "o": 9}) is True  # another pair
            other.rollback()
        assert other.scalar(try_single, {"k": 7}) is True
        assert other.scalar(try_pair, {"c": 7, "o": 8}) is True


def test_the_utc_day_of_a_time_whatever_the_session_time_zone(engine: Engine) -> None:
    table = scratch(engine, Column("at", DateTime(timezone=True)))
    late = dt.datetime(2026, 3, 1, 23, 30, tzinfo=dt.UTC)
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": "a", "at": late})
    with engine.connect() as conn:
        if not single_writer(engine):
            conn.exec_driver_sql("SET TIME ZONE 'Pacific/Kiritimati'")  # UTC+14: March 2nd
        assert conn.scalar(select(utc_day_text(engine, table.c.at))) == "2026-03-01"
        day = conn.scalar(text(f"SELECT {utc_day_sql(engine, 'scratch.at')} FROM scratch"))
    assert str(day) == "2026-03-01"


def test_json_text_and_the_members_of_json_objects(engine: Engine) -> None:
    table = scratch(engine, Column("labels", Text))
    labels = {
        "object": json.dumps({_AWKWARD_KEY: "x", "k": "v"}),
        "array": "[1, 2]",
        "null": "null",
        "string": '"s"',
    }
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": k, "labels": v} for k, v in labels.items()])
    with engine.connect() as conn:
        found = conn.execute(
            select(table.c.id).where(json_text(engine, table.c.labels, _AWKWARD_KEY) == "x")
        )
        assert found.scalars().all() == ["object"]
        each = json_object_each_sql(engine, "scratch.labels")
        members = conn.execute(
            text(f"SELECT scratch.id, l.key, l.value FROM scratch, {each} AS l ORDER BY 2")
        )
        assert [tuple(r) for r in members] == [("object", _AWKWARD_KEY, "x"), ("object", "k", "v")]


def test_bytes_contain_finds_bytes_not_patterns(engine: Engine) -> None:
    table = scratch(engine, Column("body", LargeBinary))
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": "a", "body": b"ab\x00c%d"}, {"id": "b", "body": b"x"}])

    def matching(needle: bytes) -> list[str]:
        with engine.connect() as conn:
            query = select(table.c.id).where(bytes_contain(engine, table.c.body, needle))
            return list(conn.scalars(query))

    assert matching(b"\x00c") == ["a"]
    assert matching(b"c%") == ["a"]
    assert matching(b"%") == ["a"]
    assert matching(b"_") == []
    assert matching(b"ab\x00c%d!") == []
