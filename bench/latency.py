"""Change-to-live latency and reload throughput.

Change-to-live is measured from the update's acknowledgment (``await update_one``
returned) to the first call that the new version serves: a caller loop calls the plugin,
yielding to the event loop between calls, until the result changes.

* plugin-host: sequential updates of one plugin; each waits until the previous one is
  live, so the samples are independent. The ``plugin.reloaded`` event's arrival is
  recorded too (``event_ms``), for comparison with the call-served time.
* polling reloader: a one-second period makes sequential updates take ~0.5 s each, so
  updates run ``POLL_LANES`` at a time on distinct plugins, each after a random delay
  so that updates land uniformly across the poll period. Each lane probes its plugin
  every millisecond, a resolution far below the figure it measures.

Reload throughput: many sequential updates of one plugin, as fast as the server
acknowledges them, then the time until the last one is live. The loader compiles only
the newest pending change per name, so it may compile fewer versions than updates
(``compiled``).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from host import PluginHost

from .baselines import POLL_INTERVAL, PollingReloader
from .common import Config, Target, async_source, database, record, summarize, update

WARMUP = 20
POLL_LANES = 25
DEADLINE = 30.0


async def _until_served(call: Any, name: str, expected: int, probe: float) -> None:
    """Call ``name`` until it returns ``expected``; ``probe`` seconds between calls."""
    deadline = time.perf_counter() + DEADLINE
    while await call(name) != expected:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{name} did not serve revision {expected} in {DEADLINE} s")
        await asyncio.sleep(probe)


async def ours_change_to_live(uri: str, updates: int) -> dict[str, Any]:
    """Sequential updates of one plugin; ack → first call served by the new version."""
    async with database(uri, "latency") as db:
        coll = db.functions
        await coll.insert_one(record("lat", async_source(0), 0))
        served: list[float] = []
        event_ms: list[float] = []
        async with PluginHost(db, "functions") as host, host.events() as events:
            arrivals: dict[int, float] = {}

            async def listen() -> None:
                async for event in events:
                    if event.event == "plugin.reloaded":
                        arrivals[int(event["revision"])] = time.perf_counter()

            listener = asyncio.create_task(listen())
            try:
                for rev in range(1, WARMUP + updates + 1):
                    await coll.update_one({"_id": "lat"}, update(async_source(rev), rev))
                    acked = time.perf_counter()
                    await _until_served(host.call, "lat", rev, 0.0)
                    done = time.perf_counter()
                    await asyncio.sleep(0)  # let the listener record the event
                    if rev > WARMUP:
                        served.append((done - acked) * 1000.0)
                        if rev in arrivals:
                            event_ms.append((arrivals[rev] - acked) * 1000.0)
            finally:
                listener.cancel()
    return {
        "method": "sequential updates of one plugin; caller loop with sleep(0) between calls",
        "served_ms": summarize(served),
        "event_ms": summarize(event_ms),
        "samples_ms": served,
    }


async def polling_change_to_live(uri: str, updates: int) -> dict[str, Any]:
    """The polling reloader: ack → first call served by the new version."""
    lanes = min(POLL_LANES, updates)
    async with database(uri, "polling") as db:
        coll = db.functions
        await coll.insert_many([record(f"p{i}", async_source(0), 0) for i in range(lanes)])
        samples: list[float] = []
        rng = random.Random(1)
        async with PollingReloader(coll) as reloader:
            per_lane = [updates // lanes + (1 if i < updates % lanes else 0) for i in range(lanes)]

            async def lane(i: int, count: int) -> None:
                name = f"p{i}"
                for rev in range(1, count + 1):
                    await asyncio.sleep(rng.random() * POLL_INTERVAL)
                    await coll.update_one({"_id": name}, update(async_source(rev), rev))
                    acked = time.perf_counter()
                    await _until_served(reloader.call, name, rev, 0.001)
                    samples.append((time.perf_counter() - acked) * 1000.0)

            await asyncio.gather(*(lane(i, n) for i, n in enumerate(per_lane)))
    return {
        "method": f"{lanes} plugins updated concurrently at random phases; probe every 1 ms",
        "interval_s": POLL_INTERVAL,
        "served_ms": summarize(samples),
        "samples_ms": samples,
    }


async def reload_throughput(uri: str, updates: int) -> dict[str, Any]:
    """Sequential updates of one plugin as fast as acknowledged; time until the last is live."""
    async with database(uri, "reload") as db:
        coll = db.functions
        await coll.insert_one(record("hot", async_source(0), 0))
        async with PluginHost(db, "functions") as host, host.events() as events:
            compiled = 0

            async def count() -> None:
                nonlocal compiled
                async for event in events:
                    if event.event == "plugin.reloaded":
                        compiled += 1

            counter = asyncio.create_task(count())
            try:
                started = time.perf_counter()
                for rev in range(1, updates + 1):
                    await coll.update_one({"_id": "hot"}, update(async_source(rev), rev))
                acked = time.perf_counter()
                await _until_served(host.call, "hot", updates, 0.0)
                live = time.perf_counter()
                await asyncio.sleep(0.05)  # the last events reach the counter
            finally:
                counter.cancel()
    elapsed = live - started
    return {
        "updates": updates,
        "compiled": compiled,
        "elapsed_s": elapsed,
        "updates_per_s": updates / elapsed,
        "ack_rate_per_s": updates / (acked - started),
        "last_ack_to_live_ms": (live - acked) * 1000.0,
    }


async def run(target: Target, cfg: Config) -> dict[str, Any]:
    """Change-to-live for plugin-host and the polling reloader, the issue figure, reloads/s."""
    ours = await ours_change_to_live(target.uri, cfg.latency_updates)
    issue = await ours_change_to_live(target.uri, cfg.issue_updates)
    polling = await polling_change_to_live(target.uri, cfg.latency_updates)
    reloads = await reload_throughput(target.uri, cfg.reload_updates)
    return {
        "ours": ours,
        "issue": {k: v for k, v in issue.items() if k != "samples_ms"},
        "polling": polling,
        "reload": reloads,
    }
