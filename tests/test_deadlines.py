"""Shared-clock timeouts behave like asyncio.timeout, to within their resolution."""

from __future__ import annotations

import asyncio
import time

import pytest

from receiver.deadlines import Deadlines

pytestmark = pytest.mark.pure


def test_an_expired_block_raises_timeout_error_within_the_resolution() -> None:
    deadlines = Deadlines(resolution=0.05)

    async def main() -> float:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with deadlines.timeout(0.2):
                await asyncio.sleep(10)
        return time.monotonic() - started

    waited = asyncio.run(main())
    # Not before its time; and it was the timeout that ended the 10 s sleep (no upper bound
    # closer than that: a loaded machine may schedule late, and that is not the code's fault).
    assert 0.2 <= waited < 10


def test_blocks_that_finish_in_time_are_untouched_and_the_clock_stops() -> None:
    deadlines = Deadlines(resolution=0.02)

    async def main() -> int:
        done = 0
        for _ in range(50):
            async with deadlines.timeout(5):
                await asyncio.sleep(0)
                done += 1
        # A tick drops the finished entries, then stops ticking: wait for it (a loaded
        # machine may run the tick late), but not for ever.
        for _ in range(500):
            if deadlines.pending() == 0 and not deadlines._ticking:
                break
            await asyncio.sleep(0.01)
        assert deadlines.pending() == 0
        assert not deadlines._ticking
        return done

    assert asyncio.run(main()) == 50


def test_lengths_expire_independently() -> None:
    """A long timeout begun first does not hold back a short one begun after it."""
    deadlines = Deadlines(resolution=0.02)

    async def guarded(seconds: float, hold: float) -> str:
        try:
            async with deadlines.timeout(seconds):
                await asyncio.sleep(hold)
        except TimeoutError:
            return f"timeout {seconds}"
        return f"done {seconds}"

    async def main() -> list[str]:
        return list(await asyncio.gather(guarded(5.0, 0.3), guarded(0.1, 5.0), guarded(0.5, 0.05)))

    # "timeout 0.1" ended a 5 s hold, while "done 5.0" outlived it: each expired on its own.
    assert asyncio.run(main()) == ["done 5.0", "timeout 0.1", "done 0.5"]


def test_someone_elses_cancellation_stays_a_cancellation() -> None:
    deadlines = Deadlines(resolution=0.02)

    async def main() -> None:
        async def guarded() -> None:
            async with deadlines.timeout(5):
                await asyncio.sleep(10)

        task = asyncio.create_task(guarded())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_a_new_event_loop_gets_a_working_clock() -> None:
    """An app served again (a restarted lifespan, tests) still times out."""
    deadlines = Deadlines(resolution=0.02)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            async with deadlines.timeout(0.05):
                await asyncio.sleep(1)

    asyncio.run(main())
    asyncio.run(main())
