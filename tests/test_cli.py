"""The ``receiver`` command: `send` to a live receiver, and a hook's token lifecycle over HTTP."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, select, update
from starlette.testclient import TestClient

from receiver.app import create_app
from receiver.cli import main, sample_deliveries
from receiver.db import utcnow
from receiver.models import Delivery
from receiver.settings import Settings
from tests.conftest import DELIVERIES, TOKEN
from tests.live import ServerProcess, live_server
from tests.readback import deliver
from tests.test_terminal import progress_lines


def run(db_url: str, *args: str, token: str | None = TOKEN) -> Result:
    env = {"RECEIVER_DATABASE_URL": db_url, "RECEIVER_TOKEN": token or ""}
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def webhook(output: str) -> dict[str, str]:
    """The ``webhook`` object a command printed."""
    start = output.index("{")
    block: dict[str, dict[str, str]] = json.loads(output[start : output.rindex("}") + 1])
    return block["webhook"]


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))


@pytest.mark.parametrize("path", [pytest.param(p, id=" ".join(p)) for p in all_commands(main)])
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"], env={"RECEIVER_TOKEN": ""})
    assert result.exit_code == 0, result.output
    assert f"Usage: main {' '.join(path)}" in result.output
    summary = result.output.split("\n\n")[1].strip()
    assert len(summary) > 10, result.output


def test_samples_are_the_catalogue() -> None:
    samples = {s["name"]: s for s in sample_deliveries()}
    cases = sorted(DELIVERIES.glob("*.json"))
    assert len(samples) == len(cases) == 15
    shipped = Path(__file__).resolve().parents[1] / "receiver" / "samples"
    for case_file in cases:
        case = json.loads(case_file.read_text())
        assert samples[case["name"]]["content_type"] == case["content_type"]
        body = (shipped / f"{case['name']}.body").read_bytes()
        assert body == case_file.with_suffix(".body").read_bytes()


@pytest.fixture
def live(db_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    with live_server(db_url, tmp_path / "data") as server:
        yield server


def stored(engine: Engine) -> list[tuple[str, bytes, str | None, str]]:
    """Hook, body, content type and query string of every stored delivery, oldest first."""
    with engine.connect() as conn:
        return [
            (r.hook, r.body, r.content_type, r.query_string)
            for r in conn.execute(
                select(Delivery.__table__).order_by(Delivery.received_at, Delivery.id)
            )
        ]


def test_send_a_sample_and_a_file(
    live: ServerProcess, db_url: str, engine: Engine, tmp_path: Path
) -> None:
    result = run(db_url, "send", "--sample", "06", "--url", live.url, "--hook", "crypto")
    assert result.exit_code == 0, result.output
    status, answer = result.output.split(" ", 1)
    assert status == "200"
    assert json.loads(answer)["status"] == "stored"

    again = run(db_url, "send", "--sample", "06-ai-response-csv-text", "--url", live.url)
    assert json.loads(again.output.split(" ", 1)[1])["status"] == "stored"  # other hook

    note = tmp_path / "note.txt"
    note.write_bytes("Ünïcode *markdown*\n".encode())
    labelled = run(
        db_url, "send", str(note), "--url", live.url, "--label", "task_id=t1", "--label", "p=a b"
    )
    assert labelled.exit_code == 0, labelled.output

    sample_body = (DELIVERIES / "06-ai-response-csv-text.body").read_bytes()
    assert stored(engine) == [
        ("crypto", sample_body, "text/csv", ""),
        ("default", sample_body, "text/csv", ""),
        ("default", note.read_bytes(), "text/plain", "task_id=t1&p=a+b"),
    ]


def test_send_to_a_full_hook_url_keeps_its_query_string_as_labels(
    live: ServerProcess, db_url: str, engine: Engine
) -> None:
    """``--url`` may be the whole webhook URL a task config holds; its labels arrive exactly."""
    url = f"{live.url}/hooks/pricing?task_id=t1&session_id=s1"
    result = run(db_url, "send", "--sample", "02", "--url", url, "--label", "p=a b")
    assert result.exit_code == 0, result.output
    same = run(db_url, "send", "--sample", "02", "--url", url, "--hook", "pricing")
    assert same.exit_code == 0, same.output
    clash = run(db_url, "send", "--sample", "02", "--url", url, "--hook", "other")
    assert clash.exit_code == 2
    assert "names hook 'pricing'" in clash.output
    with engine.connect() as conn:
        rows = conn.execute(
            select(Delivery.hook, Delivery.query_string, Delivery.labels).order_by(Delivery.id)
        ).all()
    assert [(r.hook, r.query_string) for r in rows] == [
        ("pricing", "task_id=t1&session_id=s1&p=a+b"),
        ("pricing", "task_id=t1&session_id=s1"),
    ]
    assert json.loads(rows[0].labels) == {"task_id": "t1", "session_id": "s1", "p": "a b"}


@pytest.mark.parametrize(
    ("url", "hook", "target"),
    [
        pytest.param("http://h:1", None, "http://h:1/hooks/default", id="base"),
        pytest.param("http://h:1/", "a b", "http://h:1/hooks/a%20b", id="base-slash"),
        pytest.param("http://h:1/rx", "p", "http://h:1/rx/hooks/p", id="prefix"),
        pytest.param("http://h:1/hooks/p?x=1&y", None, "http://h:1/hooks/p?x=1&y", id="full"),
    ],
)
def test_hook_url(url: str, hook: str | None, target: str) -> None:
    from receiver.sender import hook_url

    assert hook_url(url, hook) == target


def test_send_reports_refusals(live: ServerProcess, db_url: str, engine: Engine) -> None:
    wrong = run(db_url, "send", "--sample", "01", "--url", live.url, "--token", "Bearer nope")
    assert wrong.exit_code == 1
    assert wrong.output.startswith("401 ")
    none = run(db_url, "send", "--sample", "01", "--url", live.url, token=None)
    assert none.exit_code == 2
    assert "RECEIVER_TOKEN" in none.output
    unknown = run(db_url, "send", "--sample", "99", "--url", live.url)
    assert unknown.exit_code == 2
    assert "01-full-response-json" in unknown.output  # the message lists the samples
    both = run(db_url, "send", "--url", live.url)
    assert both.exit_code == 2
    assert stored(engine) == []


def test_send_to_nothing_says_so(db_url: str) -> None:
    from tests.live import free_port

    result = CliRunner().invoke(
        main,
        ["send", "--sample", "01", "--url", f"http://127.0.0.1:{free_port()}"],
        env={"RECEIVER_DATABASE_URL": db_url, "RECEIVER_TOKEN": TOKEN},
    )
    assert result.exit_code == 1
    assert "could not reach" in result.output


def test_list_samples() -> None:
    result = CliRunner().invoke(main, ["send", "--list-samples"], env={"RECEIVER_TOKEN": ""})
    assert result.exit_code == 0
    for sample in sample_deliveries():
        assert sample["name"] in result.output


def test_hook_token_lifecycle(db_url: str, engine: Engine, tmp_path: Path) -> None:
    """add -> the token works; rotate -> both work; revoke -> neither; list shows it all."""
    settings = Settings(database_url=db_url, data_dir=tmp_path / "data", auth_cache_seconds=0)
    added = run(db_url, "hooks", "add", "pricing", "--url", "https://rx.example.com", token=None)
    assert added.exit_code == 0, added.output
    first = webhook(added.output)
    assert first["url"] == "https://rx.example.com/hooks/pricing"
    assert first["auth"].startswith("Bearer ")

    with TestClient(create_app(settings, engine=engine)) as client:

        def status(token: str, hook: str = "pricing") -> int:
            return client.post(
                f"/hooks/{hook}", content=b"{}", headers={"authorization": token}
            ).status_code

        assert status(first["auth"]) == 200
        assert status(first["auth"], "other") == 401  # a hook's token is for that hook only
        rotated = run(db_url, "hooks", "rotate", "pricing", token=None)
        second = webhook(rotated.output)
        assert second["auth"] != first["auth"]
        assert status(first["auth"]) == status(second["auth"]) == 200

        listing = run(db_url, "hooks", "list", "--format", "json", token=None)
        [row] = [h for h in json.loads(listing.output) if h["name"] == "pricing"]
        assert (row["own_tokens"], row["deliveries"]) == (2, 3)

        revoked = run(db_url, "hooks", "revoke", "pricing", token=None)
        assert revoked.output.strip() == "revoked 2 token(s) of pricing"
        assert status(first["auth"]) == status(second["auth"]) == 401
    assert [hook for hook, *_ in stored(engine)] == ["pricing"] * 3  # the 401s stored nothing


def test_progress_off_a_terminal_is_plain_lines(
    client: TestClient, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """reprocess, export and prune say how far they got on stderr, as plain lines when it is
    no terminal (CliRunner's is not): no bar, no spinner frames; stdout is the answer alone."""
    for i in range(3):
        deliver(client, engine, "shop", json.dumps([{"n": i}]).encode())
    with engine.begin() as conn:  # received an hour ago: prune --older-than 30m takes them
        conn.execute(update(Delivery).values(received_at=utcnow() - dt.timedelta(hours=1)))

    reprocessed = run(db_url, "reprocess")
    assert json.loads(reprocessed.stdout) == {"deliveries": 3, "processed": 3}
    lines = progress_lines(reprocessed.stderr, "reprocessing")
    assert lines[0] == "reprocessing: started of 3"
    assert re.fullmatch(r"reprocessing: 3/3 \(.+/s\)", lines[-1])

    exported = run(db_url, "export", "--out", str(tmp_path / "export"))
    assert json.loads(exported.stdout)["rows"]["deliveries"] == 3
    lines = progress_lines(exported.stderr, "exporting")
    assert lines[0] == "exporting: started"
    assert any(line.startswith("exporting: deliveries: 3 rows (") for line in lines)

    assert run(db_url, "prune", "--older-than", "30m", "--dry-run").stderr == ""  # counts only
    pruned = run(db_url, "prune", "--older-than", "30m", "--format", "json")
    assert json.loads(pruned.stdout)["deliveries"] == 3
    lines = progress_lines(pruned.stderr, "pruning")
    assert lines[0] == "pruning: started"
    assert re.fullmatch(r"pruning: pruned 3 deliveries, [\d,]+ B \(.+/s\)", lines[-1])


def test_settle_heap_freezes_what_exists_and_collects_first() -> None:
    """What `serve` calls after building its app: garbage is collected, survivors frozen."""
    import gc

    from receiver.app import settle_heap

    class Cycle:
        other: object = None

    a, b = Cycle(), Cycle()
    a.other, b.other = b, a
    del a, b  # garbage in a cycle: only the collector can free it
    gc.unfreeze()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        assert not any(type(o) is Cycle for o in gc.get_objects())  # collected, not frozen
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("revision", ["base", "0002", "0005"])
def test_costs_refuses_a_database_not_upgraded(
    revision: str, db_url: str, engine: Engine, tmp_path: Path
) -> None:
    """Below head, ``costs`` says to upgrade (like the app does) instead of a raw SQL error
    or sums from an older rollup."""
    from alembic import command

    from receiver.db import alembic_config

    command.downgrade(alembic_config(engine), revision)
    engine.dispose()
    result = CliRunner().invoke(
        main,
        ["costs", "--by", "status"],
        env={"RECEIVER_DATABASE_URL": db_url, "RECEIVER_DATA_DIR": str(tmp_path)},
    )
    assert result.exit_code == 1, result.output
    at = "nothing (never migrated)" if revision == "base" else revision
    assert f"Error: the database schema is at {at}, this receiver expects " in result.output
    assert "run `receiver db upgrade`" in result.output
    assert result.exception is not None
    assert isinstance(result.exception, SystemExit)  # a ClickException, not a traceback

    run(db_url, "db", "upgrade")
    upgraded = CliRunner().invoke(
        main,
        ["costs", "--by", "status", "--format", "json"],
        env={"RECEIVER_DATABASE_URL": db_url, "RECEIVER_DATA_DIR": str(tmp_path)},
    )
    assert upgraded.exit_code == 0, upgraded.output
    assert json.loads(upgraded.output) == []


def test_the_readmes_cli_reference_is_current() -> None:
    from receiver import clidoc

    readme = clidoc.README.read_text()
    assert clidoc.current(readme) == clidoc.reference(), "run: python -m receiver.clidoc"
    assert clidoc.main(["--check"]) == 0
    for path in all_commands(main):
        assert f"### `receiver {' '.join(path)}`" in readme


def test_every_format_option_is_spelt_alike() -> None:
    """One --format option (receiver.inspection.format_option) for every command that has one."""
    found = {}
    for path in all_commands(main):
        command: click.Command = main
        for name in path:
            assert isinstance(command, click.Group)
            command = command.commands[name]
        for param in command.params:
            if "--format" in getattr(param, "opts", ()):
                assert isinstance(param, click.Option)
                assert isinstance(param.type, click.Choice)
                found[" ".join(path)] = (param.name, param.default, param.type.choices[0])
                assert (param.help or "").startswith("table fits the terminal; json ")
    assert set(found.values()) == {("format_", "table", "table")}
    assert {"prune", "run", "runs list", "costs", "tasks list"} <= found.keys()


@pytest.mark.parametrize("path", [pytest.param(p, id=" ".join(p)) for p in all_commands(main)])
def test_help_is_plain_text(path: tuple[str, ...]) -> None:
    """No reST or Markdown markup, no pointers into the code: help points at the README."""
    result = CliRunner().invoke(main, [*path, "--help"], env={"RECEIVER_TOKEN": ""})
    assert "``" not in result.output
    assert "`" not in result.output
    assert "receiver." not in result.output.replace("receiver.db", "")
    assert "See receiver" not in result.output
