"""The trigger engine's own bookkeeping: what wakes its reconcile loop, the state a
trigger reports before its change stream is open and its first checkpoint, and the counts
the metrics read."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from typing import Any

import pytest

from host import PluginHost
from tests.support import PROBE, Db, next_event, wait_until
from tests.test_fleet_daemons import cli
from tests.test_triggerview import beat
from tests.triggers_support import FAST, RECORDER, record, state, wait_running

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]  # CLI subprocesses, busy machine

PLAIN = """
async def main(ctx, args):
    return {revision}
"""

SLOW_POLL = dataclasses.replace(FAST, poll_interval=3600.0)
"""No periodic look: only a plugin event (or a runner ending) makes the engine reconcile."""


async def test_only_plugins_with_triggers_wake_the_engine(db: Db) -> None:
    """Reloads of a plugin without triggers never wake the engine; a plugin gaining or losing
    triggers does (its trigger starts, or pauses, with no periodic poll to find it)."""
    await db.functions.insert_one(record("t", RECORDER, {"collection": "orders"}))
    await db.functions.insert_one({"_id": "plain", "source": PLAIN.format(revision=0)})
    host = PluginHost(db, triggers=SLOW_POLL)
    async with host.events() as events, host:
        engine = host.triggers
        assert engine is not None
        await wait_running(db, "t/orders")
        before = engine.wakeups
        for revision in range(1, 11):
            await db.functions.update_one(
                {"_id": "plain"}, {"$set": {"source": PLAIN.format(revision=revision)}}
            )
            await next_event(events, "plugin.reloaded", lambda e: e.get("plugin") == "plain")
        assert await host.call("plain") == 10
        # A plugin that gains a trigger wakes the engine, which starts it at once.
        await db.functions.insert_one(record("u", RECORDER, {"collection": "invoices"}))
        await wait_running(db, "u/invoices")
        # The wake-ups arrive in emit order: had a reload of `plain` woken the engine, it
        # would have been counted before the one of `u`.
        assert engine.wakeups == before + 1
        # A plugin that loses its triggers (it had some) wakes it too: its trigger pauses.
        await db.functions.update_one(
            {"_id": "t"}, {"$set": {"source": PLAIN.format(revision=1), "triggers": []}}
        )

        async def paused() -> bool:
            doc = await state(db, "t/orders")
            return doc is not None and doc.get("status") == "paused"

        await wait_until(paused, "t/orders paused once t declares no trigger")
        assert engine.owned() == {"u/invoices": "u"}


@pytest.mark.embedded_only("failCommand with namespace")
async def test_a_trigger_is_starting_until_its_change_stream_opens(mongo_uri: str, db: Db) -> None:
    """A leased trigger whose change stream cannot open yet says `starting` (state document,
    `plugin-host triggers` and `--json`), and `running` once the stream is open."""
    await db.functions.insert_one(record("st", RECORDER, {"collection": "orders"}))
    host = PluginHost(db, triggers=FAST)
    engine = host.triggers
    assert engine is not None
    await beat(db, engine.host_id, ttl=3600)  # the owner counts as alive in the view
    no_stream = {"failCommands": ["aggregate"], "errorCode": 2, "namespace": f"{db.name}.orders"}
    admin = db.client.admin
    await admin.command("configureFailPoint", "failCommand", mode="alwaysOn", data=no_stream)
    try:
        async with host.events() as events, host:
            await next_event(events, "trigger.stream_error")  # it tried, and could not open
            doc = await state(db, "st/orders")
            assert doc is not None
            assert (doc["status"], doc["owner"]) == ("starting", engine.host_id)
            as_json = await cli(mongo_uri, db.name, "triggers", "--json")
            assert as_json.returncode == 0, as_json.stderr
            (row,) = json.loads(as_json.stdout)
            assert (row["id"], row["status"], row["orphaned"]) == ("st/orders", "starting", False)
            plain = await cli(mongo_uri, db.name, "triggers")
            assert plain.returncode == 0, plain.stderr
            line = next(x for x in plain.stdout.splitlines() if x.startswith("st/orders "))
            assert "starting" in line and "running" not in line
            await admin.command("configureFailPoint", "failCommand", mode="off")
            await wait_running(db, "st/orders")
            await db.orders.insert_one({"_id": 1})

            async def handled() -> bool:
                return await db.seen.count_documents({"key": 1}) == 1

            await wait_until(handled, "the event after the stream opened handled")
            as_json = await cli(mongo_uri, db.name, "triggers", "--json")
            assert [r["status"] for r in json.loads(as_json.stdout)] == ["running"]
    finally:
        await admin.command("configureFailPoint", "failCommand", mode="off")


async def test_the_first_checkpoint_is_written_though_no_event_arrives(db: Db) -> None:
    """A new trigger whose stream never sees an event still stores its first checkpoint
    (the stream's start, beside the reading): a restart resumes there, so an insert made
    while no host ran is delivered, not skipped by a new "now"."""
    await db.functions.insert_one(record("quiet", RECORDER, {"collection": "orders"}))
    async with PluginHost(db, triggers=FAST):
        first = await wait_running(db, "quiet/orders")
    assert first["processed"] == 0 and first["checkpoint"] is not None
    await db.orders.insert_one({"_id": "while-down"})
    async with PluginHost(db, triggers=FAST):

        async def delivered() -> bool:
            return await db.seen.count_documents({"key": "while-down"}) == 1

        await wait_until(delivered, "the insert made while no host ran delivered")


HELD = f"""
import asyncio
import {PROBE} as probe

async def on_change(ctx, event):
    if event["documentKey"]["_id"] == "hold":
        probe.holding.set()
        await probe.release.wait()
"""


async def test_the_counts_are_read_from_the_running_triggers(db: Db, probe: Any) -> None:
    """The engine's events and in-flight counts follow a run as it goes and keep its
    events once it ends, including a later run of the same trigger."""
    module = sys.modules[PROBE]
    module.__dict__.update(holding=asyncio.Event(), release=asyncio.Event())
    await db.functions.insert_one(record("cnt", HELD, {"collection": "orders"}))
    async with PluginHost(db, triggers=FAST) as host:
        engine = host.triggers
        assert engine is not None
        await wait_running(db, "cnt/orders")
        await db.orders.insert_many([{"_id": i} for i in range(10)])
        await wait_until(lambda: engine.stats.events.get("cnt/orders") == 10, "10 counted")
        await db.orders.insert_one({"_id": "hold"})
        await asyncio.wait_for(module.holding.wait(), 30)
        assert engine.in_flight == engine.stats.in_flight == 1
        module.release.set()
        await wait_until(lambda: engine.stats.events.get("cnt/orders") == 11, "11 counted")
        assert engine.stats.in_flight == 0
        # A plugin disabled and enabled again: a new run of the trigger, counted on top.
        await db.functions.update_one({"_id": "cnt"}, {"$set": {"enabled": False}})
        await wait_until(lambda: engine.owned() == {}, "the trigger paused")
        assert engine.stats.events == {"cnt/orders": 11}
        await db.functions.update_one({"_id": "cnt"}, {"$set": {"enabled": True}})
        await wait_running(db, "cnt/orders")
        await db.orders.insert_many([{"_id": i} for i in range(10, 15)])
        await wait_until(lambda: engine.stats.events.get("cnt/orders") == 16, "16 counted")
    assert engine.stats.events == {"cnt/orders": 16} and engine.stats.in_flight == 0
