"""The console over HTTP (Starlette's TestClient), on both databases: who may open it, CSRF,
what each page shows, and that it shows the same numbers as the library it calls."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from receiver import listings, rollups
from receiver.app import create_app
from receiver.cli import main
from receiver.console import create_console
from receiver.models import Delivery
from receiver.settings import Settings
from tests.conftest import TOKEN
from tests.consoledata import (
    ACCEPTING_SCHEMA,
    CONSOLE_TOKEN,
    STRICT_SCHEMA,
    Seeded,
    client_post,
    seed,
)

BEARER = {"authorization": f"Bearer {CONSOLE_TOKEN}"}


def register(db_url: str, tmp_path: Path, hook: str, schema: object) -> None:
    """``receiver hooks add HOOK --schema FILE``, as an operator would."""
    path = tmp_path / f"{hook}.schema.json"
    path.write_text(json.dumps(schema))
    result = CliRunner().invoke(
        main,
        ["hooks", "add", hook, "--schema", str(path)],
        env={"RECEIVER_DATABASE_URL": db_url, "RECEIVER_TOKEN": TOKEN},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output


@pytest.fixture
def console_settings(settings: Settings) -> Settings:
    return Settings(**{**settings.__dict__, "console_token": CONSOLE_TOKEN})


@pytest.fixture
def console(console_settings: Settings, engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(console_settings, engine=engine)) as client:
        yield client


@pytest.fixture
def seeded(console: TestClient, db_url: str, tmp_path: Path) -> Seeded:
    register(db_url, tmp_path, "strict", STRICT_SCHEMA)
    seeded = seed(client_post(console), tasks=40)
    console.app.state.pipeline.join()  # type: ignore[attr-defined]
    return seeded


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, html
    return match[1]


def sign_in(client: TestClient) -> None:
    form = client.get("/console/sign-in")
    response = client.post(
        "/console/sign-in",
        data={"csrf": csrf_of(form.text), "token": CONSOLE_TOKEN},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text


def test_no_console_without_its_token(client: TestClient) -> None:
    assert client.get("/console/", headers=BEARER).status_code == 404
    assert client.get("/console/deliveries", headers=BEARER).status_code == 404


def test_the_console_token_may_not_be_a_webhook_token(settings: Settings, engine: Engine) -> None:
    same = Settings(**{**settings.__dict__, "console_token": TOKEN.removeprefix("Bearer ")})
    with pytest.raises(ValueError, match="differ"):
        create_console(same, engine)


PAGES = ["/", "/deliveries", "/quarantine", "/tasks", "/tables", "/costs"]


@pytest.mark.parametrize("page", PAGES)
def test_refused_without_the_console_token(console: TestClient, page: str) -> None:
    assert console.get(f"/console{page}").status_code == 401
    # A webhook token opens hooks, never the console.
    assert console.get(f"/console{page}", headers={"authorization": TOKEN}).status_code == 401
    wrong = {"authorization": "Bearer not-the-console-token"}
    assert console.get(f"/console{page}", headers=wrong).status_code == 401
    assert console.get(f"/console{page}", headers=BEARER).status_code == 200


def test_a_browser_without_a_session_gets_the_sign_in_form(console: TestClient) -> None:
    response = console.get("/console/", headers={"accept": "text/html"})
    assert response.status_code == 401
    assert 'name="token"' in response.text


def test_sign_in_sets_a_signed_httponly_samesite_cookie(console: TestClient) -> None:
    form = console.get("/console/sign-in")
    wrong = console.post("/console/sign-in", data={"csrf": csrf_of(form.text), "token": "nope"})
    assert wrong.status_code == 401
    assert "wrong token" in wrong.text
    response = console.post(
        "/console/sign-in",
        data={"csrf": csrf_of(form.text), "token": CONSOLE_TOKEN},
        follow_redirects=False,
    )
    assert response.status_code == 303
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert "path=/console" in cookie
    assert CONSOLE_TOKEN not in response.headers["set-cookie"]
    assert console.get("/console/").status_code == 200
    # Signing out ends it.
    out = console.post("/console/sign-out", data={"csrf": csrf_of(console.get("/console/").text)})
    assert out.status_code == 200  # the redirect, followed, lands on the sign-in form
    assert console.get("/console/").status_code == 401


def test_a_forged_cookie_opens_nothing(console: TestClient) -> None:
    console.cookies.set("receiver_console", "eyJ1c2VyIjogIngifQ==.forged.sig", path="/console")
    assert console.get("/console/").status_code == 401


def test_sign_in_needs_the_forms_csrf_token(console: TestClient) -> None:
    console.get("/console/sign-in")
    response = console.post("/console/sign-in", data={"token": CONSOLE_TOKEN})
    assert response.status_code == 403


def test_a_post_without_its_csrf_token_is_refused(
    console: TestClient, seeded: Seeded, engine: Engine
) -> None:
    sign_in(console)
    for data in (
        {"delivery_id": seeded.quarantined_id},
        {"delivery_id": seeded.quarantined_id, "csrf": "guessed"},
    ):
        response = console.post("/console/quarantine/reprocess", data=data)
        assert response.status_code == 403
        assert "CSRF" in response.text
    with engine.connect() as conn:
        status = conn.scalar(select(Delivery.status).where(Delivery.id == seeded.quarantined_id))
    assert status == "quarantined"


def test_every_page_answers_and_never_shows_a_webhook_token(
    console: TestClient, seeded: Seeded, engine: Engine
) -> None:
    sign_in(console)
    pages = [f"/console{p}" for p in PAGES]
    pages += [f"/console/deliveries/{r.id}" for r in listings.list_deliveries(engine, limit=30)]
    pages += [f"/console/tables/{t.name}" for t in listings.list_tables(engine)]
    for task in listings.list_tasks(engine, limit=10):
        query = f"?session_id={task.session_id}" if task.session_id else ""
        pages.append(f"/console/tasks/{task.task_id}{query}")
    for page in pages:
        response = console.get(page)
        assert response.status_code == 200, (page, response.text[:500])
        assert TOKEN not in response.text
        assert "test-token" not in response.text
        assert CONSOLE_TOKEN not in response.text


def test_deliveries_filters_and_keyset_pages(
    console: TestClient, seeded: Seeded, engine: Engine
) -> None:
    page = console.get("/console/deliveries", headers=BEARER).text
    ids = re.findall(r'class="id" href="/console/deliveries/([0-9a-f-]{36})"', page)
    assert len(ids) == 50
    assert ids == sorted(ids, reverse=True)
    older = re.search(r'rel="next" href="([^"]+)"', page)
    assert older
    second = console.get("/console/deliveries" + older[1].replace("&amp;", "&"), headers=BEARER)
    more = re.findall(r'class="id" href="/console/deliveries/([0-9a-f-]{36})"', second.text)
    assert more
    assert max(more) < min(ids)
    everything = {r.id for r in listings.list_deliveries(engine, limit=10_000)}
    assert len(everything) == seeded.deliveries

    def shown(query: str) -> set[str]:
        html = console.get(f"/console/deliveries?{query}", headers=BEARER).text
        return set(re.findall(r'class="id" href="/console/deliveries/([0-9a-f-]{36})"', html))

    assert shown("status=quarantined") >= {seeded.quarantined_id, seeded.binary_id}
    assert shown("hook=strict") == {seeded.quarantined_id}
    assert shown("q=binary") == {seeded.binary_id}
    assert seeded.csv_id in shown("label=team%3Dops&output_type=structured_csv")
    assert shown("label=team%3Dnobody") == set()
    assert len(shown("task_id=gen-t0003")) == 1
    assert (
        "not an ISO time" in console.get("/console/deliveries?since=yesterday", headers=BEARER).text
    )


def test_one_delivery_by_prefix_with_body_views(
    console: TestClient, seeded: Seeded, engine: Engine
) -> None:
    binary = console.get(f"/console/deliveries/{seeded.binary_id[:23]}", headers=BEARER)
    assert binary.status_code == 200
    assert "ff fe 00 62 69 6e" in binary.text  # hex, not mojibake
    csv_page = console.get(f"/console/deliveries/{seeded.csv_id}", headers=BEARER).text
    assert "<td>XRP</td>" in csv_page  # its CSV output, as a table
    assert 'class="listing csv"' in csv_page
    assert "results__crypto" in csv_page  # what it became, with a link to its table
    quarantined = console.get(f"/console/deliveries/{seeded.quarantined_id}", headers=BEARER)
    assert "does not match the hook" in quarantined.text
    assert console.get("/console/deliveries/0", headers=BEARER).status_code == 409  # ambiguous
    assert console.get("/console/deliveries/ffff", headers=BEARER).status_code == 404


def test_a_pruned_body_is_said_to_be_pruned_and_when(
    console: TestClient, seeded: Seeded, engine: Engine
) -> None:
    from receiver.db import utcnow
    from receiver.retention import prune

    before = console.get(f"/console/deliveries/{seeded.csv_id}", headers=BEARER).text
    assert "was pruned" not in before
    assert prune(engine, utcnow() + dt.timedelta(seconds=1)).deliveries > 0
    with engine.connect() as conn:
        when = conn.scalar(select(Delivery.body_pruned_at).where(Delivery.id == seeded.csv_id))
    assert when is not None
    page = console.get(f"/console/deliveries/{seeded.csv_id}", headers=BEARER).text
    assert f"The body was pruned at {when}" in page
    assert "results__crypto" in page  # what it became is still shown


def test_reprocess_a_quarantined_delivery_after_fixing_the_schema(
    console: TestClient, seeded: Seeded, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    sign_in(console)
    page = console.get("/console/quarantine").text
    assert "output does not match the hook" in page
    register(db_url, tmp_path, "strict", ACCEPTING_SCHEMA)
    response = console.post(
        "/console/quarantine/reprocess",
        data={"csrf": csrf_of(page), "delivery_id": seeded.quarantined_id},
    )
    assert response.status_code == 200
    assert re.search(r"<dt>processed</dt><dd>1</dd>", response.text), response.text
    with engine.connect() as conn:
        status = conn.scalar(select(Delivery.status).where(Delivery.id == seeded.quarantined_id))
    assert status == "processed"
    # All of one reason and hook: the non-UTF-8 body stays quarantined, and says why.
    page = console.get("/console/quarantine").text
    [reason] = [g.reason for g in listings.quarantine_groups(engine) if g.hook == "pricing"]
    response = console.post(
        "/console/quarantine/reprocess",
        data={"csrf": csrf_of(page), "hook": "pricing", "reason": reason or ""},
    )
    assert re.search(r"<dt>quarantined</dt><dd>1</dd>", response.text)
    assert seeded.binary_id in response.text


def test_costs_show_the_rollups_numbers_and_unknown_apart(
    console: TestClient, seeded: Seeded, engine: Engine
) -> None:
    html = console.get("/console/costs", headers=BEARER).text
    assert "<svg" in html
    assert "<rect" in html
    rows = rollups.costs(engine, ["day", "hook"])
    table = html[html.index('id="cost-by-day-hook"') :]
    for row in rows:
        assert f"<td>{row.key[1]}</td>" in table
        if row.cost_usd is not None:
            assert f"${row.cost_usd:,.4f}" in table
    total = rollups.total(rows)
    assert total.tasks_unknown_cost > 0  # the generated tasks include some of unknown cost
    assert f"${total.cost_usd:,.4f}" in table
    assert 'data-series="unknown cost"' in html
    assert "NAVIGATION_TIMEOUT" in html


def test_tables_and_downloads(console: TestClient, seeded: Seeded, engine: Engine) -> None:
    info = listings.table_listing(engine, "results__generated")
    page = console.get("/console/tables/results__generated", headers=BEARER).text
    assert all(f"<code>{c.name}</code>" in page for c in info.columns)
    as_json = console.get("/console/tables/results__generated/rows.json", headers=BEARER)
    records = json.loads(as_json.text)
    assert len(records) == 40 - 40 // 7  # the failed tasks have no output
    assert {r["sku"] for r in records} >= {"SKU-1", "SKU-40"}
    as_csv = console.get("/console/tables/results__generated/rows.csv", headers=BEARER)
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert len(as_csv.text.strip().splitlines()) == len(records) + 1
    assert console.get("/console/tables/no_such_table", headers=BEARER).status_code == 404
    assert console.get("/console/tables/hooks", headers=BEARER).status_code == 404


def test_tasks_list_and_timeline(console: TestClient, seeded: Seeded, engine: Engine) -> None:
    page = console.get("/console/tasks?status=failed", headers=BEARER).text
    assert "gen-t0007" in page
    assert "gen-t0003" not in page
    task = console.get("/console/tasks/gen-t0007?session_id=gen-s0", headers=BEARER).text
    assert "NAVIGATION_TIMEOUT" in task
    assert re.search(r'class="id" href="/console/deliveries/[0-9a-f-]{36}"', task)
    assert console.get("/console/tasks/gen-t9999", headers=BEARER).status_code == 404


def test_the_readmes_screenshots_exist() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shots = re.findall(r"\((docs/console-[a-z]+\.png)\)", readme)
    assert len(shots) == 6
    for shot in shots:
        data = (Path(__file__).resolve().parents[1] / shot).read_bytes()
        assert data.startswith(b"\x89PNG"), shot
