"""Deep, valid JSON: parsed up to the limit, quarantined past it with the depth and the limit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from receiver.models import Delivery
from receiver.nesting import MAX_JSON_DEPTH, text_depth, value_depth
from tests.conftest import post


def nested(depth: int) -> bytes:
    return (
        b'{"a":' * (depth // 2)
        + b"[" * (depth - depth // 2)
        + b"1"
        + b"]" * (depth - depth // 2)
        + b"}" * (depth // 2)
    )


def _outcome(engine: Engine, delivery_id: object) -> tuple[str, str | None]:
    with engine.connect() as conn:
        row = conn.execute(
            select(Delivery.status, Delivery.reason).where(Delivery.id == delivery_id)
        ).one()
    return row.status, row.reason


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", None])
def test_5000_levels_are_quarantined_naming_depth_and_limit(
    client: TestClient, engine: Engine, content_type: str | None
) -> None:
    answer = post(client, "deep", nested(5000), content_type)
    status, reason = _outcome(engine, answer["delivery_id"])
    assert status == "quarantined"
    assert reason == f"JSON nested 5000 levels deep, past the limit of {MAX_JSON_DEPTH} levels"


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
def test_json_at_the_limit_is_processed(
    client: TestClient, engine: Engine, content_type: str
) -> None:
    answer = post(client, "deep", nested(MAX_JSON_DEPTH), content_type)
    assert _outcome(engine, answer["delivery_id"]) == ("processed", None)


def test_one_past_the_limit_parses_but_is_quarantined(client: TestClient, engine: Engine) -> None:
    answer = post(client, "deep", nested(MAX_JSON_DEPTH + 1))
    status, reason = _outcome(engine, answer["delivery_id"])
    assert status == "quarantined"
    assert reason is not None
    assert f"{MAX_JSON_DEPTH + 1} levels deep" in reason


_json = st.recursive(
    st.none() | st.integers() | st.text(alphabet='ab[]{}"\\,:'),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=20,
)


@given(_json)
def test_text_depth_equals_value_depth(value: object) -> None:
    import json

    assert text_depth(json.dumps(value)) == value_depth(value)  # type: ignore[arg-type]
