"""Triggers across hosts (several PluginHosts in one process): lease, takeover, spread."""

from __future__ import annotations

import dataclasses
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import pytest

from host import PluginHost
from host.fleet import StatusReporting
from host.triggers import TriggerOptions
from host.triggers.lease import preferred_owner
from tests.support import Db, commands_fail, next_event, wait_until
from tests.triggers_support import (
    FAST,
    RECORDER,
    app_client,
    duplicates,
    record,
    wait_keys,
    wait_running,
    wait_seen,
)

pytestmark = pytest.mark.anyio

TRIGGER = {"collection": "orders", "operations": ["insert"]}

SLOWISH = """
import asyncio

async def on_change(ctx, event):
    await asyncio.sleep(0.002)
    await ctx.db.seen.insert_one({"event_id": ctx.event_id, "key": event["documentKey"]["_id"]})
"""


def options(host_id: str) -> TriggerOptions:
    """The fast test options, as host ``host_id``."""
    return dataclasses.replace(FAST, host_id=host_id)


def state_writes_fail(db: Db, app_name: str) -> AbstractAsyncContextManager[None]:
    """While the block runs, the trigger-state writes of client ``app_name`` fail."""
    return commands_fail(
        db,
        {
            "failCommands": ["update", "findAndModify"],
            "errorCode": 2,
            "appName": app_name,
            "namespace": f"{db.name}.functions_triggers",
        },
    )


@pytest.mark.embedded_only("failCommand with appName")
async def test_a_second_host_takes_over_when_the_owner_stops_renewing(
    db: Db, mongo_uri: str
) -> None:
    """The owner's lease writes fail: it stops at the TTL, the other host resumes, nothing lost."""
    await db.functions.insert_one(record("t", RECORDER, TRIGGER))
    async with (
        app_client(mongo_uri, "host-a") as client_a,
        app_client(mongo_uri, "host-b") as client_b,
    ):
        db_a, db_b = client_a[db.name], client_b[db.name]
        host_a = PluginHost(db_a, triggers=options("A"))
        async with host_a.events() as events_a, host_a:
            first = await wait_running(db, "t/orders", owner="A")
            async with PluginHost(db_b, triggers=options("B")) as host_b:
                await db.orders.insert_many([{"_id": i} for i in range(100)])
                await wait_seen(db, 100)
                async with state_writes_fail(db, "host-a"):
                    await next_event(events_a, "trigger.lease_lost")
                    taken = await wait_running(db, "t/orders", owner="B")
                    await db.orders.insert_many([{"_id": i} for i in range(100, 200)])
                    # Distinct keys: a takeover may repeat events (at least once), and
                    # repeats must not end the wait before the last events are handled.
                    await wait_keys(db, 200)
                    assert host_a.triggers is not None and host_a.triggers.owned() == {}
                    assert host_b.triggers is not None
                    assert host_b.triggers.owned() == {"t/orders": "t"}
    assert sorted(await db.seen.distinct("key")) == list(range(200))
    assert taken["lease_epoch"] > first["lease_epoch"]


async def test_a_clean_drain_hands_over_with_no_repeats(db: Db) -> None:
    """The owner drains mid-burst: events in flight finish, the other host goes on, no repeat."""
    await db.functions.insert_one(record("t", SLOWISH, TRIGGER))
    stop_a, a_stopped = anyio.Event(), anyio.Event()
    engines: list[Any] = []

    async def run_a() -> None:  # its own task: it stops before B, which started after it
        async with PluginHost(db, triggers=options("A")) as host_a:
            engines.append(host_a.triggers)
            await stop_a.wait()
        a_stopped.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_a)
        await wait_running(db, "t/orders", owner="A")
        async with PluginHost(db, triggers=options("B")) as host_b:
            await db.orders.insert_many([{"_id": i} for i in range(400)])
            await wait_seen(db, 50)
            assert engines[0].owned() == {"t/orders": "t"}
            stop_a.set()
            await a_stopped.wait()
            handled_by_a = engines[0].stats.events.get("t/orders", 0)
            await wait_seen(db, 400)
            assert host_b.triggers is not None and host_b.triggers.owned() == {"t/orders": "t"}
    assert await duplicates(db) == []
    assert sorted(await db.seen.distinct("key")) == list(range(400))
    assert 0 < handled_by_a < 400  # the hand-over happened mid-burst


SPREAD = """
async def on_change(ctx, event):
    pass
"""


async def test_triggers_spread_over_the_live_hosts(db: Db) -> None:
    """Eight triggers on two reporting hosts: each runs the ones rendezvous hashing gives it."""
    triggers = [{"collection": f"c{i}"} for i in range(8)]
    await db.functions.insert_one(record("s", SPREAD, *triggers))
    ids = {"A": "A", "B": "B"}
    expected: dict[str, set[str]] = {"A": set(), "B": set()}
    for i in range(8):
        tid = f"s/c{i}"
        owner = preferred_owner(tid, ids.values())
        assert owner is not None
        expected[owner].add(tid)
    assert expected["A"] and expected["B"]  # these ids do split the eight

    def host(host_id: str) -> PluginHost:
        report = StatusReporting(heartbeat=0.1, host_id=host_id)
        return PluginHost(db, triggers=options(host_id), report_status=report)

    async with host("A") as host_a:
        engine_a = host_a.triggers
        assert engine_a is not None
        await wait_until(lambda: len(engine_a.owned()) == 8, "A alone runs all eight")
        async with host("B") as host_b:
            engine_b = host_b.triggers
            assert engine_b is not None

            def spread() -> bool:
                return (
                    set(engine_a.owned()) == expected["A"]
                    and set(engine_b.owned()) == expected["B"]
                )

            await wait_until(spread, "the triggers spread as rendezvous hashing says")
        await wait_until(lambda: len(engine_a.owned()) == 8, "A runs all eight again")
    docs = [d async for d in db.functions_triggers.find({})]
    assert len(docs) == 8
