"""A token in the URL (or a header): absent from every table, log line and export."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, MetaData, insert, select
from starlette.testclient import TestClient

from receiver.auth import add_token
from receiver.db import utcnow
from receiver.export import export
from receiver.models import Hook
from receiver.redaction import MASK, redact_headers, redact_query
from tests.conftest import TOKEN, post

BARE = TOKEN.removeprefix("Bearer ")


def _never(raw: bytes) -> bool:
    return False


@pytest.mark.parametrize(
    ("query", "masked"),
    [
        pytest.param("token=abc&project=x", f"token={MASK}&project=x", id="by-name"),
        pytest.param("API_KEY=1&Signature=2&pwd=3", f"API_KEY={MASK}&Signature={MASK}&pwd={MASK}"),
        pytest.param("note=Bearer%20abc", f"note={MASK}", id="bearer-form"),
        pytest.param("a=1&a=2&b=%ff", "a=1&a=2&b=%ff", id="untouched-byte-for-byte"),
        pytest.param("x=y&&z", "x=y&&z", id="empty-pieces"),
    ],
)
def test_redact_query_by_name_and_form(query: str, masked: str) -> None:
    assert redact_query(query, _never) == masked


def test_redact_query_by_value_and_bare() -> None:
    def is_token(raw: bytes) -> bool:
        return raw == b"Bearer s3cr3t"

    assert redact_query("p=s3cr3t&s3cr3t&q=1", is_token) == f"p={MASK}&{MASK}&q=1"


@given(st.lists(st.tuples(st.sampled_from(["project", "team", "n", "day"]), st.text())))
def test_a_query_without_credentials_is_kept_as_is(pairs: list[tuple[str, str]]) -> None:
    from urllib.parse import urlencode

    query = urlencode(pairs)
    expected = redact_query(query, _never)
    assert all(MASK not in part or "bearer" in part.lower() for part in expected.split("&"))
    if not any(v.strip().lower().startswith(("bearer ", "basic ", "token ")) for _, v in pairs):
        assert expected == query


def test_headers_named_like_credentials_are_masked() -> None:
    headers = (("Content-Type", "application/json"), ("X-Api-Key", "k"), ("X-Note", "Bearer t"))
    assert redact_headers(headers) == (
        ("Content-Type", "application/json"),
        ("X-Api-Key", MASK),
        ("X-Note", MASK),
    )


def _everything_stored(engine: Engine) -> str:
    metadata = MetaData()
    metadata.reflect(engine)
    out = []
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(select(table)):
                out.append(repr(tuple(row)))
    return "\n".join(out)


def test_a_token_in_the_url_is_stored_nowhere(
    client: TestClient, engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with engine.begin() as conn:
        conn.execute(insert(Hook).values(name="leaky", created_at=utcnow()))
    hook_token = add_token(engine, "leaky")
    hook_bare = hook_token.removeprefix("Bearer ")
    body = json.dumps(
        {
            "type": "task_completed",
            "sessionId": "s",
            "taskId": "t-1",
            "data": {"message": "done"},
            "usage": {"cost": 0.5},
        }
    ).encode()
    caplog.set_level(logging.DEBUG)
    queries = [
        f"token={BARE}&project=alpha",
        f"project=beta&t={hook_bare}&apikey=zzz-also-secret",
        f"{BARE}&team=red",
    ]
    for i, query in enumerate(queries):
        post(client, "leaky", body.replace(b"t-1", b"t-%d" % i), query=query)
    stored = _everything_stored(engine)
    export(engine, str(tmp_path / "export"), lag=dt.timedelta(0))
    exported = b"".join(p.read_bytes() for p in (tmp_path / "export").rglob("*") if p.is_file())
    ours = [r for r in caplog.records if r.name.startswith(("receiver", "uvicorn"))]
    logged = "\n".join(r.getMessage() for r in ours)  # not the test client's own lines
    for secret in (BARE, hook_bare, "zzz-also-secret"):
        assert secret not in stored
        assert secret.encode() not in exported
        assert secret not in logged
    # The rest of the query string and labels are kept.
    assert "project=alpha" in stored
    assert "'team': 'red'" in stored or '"team": "red"' in stored
    assert MASK in stored
