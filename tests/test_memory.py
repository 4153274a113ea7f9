"""Memory bounded: the body budget is respected, every delivery answered, the bytes given back.

Un-timed: the RSS figures (peak and settled after a burst) are the bench's
(``python -m bench.memory``, bench/README).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from receiver.memory import SMALL_BODY, BodyBudget, OverBudget
from receiver.processing import BATCH_BYTES, _runs_within
from tests.conftest import TOKEN
from tests.live import live_server


def test_a_large_body_waits_for_room_then_goes_in() -> None:
    async def scenario() -> list[str]:
        budget = BodyBudget(3 * SMALL_BODY, wait_seconds=60)
        events: list[str] = []
        await budget.acquire(2 * SMALL_BODY)

        async def second() -> None:
            await budget.acquire(2 * SMALL_BODY)
            events.append("second in")

        task = asyncio.create_task(second())
        await asyncio.sleep(0.05)
        events.append("first out")
        budget.release(2 * SMALL_BODY)
        await task
        assert budget.held == 2 * SMALL_BODY
        assert budget.peak == 2 * SMALL_BODY
        assert budget.waited == 1
        return events

    assert asyncio.run(scenario()) == ["first out", "second in"]


def test_past_the_wait_a_large_body_is_refused_and_small_ones_never_wait() -> None:
    async def scenario() -> BodyBudget:
        budget = BodyBudget(2 * SMALL_BODY, wait_seconds=0.1)
        await budget.acquire(2 * SMALL_BODY)
        with pytest.raises(OverBudget):
            await budget.acquire(SMALL_BODY)
        await budget.acquire(SMALL_BODY - 1)  # small: counted, never held back
        return budget

    budget = asyncio.run(scenario())
    assert (budget.refused, budget.held) == (1, 3 * SMALL_BODY - 1)


def test_a_pipeline_batch_reads_at_most_batch_bytes_of_bodies() -> None:
    sizes = {"a": BATCH_BYTES // 2, "b": BATCH_BYTES // 2, "c": 1, "d": 2 * BATCH_BYTES, "e": 5}
    assert _runs_within(list(sizes), sizes) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert _runs_within(["c", "e"], sizes) == [["c", "e"]]


def _metric(url: str, name: str) -> float:
    scrape = httpx.get(f"{url}/metrics").text
    return float(next(x for x in scrape.splitlines() if x.startswith(name + " ")).split()[-1])


@pytest.mark.slow
def test_a_burst_of_large_bodies_stays_within_the_budget(db_url: str, tmp_path: Path) -> None:
    body_size = 1 << 20
    budget = 4 * body_size
    env = {"RECEIVER_MEMORY_BUDGET_BYTES": str(budget)}

    async def burst(url: str) -> list[int]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=30)) as http:

            async def one(i: int) -> int:
                body = b'{"n": %d, "x": "' % i + b"a" * (body_size - 32) + b'"}'
                answer = await http.post(
                    f"{url}/hooks/burst",
                    content=body,
                    headers={"Authorization": TOKEN, "Content-Type": "application/json"},
                )
                return answer.status_code

            return await asyncio.gather(*(one(i) for i in range(30)))

    with live_server(db_url, tmp_path / "data", max_body_bytes=2 * body_size, env=env) as server:
        assert asyncio.run(burst(server.url)) == [200] * 30
        assert _metric(server.url, "receiver_body_budget_peak_bytes") <= budget
        assert _metric(server.url, "receiver_body_budget_waits_total") > 0
        assert _metric(server.url, "receiver_body_budget_held_bytes") == 0
        assert _metric(server.url, "receiver_body_budget_refused_total") == 0
        for _ in range(600):  # every one processed
            if _metric(server.url, "receiver_deliveries_processing") == 0:
                break
            time.sleep(0.1)
        assert _metric(server.url, "receiver_deliveries_processing") == 0
        assert _metric(server.url, "receiver_deliveries_stored_total") == 30
