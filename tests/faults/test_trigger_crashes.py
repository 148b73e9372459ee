"""Triggers through kill -9: real `plugin-host run` processes, real SIGKILL, the example aggregator.

Two triggers watch ``sales``: a recorder (one ``seen`` document per delivery, with the
event's cluster time and the delivering process) and the example ``sales_by_region``
aggregator with its load-time reconcile removed, so only its trigger keeps the totals.
After each fault: every sale event was delivered (nothing lost), every repeat is of an
event the checkpoint had not covered when the owner died (repeats bounded by what was in
flight), and the totals equal a recomputation from ``sales``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from host.fleetview import fleet_status
from host.publish import declared_triggers
from tests.daemon_support import Daemon, free_port, wait_ready
from tests.support import Db, Doc, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(400)]

EXAMPLE = Path(__file__).resolve().parents[2] / "plugins_examples" / "sales_by_region.py"
RECONCILE = "async def setup(ctx):\n    ctx.spawn(reconcile, ctx)\n"
LEASE_TTL = 2.0
FLAGS = ("--heartbeat", "0.2", "--host-ttl", "1", "--trigger-lease-ttl", str(LEASE_TTL))
RECORDER = """
import os

async def on_change(ctx, event):
    await ctx.db.seen.insert_one({
        "event_id": ctx.event_id,
        "key": event["documentKey"]["_id"],
        "op": event["operationType"],
        "ct": event["clusterTime"],
        "pid": os.getpid(),
    })
"""
TRIGGERS = ("recorder/sales", "sales_by_region/sales")


async def publish_triggers(db: Db) -> None:
    """The recorder and the aggregator (trigger only: its reconcile-on-load removed)."""
    source = EXAMPLE.read_text()
    assert RECONCILE in source
    source = source.replace(RECONCILE, "")
    await db.functions.insert_many(
        [
            {"_id": "recorder", "source": RECORDER, "triggers": [{"collection": "sales"}]},
            {"_id": "sales_by_region", "source": source, "triggers": declared_triggers(source)},
        ]
    )


@contextlib.asynccontextmanager
async def daemon(
    tmp: Path, mongo_uri: str, db: Db, started: list[Daemon], label: str
) -> AsyncIterator[Daemon]:
    """One ready `plugin-host run` with short heartbeats and trigger leases."""
    folder = tmp / label
    folder.mkdir()
    port = free_port()
    proc = Daemon.run(folder, mongo_uri, db.name, f"127.0.0.1:{port}", *FLAGS)
    started.append(proc)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        await wait_ready(client, proc, timeout=180)
    yield proc


async def owners(db: Db) -> dict[str, Any]:
    """Trigger id → owner host id, for the triggers that run now."""
    return {
        doc["_id"]: doc.get("owner")
        async for doc in db.functions_triggers.find({"status": "running"})
    }


async def host_id(db: Db, proc: Daemon) -> str:
    """The host id a daemon reports under (its leases name it)."""

    async def reported() -> str | None:
        for host in (await fleet_status(db)).hosts:
            if host.pid == proc.proc.pid and host.alive:
                return host.id
        return None

    found: str = await wait_until(reported, f"pid {proc.proc.pid} reports", timeout=60)
    return found


class Sales:
    """Writes a burst of sales (inserts, some updates and deletes) and remembers the keys."""

    def __init__(self, db: Db) -> None:
        self.db = db
        self.keys: list[int] = []
        self.events = 0  # change events written so far (updates/deletes that matched)
        self.rng = random.Random(17)

    async def burst(self, count: int) -> None:
        """Insert ``count`` sales in batches of 20, updating 3 and deleting 1 per batch."""
        for _ in range(count // 20):
            first = len(self.keys)
            keys = list(range(first, first + 20))
            batch: list[Doc] = [
                {"_id": k, "region": self.rng.choice("nsew"), "amount": k % 7 + 1} for k in keys
            ]
            await self.db.sales.insert_many(batch)
            self.keys += keys
            self.events += len(batch)
            for key in self.rng.sample(self.keys, 3):
                change = {"$set": {"region": self.rng.choice("nsew")}, "$inc": {"amount": 5}}
                updated = await self.db.sales.update_one({"_id": key}, change)
                self.events += updated.modified_count
            deleted = await self.db.sales.delete_one({"_id": self.rng.choice(self.keys)})
            self.events += deleted.deleted_count


async def all_delivered(db: Db, sales: Sales) -> None:
    """Wait until every change written to ``sales`` so far reached the recorder."""

    async def done() -> bool:
        return len(await db.seen.distinct("event_id")) >= sales.events

    await wait_until(done, f"all {sales.events} sales events delivered", timeout=120, interval=0.2)
    assert len(await db.seen.distinct("event_id")) == sales.events


async def totals_diff(db: Db) -> dict[str, Any]:
    """Where sales_by_region differs from a recomputation from ``sales`` (empty: nowhere)."""
    expected: dict[str, tuple[int, int]] = {}
    async for sale in db.sales.find():
        total, orders = expected.get(sale["region"], (0, 0))
        expected[sale["region"]] = (total + sale["amount"], orders + 1)
    got = {
        row["_id"]: (row["total"], row["orders"])
        async for row in db.sales_by_region.find({"orders": {"$gt": 0}})
    }
    return {
        r: (got.get(r), expected.get(r))
        for r in set(got) | set(expected)
        if got.get(r) != expected.get(r)
    }


async def wait_totals(db: Db) -> None:
    """Wait until sales_by_region equals a recomputation; say where it differs if not."""

    async def match() -> bool:
        return not await totals_diff(db)

    try:
        await wait_until(match, "the totals match the sales", timeout=120, interval=0.2)
    except AssertionError:
        state = await db.functions_triggers.find_one({"_id": "sales_by_region/sales"})
        pending = await db.sales_by_region_ledger.count_documents({"done": False})
        dead = await db.functions_deadletters.distinct("error")
        raise AssertionError(
            f"totals differ (got, expected): {await totals_diff(db)}; "
            f"half-done ledger entries: {pending}; dead letters: {dead}; state: {state}"
        ) from None


async def repeats(db: Db) -> list[Doc]:
    """Deliveries of an event beyond its first: ``{_id: event_id, n, ct}``."""
    pipeline: list[dict[str, Any]] = [
        {"$group": {"_id": "$event_id", "n": {"$sum": 1}, "ct": {"$first": "$ct"}}},
        {"$match": {"n": {"$gt": 1}}},
    ]
    return [d async for d in await db.seen.aggregate(pipeline)]


def at_or_after(ct: Any, checkpoint: Any) -> bool:
    """Cluster time ``ct`` is at or after the checkpoint's (Timestamps, or None: nothing)."""
    if checkpoint is None:
        return True
    return (ct.time, ct.inc) >= (checkpoint.time, checkpoint.inc)


