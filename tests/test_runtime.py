"""PluginHost end to end: the embedded server, the real driver, change streams and swaps."""

from __future__ import annotations

import gc
import weakref
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from host import HostEvent, PluginFailed, PluginHost, PluginNotFound
from tests.support import Db, events_for, next_event, wait_until

pytestmark = pytest.mark.anyio

GREET = """
async def main(ctx, args):
    same = await ctx.db.users.count_documents({"lastName": args["lastName"]})
    return f"Hello there, {args['firstName']}!!! There are {same} with the same last name as you!"
"""


def version_source(n: int, *, sync: bool = False) -> str:
    """A plugin whose top level sets two globals to ``n``; main returns both."""
    head = "def" if sync else "async def"
    return f"A = {n}\nB = {n}\n{head} main(ctx, args):\n    return (A, B)\n"


@pytest.fixture
async def host(db: Db) -> AsyncIterator[PluginHost]:
    """A PluginHost over the test database's ``functions`` collection."""
    async with PluginHost(db, context={"foo": "bar"}, grace_period=5.0) as plugin_host:
        yield plugin_host


async def test_blog_post_greet(db: Db) -> None:
    """The hot-require blog post's example, ported: greet counts users through ctx.db."""
    await db.users.insert_many([{"firstName": f"u{i}", "lastName": "Smith"} for i in range(13)])
    await db.users.insert_one({"firstName": "x", "lastName": "Jones"})
    created = __import__("datetime").datetime(2020, 1, 1)
    await db.functions.insert_one({"_id": "greet", "fn": GREET, "createdAt": created})
    async with PluginHost(db) as plugins:
        result = await plugins.call("greet", {"firstName": "Blain", "lastName": "Smith"})
    assert result == "Hello there, Blain!!! There are 13 with the same last name as you!"


async def test_events_accept_filters_in_the_emitters_step(db: Db, host: PluginHost) -> None:
    """``events(accept=)`` sees every event as it is emitted; only accepted ones are read."""
    seen: list[str] = []

    def accept(event: HostEvent) -> bool:
        seen.append(event.event)
        return event.event == "plugin.reloaded"

    async with host.events(accept=accept) as events:
        await db.functions.insert_one({"_id": "acc", "source": version_source(1)})
        await wait_until(lambda: "plugin.loaded" in seen, "plugin.loaded is emitted")
        assert events.receive_nowait() is None, "a refused event was delivered"
        await db.functions.update_one({"_id": "acc"}, {"$set": {"source": version_source(2)}})
        reloaded = await next_event(events, "plugin.reloaded")
    assert reloaded["plugin"] == "acc"
    assert seen[:2] == ["plugin.loaded", "plugin.reloaded"]


async def test_update_is_served_without_restart(db: Db, host: PluginHost) -> None:
    """An update to the record is live on the next call, reported by plugin.reloaded."""
    async with host.events() as events:
        await db.functions.insert_one({"_id": "v", "source": version_source(1)})
        await next_event(events, "plugin.loaded")
        assert await host.call("v") == (1, 1)
        await db.functions.update_one({"_id": "v"}, {"$set": {"source": version_source(2)}})
        reloaded = await next_event(events, "plugin.reloaded")
    assert await host.call("v") == (2, 2)
    assert reloaded["old_version"] != reloaded["new_version"]
    assert reloaded["change_to_live_ms"] >= 0
    assert reloaded["compile_ms"] >= 0


@pytest.mark.parametrize(
    ("source", "stage"),
    [
        ("def main(ctx, args:\n    return 1\n", "syntax"),
        ("import no_such_module_xyz\nasync def main(ctx, args):\n    return 1\n", "import"),
        ("async def handler(ctx, args):\n    return 1\n", "entrypoint"),
        ("raise RuntimeError('boom at import')\n", "import"),
    ],
)
async def test_broken_update_keeps_old_version(
    db: Db, host: PluginHost, source: str, stage: str
) -> None:
    """A broken new version fails to load; the old version keeps serving and says so."""
    async with host.events() as events:
        await db.functions.insert_one({"_id": "p", "source": version_source(1)})
        loaded = await next_event(events, "plugin.loaded")
        await db.functions.update_one({"_id": "p"}, {"$set": {"source": source}})
        failed = await next_event(events, "plugin.reload_failed")
    assert failed["stage"] == stage
    assert failed["serving"] == loaded["version"]
    assert await host.call("p") == (1, 1)
    info = host.plugin("p")
    assert info is not None
    assert info.status == "degraded"
    assert info.last_error


