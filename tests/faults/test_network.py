"""Network and server faults: the host keeps serving, loses no change, and says what happened."""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
from pymongo import AsyncMongoClient

import host.watcher as watcher_module
from host import PluginHost, PluginNotFound
from host.embedded import EmbeddedMongo
from host.loader import Change, change_from_event
from tests.support import Db, drain, next_event, torn_pair, wait_until

from .helpers import collection_versions, fail_command, registry_versions

pytestmark = pytest.mark.anyio


def _stream_revisions(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record the ``revision`` each update event from the change stream sets, in stream order.

    ``fullDocument: updateLookup`` shows the document as it is at lookup time, so the
    event's own ``updateDescription`` is what proves each write was streamed.
    """
    seen: list[Any] = []

    def spy(event: Mapping[str, Any]) -> Change | None:
        fields = (event.get("updateDescription") or {}).get("updatedFields") or {}
        if event.get("operationType") == "update":
            seen.append(fields.get("revision"))
        return change_from_event(event)

    monkeypatch.setattr(watcher_module, "change_from_event", spy)
    return seen


@pytest.mark.parametrize(
    ("failures", "resumed_by"),
    [(2, "driver"), (3, "watcher")],
    ids=["getMore+aggregate", "getMore+aggregate+retry"],
)
async def test_connection_closed_on_getmore_then_on_resume_aggregate(
    own_server: EmbeddedMongo,
    own_db: Db,
    monkeypatch: pytest.MonkeyPatch,
    failures: int,
    resumed_by: str,
) -> None:
    """getMore, then resume aggregates, lose the connection: every write streams once, in order."""
    await own_db.functions.insert_one({"_id": "r", "source": torn_pair(0), "revision": 0})
    streamed = _stream_revisions(monkeypatch)
    async with PluginHost(own_db, max_await_ms=50) as host, host.events() as events:
        # PyMongo resumes a getMore network error once, and retries the resume aggregate
        # once (a retryable read): two failures are transparent; a third reaches the
        # watcher, which backs off and resumes from its own token (watch.resumed).
        await fail_command(
            own_db, {"times": failures}, failCommands=["getMore", "aggregate"], closeConnection=True
        )
        for n in range(1, 11):
            await own_db.functions.update_one(
                {"_id": "r"}, {"$set": {"source": torn_pair(n), "revision": n}}
            )

        async def newest() -> bool:
            return bool(await host.call("r") == (10, 10))

        await wait_until(newest, "the last update serves", timeout=20)
        after = await drain(events, quiet=0.3)
    assert own_server.failpoints.times_entered("failCommand") == failures
    resumes = [e for e in after if e.event == "watch.resumed"]
    if resumed_by == "watcher":
        assert resumes, "the watcher did not report its resume"
        assert any(e.event == "watch.error" for e in after)
    else:
        assert resumes == [], "the driver should have resumed transparently"
    assert streamed == list(range(1, 11)), "a write was lost, repeated or reordered"
    assert not any(e.event == "watch.resynced" for e in after)
    reloaded = [e["revision"] for e in after if e.event == "plugin.reloaded"]
    assert len(reloaded) == len(set(reloaded)), "a reload was applied twice"


async def test_blocked_replies_do_not_stop_calls(own_server: EmbeddedMongo, own_db: Db) -> None:
    """While the server stalls the stream's replies, calls are served; the write lands after."""
    await own_db.functions.insert_one({"_id": "b", "source": torn_pair(1)})
    async with PluginHost(own_db, max_await_ms=50) as host, host.events() as events:
        await fail_command(
            own_db,
            {"times": 2},
            failCommands=["getMore"],
            blockConnection=True,
            blockTimeMS=1500,
        )
        await wait_until(
            lambda: own_server.failpoints.times_entered("failCommand") >= 1, "a reply is stalled"
        )
        # Written while the stream's reply is held back by the server.
        await own_db.functions.update_one({"_id": "b"}, {"$set": {"source": torn_pair(2)}})
        stalled = 0
        while own_server.failpoints.times_entered("failCommand") < 2 or stalled < 100:
            assert await host.call("b") in ((1, 1), (2, 2))
            stalled += 1
            await anyio.lowlevel.checkpoint()
        reloaded = await next_event(events, "plugin.reloaded", timeout=20)
        assert reloaded["plugin"] == "b"
        assert await host.call("b") == (2, 2)
        assert host.is_ready


async def test_server_restarts_twice_with_changes_during_outage(tmp_path: Path) -> None:
    """Across two restarts on one port and data dir, outage-time changes apply exactly once."""
    data = tmp_path / "data"
    server = EmbeddedMongo(port=0, data_dir=data)
    await server.start()
    port = server.port
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        server.uri, serverSelectionTimeoutMS=2000, connectTimeoutMS=500
    )
    db = client.app
    await db.functions.insert_many(
        [{"_id": name, "source": torn_pair(1)} for name in ("upd", "gone", "same")]
    )
    try:
        async with PluginHost(db, max_await_ms=100) as host, host.events() as events:
            for round_ in (1, 2):
                await server.aclose()
                await wait_until(lambda: not host._watcher.live, "the host noticed the outage")
                assert await host.call("same") == (1, 1), "the registry serves during the outage"
                server = EmbeddedMongo(port=port, data_dir=data)
                await server.start()
                other: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.uri)
                if round_ == 1:  # changes made by another client while the host is cut off
                    await other.app.functions.update_one(
                        {"_id": "upd"}, {"$set": {"source": torn_pair(2)}}
                    )
                    await other.app.functions.delete_one({"_id": "gone"})
                    await other.app.functions.insert_one({"_id": "new", "source": torn_pair(3)})
                await other.close()
                await wait_until(lambda: host.is_ready, "the stream is live again", timeout=30)
                await wait_until(
                    lambda: registry_versions(host).keys() == {"upd", "same", "new"},
                    "the outage's changes went live",
                    timeout=30,
                )
            seen = await drain(events, quiet=0.5)
            assert registry_versions(host) == await collection_versions(db)
            assert await host.call("upd") == (2, 2)
            assert await host.call("new") == (3, 3)
            with pytest.raises(PluginNotFound):
                await host.call("gone")
        applied = [
            (e.event, e["plugin"])
            for e in seen
            if e.event in ("plugin.loaded", "plugin.reloaded", "plugin.unloaded")
        ]
        assert sorted(applied) == [
            ("plugin.loaded", "new"),
            ("plugin.reloaded", "upd"),
            ("plugin.unloaded", "gone"),
        ], "a change was applied twice, or an untouched plugin reloaded"
    finally:
        await client.close()
        await server.aclose()


