"""The README works when pasted: every command and code block in it is run here.

- The settings table is generated from `receiver.settings.SETTINGS_DOC`.
- The first block's `scripts/dev.sh serve` is started for real; its `scripts/dev.sh test`
  is what `.ci/run` runs (running it here would run this suite inside itself).
- The other shell blocks run in order as one bash script in an empty folder, with a live
  receiver; the only rewrite is the port (``8000`` becomes a free one). The Python blocks
  then run in that folder, on the walkthrough's Parquet export.
- SQL blocks run on SQLite and PostgreSQL databases holding the 15 sample deliveries.
- A block marked ``<!-- readme-test: postgresql -->`` runs against a fresh, empty test
  database; one marked ``docker`` cannot run without a Docker engine, so the Dockerfile
  is checked against it instead.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, text
from starlette.testclient import TestClient

from receiver.cli import webhook_object
from receiver.db import create_db_engine, upgrade
from receiver.models import Base
from receiver.settings import SETTINGS_DOC, Settings
from tests.conftest import DELIVERIES, _pg_admin, _pg_url, drop_pg_database, post
from tests.live import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent

_FENCE = re.compile(
    r"(?:<!-- readme-test: (?P<mark>\w+)[^>]*-->\n)?^```(?P<lang>\w*)\n(?P<code>.*?)^```$",
    re.S | re.M,
)


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    mark: str | None
    heading: str


def readme_blocks() -> list[Block]:
    text_ = README.read_text()
    out = []
    for m in _FENCE.finditer(text_):
        headings = re.findall(r"^#+ (.+)$", text_[: m.start()], re.M)
        out.append(Block(m["lang"], m["code"], m["mark"], headings[-1] if headings else ""))
    return out


def blocks(lang: str, mark: str | None = None) -> list[Block]:
    return [b for b in readme_blocks() if b.lang == lang and b.mark == mark]


def settings_table() -> str:
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{name}` | `{default}` | {meaning} |" for name, default, meaning in SETTINGS_DOC]
    return "\n".join(lines)


def test_settings_table_matches_code() -> None:
    text_ = README.read_text()
    start = text_.index("<!-- settings:start -->") + len("<!-- settings:start -->")
    end = text_.index("<!-- settings:end -->")
    assert text_[start:end].strip() == settings_table()


def test_every_block_is_one_this_file_runs() -> None:
    kinds = {(b.lang, b.mark) for b in readme_blocks()}
    assert kinds <= {
        ("bash", None),
        ("bash", "docker"),
        ("bash", "postgresql"),
        ("bash", "wheel"),
        ("json", None),
        ("sql", None),
        ("python", None),
    }
    assert len(readme_blocks()) >= 15


def _commands(code: str) -> list[str]:
    return [line.split("  #")[0].strip() for line in code.splitlines() if line.strip()]


def test_the_first_two_commands() -> None:
    first = readme_blocks()[0]
    assert _commands(first.code) == ["scripts/dev.sh serve", "scripts/dev.sh test"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == "exec scripts/dev.sh test"


def test_the_wheel_block_is_what_the_smoke_runs() -> None:
    """The README's wheel commands need a checkout and a fresh venv: CI's smoke runs them."""
    (block,) = blocks("bash", "wheel")
    smoke = (ROOT / "scripts" / "smoke.sh").read_text()
    for phrase in ("pip wheel", "--no-deps", "pipx", "--version", "db upgrade"):
        assert phrase in block.code
        assert phrase in smoke
    for command in ("serve", "send", "costs", "export"):
        assert f'"$bin" {command}' in smoke
    assert (ROOT / ".ci" / "run").read_text().count("scripts/dev.sh smoke") == 1


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the receiver exited"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop ``process`` and everything it started (it leads its own session)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECEIVER_", "PROMETHEUS_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("VIRTUAL_ENV", None)
    return {**env, **extra}


def test_dev_sh_serve_starts_a_receiver_and_prints_its_token(tmp_path: Path) -> None:
    port = free_port()
    command = [*shlex.split(_commands(readme_blocks()[0].code)[0]), "--port", str(port)]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=_clean_env(RECEIVER_DATA_DIR=str(tmp_path / "data")),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_ready(f"http://127.0.0.1:{port}/readyz", process)
        printed = log.read_text()
        token = re.search(r"Authorization: (Bearer \S+)", printed)
        assert token is not None, printed
        answer = httpx.post(
            f"http://127.0.0.1:{port}/hooks/default",
            content=(DELIVERIES / "03-just-ping.body").read_bytes(),
            headers={"authorization": token[1]},
        )
        assert answer.status_code == 200
    finally:
        _stop(process)
    assert (tmp_path / "data" / "receiver.db").exists()


def localised(code: str, port: int) -> str:
    """The README's port 8000 moved to ``port``, so the test can run beside anything."""
    return code.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace(
        "--port 8000", f"--port {port}"
    )


