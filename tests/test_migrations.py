"""The core schema comes from Alembic alone, and the models agree with it."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from receiver.db import check_schema
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
    import pytest

    from receiver.db import create_db_engine
    from receiver.errors import SchemaOutOfDate
    from receiver.settings import Settings

    engine = create_db_engine(Settings(database_url=f"sqlite:///{tmp_path}/empty.db"))
    with pytest.raises(SchemaOutOfDate, match="receiver db upgrade"):
        check_schema(engine)
    engine.dispose()