async def test_invalid_record_is_rejected_naming_the_field(db: Db, host: PluginHost) -> None:
    """A record with a bad field is rejected (plugin.rejected names it); the old version serves."""
    async with host.events() as events:
        await db.functions.insert_one({"_id": "r", "source": version_source(1)})
        await next_event(events, "plugin.loaded")
        await db.functions.update_one({"_id": "r"}, {"$set": {"timeout": "soon"}})
        rejected = await next_event(events, "plugin.rejected")
    assert rejected["field"] == "timeout"
    assert "r" in rejected["error"]
    assert await host.call("r") == (1, 1)


async def test_delete_and_disable_unload(db: Db, host: PluginHost) -> None:
    """Deleting a record, or setting enabled: false, makes calls raise PluginNotFound."""
    async with host.events() as events:
        await db.functions.insert_many(
            [
                {"_id": "gone", "source": version_source(1)},
                {"_id": "off", "source": version_source(2)},
            ]
        )
        await events_for(events, "plugin.loaded", {"gone", "off"})
        await db.functions.delete_one({"_id": "gone"})
        await db.functions.update_one({"_id": "off"}, {"$set": {"enabled": False}})
        await events_for(events, "plugin.unloaded", {"gone", "off"})
    with pytest.raises(PluginNotFound):
        await host.call("gone")
    with pytest.raises(PluginNotFound):
        await host.call("off")
    info = host.plugin("off")
    assert info is not None
    assert info.status == "disabled"
    async with host.events() as events:
        await db.functions.update_one({"_id": "off"}, {"$set": {"enabled": True}})
        await next_event(events, "plugin.loaded", lambda e: e["plugin"] == "off")
    assert await host.call("off") == (2, 2)


async def test_in_flight_call_finishes_on_old_version(db: Db, host: PluginHost) -> None:
    """A call in flight during a swap finishes on its version; new calls get the new one."""
    gate_source = (
        "import asyncio\nGATE = asyncio.Event()\n"
        "async def main(ctx, args):\n"
        "    if args == 'release':\n        GATE.set()\n        return 'released'\n"
        "    await GATE.wait()\n    return 'old'\n"
    )
    async with host.events() as events:
        await db.functions.insert_one({"_id": "slow", "source": gate_source})
        await next_event(events, "plugin.loaded")
        old_plugin = host.current("slow")
        assert old_plugin is not None
        results: list[Any] = []
        async with anyio.create_task_group() as tg:

            async def slow_call() -> None:
                results.append(await host.call("slow", "wait"))

            tg.start_soon(slow_call)
            await wait_until(lambda: old_plugin.in_flight == 1, "the slow call is in flight")
            new_source = "async def main(ctx, args):\n    return 'new'\n"
            await db.functions.update_one({"_id": "slow"}, {"$set": {"source": new_source}})
            await next_event(events, "plugin.reloaded")
            assert await host.call("slow", "x") == "new"
            assert old_plugin.in_flight == 1
            # release the old version's gate from inside the old module
            old_plugin.module.GATE.set()
        assert results == ["old"]
        await next_event(events, "plugin.retired", timeout=10)


async def test_concurrent_callers_during_swaps_never_fail(db: Db, host: PluginHost) -> None:
    """50 callers during 40 swaps: zero failed calls, each result from one whole version."""
    async with host.events() as events:
        await db.functions.insert_one({"_id": "swap", "source": version_source(0)})
        await next_event(events, "plugin.loaded")
    results: list[tuple[int, int]] = []
    served: set[int] = set()
    failures: list[BaseException] = []
    done = anyio.Event()

    async def caller() -> None:
        while not done.is_set():
            try:
                result = await host.call("swap")
                results.append(result)
                served.add(result[0])
            except Exception as exc:
                failures.append(exc)
            await anyio.lowlevel.checkpoint()

    async with host.events() as events, anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(caller)
        for n in range(1, 41):
            sync = n % 2 == 0
            await db.functions.update_one(
                {"_id": "swap"}, {"$set": {"source": version_source(n, sync=sync)}}
            )
            await next_event(events, "plugin.reloaded", lambda e: e["plugin"] == "swap")
        # The callers get turns after the last swap before they stop (the event can come
        # before any of them ran again): the newest version must serve them.
        await wait_until(lambda: 40 in served, "a call served v40")
        done.set()
    assert failures == []
    assert len(results) > 40
    assert all(a == b for a, b in results), "a call saw a half-built version"
    assert {a for a, _ in results} >= {0, 40}


