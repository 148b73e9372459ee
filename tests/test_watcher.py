"""The watcher: snapshot/stream stitching, resume, resync, invalidate, and no polling."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import (
    AutoReconnect,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)

from host import PluginHost, PluginNotFound
from host.embedded import EmbeddedMongo
from host.watcher import FATAL_CODES, RESYNC_CODES, Code, _classify
from tests.embedded.support import Server
from tests.support import Db, drain, next_event, returning, wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture
def own_oplog_size() -> int:
    """This module's private servers keep a short oplog (history-lost tests)."""
    return 50


async def test_writes_racing_startup_are_not_lost(db: Db) -> None:
    """Writes made while the host starts all arrive; the final state is the newest version."""
    await db.functions.insert_many([{"_id": f"p{i}", "source": returning(0)} for i in range(20)])
    stop = anyio.Event()
    written: dict[str, int] = {}

    async def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            name = f"p{n % 20}"
            await db.functions.update_one({"_id": name}, {"$set": {"source": returning(n)}})
            written[name] = n
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer)
        async with PluginHost(db) as host:
            await wait_until(lambda: len(written) == 20, "every plugin was written once")
            stop.set()
            await wait_until(
                lambda: all(
                    (p := host.current(name)) is not None and p.module.main is not None
                    for name in written
                ),
                "all plugins loaded",
            )

            async def all_current() -> bool:
                for name, n in written.items():
                    if await host.call(name) != n:
                        return False
                return True

            await wait_until(all_current, "every plugin serves its newest write")


async def test_never_goes_back_to_an_older_version(db: Db) -> None:
    """While a writer increments a plugin, each caller only ever sees non-decreasing versions."""
    await db.functions.insert_one({"_id": "mono", "source": returning(0)})
    seen: list[int] = []
    async with PluginHost(db) as host, anyio.create_task_group() as tg:
        stop = anyio.Event()

        async def reader() -> None:
            while not stop.is_set():
                seen.append(await host.call("mono"))
                await anyio.lowlevel.checkpoint()

        tg.start_soon(reader)
        for n in range(1, 60):
            await db.functions.update_one({"_id": "mono"}, {"$set": {"source": returning(n)}})
        await wait_until(lambda: seen and seen[-1] == 59, "the newest version serves")
        stop.set()
    assert seen == sorted(seen), "an older version replaced a newer one"


async def test_idle_host_sends_no_find_or_count(own_server: EmbeddedMongo, own_db: Db) -> None:
    """Apart from the initial load, an idle host never reads the collection: no polling."""
    await own_db.functions.insert_one({"_id": "idle", "source": returning(1)})
    async with PluginHost(own_db, max_await_ms=50) as host:
        counts = own_server.command_counts
        before = {k: counts[k] for k in ("find", "count", "aggregate", "getMore")}
        # let the stream go through several empty getMores
        await wait_until(
            lambda: counts["getMore"] >= before["getMore"] + 5, "the stream keeps waiting"
        )
        assert counts["find"] == before["find"]
        assert counts["count"] == before["count"]
        assert counts["aggregate"] == before["aggregate"]
        assert await host.call("idle") == 1


async def test_resumes_after_connection_dropped(own_server: EmbeddedMongo, own_db: Db) -> None:
    """A failpoint closing the connection on getMore is survived with nothing lost."""
    await own_db.functions.insert_one({"_id": "r", "source": returning(0)})
    async with PluginHost(own_db, max_await_ms=50) as host, host.events() as events:
        await own_db.client.admin.command(
            "configureFailPoint",
            "failCommand",
            mode={"times": 2},
            data={"failCommands": ["getMore"], "closeConnection": True},
        )
        for n in range(1, 6):
            await own_db.functions.update_one({"_id": "r"}, {"$set": {"source": returning(n)}})

        async def newest() -> bool:
            return bool(await host.call("r") == 5)

        await wait_until(newest, "the last update serves")
        seen = await drain(events)
        assert all(e.event != "plugin.reload_failed" for e in seen)
        assert own_server.failpoints.times_entered("failCommand") == 2


