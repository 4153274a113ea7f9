"""The console in a real headless Chromium (Debian's ``chromium``, driven by Playwright), against
a real `receiver serve` process on 127.0.0.1, on both databases.

Set ``CONSOLE_SCREENSHOTS=docs`` to write the README's screenshots there (the SQLite run's).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy import Engine, select

from receiver.models import Delivery
from tests.consoledata import (
    ACCEPTING_SCHEMA,
    CONSOLE_TOKEN,
    STRICT_SCHEMA,
    Seeded,
    http_post,
    seed,
    wait_processed,
)
from tests.live import ServerProcess
from tests.test_console import register

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WIDTH = 1024

# Outside CI a machine without Debian's chromium skips these (and says why); in CI
# (`scripts/dev.sh test` installs it) a missing browser fails them instead.
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"),
    reason="Debian's chromium is missing: scripts/dev.sh test installs it",
)


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    register(db_url, tmp_path, "strict", STRICT_SCHEMA)
    process = ServerProcess(db_url, tmp_path / "data")
    process.env["RECEIVER_CONSOLE_TOKEN"] = CONSOLE_TOKEN
    try:
        process.start()
        yield process
    finally:
        process.kill()


@pytest.fixture
def seeded(server: ServerProcess, engine: Engine) -> Seeded:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        seeded = seed(http_post(http), tasks=300)
    wait_processed(engine)
    return seeded


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def shoot(page: Page, name: str, db_url: str) -> None:
    folder = os.environ.get("CONSOLE_SCREENSHOTS")
    if folder and db_url.startswith("sqlite"):
        page.screenshot(path=str(Path(folder) / f"console-{name}.png"), full_page=False)


def fits_the_width(page: Page) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= WIDTH, f"{page.url} is {width} px wide"


def test_refused_without_the_token(browser: Browser, server: ServerProcess) -> None:
    page = browser.new_page(viewport={"width": WIDTH, "height": 800})
    response = page.goto(f"{server.url}/console/deliveries")
    assert response is not None
    assert response.status == 401
    expect(page.get_by_label("Console token")).to_be_visible()
    page.get_by_label("Console token").fill("Bearer test-token")  # a webhook token
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("wrong token")
    assert page.request.get(f"{server.url}/console/").status == 401


def test_walk_the_console(
    browser: Browser,
    server: ServerProcess,
    seeded: Seeded,
    engine: Engine,
    db_url: str,
    tmp_path: Path,
) -> None:
    errors: list[str] = []
    page = browser.new_page(viewport={"width": WIDTH, "height": 900})
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("requestfailed", lambda r: errors.append(f"{r.url} failed"))
    page.goto(f"{server.url}/console/")
    page.get_by_label("Console token").fill(CONSOLE_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
    errors.clear()  # the sign-in form itself came with a 401
    expect(page.locator(".cards")).to_contain_text("quarantined")
    fits_the_width(page)
    shoot(page, "overview", db_url)

    nav = page.get_by_role("navigation", name="Console")
    for link, heading in [
        ("Deliveries", "Deliveries"),
        ("Quarantine", "Quarantine"),
        ("Tasks", "Tasks"),
        ("Tables", "Result tables"),
        ("Costs", "Costs, last 30 days"),
    ]:
        nav.get_by_role("link", name=link).click()
        expect(page.get_by_role("heading", level=1)).to_have_text(heading)
        assert nav.get_by_role("link", name=link).get_attribute("aria-current") == "page"
        fits_the_width(page)

    # The chart is drawn: an SVG with bars of the hooks' cost and the unknown-cost series.
    chart = page.locator("svg.chart")
    expect(chart).to_be_visible()
    box = chart.bounding_box()
    assert box is not None
    assert box["width"] > 300
    assert box["height"] > 100
    assert page.locator('svg.chart rect[data-series="generated"]').count() > 0
    assert page.locator('svg.chart rect[data-series="unknown cost"]').count() > 0
    shoot(page, "costs", db_url)

    # Filter, then open a delivery and the rows it became.
    nav.get_by_role("link", name="Deliveries").click()
    shoot(page, "deliveries", db_url)
    page.get_by_label("hook").select_option("crypto")
    page.get_by_label("output type").fill("structured_csv")
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("table.listing tbody tr")
    assert rows.count() >= 1
    for n in range(rows.count()):
        expect(rows.nth(n).locator("td").nth(1)).to_have_text("crypto")
    page.locator(f'a[href="/console/deliveries/{seeded.csv_id}"]').click()
    expect(page.get_by_role("heading", level=1)).to_contain_text(seeded.csv_id)
    expect(page.locator("table.csv").first).to_contain_text("XRP")
    shoot(page, "delivery", db_url)
    page.get_by_role("link", name="results__crypto").first.click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("results__crypto")
    assert page.locator("table.result-rows tbody tr").count() >= 1
    shoot(page, "table", db_url)

    # A task and its timeline.
    page.goto(f"{server.url}/console/tasks?status=failed")
    page.get_by_role("link", name="gen-t0007").click()
    expect(page.locator("dl.facts")).to_contain_text("NAVIGATION_TIMEOUT")
    assert page.locator("ol.timeline li").count() == 1

    # A POST without its CSRF token is refused, with the session cookie it carries.
    refused = page.request.post(
        f"{server.url}/console/quarantine/reprocess",
        form={"delivery_id": seeded.quarantined_id},
    )
    assert refused.status == 403

    # Fix the schema, then reprocess the quarantined delivery from its group.
    nav.get_by_role("link", name="Quarantine").click()
    expect(page.locator("main")).to_contain_text("output does not match the hook's schema")
    shoot(page, "quarantine", db_url)
    register(db_url, tmp_path, "strict", ACCEPTING_SCHEMA)
    group = page.locator("section.group", has_text="strict")
    group.get_by_role("button", name="Reprocess", exact=True).click()
    outcome = page.get_by_role("status", name="Outcome")
    expect(outcome).to_contain_text("processed")
    assert re.search(r"processed\s*1", outcome.inner_text())
    with engine.connect() as conn:
        status = conn.scalar(select(Delivery.status).where(Delivery.id == seeded.quarantined_id))
    assert status == "processed"
    assert errors == []


def test_reading_needs_no_javascript(
    browser: Browser, server: ServerProcess, seeded: Seeded
) -> None:
    context = browser.new_context(
        java_script_enabled=False, viewport={"width": WIDTH, "height": 800}
    )
    page = context.new_page()
    page.goto(f"{server.url}/console/sign-in")
    page.get_by_label("Console token").fill(CONSOLE_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    for path, text in [
        ("/console/", "Latest deliveries"),
        ("/console/costs", "By day and hook"),
        (f"/console/deliveries/{seeded.binary_id}", "binary"),
        ("/console/tables/results__generated", "SKU-1"),
    ]:
        page.goto(f"{server.url}{path}")
        expect(page.locator("main")).to_contain_text(text)
    context.close()