async def test_kill_9_mid_burst_then_restart_loses_nothing(
    mongo_uri: str, db: Db, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """kill -9 mid-burst, restart: every event delivered, repeats only past the checkpoint."""
    await publish_triggers(db)
    sales = Sales(db)
    async with daemon(tmp_path, mongo_uri, db, daemons, "first") as first:
        await wait_until(lambda: _running(db), "both triggers run on the first daemon", timeout=60)
        await sales.burst(200)

        async def halfway() -> bool:
            return await db.seen.count_documents({}) >= 100

        await wait_until(halfway, "the first daemon handled part of the burst", timeout=60)
        await sales.burst(100)  # more events in flight while it dies
        os.kill(first.proc.pid, signal.SIGKILL)
        assert await first.exit_code() == -signal.SIGKILL
    checkpoint = (await db.functions_triggers.find_one({"_id": "recorder/sales"}) or {}).get(
        "checkpoint_time"
    )
    await sales.burst(100)  # written while no host runs
    async with daemon(tmp_path, mongo_uri, db, daemons, "second"):
        await all_delivered(db, sales)
        await wait_totals(db)
    again = await repeats(db)
    assert all(at_or_after(d["ct"], checkpoint) for d in again), (checkpoint, again)
    uncovered = [  # what the first daemon handled past the checkpoint it had written
        d async for d in db.seen.find({"pid": first.proc.pid}) if at_or_after(d["ct"], checkpoint)
    ]
    assert sum(d["n"] - 1 for d in again) <= len(uncovered)
    assert len(await db.seen.distinct("key")) == len(sales.keys)


async def _running(db: Db) -> bool:
    """Both triggers run and their streams are open: each state has its first checkpoint.

    ``status: running`` and an owner are written when the lease is taken, before the
    runner opens its stream; a trigger without a checkpoint starts "now", when the stream
    opens, and its first checkpoint (the stream's start token) is what fixes that point.
    Writing the burst before it (a slow start under load) left its first events before
    the aggregator's start: never delivered, the totals short by that first batch.
    """
    states = {
        doc["_id"]: doc
        async for doc in db.functions_triggers.find({"_id": {"$in": list(TRIGGERS)}})
    }
    return all(
        (doc := states.get(t)) is not None
        and doc.get("status") == "running"
        and doc.get("owner")
        and doc.get("checkpoint") is not None
        for t in TRIGGERS
    )


async def test_kill_9_of_the_lease_holder_the_other_host_takes_over(
    mongo_uri: str, db: Db, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Two daemons, kill -9 the lease holder: the other takes every trigger and loses nothing."""
    await publish_triggers(db)
    sales = Sales(db)
    async with (
        daemon(tmp_path, mongo_uri, db, daemons, "a") as a,
        daemon(tmp_path, mongo_uri, db, daemons, "b") as b,
    ):
        ids = {await host_id(db, a): a, await host_id(db, b): b}
        await wait_until(lambda: _running(db), "both triggers run", timeout=60)
        await sales.burst(100)
        holder_id = (await owners(db))["recorder/sales"]
        holder = ids[holder_id]
        (survivor_id,) = set(ids) - {holder_id}
        os.kill(holder.proc.pid, signal.SIGKILL)
        assert await holder.exit_code() == -signal.SIGKILL
        await sales.burst(100)

        async def taken_over() -> bool:
            found = await owners(db)
            return all(found.get(t) == survivor_id for t in TRIGGERS)

        await wait_until(taken_over, "the survivor owns every trigger", timeout=60)
        await all_delivered(db, sales)
        await wait_totals(db)
    assert len(await db.seen.distinct("key")) == len(sales.keys)
    survivor_pid = ids[survivor_id].proc.pid
    assert await db.seen.count_documents({"pid": survivor_pid}) > 0
