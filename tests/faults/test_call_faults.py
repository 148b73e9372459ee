"""Call-time faults: loop blocking is detected, cycles stop, hooks fail safely, leaks are reaped."""

from __future__ import annotations

import functools

import anyio
import pytest

from host import PluginHost, RequireDepthExceeded
from host.watchdog import LoopWatchdog
from tests.support import Db, drain, next_event, torn_pair, wait_until

pytestmark = pytest.mark.anyio

BLOCKER = """
import time

async def main(ctx, args):
    time.sleep(0.5)  # blocks the event loop: a bug the host must point at
    return 'done'
"""


@pytest.mark.allow_blocking
async def test_blocking_handler_is_reported_as_loop_blocked(db: Db) -> None:
    """An async handler that blocks the loop → loop.blocked naming the plugin and version."""
    async with PluginHost(db) as host, host.events() as events:
        await db.functions.insert_one({"_id": "blocker", "source": BLOCKER, "revision": 3})
        loaded = await next_event(events, "plugin.loaded")
        assert await host.call("blocker") == "done"
        blocked = await next_event(events, "loop.blocked", lambda e: e["plugin"] == "blocker")
        assert blocked["version"] == loaded["version"]
        assert blocked["blocked_ms"] > blocked["threshold_ms"]
        # The host carries on serving.
        await db.functions.insert_one({"_id": "fine", "source": torn_pair(1)})
        await next_event(events, "plugin.loaded")
        assert await host.call("fine") == (1, 1)


@pytest.mark.allow_blocking
async def test_blocking_handler_without_revision_is_named(db: Db) -> None:
    """loop.blocked names versions of records without a revision too (name:hash)."""
    async with PluginHost(db) as host, host.events() as events:
        await db.functions.insert_one({"_id": "b2", "source": BLOCKER})
        loaded = await next_event(events, "plugin.loaded")
        await host.call("b2")
        blocked = await next_event(events, "loop.blocked", lambda e: e["plugin"] == "b2")
        assert blocked["version"] == loaded["version"]


async def test_watchdog_can_be_disabled(db: Db) -> None:
    """loop_block_threshold=None runs no watchdog; the default runs one."""
    async with PluginHost(db, loop_block_threshold=None) as host:
        assert host.watchdog is None
    async with PluginHost(db) as host:
        assert isinstance(host.watchdog, LoopWatchdog)
        assert host.watchdog.threshold == 0.1


async def test_require_cycle_is_stopped(db: Db) -> None:
    """a → b → a … raises RequireDepthExceeded to the caller; the host keeps serving."""
    a = "async def main(ctx, args):\n    return await ctx.require('b')(args)\n"
    b = "async def main(ctx, args):\n    return await ctx.call('a', args)\n"
    await db.functions.insert_many(
        [
            {"_id": "a", "source": a},
            {"_id": "b", "source": b},
            {"_id": "ok", "source": torn_pair(1)},
        ]
    )
    async with PluginHost(db, require_depth=8) as host:
        with pytest.raises(RequireDepthExceeded) as info:
            await host.call("a")
        assert "a" in str(info.value)
        assert await host.call("ok") == (1, 1)
        assert host.current("a") is not None
        assert all(p.in_flight == 0 for _, p in host._registry.items())


SETUP_FAILS = """
async def setup(ctx):
    raise RuntimeError('no connection to the thing')

async def teardown(ctx):
    ctx.torn.append('v2')

async def main(ctx, args):
    return 'v2'
"""


async def test_setup_raising_keeps_old_version(db: Db) -> None:
    """setup raises → reload_failed stage setup; the new version never goes live nor tears down."""
    torn: list[str] = []
    v1 = (
        "async def teardown(ctx):\n    ctx.torn.append('v1')\n"
        "async def main(ctx, args):\n    return 'v1'\n"
    )
    async with PluginHost(db, context={"torn": torn}) as host, host.events() as events:
        await db.functions.insert_one({"_id": "s", "source": v1})
        loaded = await next_event(events, "plugin.loaded")
        await db.functions.update_one({"_id": "s"}, {"$set": {"source": SETUP_FAILS}})
        failed = await next_event(events, "plugin.reload_failed")
        assert failed["stage"] == "setup"
        assert "no connection to the thing" in failed["error"]
        assert failed["serving"] == loaded["version"]
        assert await host.call("s") == "v1"
        assert torn == []
    assert torn == ["v1"]


async def test_teardown_raising_still_retires(db: Db) -> None:
    """teardown raises → plugin.teardown_failed, then plugin.retired; the new version serves."""
    bad = (
        "async def teardown(ctx):\n    raise ValueError('cannot close')\n"
        "async def main(ctx, args):\n    return 1\n"
    )
    async with PluginHost(db) as host, host.events() as events:
        await db.functions.insert_one({"_id": "t", "source": bad})
        loaded = await next_event(events, "plugin.loaded")
        old = host.current("t")
        assert old is not None
        await db.functions.update_one({"_id": "t"}, {"$set": {"source": torn_pair(2)}})
        failed = await next_event(events, "plugin.teardown_failed")
        retired = await next_event(events, "plugin.retired")
    assert failed["version"] == retired["version"] == loaded["version"]
    assert failed["error_type"] == "ValueError"
    assert old.released
    del old


LEAKY = """
import asyncio

async def _forever(ctx, tag):
    ctx.live.add(tag)
    try:
        while True:
            await asyncio.sleep(0.01)
    finally:
        ctx.live.discard(tag)

async def setup(ctx):
    asyncio.create_task(_forever(ctx, 'setup:{n}'))  # never awaited, never cancelled

async def main(ctx, args):
    asyncio.get_running_loop().create_task(_forever(ctx, 'main:{n}'))
    return {n}
"""


async def test_leaked_tasks_are_cancelled_when_the_version_retires(db: Db) -> None:
    """Tasks a version leaks (setup and main) die with it: after 5 reloads one loop is alive."""
    live: set[str] = set()
    host = PluginHost(db, context={"live": live}, grace_period=5)
    async with host, host.events() as events:
        await db.functions.insert_one({"_id": "leak", "source": LEAKY.format(n=0)})
        await next_event(events, "plugin.loaded")
        for n in range(1, 6):
            assert await host.call("leak") == n - 1
            await wait_until(functools.partial(set.__contains__, live, f"main:{n - 1}"), "leaked")
            await db.functions.update_one({"_id": "leak"}, {"$set": {"source": LEAKY.format(n=n)}})
            await next_event(events, "plugin.retired")
        await wait_until(lambda: "setup:5" in live, "the newest setup task runs")
        assert live == {"setup:5"}, "a retired version's task is still alive"
        assert [t for t in live if t.startswith("setup:")] == ["setup:5"]
        await drain(events, quiet=0.05)
    assert live == set(), "the host left a plugin task running after exit"


async def test_failed_call_does_not_leak_in_flight(db: Db) -> None:
    """A call that raises or is cancelled leaves in_flight at 0, so its version can retire."""
    src = (
        "import asyncio\nasync def main(ctx, args):\n"
        "    if args == 'raise':\n        raise KeyError(args)\n"
        "    await asyncio.sleep(30)\n"
    )
    async with PluginHost(db) as host:
        await db.functions.insert_one({"_id": "f", "source": src})
        await wait_until(lambda: "f" in host._registry, "loaded")
        plugin = host.current("f")
        assert plugin is not None
        with pytest.raises(Exception, match="KeyError"):
            await host.call("f", "raise")
        with anyio.move_on_after(0.05):
            await host.call("f", "sleep")
        assert plugin.in_flight == 0
