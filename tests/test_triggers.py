"""Triggers on one host: delivery at least once, order per key, retries, dead letters."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo import UpdateOne

from host import PluginHost
from host.metrics import Metrics, follow_triggers
from host.triggers.runner import _READ_TURN
from tests.support import PROBE, Db, commands_fail, next_event, wait_until
from tests.triggers_support import (
    FAST,
    RECORDER,
    app_client,
    duplicates,
    record,
    state,
    wait_running,
    wait_seen,
)

pytestmark = pytest.mark.anyio


@pytest.mark.timeout(240)  # 2,000 writes: slow on a loaded machine, never a timing check
async def test_a_thousand_inserts_are_each_handled_once(db: Db) -> None:
    """1,000 inserts reach the handler once each when nothing fails, and the checkpoint follows."""
    await db.functions.insert_one(record("rec", RECORDER, {"collection": "orders"}))
    async with PluginHost(db, triggers=FAST) as host:
        await wait_running(db, "rec/orders")
        await db.orders.insert_many([{"_id": i} for i in range(1000)])
        await wait_seen(db, 1000, timeout=200)

        async def checkpointed() -> bool:
            doc = await state(db, "rec/orders")
            return doc is not None and doc["processed"] == 1000

        await wait_until(checkpointed, "the state counts 1,000 processed events")
        assert host.triggers is not None and host.triggers.owned() == {"rec/orders": "rec"}
    assert await db.seen.count_documents({}) == 1000
    assert await duplicates(db) == []
    assert sorted(await db.seen.distinct("key")) == list(range(1000))
    assert await db.seen.count_documents({"attempt": {"$ne": 1}}) == 0
    doc = await state(db, "rec/orders")
    assert doc is not None
    assert doc["owner"] is None  # released at the clean stop
    assert doc["status"] == "waiting"
    assert doc["checkpoint"] is not None


ORDER = f"""
import asyncio, random
import {PROBE} as probe

async def on_change(ctx, event):
    key = event["documentKey"]["_id"]
    if key in probe.running:
        probe.overlaps += 1
    probe.running.add(key)
    probe.peak = max(probe.peak, len(probe.running))
    if random.random() < probe.awaiting:  # the others never await: the workers' fast path
        await asyncio.sleep(random.random() * 0.003)
    probe.log.append((key, event["updateDescription"]["updatedFields"]["n"]))
    probe.running.discard(key)
"""


async def test_per_key_order_holds_under_concurrency(db: Db, probe: Any) -> None:
    """Events of one document run one at a time in commit order; different documents overlap."""
    module = sys.modules[PROBE]
    module.__dict__.update(log=[], running=set(), overlaps=0, peak=0, awaiting=1.0)
    keys, rounds = 20, 30
    start = datetime.now(UTC) - timedelta(seconds=1)
    await db.docs.insert_many([{"_id": k, "n": -1} for k in range(keys)])
    for n in range(rounds):
        for k in range(keys):
            await db.docs.update_one({"_id": k}, {"$set": {"n": n}})
    trigger = {"collection": "docs", "operations": ["update"], "start_at": start}
    await db.functions.insert_one(record("order", ORDER, trigger))
    async with PluginHost(db, triggers=FAST):
        await wait_until(lambda: len(module.log) >= keys * rounds, "every update handled")
    by_key: dict[int, list[int]] = {}
    for key, n in module.log:
        by_key.setdefault(key, []).append(n)
    assert by_key == {k: list(range(rounds)) for k in range(keys)}
    assert module.overlaps == 0
    assert module.peak > 1  # different keys did run concurrently


async def updated_in_rounds(db: Db, keys: int, rounds: int) -> datetime:
    """Insert ``docs`` 0..keys-1, then set each one's ``n`` to 0..rounds-1, round by round
    (one bulk write); a ``start_at`` from before it all."""
    start = datetime.now(UTC) - timedelta(seconds=1)
    await db.docs.insert_many([{"_id": k, "n": -1} for k in range(keys)])
    updates = [
        UpdateOne({"_id": k}, {"$set": {"n": n}}) for n in range(rounds) for k in range(keys)
    ]
    await db.docs.bulk_write(updates)
    return start


FLAKY_ORDER = f"""
import {PROBE} as probe

async def on_change(ctx, event):
    key = event["documentKey"]["_id"]
    n = event["updateDescription"]["updatedFields"]["n"]
    if (key + n) % 3 == 0 and ctx.attempt == 1:
        raise RuntimeError(f"first attempt of {{key}}/{{n}} fails")
    probe.log.append((key, n, ctx.attempt))
