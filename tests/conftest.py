"""Shared fixtures: a fresh, migrated database per test, on SQLite and PostgreSQL.

PostgreSQL databases are cloned from a template migrated once per run, so
every test still gets its own database. ``RECEIVER_TEST_PG`` overrides the
server URL (default: the local server, user postgres).
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.corpora import DELIVERIES, missing_corpora

if TYPE_CHECKING:
    import psycopg
    from sqlalchemy import Engine
    from starlette.testclient import TestClient

    from receiver.settings import Settings

# The database stack is imported inside the fixtures, so `pytest -m pure` collects and runs
# the pure cores' tests with no database server and without importing SQLAlchemy or psycopg.

__all__ = ["DELIVERIES", "TOKEN", "post"]

TOKEN = "Bearer test-token"
PG_SERVER = os.environ.get("RECEIVER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")

_RUN = uuid.uuid4().hex[:8]
_counter = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    if problems := missing_corpora():
        raise pytest.UsageError("test corpus incomplete:\n" + "\n".join(problems))


def _pg_admin() -> psycopg.Connection[tuple[object, ...]]:
    import psycopg

    return psycopg.connect(PG_SERVER, autocommit=True)


def _pg_url(name: str) -> str:
    base = PG_SERVER.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    from receiver.db import create_db_engine, upgrade
    from receiver.settings import Settings

    name = f"receiver_test_{_RUN}_tmpl"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = create_db_engine(Settings(database_url=_pg_url(name)))
    upgrade(engine)
    engine.dispose()
    yield name
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fresh_pg_database(template: str) -> str:
    name = f"receiver_test_{_RUN}_{next(_counter)}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return name


def drop_pg_database(name: str) -> None:
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database at the migrations' head."""
    from receiver.db import create_db_engine, upgrade
    from receiver.settings import Settings

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'receiver.db'}"
        engine = create_db_engine(Settings(database_url=url))
        upgrade(engine)
        engine.dispose()
        yield url
        return
    template: str = request.getfixturevalue("pg_template")
    name = fresh_pg_database(template)
    yield _pg_url(name)
    drop_pg_database(name)


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    from receiver.settings import Settings

    return Settings(database_url=db_url, tokens=(TOKEN.encode(),), data_dir=tmp_path / "data")


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    from receiver.db import create_db_engine

    engine = create_db_engine(settings)
    yield engine
    engine.dispose()


@pytest.fixture
def client(settings: Settings, engine: Engine) -> Iterator[TestClient]:
    from starlette.testclient import TestClient

    from receiver.app import create_app

    with TestClient(create_app(settings, engine=engine)) as client:
        yield client


def post(
    client: TestClient,
    hook: str,
    body: bytes,
    content_type: str | None = "application/json",
    *,
    query: str = "",
    token: str | None = TOKEN,
) -> dict[str, object]:
    """POST a delivery, wait until it is processed, return the JSON answer (asserting 200)."""
    headers = {}
    if content_type is not None:
        headers["content-type"] = content_type
    if token is not None:
        headers["authorization"] = token
    url = f"/hooks/{hook}" + (f"?{query}" if query else "")
    response = client.post(url, content=body, headers=headers)
    assert response.status_code == 200, response.text
    client.app.state.pipeline.join()  # type: ignore[attr-defined]
    answer: dict[str, object] = response.json()
    return answer
