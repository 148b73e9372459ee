"""Tests for the dispatcher's deadlines: a loop's timed calls share one ticker (host.dispatch)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
import structlog

from host import dispatch
from host.errors import PluginTimeout
from host.registry import Registry
from tests.support import wait_until

from .test_dispatch import Host, make_host

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


def ticker_of(host: Host) -> dispatch._Ticker:
    """The ticker of the running loop, as the dispatcher's last call cached it."""
    _thread, loop, ticker = host.dispatcher._loops.cached
    assert loop is asyncio.get_running_loop() and ticker is not None
    return ticker


def stopped(ticker: dispatch._Ticker) -> bool:
    """Whether the ticker holds no deadline and has no timer set."""
    return not ticker.buckets and ticker.timer is None


CLEANS_UP = (
    "import asyncio\n\nasync def main(ctx, args):\n"
    "    try:\n"
    "        await asyncio.sleep(30)\n"
    "    finally:\n"
    "        await asyncio.sleep(30)  # a slow clean-up, cancelled in its turn\n"
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
    ticker = ticker_of(host)
    await wait_until(lambda: stopped(ticker), "the ticker stopped once empty", timeout=10.0)
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


async def test_many_distinct_timeouts_share_one_timer(registry: Registry) -> None:
    """Calls with a hundred distinct timeouts each time out after their own timeout, never
    before it, with one timer for all of them; then the ticker stops."""
    host = make_host(registry)
    await host.load("sleep", SLEEP)
    loop = asyncio.get_running_loop()
    timeouts = [0.02 + i / 5_000 for i in range(100)]
    late: dict[float, float] = {}

    async def one(seconds: float) -> None:
        started = loop.time()
        try:
            await host.dispatcher.call("sleep", 30, timeout=seconds)
        except PluginTimeout as exc:
            late[exc.timeout] = loop.time() - started - seconds

    async with anyio.create_task_group() as tg:
        for seconds in reversed(timeouts):  # later buckets first: earlier ones re-arm it
            tg.start_soon(one, seconds)
    assert sorted(late) == timeouts
    assert min(late.values()) >= 0, "a deadline fired before its time"
    assert len(ticker_of(host).due) <= 2 * 100 + 64
    await wait_until(lambda: stopped(ticker_of(host)), "the ticker stopped once empty")


def check_invariant(ticker: dispatch._Ticker) -> None:
    """Assert _Ticker's invariant: no empty bucket but the open one, every bucket's tick on
    the heap (a bounded number of stale ones), and the timer set no later than the first."""
    assert all(bucket or bucket is ticker.open for bucket in ticker.buckets.values())
    assert set(ticker.buckets) <= set(ticker.due)
    assert len(ticker.due) <= 2 * len(ticker.buckets) + 65
    assert all(ticker.due[(i - 1) // 2] <= tick for i, tick in enumerate(ticker.due) if i)
    if ticker.buckets:
        assert ticker.timer is not None and ticker.armed <= min(ticker.buckets)


async def test_a_mixed_load_keeps_the_invariant_and_times_out_exactly_the_late(
    registry: Registry,
) -> None:
    """400 calls with random timeouts and durations, clearly apart: each times out exactly when
    it runs past its timeout, and the ticker's invariant holds throughout and at the end."""
    host = make_host(registry)
    await host.load("sleep", SLEEP)
    rng = random.Random(19)
    plans = []
    for _ in range(400):
        timeout = rng.choice([0.005, 0.01, 0.03, 0.05, 1.0]) + rng.random() / 100
        late = rng.random() < 0.4  # runs 20 ms past its timeout, or ends 0.2 s before it
        plans.append((timeout, timeout + 0.02 if late else max(0.0, timeout - 0.2), late))
    outcomes: list[bool] = [False] * len(plans)
    stop = anyio.Event()

    async def one(i: int, timeout: float, seconds: float) -> None:
        await anyio.sleep(rng.random() / 50)
        try:
            await host.dispatcher.call("sleep", seconds, timeout=timeout)
        except PluginTimeout:
            outcomes[i] = True

    async def watch() -> None:
        while not stop.is_set():
            _thread, _loop, ticker = host.dispatcher._loops.cached
            if ticker is not None:
                check_invariant(ticker)
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        async with anyio.create_task_group() as calls:
            for i, (timeout, seconds, _late) in enumerate(plans):
                calls.start_soon(one, i, timeout, seconds)
        stop.set()
    assert outcomes == [late for _timeout, _seconds, late in plans]
    check_invariant(ticker_of(host))


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_a_deadline_is_never_early_and_at_most_one_tick_late(use_uvloop: bool) -> None:
    """On asyncio and uvloop, the timer is set within one tick after the deadline, and the
    cancellation reaches the plugin no earlier than the deadline by the loop's clock."""
    if use_uvloop:
        pytest.importorskip("uvloop")

    async def main() -> list[tuple[float, float, float]]:
        async with Registry(grace_period=5.0) as registry:
            host = make_host(registry)
            await host.load("sleep", SLEEP)
            loop = asyncio.get_running_loop()
            seen: list[tuple[float, float, float]] = []
            for seconds in (0.0105, 0.0123, 0.02, 0.0301):
                started = loop.time()
                call = asyncio.ensure_future(host.dispatcher.call("sleep", 30, timeout=seconds))
                await anyio.lowlevel.checkpoint()  # the call starts and arms the timer
                ticker = ticker_of(host)
                assert ticker.loop is loop and ticker.timer is not None
                armed = ticker.timer.when()
                # (1e-9: the float error of adding seconds to the clock)
                late = armed - (loop.time() + seconds)
                assert armed > started + seconds and late <= 1 / dispatch.TICKS + 1e-9
                with pytest.raises(PluginTimeout):
                    await call
                seen.append((started, seconds, loop.time()))
            await wait_until(lambda: stopped(ticker_of(host)), "the ticker stopped")
            return seen

    if use_uvloop:
        import uvloop

        seen = uvloop.run(main())
    else:
        seen = asyncio.run(main(), debug=True)
    assert all(ended >= started + seconds for started, seconds, ended in seen)


async def test_the_ticker_stops_when_empty_and_rearms_on_the_next_call(registry: Registry) -> None:
    """Once its last deadline passed the ticker has no timer; the next timed call sets one,
    and a call that ends in time leaves no bucket behind once the next one opens."""
    host = make_host(registry)
    await host.load("sleep", SLEEP)
    with pytest.raises(PluginTimeout):
        await host.dispatcher.call("sleep", 30, timeout=0.01)
    ticker = ticker_of(host)
    await wait_until(lambda: stopped(ticker), "the ticker stopped")
    assert await host.dispatcher.call("sleep", 0, timeout=0.05) == 0
    assert ticker.timer is not None, "the next timed call set the timer again"
    assert list(ticker.buckets.values()) == [{}], "only the open bucket, empty"
    await wait_until(lambda: stopped(ticker), "the ticker stopped again")


async def test_an_emptied_closed_bucket_is_dropped_at_once(registry: Registry) -> None:
    """A call that outlives the opening of the next bucket takes its bucket with it when it
    ends in time, long before that bucket's deadline."""
    host = make_host(registry)
    await host.load("sleep", SLEEP)
    long_call = asyncio.ensure_future(host.dispatcher.call("sleep", 0.01, timeout=30))
    await anyio.lowlevel.checkpoint()
    ticker = ticker_of(host)
    (first,) = ticker.buckets
    await wait_until(lambda: int(ticker.time() * dispatch.TICKS) > first - 30_000, "a tick")
    assert await host.dispatcher.call("sleep", 0, timeout=30) == 0  # opens the next bucket
    assert await long_call == 0.01
    assert first not in ticker.buckets and len(ticker.buckets) == 1
    assert ticker.timer is not None  # still set for the open bucket, 30 s away


async def test_calls_on_a_second_loop_use_that_loops_ticker(registry: Registry) -> None:
    """A timed call on another loop (another thread) gets a ticker of that loop, and times
    out there, while a call of this loop keeps its own ticker and times out here."""
    host = make_host(registry)
    await host.load("sleep", SLEEP)
    here = asyncio.ensure_future(host.dispatcher.call("sleep", 30, timeout=0.2))
    await anyio.lowlevel.checkpoint()
    mine = ticker_of(host)

    async def elsewhere() -> tuple[Any, Any]:
        outcome: Any = None
        try:
            await host.dispatcher.call("sleep", 30, timeout=0.01)
        except PluginTimeout as exc:
            outcome = exc.timeout
        return outcome, host.dispatcher._loops.cached

    outcome, (_thread, loop, theirs) = await anyio.to_thread.run_sync(asyncio.run, elsewhere())
    assert outcome == 0.01
    assert theirs is not mine and theirs.loop is loop and loop is not mine.loop
    with pytest.raises(PluginTimeout):
        await here
    assert mine.loop is asyncio.get_running_loop()
    assert await host.dispatcher.call("sleep", 0, timeout=30) == 0
    assert ticker_of(host) is not theirs  # this loop's calls never use the other's


async def test_a_scope_cancelling_an_expired_call_still_unwinding_wins(registry: Registry) -> None:
    """The deadline passes, and an enclosing cancel scope cancels while the plugin is still
    cleaning up: the scope's cancellation propagates (no PluginTimeout, no call.timeout)."""
    host = make_host(registry)
    plugin = await host.load("cleans_up", CLEANS_UP)
    with structlog.testing.capture_logs() as logs, anyio.move_on_after(0.1) as scope:
        await host.dispatcher.call("cleans_up", None, timeout=0.01)
    assert scope.cancelled_caught
    assert [e for e in logs if e["event"] == "call.timeout"] == []
    assert plugin.in_flight == 0


async def test_an_infinite_timeout_is_no_deadline(registry: Registry) -> None:
    """timeout=inf (or NaN) never expires and leaves no bucket; an enclosing scope still
    cancels the call."""
    host = make_host(registry)
    await host.load("sleep", SLEEP)
    assert await host.dispatcher.call("sleep", 0.001, timeout=float("inf")) == 0.001
    assert await host.dispatcher.call("sleep", 0.001, timeout=float("nan")) == 0.001
    assert stopped(ticker_of(host))
    with anyio.move_on_after(0.02) as scope:
        await host.dispatcher.call("sleep", 30, timeout=float("inf"))
    assert scope.cancelled_caught