"""


async def test_per_key_order_holds_when_first_attempts_fail(db: Db, probe: Any) -> None:
    """Handlers that never await, a third of whose first attempts raise: every event is
    handled once, on its second attempt where the first failed, in commit order per key."""
    module = sys.modules[PROBE]
    module.__dict__.update(log=[])
    keys, rounds = 10, 12
    start = await updated_in_rounds(db, keys, rounds)
    trigger = {"collection": "docs", "operations": ["update"], "start_at": start}
    await db.functions.insert_one(record("flaky", FLAKY_ORDER, trigger))
    async with PluginHost(db, triggers=FAST):

        async def covered() -> bool:
            doc = await state(db, "flaky/docs")
            return doc is not None and doc.get("processed") == keys * rounds

        await wait_until(covered, "every update handled and checkpointed")
    by_key: dict[int, list[int]] = {}
    for key, n, attempt in module.log:
        by_key.setdefault(key, []).append(n)
        assert attempt == (2 if (key + n) % 3 == 0 else 1)
    assert by_key == {k: list(range(rounds)) for k in range(keys)}
    doc = await state(db, "flaky/docs")
    failing = sum((k + n) % 3 == 0 for k in range(keys) for n in range(rounds))
    assert doc is not None and doc["failed_attempts"] == failing and doc["dead_letters"] == 0


FAN_OUT = f"""
import asyncio
import {PROBE} as probe

async def on_change(ctx, event):
    probe.active += 1
    probe.peak = max(probe.peak, probe.active)
    if probe.active == probe.limit:
        probe.full.set()
    try:  # hold every handler until the limit is reached (at most 10 s: then fail below)
        await asyncio.wait_for(probe.full.wait(), 10)
    except TimeoutError:
        pass
    probe.log.append(event["documentKey"]["_id"])
    probe.active -= 1
"""


async def test_the_worker_pool_fans_out_to_max_concurrency_and_never_beyond(
    db: Db, probe: Any
) -> None:
    """Handlers that wait, over many documents: max_concurrency of them run at once, no more."""
    module = sys.modules[PROBE]
    module.__dict__.update(log=[], active=0, peak=0, limit=5, full=asyncio.Event())
    start = datetime.now(UTC) - timedelta(seconds=1)
    await db.docs.insert_many([{"_id": i} for i in range(40)])
    trigger = {"collection": "docs", "max_concurrency": 5, "start_at": start}
    await db.functions.insert_one(record("fan", FAN_OUT, trigger))
    async with PluginHost(db, triggers=FAST):
        await wait_until(lambda: len(module.log) >= 40, "every insert handled")
    assert module.peak == 5
    assert sorted(module.log) == list(range(40))


@pytest.mark.timeout(120)  # 3,000 updates: slow on a loaded machine, never a timing check
async def test_the_worker_pool_keeps_order_and_bound_under_load(db: Db, probe: Any) -> None:
    """3,000 updates of 30 documents, handlers awaiting or not: each handled once, in
    commit order per document, never two of one document at once, at most max_concurrency."""
    module = sys.modules[PROBE]
    module.__dict__.update(log=[], running=set(), overlaps=0, peak=0, awaiting=0.5)
    keys, rounds = 30, 100
    start = await updated_in_rounds(db, keys, rounds)
    trigger = {"collection": "docs", "operations": ["update"], "start_at": start}
    await db.functions.insert_one(record("mix", ORDER, {**trigger, "max_concurrency": 8}))
    async with PluginHost(db, triggers=FAST):

        async def covered() -> bool:
            doc = await state(db, "mix/docs")
            return doc is not None and doc.get("processed") == keys * rounds

        await wait_until(covered, "every update handled and checkpointed", timeout=100)
    by_key: dict[int, list[int]] = {}
    for key, n in module.log:
        by_key.setdefault(key, []).append(n)
    assert by_key == {k: list(range(rounds)) for k in range(keys)}
    assert module.overlaps == 0
    assert 1 < module.peak <= 8


POISON = """
async def on_change(ctx, event):
    doc = event["fullDocument"]
    if doc.get("poison"):
        raise ValueError(f"cannot digest {doc['_id']}")
    await ctx.db.seen.insert_one({"event_id": ctx.event_id, "key": doc["_id"]})
