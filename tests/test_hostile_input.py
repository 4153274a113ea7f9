"""Whatever arrives: no 5xx, authorised bytes kept exactly, no secret in the logs."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from receiver.models import Delivery
from tests.conftest import TOKEN

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**60), max_value=10**60)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


def nested(depth: int) -> bytes:
    return b'{"a": ' * depth + b"1" + b"}" * depth


bodies = st.one_of(
    st.binary(max_size=3000),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(min_size=1, max_size=200).map(lambda b: b'{"x": "' + b"\xc3\x28" + b + b'"}'),
    st.integers(min_value=1, max_value=5000).map(lambda n: b'{"n": ' + b"9" * n + b"}"),
    st.integers(min_value=1, max_value=3000).map(nested),
    st.integers(min_value=1, max_value=3000).map(lambda n: b"[" * n),
    st.sampled_from([b"", b"null", b"\x00" * 10, b"\xef\xbb\xbf{}", b"a,b\n1,2\n"]),
)
#: Header values an HTTP/1.1 parser lets through (no control characters), non-ASCII as UTF-8:
#: Starlette's TestClient re-encodes header text as UTF-8, so other bytes would not arrive as sent.
#: Raw non-UTF-8 header bytes are sent to a live server in test_reliability.
header_value = st.text(
    st.characters(blacklist_categories=["Cc", "Cs"]) | st.just("\t"), max_size=200
).map(lambda t: t.strip().encode("utf-8")) | st.just(b"x" * 9000)
header_name = st.from_regex(rb"\A[A-Za-z][A-Za-z0-9-]{0,30}\Z")
content_types = (
    st.none()
    | st.sampled_from(
        [b"application/json", b"text/csv", b"text/plain; charset=latin-1", b"text/csv; x=\xc3\xa9"]
    )
    | header_value
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=bodies,
    content_type=content_types,
    extra=st.lists(st.tuples(header_name, header_value), max_size=4),
    authorizations=st.sampled_from([[TOKEN], [], [TOKEN, TOKEN], [TOKEN, "Bearer nope"]]),
    query=st.text(max_size=30),
)
def test_never_a_5xx_and_authorised_bodies_are_kept_exactly(
    client: TestClient,
    engine: Engine,
    body: bytes,
    content_type: bytes | None,
    extra: list[tuple[bytes, bytes]],
    authorizations: list[str],
    query: str,
) -> None:
    headers: list[tuple[bytes, bytes]] = [(b"authorization", a.encode()) for a in authorizations]
    headers += [(k, v) for k, v in extra if k.lower() not in {b"authorization", b"content-type"}]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    response = client.post("/hooks/hostile", params={"q": query}, content=body, headers=headers)
    assert response.status_code < 500, response.text
    if authorizations != [TOKEN]:
        assert response.status_code == 401
        return
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    client.app.state.pipeline.join()  # type: ignore[attr-defined]
    with engine.connect() as conn:
        row = conn.execute(
            select(Delivery.__table__).where(Delivery.id == answer["delivery_id"])
        ).one()
    assert row.body == body
    if content_type is None:
        assert row.content_type is None
    else:  # header bytes are kept as latin-1 text: one character per byte, nothing lost
        assert row.content_type.encode("latin-1") == content_type
    assert row.status in {"processed", "quarantined", "duplicate"}, row.reason
    assert "nope" not in row.headers
    assert TOKEN not in row.headers


SECRET = "Bearer sk_live_51HxSECRETvalue0123456789"


@pytest.mark.parametrize(
    "authorizations",
    [
        pytest.param([SECRET], id="wrong-token"),
        pytest.param([TOKEN, SECRET], id="repeated"),
        pytest.param([SECRET + "\xe9"], id="non-ascii"),
    ],
)
def test_a_refused_delivery_logs_no_token_and_no_body(
    client: TestClient, caplog: pytest.LogCaptureFixture, authorizations: list[str]
) -> None:
    body = b'{"card": "4242424242424242", "note": "BODY-SECRET"}'
    caplog.set_level(logging.DEBUG)
    headers = [(b"authorization", a.encode("latin-1")) for a in authorizations]
    response = client.post("/hooks/logged", content=body, headers=headers)
    assert response.status_code == 401
    ok = client.post("/hooks/logged", content=body, headers={"authorization": TOKEN})
    assert ok.status_code == 200
    client.app.state.pipeline.join()  # type: ignore[attr-defined]
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert caplog.records  # the refusal and the delivery were logged
    for secret in ("SECRETvalue", "test-token", "BODY-SECRET", "4242424242424242"):
        assert secret not in logged