async def test_require_is_late_bound(db: Db, host: PluginHost) -> None:
    """A require() handle always calls the version current at call time."""
    async with host.events() as events:
        await db.functions.insert_one({"_id": "dep", "source": version_source(1)})
        caller = (
            "async def main(ctx, args):\n    dep = ctx.require('dep')\n    return await dep(None)\n"
        )
        await db.functions.insert_one({"_id": "user", "source": caller})
        await events_for(events, "plugin.loaded", {"dep", "user"})
        handle = host.require("dep")
        assert await handle() == (1, 1)
        assert await host.call("user") == (1, 1)
        await db.functions.update_one({"_id": "dep"}, {"$set": {"source": version_source(2)}})
        await next_event(events, "plugin.reloaded")
    assert await handle() == (2, 2)
    assert await host.call("user") == (2, 2)


async def test_context_globals_and_failures(db: Db, host: PluginHost) -> None:
    """ctx carries the host's globals; a plugin exception becomes PluginFailed with its lines."""
    source = (
        "async def main(ctx, args):\n"
        "    if args == 'fail':\n"
        "        raise ValueError('bad input: ' + ctx.foo)\n"
        "    return ctx.foo\n"
    )
    async with host.events() as events:
        await db.functions.insert_one({"_id": "ctx", "source": source})
        await next_event(events, "plugin.loaded")
    assert await host.call("ctx") == "bar"
    with pytest.raises(PluginFailed) as info:
        await host.call("ctx", "fail")
    assert info.value.error_type == "ValueError"
    assert "raise ValueError('bad input: ' + ctx.foo)" in info.value.traceback
    assert await host.call("ctx") == "bar"


async def test_setup_and_teardown_once_per_version_and_collected(db: Db) -> None:
    """setup and teardown run exactly once per version; retired modules are collected."""
    await db.create_collection("log")
    source = (
        "N = {n}\n"
        "async def setup(ctx):\n"
        "    await ctx.db.log.insert_one({{'hook': 'setup', 'n': N}})\n"
        "    return N\n"
        "async def teardown(ctx):\n"
        "    await ctx.db.log.insert_one({{'hook': 'teardown', 'n': N}})\n"
        "async def main(ctx, args):\n"
        "    return ctx.state\n"
    )
    refs: list[weakref.ref[Any]] = []
    async with PluginHost(db, grace_period=5.0) as host, host.events() as events:
        await db.functions.insert_one({"_id": "hooks", "source": source.format(n=1)})
        await next_event(events, "plugin.loaded")
        for n in (2, 3):
            current = host.current("hooks")
            assert current is not None
            refs.append(weakref.ref(current.module))
            del current
            await db.functions.update_one(
                {"_id": "hooks"}, {"$set": {"source": source.format(n=n)}}
            )
            await next_event(events, "plugin.reloaded")
            await next_event(events, "plugin.retired")
        assert await host.call("hooks") == 3
    rows = [(d["hook"], d["n"]) async for d in db.log.find({}, {"_id": 0}).sort("_id", 1)]
    assert sorted(rows) == sorted(
        [
            ("setup", 1),
            ("setup", 2),
            ("setup", 3),
            ("teardown", 1),
            ("teardown", 2),
            ("teardown", 3),
        ]
    )
    gc.collect()
    assert all(ref() is None for ref in refs), "a retired version's module is still alive"


async def test_motor_database_is_accepted(mongo_uri: str, db_name: str) -> None:
    """A Motor database works as the host's database (watch, snapshot, ctx.db)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from motor.motor_asyncio import AsyncIOMotorClient

    motor: Any = AsyncIOMotorClient(mongo_uri)
    try:
        mdb = motor[db_name]
        await mdb.functions.insert_one({"_id": "m", "source": version_source(7)})
        async with PluginHost(mdb) as host, host.events() as events:
            assert await host.call("m") == (7, 7)
            await mdb.functions.update_one({"_id": "m"}, {"$set": {"source": version_source(8)}})
            await next_event(events, "plugin.reloaded")
            assert await host.call("m") == (8, 8)
    finally:
        await motor.drop_database(db_name)
        motor.close()


async def test_started_host_raises_young_gc_threshold(host: PluginHost) -> None:
    """Once a host has started, the young generation is at least host.gctune's threshold."""
    from host.gctune import YOUNG_THRESHOLD

    young, middle, old = gc.get_threshold()
    assert young >= YOUNG_THRESHOLD
    assert (middle, old) == (10, 10)  # only the young threshold moves (CPython defaults)