"""


async def test_a_poison_event_is_dead_lettered_while_the_rest_flow(db: Db) -> None:
    """A handler failing on one event is retried max_attempts times, then dead-lettered."""
    trigger = {"collection": "orders", "max_attempts": 3, "operations": ["insert"]}
    await db.functions.insert_one(record("p", POISON, trigger))
    metrics = Metrics(process=False)
    async with PluginHost(db, triggers=FAST) as host, host.events() as events:
        assert host.triggers is not None
        follow_triggers(host.triggers.stats, metrics)
        await wait_running(db, "p/orders")
        await db.orders.insert_many([{"_id": i, "poison": i == 5} for i in range(20)])
        letter_event = await next_event(events, "trigger.dead_lettered")
        await wait_seen(db, 19)

        async def counted() -> bool:
            doc = await state(db, "p/orders")
            return doc is not None and doc["processed"] == 20 and doc["dead_letters"] == 1

        await wait_until(counted, "the state counts 20 events and one dead letter")
        text = metrics.render()
    assert 'plugin_host_trigger_events_total{trigger="p/orders"} 20.0' in text
    assert 'plugin_host_trigger_dead_letters_total{trigger="p/orders"} 1.0' in text
    assert "plugin_host_trigger_lag_seconds_count 20.0" in text
    assert "plugin_host_trigger_in_flight 0.0" in text
    assert "plugin_host_triggers_owned 1.0" in text
    assert letter_event["attempts"] == 3
    letters = [d async for d in db.functions_deadletters.find({})]
    assert len(letters) == 1
    letter = letters[0]
    assert letter["trigger"] == "p/orders" and letter["plugin"] == "p"
    assert letter["attempts"] == 3
    assert letter["event"]["fullDocument"]["_id"] == 5
    assert letter["event_id"] == letter["event"]["_id"]
    assert "cannot digest 5" in letter["error"]
    assert any("ValueError" in line for line in letter["traceback"])
    assert letter["version"].startswith("p:")
    assert letter["first_failed_at"] <= letter["last_failed_at"]
    assert sorted(await db.seen.distinct("key")) == [i for i in range(20) if i != 5]
    doc = await state(db, "p/orders")
    assert doc is not None and doc["failed_attempts"] == 3


async def test_a_dead_letter_replays_through_the_current_version(db: Db) -> None:
    """handle() reruns a stored event with its own event_id on the version now current,
    from a host that takes no lease (acquire=False)."""
    trigger = {"collection": "orders", "max_attempts": 1, "operations": ["insert"]}
    await db.functions.insert_one(record("p", POISON, trigger))
    async with PluginHost(db, triggers=FAST) as host, host.events() as events:
        await wait_running(db, "p/orders")
        await db.orders.insert_one({"_id": 1, "poison": True})
        await next_event(events, "trigger.dead_lettered")
    letter = await db.functions_deadletters.find_one({})
    assert letter is not None
    fixed = POISON.replace('doc.get("poison")', "False")
    await db.functions.update_one({"_id": "p"}, {"$set": {"source": fixed}})
    tool = dataclasses.replace(FAST, acquire=False)
    async with PluginHost(db, triggers=tool) as replayer:
        assert replayer.triggers is not None
        with pytest.raises(KeyError, match="no/such"):
            await replayer.triggers.handle("no/such", letter["event"])
        await replayer.triggers.handle("p/orders", letter["event"])
        assert replayer.triggers.owned() == {}
    doc = await db.seen.find_one({"key": 1})
    assert doc is not None and doc["event_id"] == letter["event_id"]["_data"]
    owner = await state(db, "p/orders")
    assert owner is not None and owner["owner"] is None  # the replaying host took no lease


TOTAL = f"""
import asyncio
import {PROBE} as probe

async def on_change(ctx, event):
    probe.active += 1
    probe.peak = max(probe.peak, probe.active)
    await asyncio.sleep(0.001)
    probe.log.append(event["documentKey"]["_id"])
    probe.active -= 1