@pytest.mark.parametrize("cause", ["oplog_rolled_over", "server_error_286"])
async def test_history_lost_resync_mirrors_collection_exactly(
    own_server: EmbeddedMongo, own_db: Db, cause: str
) -> None:
    """ChangeStreamHistoryLost → watch.resynced; the registry then equals the collection exactly."""
    await own_db.functions.insert_many(
        [{"_id": f"p{i}", "source": torn_pair(i), "revision": 1} for i in range(8)]
    )
    async with PluginHost(own_db, max_await_ms=50) as host, host.events() as events:
        assert len(host._registry) == 8
        if cause == "oplog_rolled_over":
            await fail_command(
                own_db, "alwaysOn", failCommands=["getMore", "aggregate"], closeConnection=True
            )
            await wait_until(lambda: not host._watcher.live, "the stream is down")
        # Changes the stream will never deliver: the resume point is lost.
        await own_db.functions.delete_many({"_id": {"$in": ["p0", "p1"]}})
        await own_db.functions.update_one(
            {"_id": "p2"}, {"$set": {"source": torn_pair(20), "revision": 2}}
        )
        await own_db.functions.update_one({"_id": "p3"}, {"$set": {"enabled": False}})
        await own_db.functions.insert_one({"_id": "fresh", "source": torn_pair(9), "revision": 1})
        if cause == "oplog_rolled_over":
            await own_db.junk.insert_many([{"i": i} for i in range(300)])
            await fail_command(own_db, "off")
        else:
            await fail_command(own_db, {"times": 1}, failCommands=["getMore"], errorCode=286)
        resynced = await next_event(events, "watch.resynced", timeout=20)
        assert resynced["reason"] == "history_lost"
        await host._loader.wait_idle()
        assert registry_versions(host) == await collection_versions(own_db)
        assert set(registry_versions(host)) == {"p2", "p4", "p5", "p6", "p7", "fresh"}
        assert await host.call("p2") == (20, 20)
        # …and the stream is live again afterwards.
        await own_db.functions.update_one({"_id": "p4"}, {"$set": {"source": torn_pair(40)}})
        await next_event(events, "plugin.reloaded", lambda e: e["plugin"] == "p4")
        assert await host.call("p4") == (40, 40)


