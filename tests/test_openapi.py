"""`GET /openapi.json` describes the HTTP interface, and a schemathesis run holds the server to it.

The run is against a live ``receiver serve`` (real HTTP, real database) on
SQLite and PostgreSQL: every generated request must get a documented status,
content type and body, never a 5xx, and leaving out the token must give 401.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.case import Case
from schemathesis.schemas import BaseSchema

from tests.conftest import TOKEN, _pg_url, drop_pg_database, fresh_pg_database
from tests.live import ServerProcess, live_server


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("openapi")
    if request.param == "sqlite":
        with live_server(f"sqlite:///{folder / 'r.db'}", folder / "data") as live:
            yield live
        return
    name = fresh_pg_database(request.getfixturevalue("pg_template"))
    try:
        with live_server(_pg_url(name), folder / "data") as live:
            yield live
    finally:
        drop_pg_database(name)


@pytest.fixture(scope="module")
def api(server: ServerProcess) -> BaseSchema:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_document_describes_every_route(server: ServerProcess) -> None:
    document = httpx.get(f"{server.url}/openapi.json").json()
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {
        "/hooks/{name}",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    }
    receive = document["paths"]["/hooks/{name}"]["post"]
    assert set(receive["responses"]) >= {"200", "401", "413"}
    assert "3" not in {code[0] for code in receive["responses"]}  # never a redirect


# schemathesis's own pytest plugin does not run under pytest 9 (it reaches for
# ``Function._nodeid``), so the run drives each operation's Hypothesis strategy directly.
@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("POST", "/hooks/{name}", id="receive"),
        pytest.param("GET", "/healthz", id="healthz"),
        pytest.param("GET", "/readyz", id="readyz"),
        pytest.param("GET", "/metrics", id="metrics"),
        pytest.param("GET", "/openapi.json", id="openapi"),
    ],
)
def test_server_conforms_to_its_document(api: BaseSchema, method: str, path: str) -> None:
    operation = api[path][method]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=40 if method == "POST" else 5,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def conforms(case: Case[Any]) -> None:
        case.call_and_validate(headers={"Authorization": TOKEN}, timeout=30)

    conforms()
