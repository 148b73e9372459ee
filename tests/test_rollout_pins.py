"""Pinning a recent replaced version (issue 16 item 2): ``held_versions`` keeps the last N
replaced versions live for ``X-Plugin-Version`` / ``call(..., version=...)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from host import PluginHost
from host.errors import VersionNotLive
from host.publish import publish
from host.records import parse_record
from tests.support import Db, next_event, wait_until

from .daemon_support import Daemon, free_port, wait_ready
from .rollout_support import start

pytestmark = pytest.mark.anyio

Doc = dict[str, Any]


def tagged(tag: str) -> str:
    """A plugin returning ``tag`` (raising on ``"boom"``); its teardown writes ``tag`` to
    ``db.torn``."""
    return (
        f"TAG = {tag!r}\n"
        "async def main(ctx, args):\n"
        "    if args == 'boom':\n"
        "        raise ValueError('boom')\n"
        "    return TAG\n"
        "async def teardown(ctx):\n"
        "    await ctx.db.torn.insert_one({'tag': TAG})\n"
    )


async def push(db: Db, host: PluginHost, tag: str) -> int:
    """Publish ``tagged(tag)`` as ``p`` and wait until the host serves it."""
    published = await publish(db, "p", tagged(tag))

    def serving() -> bool:
        current = host.current("p")
        return current is not None and current.record.revision == published.revision

    await wait_until(serving, f"the host serves r{published.revision}")
    return published.revision


async def torn(db: Db) -> list[str]:
    """The tags whose teardown ran, in order."""
    return [doc["tag"] async for doc in db.torn.find({}, {"_id": 0}).sort("_id", 1)]


async def test_recent_replaced_versions_stay_pinnable(db: Db) -> None:
    """With held_versions=2, the two versions before the current one answer pinned calls
    (by revision, r-revision, name@r and full version) and are not torn down; the third
    is evicted, retired once, and a pin to it is refused naming what is live and held."""
    async with PluginHost(db, held_versions=2) as host, host.events() as events:
        revisions = [await push(db, host, tag) for tag in ("one", "two", "three", "four")]
        r1, r2, r3, r4 = revisions
        retired = await next_event(events, "plugin.retired")
        assert retired["version"].startswith(f"p@r{r1}:")
        held = host.held("p")
        assert [plugin.record.revision for plugin in held] == [r3, r2]
        for pin, tag in ((str(r3), "three"), (f"r{r2}", "two"), (held[1].version, "two")):
            served: list[str] = []
            assert await host.call("p", version=pin, served=served) == tag
            assert served[0].startswith(f"p@r{r3 if tag == 'three' else r2}:")
        assert await host.call("p", version=f"p@r{r4}") == "four"
        assert {await host.call("p") for _ in range(30)} == {"four"}  # never unpinned
        assert await torn(db) == ["one"]

        with pytest.raises(VersionNotLive) as info:
            await host.call("p", version=f"r{r1}")
        error = info.value
        assert error.live == (host.current("p").version,)  # type: ignore[union-attr]
        assert error.held == tuple(plugin.version for plugin in held)
        assert "no longer held in memory" in str(error) and "held: p@r" in str(error)
        with pytest.raises(VersionNotLive) as unknown:
            await host.call("p", version="r99")
        assert "no longer held" not in str(unknown.value)
        assert unknown.value.held == error.held

        await push(db, host, "five")
        await wait_until(lambda: host.held("p")[-1].record.revision == r3, "r2 is evicted")

        async def two_torn() -> bool:
            return await torn(db) == ["one", "two"]

        await wait_until(two_torn, "r2 tears down once, after r1")
    assert sorted(await torn(db)) == ["five", "four", "one", "three", "two"]  # at exit, once


async def test_held_versions_default_to_none(db: Db) -> None:
    """Without held_versions a replaced version retires at once and cannot be pinned."""
    async with PluginHost(db) as host, host.events() as events:
        r1 = await push(db, host, "one")
        await push(db, host, "two")
        await next_event(events, "plugin.retired")
        assert host.held("p") == ()
        with pytest.raises(VersionNotLive) as info:
            await host.call("p", version=f"r{r1}")
        assert info.value.held == () and "held:" not in str(info.value)
        assert "no longer held in memory" in str(info.value)


async def test_an_evicted_version_finishes_its_calls_in_flight(db: Db) -> None:
    """A pinned call in flight on a held version finishes there when the version is
    evicted; the version retires only after it drains."""
    gated = (
        "import asyncio\n"
        "GATE = asyncio.Event()\n"
        "async def main(ctx, args):\n"
        "    await GATE.wait()\n"
        "    return 'old'\n"
    )
    async with PluginHost(db, held_versions=1) as host, host.events() as events:
        published = await publish(db, "p", gated)
        await next_event(events, "plugin.loaded")
        await push(db, host, "two")
        old = host.held("p")[0]
        results: list[Any] = []
        async with anyio.create_task_group() as tg:

            async def pinned() -> None:
                results.append(await host.call("p", version=str(published.revision)))

            tg.start_soon(pinned)
            await wait_until(lambda: old.in_flight == 1, "the pinned call runs on r1")
            await push(db, host, "three")  # r1 leaves the hold while its call runs
            assert host.held("p")[0].record.revision == published.revision + 1
            with pytest.raises(VersionNotLive):
                await host.call("p", version=str(published.revision))
            assert old.in_flight == 1 and old.module is not None
            old.module.GATE.set()
        assert results == ["old"]
        retired = await next_event(
            events, "plugin.retired", lambda e: e["version"] == old.version, timeout=10
        )
        assert retired["in_flight"] == 0 and not retired["forced"]


async def test_held_versions_invariants_under_load() -> None:
    """Registry invariants (10)-(11) under concurrent pinned and unpinned callers while 30
    versions are swapped in: unpinned calls get the newest version, a pin gets exactly the
    version it names or VersionNotLive, at most 3 are held, and every version retires once."""
    from host.compiler import compile_plugin
    from host.dispatch import Dispatcher
    from host.registry import Registry

    versions: list[Any] = []
    source = "async def main(ctx, args):\n    import asyncio\n    await asyncio.sleep(0)\n"
    async with Registry(grace_period=0.05, held_versions=3) as registry:
        dispatcher = Dispatcher(registry, db=None)
        violations: list[str] = []
        newest = 0
        done = anyio.Event()

        async def pin_caller(offset: int) -> None:
            while not done.is_set():
                revision = max(1, newest - offset)
                served: list[str] = []
                try:
                    result = await dispatcher.call("p", version=str(revision), served=served)
                except VersionNotLive:
                    # Raised before the call's first await: the registry is as it was.
                    current = registry.get("p")
                    live = [plugin.record.revision for plugin in registry.held("p")]
                    if current is not None:
                        live.append(current.record.revision)
                    if revision in live:
                        violations.append(f"r{revision} refused while live or held")
                    await anyio.lowlevel.checkpoint()
                    continue
                if result != revision or not served[0].startswith(f"p@r{revision}:"):
                    violations.append(f"pinned r{revision}, got {result!r} from {served}")

        async def caller() -> None:
            while not done.is_set():
                floor = newest
                result = await dispatcher.call("p")
                if result < floor:
                    violations.append(f"unpinned call got r{result} after r{floor} went live")

        def check() -> None:
            held = registry.held("p")
            current = registry.get("p")
            if len(held) > 3:
                violations.append(f"{len(held)} held")
            if current is not None and current in held:
                violations.append("the current version is held")
            if len(set(held)) != len(held):
                violations.append("a version is held twice")

        async with anyio.create_task_group() as tg:
            for revision in range(1, 31):
                record = parse_record(
                    {
                        "_id": "p",
                        "source": source + f"    return {revision}\n",
                        "revision": revision,
                    }
                )
                plugin = await compile_plugin(record)
                versions.append(plugin)
                await registry.install(plugin, dispatcher.make_context)
                newest = revision
                check()
                if revision == 1:
                    for offset in range(5):
                        tg.start_soon(pin_caller, offset)
                    for _ in range(3):
                        tg.start_soon(caller)
                for _ in range(20):
                    await anyio.lowlevel.checkpoint()
                check()
            done.set()
        assert violations == []
        assert [plugin.record.revision for plugin in registry.held("p")] == [29, 28, 27]

        def all_retired() -> bool:
            return len(registry.retiring()) == 0

        await wait_until(all_retired, "the 26 evicted versions retire")
        evicted = [plugin for plugin in versions if plugin not in registry.held("p")]
        assert len(evicted) == 27 and all(plugin.released for plugin in evicted[:-1])
        assert not any(plugin.released for plugin in registry.held("p"))


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_daemon_serves_held_versions_over_http(
    mongo_uri: str, db: AsyncDatabase[Doc], tmp_path: Path, daemons: list[Daemon]
) -> None:
    """`plugin-host run --held-versions 1`: X-Plugin-Version reaches the held version and the
    reply names it; an evicted or unknown pin is a 409 naming what is live and held."""
    first = await publish(db, "p", tagged("one"))
    port = free_port()
    daemon = Daemon.run(tmp_path, mongo_uri, db.name, f"127.0.0.1:{port}", "--held-versions", "1")
    daemons.append(daemon)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        await wait_ready(client, daemon)
        second = await publish(db, "p", tagged("two"))

        async def serves(revision: int) -> bool:
            reply = await client.post("/functions/p/call")
            return bool(reply.headers.get("x-plugin-version", "").startswith(f"p@r{revision}:"))

        await wait_until(lambda: serves(second.revision), "the daemon serves r2")
        pinned = await client.post(
            "/functions/p/call", headers={"X-Plugin-Version": f"r{first.revision}"}
        )
        assert pinned.status_code == 200, pinned.text
        assert pinned.json()["result"] == "one"
        assert pinned.headers["x-plugin-version"].startswith(f"p@r{first.revision}:")
        assert pinned.json()["version"] == pinned.headers["x-plugin-version"]

        third = await publish(db, "p", tagged("three"))
        await wait_until(lambda: serves(third.revision), "the daemon serves r3")
        refused = await client.post(
            "/functions/p/call", headers={"X-Plugin-Version": str(first.revision)}
        )
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["type"] == "VersionNotLive"
        assert error["live"][0].startswith(f"p@r{third.revision}:")
        assert [v.split(":")[0] for v in error["held"]] == [f"p@r{second.revision}"]
        assert "no longer held in memory" in error["message"]
        # A shadow candidate beside a held version: both pinnable, named apart in a 409.
        revision = await start(db, "p", tagged("shadow"), weight=0, mode="shadow")

        async def candidate_live() -> bool:
            reply = await client.post(
                "/functions/p/call", headers={"X-Plugin-Version": str(revision)}
            )
            return reply.status_code == 200 and reply.json()["result"] == "shadow"

        await wait_until(candidate_live, "the shadow candidate is pinnable")
        held = await client.post(
            "/functions/p/call", headers={"X-Plugin-Version": f"p@r{second.revision}"}
        )
        assert held.json()["result"] == "two"
        unknown = (
            await client.post("/functions/p/call", headers={"X-Plugin-Version": "r99"})
        ).json()
        assert unknown["error"]["live"][1].endswith("(shadow candidate)")
        assert "no longer held" not in unknown["error"]["message"]
        # A failing call's reply names the version that failed, in the header too.
        failing = await client.post(
            "/functions/p/call", headers={"X-Plugin-Version": str(revision)}, json="boom"
        )
        assert failing.status_code == 500, failing.text
        assert failing.headers["x-plugin-version"] == failing.json()["error"]["version"]
        assert failing.headers["x-plugin-version"].startswith(f"p@r{revision}:")
