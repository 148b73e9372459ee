"""Tests for the dispatcher's shared deadlines: calls with one timeout share one loop timer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from host import dispatch
from host.errors import PluginTimeout
from host.registry import Registry
from tests.support import wait_until

from .test_dispatch import make_host

pytestmark = pytest.mark.anyio

SLEEP = (
    "import asyncio\n\nasync def main(ctx, seconds):\n"
    "    await asyncio.sleep(seconds)\n    return seconds\n"
)
CALLS_INNER = (
    "async def main(ctx, args):\n"
    "    try:\n"
    "        return await ctx.call('sleep', args['inner'], timeout=args['inner_timeout'])\n"
    "    except Exception as exc:\n"
    "        return type(exc).__name__\n"
)
SWALLOWS = (
    "import asyncio\n\nasync def main(ctx, args):\n"
    "    try:\n"
    "        await asyncio.sleep(30)\n"
    "    except asyncio.CancelledError:\n"
    "        return 'swallowed'\n"
)


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    """A running registry."""
    async with Registry(grace_period=5.0) as registry:
        yield registry


async def test_under_load_exactly_the_late_calls_time_out(registry: Registry) -> None:
    """300 concurrent calls sharing one timeout: the ones past it get PluginTimeout, the others
    their result, and the shared queue is dropped once its timer finds it empty."""
    # 2 s against sleeps of at most 6 ms: a margin that survives a loaded CI machine (the
    # 300 calls start over many loop turns there).
    host = make_host(registry, default_timeout=2.0)
    await host.load("sleep", SLEEP)
    outcomes: dict[int, Any] = {}

    async def one(i: int) -> None:
        seconds = 30.0 if i % 3 == 0 else 0.001 * (i % 7)
        try:
            outcomes[i] = await host.dispatcher.call("sleep", seconds)
        except PluginTimeout as exc:
            outcomes[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(300):
            tg.start_soon(one, i)
    late = sorted(i for i, v in outcomes.items() if isinstance(v, PluginTimeout))
    assert late == [i for i in range(300) if i % 3 == 0]
    assert all(outcomes[i] == 0.001 * (i % 7) for i in range(300) if i % 3)
    assert all(v.timeout == 2.0 for v in outcomes.values() if isinstance(v, PluginTimeout))
    await wait_until(lambda: host.dispatcher._deadlines == {}, "the empty queue was dropped")
    assert registry.get("sleep").in_flight == 0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("inner", "inner_timeout", "outer_timeout", "expected"),
    [
        (30.0, 0.05, 30.0, "PluginTimeout"),  # the inner deadline passes: the inner call's
        (0.0, 30.0, 0.05, 0.0),  # neither passes
    ],
)
async def test_nested_deadlines_are_each_their_own(
    registry: Registry, inner: float, inner_timeout: float, outer_timeout: float, expected: Any
) -> None:
    """A nested call's deadline ends the nested call only (the caller sees its PluginTimeout),
    in the same task as the outer call's deadline."""
    host = make_host(registry)
    await host.load("sleep", SLEEP)
    await host.load("outer", CALLS_INNER)
    args = {"inner": inner, "inner_timeout": inner_timeout}
    assert await host.dispatcher.call("outer", args, timeout=outer_timeout) == expected


async def test_outer_deadline_ends_the_nested_call_as_the_outer_timeout(registry: Registry) -> None:
    """When the outer call's deadline passes first, the outer call raises PluginTimeout (its own
    timeout), not the nested call."""
    host = make_host(registry)
    await host.load("sleep", SLEEP)
    await host.load(
        "outer", "async def main(ctx, args):\n    return await ctx.call('sleep', 30, timeout=20)\n"
    )
    with pytest.raises(PluginTimeout) as info:
        await host.dispatcher.call("outer", None, timeout=0.05)
    assert (info.value.name, info.value.timeout) == ("outer", 0.05)


async def test_a_swallowed_expiry_leaves_the_task_uncancelled(registry: Registry) -> None:
    """A plugin that catches the cancellation and returns: its result is the call's, and the
    calling task is not left with a cancellation pending."""
    host = make_host(registry)
    await host.load("swallows", SWALLOWS)
    assert await host.dispatcher.call("swallows", None, timeout=0.05) == "swallowed"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await anyio.lowlevel.checkpoint()  # would raise CancelledError if one were left


async def test_many_distinct_timeouts_fall_back_to_a_timer_each(registry: Registry) -> None:
    """More distinct timeouts than there are shared queues: every call still times out, and the
    number of queues stays bounded."""
    host = make_host(registry)
    await host.load("sleep", SLEEP)
    count = dispatch._MAX_DEADLINE_QUEUES + 20
    timeouts = [0.05 + i / 10_000 for i in range(count)]
    timed_out: list[float] = []

    async def one(seconds: float) -> None:
        try:
            await host.dispatcher.call("sleep", 30, timeout=seconds)
        except PluginTimeout as exc:
            timed_out.append(exc.timeout)
            assert len(host.dispatcher._deadlines) <= dispatch._MAX_DEADLINE_QUEUES

    async with anyio.create_task_group() as tg:
        for seconds in timeouts:
            tg.start_soon(one, seconds)
    assert sorted(timed_out) == timeouts
    await wait_until(lambda: host.dispatcher._deadlines == {}, "the empty queues were dropped")