"""


async def test_total_order_runs_one_event_at_a_time_in_commit_order(db: Db, probe: Any) -> None:
    """ordered=total: one handler at a time, in commit order, whatever the documents."""
    module = sys.modules[PROBE]
    module.__dict__.update(log=[], active=0, peak=0)
    start = datetime.now(UTC) - timedelta(seconds=1)
    await db.docs.insert_many([{"_id": i} for i in range(60)])
    trigger = {"collection": "docs", "ordered": "total", "start_at": start}
    await db.functions.insert_one(record("tot", TOTAL, trigger))
    async with PluginHost(db, triggers=FAST):
        await wait_until(lambda: len(module.log) >= 60, "every insert handled")
    assert module.log == list(range(60))
    assert module.peak == 1


@pytest.mark.embedded_only("failCommand with appName")
async def test_stream_errors_reopen_from_the_last_read_event(db: Db, mongo_uri: str) -> None:
    """getMores failing (non-resumable) make the trigger reopen its stream; nothing lost or
    repeated."""
    await db.functions.insert_one(record("e", RECORDER, {"collection": "orders"}))
    async with app_client(mongo_uri, "flaky") as client:
        flaky = client[db.name]
        host = PluginHost(flaky, triggers=FAST)
        async with host.events() as events, host:
            await wait_running(db, "e/orders")
            await db.orders.insert_many([{"_id": i} for i in range(50)])
            await wait_seen(db, 50)
            getmores_fail = {"failCommands": ["getMore"], "errorCode": 2, "appName": "flaky"}
            async with commands_fail(db, getmores_fail, mode={"times": 4}):
                await db.orders.insert_many([{"_id": i} for i in range(50, 100)])
                await next_event(events, "trigger.stream_error")
                await wait_seen(db, 100)
    assert sorted(await db.seen.distinct("key")) == list(range(100))
    assert await duplicates(db) == []


async def test_unordered_events_of_one_document_may_overlap(db: Db, probe: Any) -> None:
    """ordered=none: events of the same document run concurrently (no per-key queue)."""
    module = sys.modules[PROBE]
    module.__dict__.update(log=[], running=set(), overlaps=0, peak=0, awaiting=1.0)
    start = datetime.now(UTC) - timedelta(seconds=1)
    await db.docs.insert_one({"_id": "one", "n": -1})
    for n in range(30):
        await db.docs.update_one({"_id": "one"}, {"$set": {"n": n}})
    trigger = {"collection": "docs", "operations": ["update"], "ordered": "none", "start_at": start}
    await db.functions.insert_one(record("free", ORDER, trigger))
    async with PluginHost(db, triggers=FAST):
        await wait_until(lambda: len(module.log) >= 30, "every update handled")
    assert sorted(n for _, n in module.log) == list(range(30))
    assert module.overlaps > 0


LOG_KEYS = f"""
import {PROBE} as probe

async def on_change(ctx, event):
    probe.log.append(event["documentKey"]["_id"])
"""


@pytest.mark.timeout(120)  # 2,500 inserts: slow on a loaded machine, never a timing check
async def test_a_batch_longer_than_a_read_turn_is_handled_whole_in_order(
    db: Db, probe: Any
) -> None:
    """Unbounded batches (batch_size None: the server sends everything it has), longer
    than the reader's turn: every event handled once, in commit order."""
    module = sys.modules[PROBE]
    module.__dict__.update(log=[])
    count = _READ_TURN + 452  # more than the reader's turn in one batch
    start = datetime.now(UTC) - timedelta(seconds=1)
    await db.docs.insert_many([{"_id": i} for i in range(count)])
    trigger = {"collection": "docs", "ordered": "total", "start_at": start}
    await db.functions.insert_one(record("long", LOG_KEYS, trigger))
    async with PluginHost(db, triggers=dataclasses.replace(FAST, batch_size=None)):
        await wait_until(lambda: len(module.log) >= count, "every insert handled")
    assert module.log == list(range(count))


SIZES = f"""
import asyncio
import {PROBE} as probe

async def on_change(ctx, event):
    await probe.ready.wait()  # the test has found the runner
    runner = probe.runner
    probe.sizes.append(len(runner._window) + len(runner._staged))
    await asyncio.sleep(0)  # the reader runs between handlers
"""


async def test_the_window_never_holds_more_than_its_capacity(db: Db, probe: Any) -> None:
    """Batches of 1,000 into a window of 25: the events read ahead (in the window or staged
    for it) never exceed 25 while the handlers run, and every event is handled once."""
    module = sys.modules[PROBE]
    module.__dict__.update(sizes=[], runner=None, ready=asyncio.Event())
    count, capacity = 300, 25
    start = datetime.now(UTC) - timedelta(seconds=1)
    await db.docs.insert_many([{"_id": i} for i in range(count)])
    await db.functions.insert_one(
        record("size", SIZES, {"collection": "docs", "start_at": start, "max_concurrency": 4})
    )
    options = dataclasses.replace(FAST, window=capacity)
    async with PluginHost(db, triggers=options) as host:
        engine = host.triggers
        assert engine is not None
        # The runner is looked at from inside (its window): the invariant, not a timing.
        await wait_until(lambda: "size/docs" in engine._running, "the trigger runs")
        module.__dict__["runner"] = engine._running["size/docs"].runner
        module.ready.set()

        async def covered() -> bool:
            doc = await state(db, "size/docs")
            return doc is not None and doc.get("processed") == count

        await wait_until(covered, "every insert handled and checkpointed")
    assert len(module.sizes) == count
    assert 1 < max(module.sizes) <= capacity
