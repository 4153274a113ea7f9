"""All 318 JSONTestSuite files as bodies: never a 5xx, every body stored byte-exact.

``n_`` files must be refused by the parser (quarantined as invalid JSON), ``y_``
files must parse; ``i_`` files may go either way but must not be lost.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from receiver.classify import parse_json
from receiver.models import Delivery
from receiver.nesting import TooDeep
from tests.conftest import TOKEN
from tests.corpora import JSON_TEST_SUITE

FILES = sorted(JSON_TEST_SUITE.glob("*.json"))


def test_corpus_present() -> None:
    assert len(FILES) == 318


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in FILES if p.name[0] in "yn"])
def test_parser_verdicts(path: object) -> None:
    from pathlib import Path

    assert isinstance(path, Path)
    data = path.read_bytes()
    if path.name.startswith("y_"):
        parse_json(data.decode("utf-8"))
    else:
        with pytest.raises((ValueError, TooDeep)):  # past the depth limit: quarantined too
            parse_json(data.decode("utf-8"))


def test_every_body_is_kept(client: TestClient, engine: Engine) -> None:
    ids: dict[str, str] = {}
    for path in FILES:
        response = client.post(
            f"/hooks/jsonsuite?file={path.name}",
            content=path.read_bytes(),
            headers={"authorization": TOKEN, "content-type": "application/json"},
        )
        assert response.status_code == 200, (path.name, response.text)
        ids[path.name] = response.json()["delivery_id"]
    client.app.state.pipeline.join()  # type: ignore[attr-defined]
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(Delivery.__table__))}
    for path in FILES:
        row = rows[ids[path.name]]
        assert row.body == path.read_bytes(), path.name
        if path.name.startswith("n_"):
            assert row.status == "quarantined", path.name
        elif path.name.startswith("y_"):
            assert row.status == "processed", (path.name, row.reason)
        else:
            assert row.status in {"processed", "quarantined", "duplicate"}, path.name
            if row.status == "quarantined":  # only for a reason that names the problem
                assert row.reason.startswith(("body is not UTF-8", "JSON holds a lone")), row.reason