async def test_history_lost_resyncs_to_collection(own_server: EmbeddedMongo, own_db: Db) -> None:
    """When the resume point leaves the oplog, the host resyncs to exactly the collection."""
    await own_db.functions.insert_many(
        [{"_id": "keep", "source": returning(1)}, {"_id": "drop", "source": returning(2)}]
    )
    async with PluginHost(own_db, max_await_ms=50) as host, host.events() as events:
        # Stall the stream so it falls behind a small oplog, then let it resume.
        await own_db.client.admin.command(
            "configureFailPoint",
            "failCommand",
            mode="alwaysOn",
            data={"failCommands": ["getMore", "aggregate"], "closeConnection": True},
        )
        await wait_until(lambda: not host._watcher.live, "the stream is down")
        await own_db.functions.delete_one({"_id": "drop"})
        await own_db.functions.update_one({"_id": "keep"}, {"$set": {"source": returning(10)}})
        await own_db.junk.insert_many([{"i": i} for i in range(200)])  # push the oplog past us
        await own_db.client.admin.command("configureFailPoint", "failCommand", mode="off")
        resynced = await next_event(events, "watch.resynced", timeout=20)
        assert resynced["reason"] == "history_lost"
        assert "drop" in resynced["unloaded"]
        with pytest.raises(PluginNotFound):
            await host.call("drop")
        assert await host.call("keep") == 10


async def test_drop_and_recreate_collection(db: Db) -> None:
    """Dropping the collection unloads its plugins; re-creating it loads them again."""
    await db.functions.insert_one({"_id": "d", "source": returning(1)})
    async with PluginHost(db) as host, host.events() as events:
        assert await host.call("d") == 1
        await db.functions.drop()
        await next_event(events, "watch.invalidated")
        await next_event(events, "plugin.unloaded", lambda e: e["plugin"] == "d")
        with pytest.raises(PluginNotFound):
            await host.call("d")
        await db.functions.insert_one({"_id": "d", "source": returning(2)})
        await next_event(events, "plugin.loaded", lambda e: e["plugin"] == "d")
        assert await host.call("d") == 2


async def test_rename_collection_unloads(db: Db, client: AsyncMongoClient[dict[str, Any]]) -> None:
    """Renaming the functions collection away invalidates the stream and unloads its plugins."""
    await db.functions.insert_one({"_id": "n", "source": returning(1)})
    async with PluginHost(db) as host, host.events() as events:
        await client.admin.command(
            "renameCollection", f"{db.name}.functions", to=f"{db.name}.functions_old"
        )
        await next_event(events, "watch.invalidated")
        await next_event(events, "plugin.unloaded", lambda e: e["plugin"] == "n")
        with pytest.raises(PluginNotFound):
            await host.call("n")


async def test_server_restart_with_data_dir(tmp_path: Any) -> None:
    """The server restarts on the same port; a change made while it was down goes live once."""
    data = tmp_path / "data"
    server = EmbeddedMongo(port=0, data_dir=data)
    await server.start()
    port = server.port
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        server.uri, serverSelectionTimeoutMS=2000, connectTimeoutMS=500
    )
    db = client.app
    await db.functions.insert_one({"_id": "s", "source": returning(1)})
    try:
        async with PluginHost(db, max_await_ms=100) as host, host.events() as events:
            assert await host.call("s") == 1
            await server.aclose()
            await wait_until(lambda: not host._watcher.live, "the host noticed the outage")
            assert await host.call("s") == 1, "the registry keeps serving during the outage"
            server = EmbeddedMongo(port=port, data_dir=data)
            await server.start()
            other: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.uri)
            await other.app.functions.update_one({"_id": "s"}, {"$set": {"source": returning(2)}})
            await other.close()
            await next_event(events, "plugin.reloaded", timeout=30)
            assert await host.call("s") == 2
            again = [e for e in await drain(events, quiet=0.5) if e.event == "plugin.reloaded"]
            assert again == [], "the reload was applied twice"
    finally:
        await client.close()
        await server.aclose()


