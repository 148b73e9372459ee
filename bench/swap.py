"""Swap under load: calls keep flowing while plugins are replaced underneath them.

``SWAP_PLUGINS`` plugins (a quarter of them sync, run in worker threads) are all updated
every ``SWAP_PERIOD`` seconds by one updater, while N concurrent callers call random
plugins in a loop (yielding to the event loop between calls). Every call must succeed
(``failed``), and no caller may see a plugin go back to an older revision after it has
seen a newer one (``stale``). Every 10th call's latency is kept for the distributions,
async and sync plugins apart (sync calls queue for the host's worker threads).

Each caller count also runs once with the updater off (``quiet``): the same callers on
the same plugins with no reloads. ``throughput_drop_pct`` is how much lower the call
rate is while the reload storm runs, against that quiet run of the same benchmark.

The updater is a process of its own (sync PyMongo), as a publisher is in production:
the storm then costs the host only what the reloads cost it, not the writer's client
work (connection set-up, 200 writes a second) on the host's event loop.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
from typing import Any

from pymongo import MongoClient

from host import PluginHost

from .common import (
    Config,
    Target,
    async_source,
    database,
    record,
    summarize,
    sync_source,
    update,
)

SWAP_PLUGINS = 20
SWAP_PERIOD = 0.1
SAMPLE_EVERY = 10


def _is_sync(i: int) -> bool:
    return i % 4 == 3


def _source(i: int, rev: int) -> str:
    return sync_source(rev) if _is_sync(i) else async_source(rev)


def _storm(
    uri: str, db_name: str, names: list[str], stop: Any, first_round: Any, counts: Any
) -> None:
    """The updater process: every plugin gets a new revision each period until ``stop``."""
    client: MongoClient[dict[str, Any]] = MongoClient(uri)
    coll = client[db_name].functions
    next_at = time.monotonic()
    rev = 0
    try:
        while not stop.is_set():
            rev += 1
            for i, name in enumerate(names):
                coll.update_one({"_id": name}, update(_source(i, rev), rev))
            counts[0] += 1
            first_round.set()
            next_at += SWAP_PERIOD
            delay = next_at - time.monotonic()
            if delay < 0:
                counts[1] += 1
                next_at = time.monotonic()
            stop.wait(max(0.0, delay))
    finally:
        client.close()


async def swap_under_load(
    uri: str, callers: int, seconds: float, *, storm: bool = True
) -> dict[str, Any]:
    """Run ``callers`` callers for ``seconds`` while every plugin changes each period.

    With ``storm=False`` nothing is updated: the quiet baseline of the same callers.
    """
    names = [f"s{i}" for i in range(SWAP_PLUGINS)]
    async with database(uri, f"swap{callers}") as db:
        coll = db.functions
        await coll.insert_many([record(n, _source(i, 0), 0) for i, n in enumerate(names)])
        async with PluginHost(db, "functions") as host, host.events() as events:
            stop = asyncio.Event()
            calls = 0
            failed = 0
            stale = 0
            errors: dict[str, int] = {}
            latencies: dict[bool, list[float]] = {False: [], True: []}  # by "is sync"
            reloads = 0
            lags: list[float] = []
            rounds = 0
            late_rounds = 0

            async def caller(seed: int) -> None:
                nonlocal calls, failed, stale
                rng = random.Random(seed)
                seen = dict.fromkeys(names, -1)
                n = 0
                while not stop.is_set():
                    i = rng.randrange(SWAP_PLUGINS)
                    name = names[i]
                    started = time.perf_counter()
                    try:
                        rev = await host.call(name)
                    except Exception as exc:
                        failed += 1
                        key = f"{type(exc).__name__}: {exc}"[:120]
                        errors[key] = errors.get(key, 0) + 1
                    else:
                        if rev < seen[name]:
                            stale += 1
                        seen[name] = rev
                    n += 1
                    if n % SAMPLE_EVERY == 0:
                        latencies[_is_sync(i)].append((time.perf_counter() - started) * 1e6)
                    calls += 1
                    await asyncio.sleep(0)

            context = multiprocessing.get_context("spawn")
            stop_storm = context.Event()
            first_round = context.Event()
            counts = context.Array("i", 2)  # rounds, late rounds

            proc = context.Process(
                target=_storm,
                args=(uri, db.name, names, stop_storm, first_round, counts),
                daemon=True,
            )

            async def updater() -> None:
                nonlocal rounds, late_rounds
                await stop.wait()
                stop_storm.set()
                await asyncio.to_thread(proc.join, 30)
                rounds, late_rounds = counts[0], counts[1]

            async def listen() -> None:
                nonlocal reloads
                async for event in events:
                    if event.event == "plugin.reloaded":
                        reloads += 1
                        lag = event.get("change_to_live_ms")
                        if lag is not None:
                            lags.append(float(lag))

            listener = asyncio.create_task(listen())
            if storm:  # the clock starts once the storm runs: the first round was written
                proc.start()
                if not await asyncio.to_thread(first_round.wait, 60):
                    raise RuntimeError("the storm's updater process did not start")
            tasks = [asyncio.create_task(caller(i)) for i in range(callers)]
            if storm:
                tasks.append(asyncio.create_task(updater()))
            started = time.perf_counter()
            await asyncio.sleep(seconds)
            stop.set()
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - started
            await asyncio.sleep(0.05)
            listener.cancel()
    return {
        "callers": callers,
        "plugins": SWAP_PLUGINS,
        "period_s": SWAP_PERIOD,
        "seconds": elapsed,
        "calls": calls,
        "calls_per_s": calls / elapsed,
        "failed": failed,
        "stale": stale,
        "errors": errors,
        "update_rounds": rounds,
        "late_rounds": late_rounds,
        "updates": rounds * SWAP_PLUGINS,
        "reloads": reloads,
        "call_us": summarize(latencies[False]),
        "sync_call_us": summarize(latencies[True]),
        "reload_lag_ms": summarize(lags),
        "call_samples_us": latencies[False],
        "sync_call_samples_us": latencies[True],
    }


async def run(target: Target, cfg: Config) -> dict[str, Any]:
    """Swap under load for each caller count in ``cfg.swap_callers``, and its quiet run."""
    out: dict[str, Any] = {}
    for n in cfg.swap_callers:
        quiet = await swap_under_load(target.uri, n, cfg.swap_seconds, storm=False)
        result = await swap_under_load(target.uri, n, cfg.swap_seconds)
        result["quiet_calls_per_s"] = quiet["calls_per_s"]
        result["throughput_drop_pct"] = 100.0 * (1.0 - result["calls_per_s"] / quiet["calls_per_s"])
        out[str(n)] = result
    return out
