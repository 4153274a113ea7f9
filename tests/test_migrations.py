"""The core schema comes from Alembic alone, and the models agree with it."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from receiver.db import alembic_config, check_schema, upgrade
from receiver.models import Base


def _include(obj: object, name: str | None, type_: str, reflected: bool, other: object) -> bool:
    return not (type_ == "table" and name is not None and name.startswith("results__"))


def test_models_match_migrations(engine: Engine) -> None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": _include})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_upgrade_creates_core_tables(engine: Engine) -> None:
    tables = set(inspect(engine).get_table_names())
    assert {"deliveries", "tasks", "hooks", "tokens", "outputs"} <= tables
    check_schema(engine)  # at head: no exception


def test_empty_database_is_refused(tmp_path: object) -> None:
    from receiver.db import create_db_engine
    from receiver.errors import SchemaOutOfDate
    from receiver.settings import Settings

    engine = create_db_engine(Settings(database_url=f"sqlite:///{tmp_path}/empty.db"))
    with pytest.raises(SchemaOutOfDate, match="receiver db upgrade"):
        check_schema(engine)
    engine.dispose()


def _compression(engine: Engine) -> dict[tuple[str, str], str]:
    """PostgreSQL's per-column compression ('' = the server default, pglz)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.relname, a.attname, a.attcompression FROM pg_attribute a"
                " JOIN pg_class c ON c.oid = a.attrelid"
                " WHERE c.relname IN ('deliveries', 'outputs', 'tasks') AND a.attnum > 0"
            )
        )
        return {(r[0], r[1]): r[2] for r in rows}


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_large_columns_use_lz4_on_postgresql(engine: Engine) -> None:
    """Bodies and outputs compress with lz4 (0004); downgrading puts the default back."""
    from alembic import command

    wanted = {("deliveries", "body"), ("outputs", "content"), ("tasks", "extra")}
    assert {k for k, method in _compression(engine).items() if method == "l"} == wanted
    command.downgrade(alembic_config(engine), "0003")
    assert set(_compression(engine).values()) <= {"", "\x00"}
    upgrade(engine)
    assert {k for k, method in _compression(engine).items() if method == "l"} == wanted


def test_recently_processed_deliveries_are_found_through_an_index(engine: Engine) -> None:
    """The export's 'processed since' query uses the partial index on processed_at (0007)."""
    query = "SELECT id FROM deliveries WHERE processed_at >= :since"
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            plan = " ".join(
                str(r[-1]) for r in conn.execute(text("EXPLAIN QUERY PLAN " + query), {"since": 0})
            )
        else:
            conn.execute(text("SET LOCAL enable_seqscan = off"))  # the table is empty here
            plan = " ".join(
                r[0] for r in conn.execute(text("EXPLAIN " + query), {"since": "2026-01-01"})
            )
    assert "ix_deliveries_processed_at" in plan, plan
