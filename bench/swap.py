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

The storm's rate is stated in updates per second, spread evenly over the plugins (one
update every ``1 / rate`` s, round robin). The default, ``SWAP_PLUGINS / SWAP_PERIOD`` =
200 updates/s sustained, is far above what a publisher does (a CI push of 20 plugins is
one burst of 20); ``STORM_RATES`` adds the drop at a rate a fleet-wide rollout or a busy
dev sync reaches (20 updates/s, ``drop_at_rate``). ``reload_cost`` measures what one
reload costs the event loop: no callers, a 200/s storm, and the CPU time of the loop's
thread (``time.thread_time``) per reload applied, against the same seconds with no
updates. CPU time, unlike the throughput drop, barely moves with the machine's load.

The updater is a process of its own (sync PyMongo), as a publisher is in production:
the storm then costs the host only what the reloads cost it, not the writer's client
work (connection set-up, 200 writes a second) on the host's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import time
from typing import Any

from pymongo import MongoClient

from host import HostEvent, PluginHost

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
STORM_RATE = SWAP_PLUGINS / SWAP_PERIOD  # updates/s of the default storm
STORM_RATES = (20.0,)  # further storm rates whose throughput drop is reported


def _is_sync(i: int) -> bool:
    return i % 4 == 3


def _source(i: int, rev: int) -> str:
    return sync_source(rev) if _is_sync(i) else async_source(rev)


def _storm(
    uri: str,
    db_name: str,
    names: list[str],
    rate: float,
    stop: Any,
    first_round: Any,
    counts: Any,
) -> None:
    """The updater process: ``rate`` updates/s, round robin over ``names``, until ``stop``.

    ``counts`` gets the updates written and how many of them were late (the writer could
    not keep the rate); ``first_round`` is set once every plugin was updated once.
    """
    client: MongoClient[dict[str, Any]] = MongoClient(uri)
    coll = client[db_name].functions
    interval = 1.0 / rate
    next_at = time.monotonic()
    written = 0
    try:
        while not stop.is_set():
            i = written % len(names)
            rev = written // len(names) + 1
            coll.update_one({"_id": names[i]}, update(_source(i, rev), rev))
            written += 1
            counts[0] = written
            if written == len(names):
                first_round.set()
            next_at += interval
            delay = next_at - time.monotonic()
            if delay < 0:
                counts[1] += 1
                next_at = time.monotonic()
            elif delay > 0:
                stop.wait(delay)
    finally:
        client.close()


async def swap_under_load(
    uri: str, callers: int, seconds: float, *, storm: bool = True, rate: float = STORM_RATE
) -> dict[str, Any]:
    """Run ``callers`` callers for ``seconds`` while ``rate`` updates/s change the plugins.

    With ``storm=False`` nothing is updated: the quiet baseline of the same callers.
    """
    names = [f"s{i}" for i in range(SWAP_PLUGINS)]
    async with database(uri, f"swap{callers}") as db:
        coll = db.functions
        await coll.insert_many([record(n, _source(i, 0), 0) for i, n in enumerate(names)])
        reloads = 0
        lags: list[float] = []

        def count(event: HostEvent) -> bool:
            # The bench's instrument: it runs in the loader's step and returns False, so
            # no reader task wakes per event (a reader's two loop turns per reload were
            # about a tenth of `reload_cost` when it was measured that way).
            nonlocal reloads
            if event.event == "plugin.reloaded":
                reloads += 1
                lag = event.get("change_to_live_ms")
                if lag is not None:
                    lags.append(float(lag))
            return False

        async with PluginHost(db, "functions") as host, host.events(accept=count):
            stop = asyncio.Event()
            calls = 0
            failed = 0
            stale = 0
            errors: dict[str, int] = {}
            latencies: dict[bool, list[float]] = {False: [], True: []}  # by "is sync"
            updates = 0
            late_updates = 0
            loop_cpu = 0.0

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
            counts = context.Array("i", 2)  # updates written, late updates

            proc = context.Process(
                target=_storm,
                args=(uri, db.name, names, rate, stop_storm, first_round, counts),
                daemon=True,
            )

            async def updater() -> None:
                nonlocal updates, late_updates
                await stop.wait()
                stop_storm.set()
                await asyncio.to_thread(proc.join, 30)
                updates, late_updates = counts[0] - counts_at_start, counts[1]

            counts_at_start = 0
            if storm:  # the clock starts once the storm runs: the first round was written
                proc.start()
                if not await asyncio.to_thread(first_round.wait, 60):
                    raise RuntimeError("the storm's updater process did not start")
                counts_at_start = counts[0]
            tasks = [asyncio.create_task(caller(i)) for i in range(callers)]
            if storm:
                tasks.append(asyncio.create_task(updater()))
            reloads_at_start = reloads
            started, cpu_started = time.perf_counter(), time.thread_time()
            await asyncio.sleep(seconds)
            loop_cpu = time.thread_time() - cpu_started
            reloads_in_window = reloads - reloads_at_start
            stop.set()
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - started
            await asyncio.sleep(0.05)
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
        "storm_rate_per_s": rate if storm else 0.0,
        "updates": updates,
        "late_updates": late_updates,
        "reloads": reloads,
        "reloads_in_window": reloads_in_window,
        "loop_cpu_s": loop_cpu,
        "call_us": summarize(latencies[False]),
        "sync_call_us": summarize(latencies[True]),
        "reload_lag_ms": summarize(lags),
        "call_samples_us": latencies[False],
        "sync_call_samples_us": latencies[True],
    }