def test_walkthrough_and_analyst_recipes(tmp_path: Path) -> None:
    port = free_port()
    shell = [b for b in blocks("bash") if b != readme_blocks()[0]]
    script = "set -euo pipefail\n" + "\n".join(localised(b.code, port) for b in shell)
    (tmp_path / "walkthrough.sh").write_text(script)
    process = subprocess.Popen(
        ["bash", "walkthrough.sh"],
        cwd=tmp_path,
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        _stop(process)
    shown = output.decode(errors="replace")
    assert process.returncode == 0, shown
    assert shown.count('"status":"stored"') == 3, shown
    assert "x9y8z7w6v5u4|completed|0.0117" in shown  # the sqlite3 line for sample 05
    assert '"url": "http://127.0.0.1' in shown  # hooks add printed a webhook object
    assert (tmp_path / "export" / "_manifest.json").exists()

    for block in blocks("python"):
        ran = subprocess.run(
            [sys.executable, "-c", block.code],
            cwd=tmp_path,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ran.returncode == 0, (block.code, ran.stderr)
        assert "pricing" in ran.stdout or "failed" in ran.stdout, ran.stdout


@pytest.fixture
def sampled(client: TestClient, engine: Engine) -> Engine:
    """A database holding every sample delivery, processed."""
    for body_file in sorted(DELIVERIES.glob("*.body")):
        meta = json.loads(body_file.with_suffix(".json").read_text())
        hook = "pricing" if "json" in body_file.name else "crypto"
        post(client, hook, body_file.read_bytes(), meta["content_type"])
    return engine


@pytest.mark.parametrize(
    "block", [pytest.param(b, id=f"sql{i}") for i, b in enumerate(blocks("sql"))]
)
def test_sql_recipe(block: Block, sampled: Engine) -> None:
    with sampled.connect() as conn:
        rows = conn.execute(text(block.code)).all()
    assert rows, block.code
    assert all(r[0] is not None or "error_code" in block.code for r in rows)


def test_postgresql_commands(tmp_path: Path) -> None:
    """On an empty database, the block leaves the schema migrated."""
    (block,) = blocks("bash", "postgresql")
    name = f"receiver_readme_{os.getpid()}_{int(time.time())}"
    with _pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = _pg_url(name)
        code = re.sub(r"postgresql\+psycopg://\S+", url, block.code)
        assert code != block.code
        ran = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code],
            cwd=tmp_path,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ran.returncode == 0, ran.stderr
        engine = create_db_engine(Settings(database_url=url))
        try:
            with engine.connect() as conn:
                assert conn.scalar(text("SELECT count(*) FROM deliveries")) == 0
        finally:
            engine.dispose()
    finally:
        drop_pg_database(name)


def dockerfile() -> list[tuple[str, str]]:
    """Instructions as (KEYWORD, arguments), continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_docker_block_matches_the_dockerfile() -> None:
    (block,) = blocks("bash", "docker")
    instructions = dockerfile()
    keywords = [k for k, _ in instructions]
    assert dict(instructions)["FROM"].endswith("-slim")
    users = [args for k, args in instructions if k == "USER"]
    assert users
    assert users[-1] not in {"root", "0"}
    assert keywords.index("USER") < keywords.index("CMD")
    health = dict(instructions)["HEALTHCHECK"]
    assert "/healthz" in health
    cmd = json.loads(dict(instructions)["CMD"])
    assert cmd[:2] == ["receiver", "serve"]  # serve migrates before it listens
    port = cmd[cmd.index("--port") + 1]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert dict(instructions)["EXPOSE"] == port
    run = next(c for c in _commands(block.code.replace("\\\n", " ")) if c.startswith("docker run"))
    assert f":{port}" in run.split("-p ", 1)[1].split()[0]
    documented = {name for name, _, _ in SETTINGS_DOC}
    assert set(re.findall(r"-e (\w+)=", run)) <= documented
    assert "RECEIVER_DATABASE_URL" in run
    assert "postgresql+psycopg://" in run
    build = _commands(block.code)[0].split()
    assert build[:2] == ["docker", "build"]
    assert build[-1] == "."


def _documented_columns() -> dict[str, list[str]]:
    section = README.read_text().split("## Data model", 1)[1].split("\n## ", 1)[0]
    out: dict[str, list[str]] = {}
    for part in section.split("\n### ")[1:]:
        name = re.match(r"`(\w+)`", part)
        assert name is not None, part[:40]
        out[name[1]] = re.findall(r"^\| `(\w+)` \|", part, re.M)
    return out


def test_data_model_lists_every_core_table_and_view_column(tmp_path: Path) -> None:
    engine = create_db_engine(Settings(database_url=f"sqlite:///{tmp_path / 'r.db'}"))
    upgrade(engine)
    try:
        with engine.connect() as conn:
            views = list(conn.scalars(text("SELECT name FROM sqlite_master WHERE type = 'view'")))
            expected = {t.name: [c.name for c in t.columns] for t in Base.metadata.sorted_tables}
            for view in views:
                expected[view] = list(conn.execute(text(f'SELECT * FROM "{view}"')).keys())
    finally:
        engine.dispose()
    documented = _documented_columns()
    assert set(documented) == set(expected)
    for name, columns in expected.items():
        assert documented[name] == columns, name


def test_json_blocks_are_what_the_cli_prints() -> None:
    (config,) = blocks("json")
    parsed = json.loads(config.code)
    hook = parsed["initialTask"]["webhook"]
    printed = json.loads(webhook_object("pricing", "https://x/hooks/pricing", "Bearer t"))
    assert set(hook) == set(printed["webhook"])
    assert hook["url"].endswith(f"/hooks/{hook['name']}")


def test_every_test_the_readme_names_exists() -> None:
    """A guarantee names the test that checks it (`file.py::name`, or `::name` for the file named
    just before): each must exist, or the guarantee is checked by nothing."""
    text = README.read_text()
    named: list[tuple[str, str]] = []
    current = ""
    for file, name in re.findall(r"`(?:(test_\w+\.py))?::(\w+)`", text):
        current = file or current
        named.append((current, name))
    assert len(named) > 10, named  # the guarantees section names many
    tests = Path(__file__).resolve().parent
    missing = [
        f"{file}::{name}"
        for file, name in named
        if not re.search(rf"^(?:async )?def {name}\(", (tests / file).read_text(), re.MULTILINE)
    ]
    assert missing == []
