"""Triggers whose resume point left the oplog: each ``on_history_lost`` policy, never silent."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from structlog.testing import capture_logs

from host import PluginHost
from tests.support import Db, next_event, wait_until
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


async def test_rescan_runs_the_handler_over_the_current_documents(own_db: Db) -> None:
    """rescan: every current document reaches the handler as a 'rescan' event, then the stream."""
    old = await lose_history(own_db, "rescan")
    host = PluginHost(own_db, triggers=FAST)
    async with host.events() as events, host:
        lost = await next_event(events, "trigger.history_lost")
        await wait_seen(own_db, 200, op="rescan")
        await wait_new_start(own_db, old)  # the rescan done, the checkpoint passes it
        await own_db.orders.insert_one({"_id": 1000})
        await wait_seen(own_db, 1, key=1000, op="insert")
    assert lost["policy"] == "rescan"
    assert sorted(await own_db.seen.distinct("key", {"op": "rescan"})) == list(range(200))
    event_ids = await own_db.seen.distinct("event_id", {"op": "rescan"})
    assert len(event_ids) == 200 and all(e.startswith("rescan:") for e in event_ids)