def _failure(code: int, *labels: str) -> OperationFailure:
    """A server error as PyMongo raises it: code, message and error labels."""
    details = {"ok": 0, "code": code, "errmsg": f"error {code}", "errorLabels": list(labels)}
    return OperationFailure(f"error {code}", code, details)


@pytest.mark.parametrize(
    ("error", "action", "detail"),
    [
        (_failure(286), "resync", "history_lost"),
        (_failure(280), "resync", "stream_error"),
        (_failure(260), "resync", "stream_error"),
        (_failure(11601, "NonResumableChangeStreamError"), "resync", "stream_error"),
        (_failure(40573), "fatal", "change streams need a replica set"),
        (_failure(13), "fatal", "may not watch or read"),
        (_failure(18), "fatal", "authentication failed"),
        (_failure(136), "fatal", "change streams are disabled"),
        (_failure(91), "resume", ""),  # ShutdownInProgress: transient
        (_failure(11601), "resume", ""),  # Interrupted, without the non-resumable label
        (AutoReconnect("connection reset"), "resume", ""),
        (ServerSelectionTimeoutError("no primary"), "resume", ""),
        (PyMongoError("anything else"), "resume", ""),
    ],
)
def test_classify_sorts_stream_errors(error: PyMongoError, action: str, detail: str) -> None:
    """The change-stream policy: each error maps to resume, resync or fatal, with its reason."""
    verdict = _classify(error)
    assert verdict.action == action
    if action == "fatal":
        assert detail in verdict.detail
    else:
        assert verdict.detail == detail


def test_policy_codes_are_named() -> None:
    """Every code the policy branches on is a named Code member (no bare numbers)."""
    assert all(isinstance(code, Code) for code in (*RESYNC_CODES, *FATAL_CODES))
    assert int(Code.CHANGE_STREAM_HISTORY_LOST) == 286


@pytest.fixture
def server_process_uri(mongo_uri: str, using_embedded: bool) -> Iterator[str]:
    """An embedded server in a process of its own (``MONGODB_URI``'s deployment if set).

    The session's embedded server runs in a thread of the test process: under 50 spinning
    callers on the test's loop, that thread competes with them for the GIL, and a busy
    machine starves it (a reload once took 2.8 s). A server process keeps the wake-up rule
    the test checks apart from that contention, as in production and in the bench.
    """
    if not using_embedded:
        yield mongo_uri
        return
    server = Server(None)
    try:
        yield server.uri
    finally:
        server.kill9()


@pytest.fixture
async def process_db(server_process_uri: str, db_name: str) -> AsyncIterator[Db]:
    """A fresh database on ``server_process_uri``."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server_process_uri)
    try:
        yield client[db_name]
        await client.drop_database(db_name)
    finally:
        await client.close()


async def test_changes_go_live_under_busy_callers_without_an_await_timeout(process_db: Db) -> None:
    """Under spinning callers, every update goes live long before a 60 s getMore would end.

    An update that reached the host only when the stream's getMore timed out would take
    60 s; the test allows 20 s for all of them, with 50 callers keeping the loop busy.
    """
    db = process_db
    await db.functions.insert_one({"_id": "busy", "source": returning(0)})
    async with PluginHost(db, max_await_ms=60_000) as host:
        stop = anyio.Event()

        async def spin() -> None:
            while not stop.is_set():
                await host.call("busy")
                await anyio.lowlevel.checkpoint()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(spin)
                for n in range(1, 31):
                    await db.functions.update_one(
                        {"_id": "busy"}, {"$set": {"source": returning(n)}}
                    )
                    while await host.call("busy") != n:
                        await anyio.lowlevel.checkpoint()
                stop.set()
        assert await host.call("busy") == 30
