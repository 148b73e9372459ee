"""Tests for host.threads: interruptible thread calls, limits that count abandoned threads."""

from __future__ import annotations

import threading

import anyio
import pytest

from host.threads import ThreadLimiter, ThreadsExhausted, ThreadTally, run_sync_interruptible
from tests.support import wait_until

pytestmark = pytest.mark.anyio


async def _abandon_one(limiter: ThreadLimiter, gate: threading.Event, tally: ThreadTally) -> None:
    """Start a call blocked in C on ``gate`` and give up on it."""
    with anyio.move_on_after(0.05):
        await run_sync_interruptible(gate.wait, limiter=limiter, tally=tally)


async def test_waiter_fails_once_abandoned_threads_hold_every_slot() -> None:
    """A call queued for a slot gets ThreadsExhausted when the last free holder is abandoned."""
    limiter, tally = ThreadLimiter(2), ThreadTally()
    gate = threading.Event()
    try:
        await _abandon_one(limiter, gate, tally)
        assert (limiter.in_use, limiter.abandoned, tally.abandoned) == (1, 1, 1)
        outcome: list[BaseException] = []

        async def queued() -> None:
            try:
                await run_sync_interruptible(lambda: None, limiter=limiter)
            except ThreadsExhausted as exc:
                outcome.append(exc)

        holder = anyio.CancelScope()

        async def hold() -> None:  # the second slot: abandoned once a call waits for a slot
            with holder:
                await run_sync_interruptible(gate.wait, limiter=limiter, tally=tally)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await wait_until(lambda: limiter.in_use == 2, "both slots are taken")
            tg.start_soon(queued)
            await wait_until(lambda: limiter._waiters, "the third call waits for a slot")
            holder.cancel()
        assert len(outcome) == 1, "the queued call did not learn that no slot can free up"
        assert limiter.abandoned == 2
        with pytest.raises(ThreadsExhausted, match="all 2 worker threads"):
            await run_sync_interruptible(lambda: None, limiter=limiter)
    finally:
        gate.set()
    await wait_until(lambda: limiter.in_use == 0, "the abandoned threads ended")
    assert (limiter.abandoned, tally.abandoned) == (0, 0)
    assert await run_sync_interruptible(lambda: 42, limiter=limiter) == 42


def test_limiter_needs_a_slot() -> None:
    """A limiter of zero slots is refused with a message naming the size."""
    with pytest.raises(ValueError, match="at least 1 slot, got 0"):
        ThreadLimiter(0)
