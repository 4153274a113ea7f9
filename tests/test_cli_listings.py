"""Every listing of the ``receiver`` command at 80 columns, as JSON and CSV, with --limit and
--since; ``show`` commands by id prefix. On both databases, filled through the HTTP edge."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine
from starlette.testclient import TestClient

from receiver import listings, rollups
from receiver.cli import main
from receiver.terminal import money
from tests.conftest import TOKEN
from tests.consoledata import STRICT_SCHEMA, Seeded, client_post, seed
from tests.test_console import register

WIDTH = 80


def cli(db_url: str, *args: str, width: int = WIDTH) -> Result:
    result = CliRunner().invoke(
        main,
        list(args),
        env={"RECEIVER_DATABASE_URL": db_url, "RECEIVER_TOKEN": TOKEN, "COLUMNS": str(width)},
        catch_exceptions=False,
    )
    return result


def ok(db_url: str, *args: str) -> str:
    result = cli(db_url, *args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def seeded(client: TestClient, db_url: str, tmp_path: Path) -> Seeded:
    register(db_url, tmp_path, "strict", STRICT_SCHEMA)
    seeded = seed(client_post(client), tasks=30)
    client.app.state.pipeline.join()  # type: ignore[attr-defined]
    return seeded


def fits(output: str) -> None:
    for line in output.splitlines():
        assert len(line.rstrip()) <= WIDTH, line


LISTINGS = [
    pytest.param(["hooks", "list"], id="hooks list"),
    pytest.param(["tables"], id="tables"),
    pytest.param(["deliveries", "list"], id="deliveries list"),
    pytest.param(["deliveries", "list", "--status", "quarantined"], id="deliveries quarantined"),
    pytest.param(["tasks", "list"], id="tasks list"),
    pytest.param(["costs", "--by", "day", "--by", "hook"], id="costs day hook"),
    pytest.param(["costs", "--by", "hook", "--by", "status"], id="costs hook status"),
    pytest.param(["costs", "--by", "label:team"], id="costs label"),
]


@pytest.mark.parametrize("command", LISTINGS)
def test_every_listing_fits_80_columns(command: list[str], seeded: Seeded, db_url: str) -> None:
    output = ok(db_url, *command)
    fits(output)
    assert len(output.splitlines()) > 4


@pytest.mark.parametrize("command", LISTINGS)
def test_every_listing_round_trips_as_json_and_csv(
    command: list[str], seeded: Seeded, db_url: str
) -> None:
    records = json.loads(ok(db_url, *command, "--format", "json"))
    assert isinstance(records, list)
    assert records
    if command[0] != "tables":  # tables nests each table's columns: JSON only
        written = cli(db_url, *command, "--format", "csv").stdout_bytes
        assert b"\r" not in written  # every listing's CSV the same way: lines end in \n
        rows = list(csv.DictReader(io.StringIO(written.decode())))
        assert len(rows) == len(records)
        assert list(rows[0]) == list(records[0])
        for row, record in zip(rows, records, strict=True):
            for key, value in record.items():
                shown = "" if value is None else value
                assert row[key] == str(shown) or json.loads(row[key]) == shown, key


@pytest.mark.parametrize("command", LISTINGS)
def test_every_listing_takes_limit_and_since(
    command: list[str], seeded: Seeded, db_url: str
) -> None:
    limited = json.loads(ok(db_url, *command, "--format", "json", "--limit", "1"))
    assert len(limited) == 1
    future = json.loads(ok(db_url, *command, "--format", "json", "--since", "2999-01-01"))
    assert future == []


def test_money_and_status_are_never_cut(seeded: Seeded, db_url: str, engine: Engine) -> None:
    output = ok(db_url, "costs", "--by", "day", "--by", "hook")
    for row in rollups.costs(engine, ["day", "hook"]):
        line = next(x for x in output.splitlines() if f" {row.key[1]} " in x)
        assert money(row.cost_usd) in line
        assert f"{row.tasks:,}" in line
    assert "unknown" in output  # the tasks of unknown cost are said, never $0
    total = rollups.total(rollups.costs(engine, ["day", "hook"]))
    assert money(total.cost_usd) in output

    tasks = ok(db_url, "tasks", "list", "--limit", "100")
    for task in listings.list_tasks(engine, limit=100):
        lines = [x for x in tasks.splitlines() if f"{task.task_id} " in x and task.hook in x]
        assert any((task.status or "") in x and money(task.cost_usd) in x for x in lines)

    deliveries = ok(db_url, "deliveries", "list", "--limit", "100")
    statuses = re.findall(r" (stored|processed|quarantined|duplicate) ", deliveries)
    assert len(statuses) == len(listings.list_deliveries(engine, limit=100))


def test_unknown_totals_are_said(seeded: Seeded, db_url: str, engine: Engine) -> None:
    output = ok(db_url, "costs", "--by", "hook")
    total = rollups.total(rollups.costs(engine, ["hook"]))
    assert "cost_usd" in total.partial  # some tasks have a cost, some do not
    assert money(total.cost_usd) + "+" in output
    assert "+: the sum of the tasks that reported it" in output


def test_tables_explain_their_special_source_keys(seeded: Seeded, db_url: str) -> None:
    output = cli(db_url, "tables", width=200).output
    assert "#row-note._flag" in output
    assert "#row-note: set on rows that did not parse cleanly" in output
    record = next(
        t
        for t in json.loads(ok(db_url, "tables", "--format", "json"))
        if t["name"] == "results__crypto"
    )
    notes = {c["name"]: c["note"] for c in record["columns"]}
    assert notes["_flag"].startswith("row note")


def test_deliveries_json_is_whole(seeded: Seeded, db_url: str, engine: Engine) -> None:
    records = json.loads(ok(db_url, "deliveries", "list", "--format", "json", "--limit", "500"))
    assert [r["id"] for r in records] == [r.id for r in listings.list_deliveries(engine, limit=500)]
    assert seeded.quarantined_id in {r["id"] for r in records}
    [strict] = [r for r in records if r["id"] == seeded.quarantined_id]
    assert "output does not match the hook's schema" in strict["reason"]


def test_show_takes_the_prefix_a_listing_shows(seeded: Seeded, db_url: str) -> None:
    listing = ok(db_url, "deliveries", "list", "--hook", "strict")
    shown = re.search(r"^ ?([0-9a-f]{8}-[0-9a-f-]+)\s+strict", listing, re.M)
    assert shown
    assert len(shown[1]) < 36
    assert seeded.quarantined_id.startswith(shown[1])
    detail = ok(db_url, "deliveries", "show", shown[1])
    assert seeded.quarantined_id in detail
    assert "--- body ---" in detail


def test_show_says_when_a_prefix_is_ambiguous_or_unknown(seeded: Seeded, db_url: str) -> None:
    ambiguous = cli(db_url, "deliveries", "show", seeded.quarantined_id[:4])
    assert ambiguous.exit_code == 1
    assert "is the start of several delivery ids" in ambiguous.output
    missing = cli(db_url, "deliveries", "show", "ffffffff")
    assert missing.exit_code == 1
    assert "no delivery ffffffff" in missing.output
    assert "Traceback" not in missing.output


def test_tasks_show_by_ids_or_prefix(seeded: Seeded, db_url: str) -> None:
    both = ok(db_url, "tasks", "show", "gen-s0", "gen-t0007")
    assert (
        json.loads(both[: both.index("--- deliveries ---")])["error_code"] == "NAVIGATION_TIMEOUT"
    )
    assert "failure" in both[both.index("--- deliveries ---") :]
    by_prefix = ok(db_url, "tasks", "show", "gen-t0007")
    assert '"task_id": "gen-t0007"' in by_prefix
    ambiguous = cli(db_url, "tasks", "show", "gen-t00")
    assert ambiguous.exit_code == 1
    assert "names several tasks" in ambiguous.output
    assert cli(db_url, "tasks", "show", "nothing-like-it").exit_code == 1


def test_tasks_list_filters(seeded: Seeded, db_url: str) -> None:
    failed = json.loads(ok(db_url, "tasks", "list", "--status", "failed", "--format", "json"))
    assert {t["task_id"] for t in failed} == {
        "gen-t0007",
        "gen-t0014",
        "gen-t0021",
        "gen-t0028",
        "t-9",
    }
    generated = json.loads(
        ok(db_url, "tasks", "list", "--hook", "generated", "--format", "json", "--limit", "500")
    )
    assert len(generated) == 30


def test_reprocess_says_how_far_it_got(seeded: Seeded, db_url: str) -> None:
    result = cli(db_url, "reprocess", "--quarantined")
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert lines[0] == "reprocessing: started of 2"
    assert re.match(r"reprocessing: 2/2 \(", lines[-2])
    assert json.loads(lines[-1]) == {"deliveries": 2, "quarantined": 2}
    quiet = cli(db_url, "reprocess", "--quarantined", "--quiet")
    assert quiet.output.strip().splitlines() == ['{"deliveries": 2, "quarantined": 2}']
