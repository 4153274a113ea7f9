"""Alembic environment: runs against the engine `receiver.db.upgrade` passes in,
or, from the plain ``alembic`` command, the one RECEIVER_DATABASE_URL names."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from receiver.db import create_db_engine
from receiver.models import Base
from receiver.settings import Settings


def _include(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    # Result tables are created at run time by `receiver.schema`, not by migrations.
    return not (type_ == "table" and name is not None and name.startswith("results__"))


def run_migrations() -> None:
    engine: Engine | None = context.config.attributes.get("engine")
    if engine is None:
        engine = create_db_engine(Settings.from_env())
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            include_object=_include,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations()
