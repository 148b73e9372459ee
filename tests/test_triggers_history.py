"""Triggers whose resume point left the oplog: each ``on_history_lost`` policy, never silent."""

from __future__ import annotations

import dataclasses
import sys
from datetime import datetime
from typing import Any

import pytest
from structlog.testing import capture_logs

from host import PluginHost
from tests.support import PROBE, Db, next_event, wait_until
from tests.triggers_support import FAST, RECORDER, record, state, wait_running, wait_seen

pytestmark = [pytest.mark.anyio, pytest.mark.embedded_only("a tiny oplog (oplog_max_entries)")]


@pytest.fixture
def own_oplog_size() -> int:
    """A 40-entry oplog: 200 writes while the host is down push its checkpoint out."""
    return 40


async def lose_history(db: Db, policy: str) -> Any:
    """Run the trigger over 3 inserts, stop the host cleanly, then write 200 more documents.

    Returns the checkpoint the host left (now out of the oplog).
    """
    trigger = {"collection": "orders", "on_history_lost": policy}
    await db.functions.insert_one(record("h", RECORDER, trigger))
    async with PluginHost(db, triggers=FAST):
        await wait_running(db, "h/orders")
        await db.orders.insert_many([{"_id": i} for i in range(3)])
        await wait_seen(db, 3)
    for i in range(3, 200):
        await db.orders.insert_one({"_id": i})
    doc = await state(db, "h/orders")
    assert doc is not None
    return doc["checkpoint"]


async def wait_new_start(db: Db, old: Any) -> None:
    """Wait until the trigger's checkpoint is its new stream's start (no longer ``old``)."""

    async def moved() -> bool:
        doc = await state(db, "h/orders")
        return doc is not None and doc["checkpoint"] not in (None, old)

    await wait_until(moved, "the trigger checkpointed its new start")


async def test_resume_from_now_records_the_gap_and_goes_on(own_db: Db) -> None:
    """resume_from_now: trigger.history_lost names the gap, the state keeps it, new events flow."""
    old = await lose_history(own_db, "resume_from_now")
    host = PluginHost(own_db, triggers=FAST)
    async with host.events() as events, host:
        lost = await next_event(events, "trigger.history_lost")
        await wait_new_start(own_db, old)
        await own_db.orders.insert_one({"_id": 1000})
        await wait_seen(own_db, 1, key=1000)
    assert lost["policy"] == "resume_from_now" and lost["code"] == 286
    assert datetime.fromisoformat(lost["from"]) < datetime.fromisoformat(lost["to"])
    doc = await state(own_db, "h/orders")
    assert doc is not None
    [gap] = doc["history_lost"]
    assert gap["policy"] == "resume_from_now"
    assert gap["from"] is not None and gap["from"] < gap["to"]
    assert await own_db.seen.count_documents({"key": {"$gte": 3, "$lt": 200}}) == 0  # the gap


async def test_fail_stops_the_trigger_loudly(own_db: Db) -> None:
    """fail: an error event, status failed with the error in the state, the lease released."""
    await lose_history(own_db, "fail")
    host = PluginHost(own_db, triggers=FAST)
    with capture_logs() as logs:
        async with host.events() as events, host:
            lost = await next_event(events, "trigger.history_lost")
            stopped = await next_event(events, "trigger.stopped")
            assert host.triggers is not None and host.triggers.owned() == {}
    assert lost["policy"] == "fail"
    assert stopped["status"] == "failed"
    levels = {e["event"]: e["log_level"] for e in logs if e["event"].startswith("trigger.")}
    assert levels["trigger.history_lost"] == "error"
    assert levels["trigger.stopped"] == "error"
    doc = await state(own_db, "h/orders")
    assert doc is not None
    assert doc["status"] == "failed"
    assert "history lost" in doc["error"]
    assert doc["owner"] is None
    assert doc["failed_version"] is not None and doc["failed_version"].startswith("h:")
    assert doc["history_lost"][0]["policy"] == "fail"


IN_MEMORY = f"""
import {PROBE} as probe

async def on_change(ctx, event):
    probe.log.append((event["operationType"], event["documentKey"]["_id"], ctx.event_id))
"""
# The rescan's handler keeps what it sees in memory: writing 200 documents into a 40-entry
# oplog would push the new stream's own start out again (each loss is reported and
# rescanned: see docs/design.md).


async def test_rescan_runs_the_handler_over_the_current_documents(own_db: Db, probe: Any) -> None:
    """rescan: every current document reaches the handler as a 'rescan' event, then the stream."""
    module = sys.modules[PROBE]
    module.__dict__["log"] = []
    old = await lose_history(own_db, "rescan")
    await own_db.functions.update_one({"_id": "h"}, {"$set": {"source": IN_MEMORY}})
    host = PluginHost(own_db, triggers=FAST)
    async with host.events() as events, host:
        lost = await next_event(events, "trigger.history_lost")
        await wait_until(
            lambda: sum(op == "rescan" for op, _, _ in module.log) >= 200, "200 rescan events"
        )
        await wait_new_start(own_db, old)  # the rescan done, the checkpoint passes it
        await own_db.orders.insert_one({"_id": 1000})
        await wait_until(lambda: ("insert", 1000) in {e[:2] for e in module.log}, "insert 1000")
    assert lost["policy"] == "rescan"
    rescanned = [(key, event_id) for op, key, event_id in module.log if op == "rescan"]
    assert sorted(key for key, _ in rescanned) == list(range(200))
    assert all(event_id.startswith("rescan:") for _, event_id in rescanned)
    assert len({event_id for _, event_id in rescanned}) == 200


async def test_a_rescan_that_outlasts_the_oplog_converges(own_db: Db) -> None:
    """rescan: handlers writing 5x the oplog during the rescan no longer lose the new start."""
    old = await lose_history(own_db, "rescan")
    # A 10-event window: the rescan of 200 documents waits for the handlers 190 times, and
    # each handler writes one `seen` document: 200 writes into a 40-entry oplog while the
    # rescan runs. The stream is read meanwhile, so its position stays in the oplog.
    options = dataclasses.replace(FAST, window=10)
    host = PluginHost(own_db, triggers=options)
    async with host.events() as events, host:
        lost = await next_event(events, "trigger.history_lost")
        await next_event(events, "trigger.rescanned", timeout=60)
        await wait_new_start(own_db, old)
        await own_db.orders.insert_one({"_id": 1000})
        await wait_seen(own_db, 1, key=1000)
    assert lost["policy"] == "rescan"
    rescanned = await own_db.seen.distinct("key", {"op": "rescan"})
    assert sorted(rescanned) == list(range(200))
    doc = await state(own_db, "h/orders")
    assert doc is not None
    assert len(doc["history_lost"]) == 1  # lost once: the rescan did not lose its own start
