"""Hook names: a documented pattern, 404 with a reason otherwise, and a limit on new hooks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select
from starlette.testclient import TestClient

from receiver.app import create_app
from receiver.cli import main
from receiver.hooknames import HOOK_NAME_PATTERN, valid_hook_name
from receiver.models import Hook
from receiver.settings import Settings
from tests.conftest import TOKEN

#: As a client sends them (``.`` and ``..`` in `test_dot_segments_over_a_real_socket`:
#: the test client resolves them).
HOSTILE = [
    "a b",
    "\N{PILE OF POO}",
    "x;drop table",
    "%ff",
    "%2e%2e",
    "-lead",
    "_lead",
    "a" * 65,
    "é",
    "a%00b",
    "a%09b",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_name_is_404_with_the_pattern(
    client: TestClient, engine: Engine, name: str
) -> None:
    answer = client.post(f"/hooks/{name}", content=b"{}", headers={"authorization": TOKEN})
    assert answer.status_code == 404
    assert HOOK_NAME_PATTERN in answer.json()["error"]
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Hook)) == 0


@pytest.mark.parametrize("name", ["a", "A.b-c_d", "x" * 64, "0", "v1.2"])
def test_a_good_name_is_created_on_first_use(client: TestClient, name: str) -> None:
    answer = client.post(f"/hooks/{name}", content=b"{}", headers={"authorization": TOKEN})
    assert answer.status_code == 200


@given(st.text(max_size=70))
def test_the_pattern_never_admits_dots_alone_or_path_characters(name: str) -> None:
    if valid_hook_name(name):
        assert name not in {".", ".."}
        assert not {"/", "%", " ", ";", "\\"} & set(name)
        assert name.isascii()
        assert 1 <= len(name) <= 64


def _metric(text: str, name: str) -> float:
    return float(next(x for x in text.splitlines() if x.startswith(name + " ")).split()[-1])


def test_the_hook_limit_stops_creation_on_first_use(settings: Settings, engine: Engine) -> None:
    limited = dataclasses.replace(settings, max_hooks=3)
    with TestClient(create_app(limited, engine=engine)) as client:
        codes = [
            client.post(f"/hooks/h{i}", content=b"{}", headers={"authorization": TOKEN})
            for i in range(5)
        ]
        assert [c.status_code for c in codes] == [200, 200, 200, 404, 404]
        assert "RECEIVER_MAX_HOOKS" in codes[3].json()["error"]
        # Existing hooks still receive.
        again = client.post("/hooks/h0", content=b"{}", headers={"authorization": TOKEN})
        assert again.status_code == 200
        scrape = client.get("/metrics").text
        assert _metric(scrape, "receiver_hooks_refused_total") == 2
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Hook)) == 3


def test_create_hooks_false_requires_hooks_add(
    settings: Settings, engine: Engine, db_url: str, tmp_path: Path
) -> None:
    closed = dataclasses.replace(settings, create_hooks=False)
    with TestClient(create_app(closed, engine=engine)) as client:
        refused = client.post("/hooks/new", content=b"{}", headers={"authorization": TOKEN})
        assert refused.status_code == 404
        assert "receiver hooks add" in refused.json()["error"]
        env = {"RECEIVER_DATABASE_URL": db_url, "RECEIVER_DATA_DIR": str(tmp_path)}
        added = CliRunner().invoke(main, ["hooks", "add", "new"], env=env)
        assert added.exit_code == 0, added.output
        client.app.state.authenticator._hooks.clear()  # type: ignore[attr-defined]
        ok = client.post("/hooks/new", content=b"{}", headers={"authorization": TOKEN})
        assert ok.status_code == 200
        bad = CliRunner().invoke(main, ["hooks", "add", ".."], env=env)
        assert bad.exit_code != 0
        assert HOOK_NAME_PATTERN in bad.output


def test_invalid_bytes_do_not_share_a_hook(client: TestClient) -> None:
    """`%ff` and `%fe` once both decoded to U+FFFD: one hook for both. Now neither is a hook."""
    raw = httpx.URL("http://testserver/hooks/%ff")
    answer = client.post(str(raw), content=b"{}", headers={"authorization": TOKEN})
    assert answer.status_code == 404


@pytest.mark.slow
def test_dot_segments_over_a_real_socket(db_url: str, tmp_path: Path) -> None:
    import socket

    from tests.live import live_server

    with live_server(db_url, tmp_path / "data") as server:
        for name in (".", "..", "%2e", "%2E%2e"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                s.sendall(
                    f"POST /hooks/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\n"
                    "Content-Length: 2\r\nConnection: close\r\n\r\n{}".encode()
                )
                answer = b""
                while chunk := s.recv(4096):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 404 "), (name, answer[:200])
            assert HOOK_NAME_PATTERN.encode() in answer.replace(b"\\\\", b"\\"), name