def _children_cpu() -> dict[str, float]:
    """CPU seconds used so far by this process's children, by kind (Linux ``/proc``).

    ``server`` is the embedded server when the suite runs it as a subprocess,
    ``compiler`` the host's compiler processes; empty where ``/proc`` is missing.
    """
    out: dict[str, float] = {}
    me = str(os.getpid())
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    with contextlib.suppress(OSError):
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        for pid in pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[1] != me:
                    continue
                with open(f"/proc/{pid}/cmdline") as f:
                    cmdline = f.read()
                kind = "server" if "embedded-mongo" in cmdline else "other"
                if "precompile_worker" in cmdline:
                    kind = "compiler"
                out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


async def reload_cost(uri: str, seconds: float) -> dict[str, Any]:
    """What one reload costs the event loop: its thread's CPU time per reload applied.

    No callers; the default storm for ``seconds``, against ``seconds`` with no updates
    (the loop's own idle cost: the stream's empty getMores, timers). Also the whole host
    process's CPU per reload (its other threads included) and, where the server is a
    subprocess of this one, the server's: what else the storm takes of the 2 cores.
    """
    idle = await swap_under_load(uri, 0, seconds, storm=False)
    before, process_before = _children_cpu(), time.process_time()
    busy = await swap_under_load(uri, 0, seconds)
    after, process_after = _children_cpu(), time.process_time()
    reloads = busy["reloads_in_window"]
    extra = busy["loop_cpu_s"] - idle["loop_cpu_s"]  # both over the same `seconds`
    # Over the whole storm run (set-up and first round included), per update written.
    updates = max(1, busy["updates"])
    per_update = {
        f"{kind}_cpu_per_update_ms": round(
            1000.0 * (after[kind] - before.get(kind, 0.0)) / updates, 3
        )
        for kind in after
        if kind != "other"
    }
    return {
        "process_cpu_per_update_ms": round(1000.0 * (process_after - process_before) / updates, 3),
        **per_update,
        "storm_rate_per_s": STORM_RATE,
        "seconds": busy["seconds"],
        "updates": busy["updates"],
        "reloads": reloads,
        "loop_cpu_s": busy["loop_cpu_s"],
        "idle_loop_cpu_s": idle["loop_cpu_s"],
        "loop_cpu_per_reload_ms": 1000.0 * extra / reloads if reloads else None,
        "loop_share_pct": 100.0 * busy["loop_cpu_s"] / busy["seconds"],
    }


async def run(target: Target, cfg: Config) -> dict[str, Any]:
    """Swap under load for each caller count in ``cfg.swap_callers``, and its quiet run.

    Each caller count also gets the drop at each of ``STORM_RATES``; ``_cost`` is
    :func:`reload_cost`.
    """
    out: dict[str, Any] = {}
    for n in cfg.swap_callers:
        quiet = await swap_under_load(target.uri, n, cfg.swap_seconds, storm=False)
        result = await swap_under_load(target.uri, n, cfg.swap_seconds)
        result["quiet_calls_per_s"] = quiet["calls_per_s"]
        result["throughput_drop_pct"] = _drop(result, quiet)
        result["drop_at_rate"] = {}
        for rate in STORM_RATES:
            slow = await swap_under_load(target.uri, n, cfg.swap_seconds, rate=rate)
            result["drop_at_rate"][f"{rate:g}"] = _drop(slow, quiet)
        out[str(n)] = result
    out["_cost"] = await reload_cost(target.uri, max(3.0, cfg.swap_seconds / 2))
    return out


def _drop(storm: dict[str, Any], quiet: dict[str, Any]) -> float:
    return 100.0 * (1.0 - float(storm["calls_per_s"]) / float(quiet["calls_per_s"]))
