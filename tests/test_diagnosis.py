"""One line for every error a user can cause, through the real ``receiver`` command.

Run as a child process, as a user types it: what reaches stderr is all they see.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine

from receiver.db import create_db_engine, upgrade
from receiver.diagnosis import where
from receiver.settings import Settings


def receiver(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    return subprocess.run(
        [sys.executable, "-m", "receiver", *args],
        env={**clean, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line(ran: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 1, at most three lines on stderr, no traceback, and the words a user needs."""
    assert ran.returncode == 1, (ran.stdout, ran.stderr)
    lines = ran.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 3, ran.stderr
    assert "Traceback" not in ran.stderr
    for word in words:
        assert word in ran.stderr, ran.stderr


def test_an_unmigrated_sqlite_database_says_to_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    for command in (["hooks", "list"], ["deliveries", "list"], ["tables"], ["costs"]):
        ran = receiver(*command, env={"RECEIVER_DATABASE_URL": url}, cwd=tmp_path)
        assert_one_line(ran, "never migrated", "receiver db upgrade")


def test_an_older_revision_says_which_and_to_upgrade(db_url: str, tmp_path: Path) -> None:
    from alembic import command

    from receiver.db import alembic_config

    engine = create_db_engine(Settings(database_url=db_url))
    try:
        command.downgrade(alembic_config(engine), "0005")
    finally:
        engine.dispose()
    ran = receiver("hooks", "list", env={"RECEIVER_DATABASE_URL": db_url}, cwd=tmp_path)
    assert_one_line(ran, "at 0005", "receiver db upgrade")
    upgraded = receiver("db", "upgrade", env={"RECEIVER_DATABASE_URL": db_url}, cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.startswith("upgraded the database from 0005 to ")


def test_an_unresolvable_postgresql_host_names_the_host_and_why(tmp_path: Path) -> None:
    url = "postgresql+psycopg://postgres@no-such-host.invalid:5432/receiver"
    for command in (["hooks", "list"], ["db", "upgrade"]):
        ran = receiver(*command, env={"RECEIVER_DATABASE_URL": url}, cwd=tmp_path)
        assert_one_line(ran, "PostgreSQL at no-such-host.invalid:5432/receiver")
        assert "translate host name" in ran.stderr or "resolve" in ran.stderr, ran.stderr


def test_a_refused_postgresql_port_names_the_server(tmp_path: Path) -> None:
    from tests.live import free_port

    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/receiver"
    ran = receiver("deliveries", "list", env={"RECEIVER_DATABASE_URL": url}, cwd=tmp_path)
    assert_one_line(ran, "PostgreSQL at 127.0.0.1:", "refused")


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        pytest.param("RECEIVER_MAX_DEPTH", "deep", ["RECEIVER_MAX_DEPTH", "'deep'"], id="int"),
        pytest.param("RECEIVER_MAX_BODY_BYTES", "-1", ["RECEIVER_MAX_BODY_BYTES"], id="negative"),
        pytest.param(
            "RECEIVER_LOG_FORMAT", "xml", ["RECEIVER_LOG_FORMAT", "plain or json"], id="enum"
        ),
        pytest.param("RECEIVER_DATABASE_URL", "nonsense", ["RECEIVER_DATABASE_URL"], id="url"),
    ],
)
def test_a_bad_setting_names_the_variable(
    variable: str, value: str, words: list[str], tmp_path: Path
) -> None:
    ran = receiver("hooks", "list", env={variable: value}, cwd=tmp_path)
    assert_one_line(ran, *words)


def test_a_missing_or_unusable_file_is_one_line(tmp_path: Path) -> None:
    env = {"RECEIVER_DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}", "RECEIVER_TOKEN": "Bearer t"}
    missing = receiver("send", str(tmp_path / "missing.json"), env=env, cwd=tmp_path)
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert receiver("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    ran = receiver("export", "--out", str(blocked / "out"), env=env, cwd=tmp_path)
    assert_one_line(ran, str(blocked))


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    ran = receiver("--debug", "hooks", "list", env={"RECEIVER_DATABASE_URL": url}, cwd=tmp_path)
    assert ran.returncode == 1
    assert "Traceback" in ran.stderr
    assert "SchemaOutOfDate" in ran.stderr
    by_env = receiver(
        "hooks", "list", env={"RECEIVER_DATABASE_URL": url, "RECEIVER_DEBUG": "1"}, cwd=tmp_path
    )
    assert "Traceback" in by_env.stderr


def test_db_upgrade_says_what_it_did(tmp_path: Path) -> None:
    env = {"RECEIVER_DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}"}
    first = receiver("db", "upgrade", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("created the schema: no receiver tables before, now at ")
    again = receiver("db", "upgrade", env=env, cwd=tmp_path)
    assert again.stdout.startswith("nothing to do: the database is already at ")


def test_version_prints_the_package_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    ran = receiver("--version", env={}, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == f"receiver, version {version('webrun-receiver')}"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param("sqlite:///data/r.db", "the SQLite database data/r.db", id="sqlite"),
        pytest.param(
            "postgresql+psycopg://u:secret@db.example:6432/rx",
            "PostgreSQL at db.example:6432/rx",
            id="postgresql",
        ),
    ],
)
def test_where_names_the_database_without_its_password(url: str, shown: str) -> None:
    assert where(url) == shown
    assert "secret" not in where(url)


def test_engine_fixture_is_at_head(engine: Engine) -> None:
    """The fixture databases the other tests use pass the CLI's schema check."""
    from receiver.db import check_schema

    check_schema(engine)
    assert upgrade(engine)[0] == upgrade(engine)[1]
