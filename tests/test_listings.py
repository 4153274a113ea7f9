"""The pure parts of `receiver.listings` and of how the CLI shortens ids: UUIDv7 time bounds
and unique prefixes, over open-ended inputs."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver.inspection import _short_ids
from receiver.ledger import new_delivery_id
from receiver.listings import ID_SLACK, id_floor, path_text, source_note

pytestmark = pytest.mark.pure

# Hypothesis takes naive bounds and adds the zone itself.
_times = st.datetimes(
    min_value=dt.datetime(2000, 1, 1),  # noqa: DTZ001
    max_value=dt.datetime(2999, 1, 1),  # noqa: DTZ001
    timezones=st.just(dt.UTC),
)


@given(_times)
def test_an_id_floor_bounds_the_ids_of_its_time(when: dt.datetime) -> None:
    floor = id_floor(when)
    assert new_delivery_id(when) >= floor
    assert new_delivery_id(when + dt.timedelta(milliseconds=1)) > floor
    assert new_delivery_id(when - dt.timedelta(milliseconds=2)) < floor
    # The bound the filters use is a second early: an id made just before its
    # received_at was read is never left out.
    assert new_delivery_id(when - dt.timedelta(milliseconds=1)) >= id_floor(when - ID_SLACK)


@given(st.lists(_times, min_size=1, max_size=30))
def test_short_ids_are_unique_prefixes(times: list[dt.datetime]) -> None:
    ids = [new_delivery_id(t) for t in times]
    short = _short_ids(ids)
    assert set(short) == set(ids)
    for full, prefix in short.items():
        assert full.startswith(prefix)
        assert len(prefix) >= 13
        assert [i for i in ids if i.startswith(prefix)] == [full] * ids.count(full)


def test_special_source_keys_are_explained() -> None:
    assert source_note(["#row-note", "_flag"]).startswith("row note")
    assert "float" in source_note([["price"], "#variant:float"])
    assert source_note(["price"]) == ""
    assert path_text("[null, []]") == "the output itself"
    assert path_text('[[], ["products"]]') == "each item of products"
