"""Triggers and live reload: new versions take the next events, disabling pauses, refusals keep
the old version handling, and a bad trigger refuses its version."""

from __future__ import annotations

from typing import Any

import pytest

from host import PluginHost
from tests.support import PROBE, Db, drain, next_event, wait_until
from tests.triggers_support import (
    FAST,
    RECORDER,
    duplicates,
    record,
    state,
    wait_running,
    wait_seen,
)

pytestmark = pytest.mark.anyio

TRIGGER = {"collection": "orders", "operations": ["insert"]}

SLOW_V1 = f"""
import {PROBE} as probe

def on_change(ctx, event):
    key = event["documentKey"]["_id"]
    if key == "slow":
        probe.stopped.set()  # says: started
        probe.gate.wait(10)
    import anyio.from_thread
    anyio.from_thread.run(
        ctx.db.seen.insert_one, {{"event_id": ctx.event_id, "key": key, "version": ctx.version}}
    )
"""


async def test_a_new_version_takes_the_next_events_while_in_flight_ones_finish(
    db: Db, probe: Any
) -> None:
    """Mid-stream reload: the event in flight finishes on v1, the next ones run on v2."""
    await db.functions.insert_one(record("r", SLOW_V1, TRIGGER, revision=1))
    async with PluginHost(db, triggers=FAST) as host, host.events() as events:
        await wait_running(db, "r/orders")
        await db.orders.insert_many([{"_id": f"a{i}"} for i in range(20)] + [{"_id": "slow"}])
        await wait_until(probe.stopped.is_set, "the slow event's handler started")
        v1 = host.current("r")
        assert v1 is not None
        await db.functions.update_one({"_id": "r"}, {"$set": {"source": RECORDER, "revision": 2}})
        await next_event(events, "plugin.reloaded")
        await db.orders.insert_many([{"_id": f"b{i}"} for i in range(20)])
        await wait_seen(db, 20, key={"$regex": "^b"})
        probe.gate.set()
        await wait_seen(db, 41)
        v2 = host.current("r")
        assert v2 is not None
    seen = {d["key"]: d["version"] async for d in db.seen.find({})}
    assert len(seen) == 41 and await duplicates(db) == []
    assert seen["slow"] == v1.version  # finished on the version it started on
    assert {seen[f"b{i}"] for i in range(20)} == {v2.version}


async def test_disabling_pauses_the_trigger_and_keeps_its_checkpoint(db: Db) -> None:
    """Disabled: status paused, nothing handled; enabled again: the changes made meanwhile."""
    await db.functions.insert_one(record("d", RECORDER, TRIGGER))
    async with PluginHost(db, triggers=FAST) as host, host.events() as events:
        await wait_running(db, "d/orders")
        await db.orders.insert_one({"_id": "before"})
        await wait_seen(db, 1)
        await db.functions.update_one({"_id": "d"}, {"$set": {"enabled": False}})
        await next_event(events, "trigger.stopped", lambda e: e["status"] == "paused")
        paused = await state(db, "d/orders")
        assert paused is not None and paused["status"] == "paused" and paused["owner"] is None
        await db.orders.insert_many([{"_id": f"while{i}"} for i in range(5)])
        await db.functions.update_one({"_id": "d"}, {"$set": {"enabled": True}})
        await wait_seen(db, 6)
    keys = await db.seen.distinct("key")
    assert sorted(keys) == ["before", *(f"while{i}" for i in range(5))]
    assert await duplicates(db) == []


async def test_a_refused_version_keeps_the_old_one_handling_events(db: Db) -> None:
    """A new version without the trigger's handler is refused; v1 keeps handling events."""
    await db.functions.insert_one(record("k", RECORDER, TRIGGER))
    async with PluginHost(db, triggers=FAST) as host, host.events() as events:
        await wait_running(db, "k/orders")
        v1 = host.current("k")
        assert v1 is not None
        broken = "async def main(ctx, args):\n    return 1\n"  # no on_change
        await db.functions.update_one({"_id": "k"}, {"$set": {"source": broken}})
        failed = await next_event(events, "plugin.reload_failed")
        await db.orders.insert_one({"_id": 1})
        await wait_seen(db, 1)
    assert failed["stage"] == "entrypoint" and "on_change" in failed["error"]
    doc = await db.seen.find_one({"key": 1})
    assert doc is not None and doc["version"] == v1.version


async def test_a_bad_trigger_refuses_the_version_and_the_old_one_serves(db: Db) -> None:
    """An invalid trigger option refuses the record (naming the option); v1 keeps serving."""
    await db.functions.insert_one(record("b", RECORDER, TRIGGER))
    async with PluginHost(db, triggers=FAST) as host, host.events() as events:
        await wait_running(db, "b/orders")
        bad = [{"collection": "orders", "ordered": "sometimes"}]
        await db.functions.update_one({"_id": "b"}, {"$set": {"triggers": bad}})
        rejected = await next_event(events, "plugin.rejected")
        await db.orders.insert_one({"_id": 1})
        await wait_seen(db, 1)
        assert host.triggers is not None and host.triggers.owned() == {"b/orders": "b"}
    assert rejected["field"] == "triggers[0].ordered"
    assert "sometimes" in rejected["error"]


async def test_a_changed_declaration_restarts_the_trigger_on_its_new_collection(db: Db) -> None:
    """A version moving trigger 't' to another collection: it restarts there, from now."""
    await db.functions.insert_one(record("m", RECORDER, {"name": "t", "collection": "a"}))
    host = PluginHost(db, triggers=FAST)
    async with host.events() as events, host:
        await wait_running(db, "m/t")
        await db.a.insert_one({"_id": "in-a"})
        await wait_seen(db, 1)
        moved = [{"name": "t", "collection": "b"}]
        await db.functions.update_one({"_id": "m"}, {"$set": {"triggers": moved}})

        async def restarted() -> bool:
            doc = await state(db, "m/t")
            return doc is not None and doc.get("checkpoint_collection") == "b"

        await wait_until(restarted, "the trigger restarted on collection b")
        await db.b.insert_one({"_id": "in-b"})
        await wait_seen(db, 1, key="in-b")
        seen = [e.event for e in await drain(events)]
    assert "trigger.history_lost" not in seen
    assert seen.count("trigger.started") == 2  # on a, then on b
    assert sorted(await db.seen.distinct("key")) == ["in-a", "in-b"]