async def test_drop_and_recreate_twice_mirrors_the_collection(db: Db) -> None:
    """Policy: the registry mirrors the collection — drop unloads all, re-create loads (twice)."""
    await db.functions.insert_many([{"_id": f"d{i}", "source": torn_pair(i)} for i in range(5)])
    async with PluginHost(db) as host, host.events() as events:
        for cycle in (1, 2):
            await db.functions.drop()
            await next_event(events, "watch.invalidated")
            await wait_until(lambda: len(host._registry) == 0, "every plugin unloaded")
            with pytest.raises(PluginNotFound):
                await host.call("d1")
            names = [f"c{cycle}_{i}" for i in range(3)]
            await db.functions.insert_many(
                [{"_id": n, "source": torn_pair(10 * cycle + i)} for i, n in enumerate(names)]
            )
            await wait_until(_serves_exactly(host, names), "the new collection loaded")
            assert registry_versions(host) == await collection_versions(db)
            assert await host.call(names[1]) == (10 * cycle + 1, 10 * cycle + 1)


async def test_rename_over_functions_loads_the_new_contents(
    db: Db, client: AsyncMongoClient[dict[str, Any]]
) -> None:
    """A staging collection renamed over functions (dropTarget) is what serves next."""
    await db.functions.insert_many([{"_id": "old1", "source": torn_pair(1)}])
    await db.staging.insert_many(
        [{"_id": "s1", "source": torn_pair(11)}, {"_id": "s2", "source": torn_pair(12)}]
    )
    async with PluginHost(db) as host, host.events() as events:
        await client.admin.command(
            "renameCollection", f"{db.name}.staging", to=f"{db.name}.functions", dropTarget=True
        )
        await next_event(events, "watch.invalidated")
        await wait_until(
            lambda: set(host._registry.names()) == {"s1", "s2"}, "the renamed-in plugins serve"
        )
        assert registry_versions(host) == await collection_versions(db)
        with pytest.raises(PluginNotFound):
            await host.call("old1")
        # The stream follows the namespace: later writes still arrive.
        await db.functions.update_one({"_id": "s1"}, {"$set": {"source": torn_pair(21)}})
        await next_event(events, "plugin.reloaded", lambda e: e["plugin"] == "s1")
        assert await host.call("s1") == (21, 21)


def _ready(host: PluginHost) -> bool:
    return host.is_ready


def _serves_exactly(host: PluginHost, names: list[str]) -> Callable[[], bool]:
    return lambda: set(host._registry.names()) == set(names)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_unreachable_at_startup_then_server_appears(tmp_path: Path) -> None:
    """No server at start: not ready, watch.error with growing delays; ready once it appears."""
    port = _free_port()
    uri = f"mongodb://127.0.0.1:{port}/?replicaSet=rs0"
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        uri, serverSelectionTimeoutMS=300, connectTimeoutMS=200
    )
    server: EmbeddedMongo | None = None
    try:
        async with PluginHost(client.app, wait_ready=False) as host, host.events() as events:
            errors = [await next_event(events, "watch.error", timeout=20) for _ in range(4)]
            assert not _ready(host)
            with pytest.raises(PluginNotFound):
                await host.call("late")
            delays = [e["retry_in_s"] for e in errors]
            assert delays == sorted(delays) and delays[-1] > delays[0], delays
            assert [e["attempt"] for e in errors] == [1, 2, 3, 4]
            assert not any(e["initial_load_done"] for e in errors)

            server = EmbeddedMongo(port=port)
            await server.start()
            seed: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.uri)
            await seed.app.functions.insert_one({"_id": "late", "source": torn_pair(5)})
            await seed.close()
            await host.ready(timeout=30)
            await wait_until(lambda: "late" in host._registry, "the plugin loaded", timeout=20)
            assert host.is_ready
            assert await host.call("late") == (5, 5)
    finally:
        await client.close()
        if server is not None:
            await server.aclose()
