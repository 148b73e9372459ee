"""Call throughput (one process, one caller) and per-call overhead over a direct call.

For each variant — an async and a sync plugin, each with and without a per-call timeout —
three ways to run the same plugin are timed back to back:

* ``ours``: ``await host.call(name, args)`` (``timeout=`` when the variant has one);
* ``direct``: the same function object the host serves, called directly with a prebuilt
  ``ctx`` (``await main(ctx, args)``; a sync ``main(ctx, args)`` is called inline) — the
  floor for dispatch overhead;
* ``seed``: the seed-style hot-require (``find_one`` + ``compile`` + ``exec`` per call).

``ours`` and ``direct`` run ``call_batch`` calls per timed batch, ``call_repeats``
batches, alternating, and report the best batch — timeit's convention: on a shared
machine, slower batches measure the neighbours, not the code (the medians are in the JSON).
Overhead is ``ours`` minus ``direct`` per call. Sync plugins run in a worker thread in the
host, so their overhead is dominated by the thread hand-off; ``direct_thread``
(``anyio.to_thread.run_sync`` of the same function) is timed as the floor for that.

``ours_frames_per_call`` and ``ours_c_calls_per_call`` count, with ``sys.setprofile`` on
the loop's thread, the Python frames (coroutine resumptions included: a sync plugin's
thread hop resumes the calling loop too) and C functions one ``ours`` call runs: unlike
the times, these do not move with the machine's load.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread

from host import Context, PluginHost

from .baselines import SeedHotRequire
from .common import Config, Target, async_source, database, record, sync_source

TIMEOUT = 30.0  # never reached: the figure is the cost of arming a deadline
ARGS = {"firstName": "Ada", "lastName": "Lovelace"}
VARIANTS = (
    ("async", False),
    ("async", True),
    ("sync", False),
    ("sync", True),
)


async def _per_call(
    loops: dict[str, Callable[[int], Awaitable[None]]], batch: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """Seconds per call of each loop over ``repeats`` interleaved batches: (best, median)."""
    times: dict[str, list[float]] = {key: [] for key in loops}
    for loop in loops.values():  # warm-up: caches, specialised bytecode
        await loop(max(1, batch // 10))
    for _ in range(repeats):
        for key, loop in loops.items():
            started = time.perf_counter()
            await loop(batch)
            times[key].append((time.perf_counter() - started) / batch)
    return {key: (min(values), statistics.median(values)) for key, values in times.items()}


async def _profile_counts(loop: Callable[[int], Awaitable[None]], calls: int) -> Counter[str]:
    """Python frames (``call``) and C calls (``c_call``) per call of ``loop`` (profiled)."""
    counts: Counter[str] = Counter()

    def profile(_frame: Any, event: str, _arg: Any) -> None:
        counts[event] += 1

    await loop(calls // 10)  # warm-up
    sys.setprofile(profile)
    try:
        await loop(calls)
    finally:
        sys.setprofile(None)
    return counts


async def _seed_rate(seed: SeedHotRequire, name: str, seconds: float) -> float:
    """Calls per second of the seed-style baseline, timed for about ``seconds``."""
    await seed.call(name, ARGS)
    calls = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for _ in range(20):
            await seed.call(name, ARGS)
        calls += 20
    return calls / (time.perf_counter() - started)


def _loops(host: PluginHost, name: str, kind: str, timed: bool) -> dict[str, Any]:
    plugin = host.current(name)
    assert plugin is not None
    func = plugin.entrypoint
    ctx = Context(plugin, host._dispatcher, 0)
    call = host.call
    args = ARGS

    if kind == "async":

        async def direct(n: int) -> None:
            for _ in range(n):
                await func(ctx, args)

    else:

        async def direct(n: int) -> None:
            for _ in range(n):
                func(ctx, args)

    async def direct_thread(n: int) -> None:
        for _ in range(n):
            await anyio.to_thread.run_sync(func, ctx, args)

    if timed:

        async def ours(n: int) -> None:
            for _ in range(n):
                await call(name, args, timeout=TIMEOUT)

    else:

        async def ours(n: int) -> None:
            for _ in range(n):
                await call(name, args)

    loops: dict[str, Any] = {"ours": ours, "direct": direct}
    if kind == "sync":
        loops["direct_thread"] = direct_thread
    return loops


async def run(target: Target, cfg: Config) -> dict[str, Any]:
    """Per-variant calls/s and per-call µs for ours, direct and seed-style; overheads."""
    results: dict[str, Any] = {}
    async with database(target.uri, "throughput") as db:
        coll = db.functions
        await coll.insert_many(
            [record("tp_async", async_source(1), 1), record("tp_sync", sync_source(1), 1)]
        )
        seed = SeedHotRequire(coll)
        async with PluginHost(db, "functions") as host:
            for kind, timed in VARIANTS:
                name = f"tp_{kind}"
                # Sync plugins cross a thread per call: fewer calls give the same precision.
                batch = cfg.call_batch if kind == "async" else max(1_000, cfg.call_batch // 20)
                loops = _loops(host, name, kind, timed)
                per_call = await _per_call(loops, batch, cfg.call_repeats)
                counted = 1_000 if kind == "async" else 100
                counts = await _profile_counts(loops["ours"], counted)
                seed_rate = await _seed_rate(seed, name, cfg.seed_seconds)
                key = f"{kind}{'_timeout' if timed else ''}"
                entry: dict[str, Any] = {
                    "kind": kind,
                    "timeout": TIMEOUT if timed else None,
                    "batch": batch,
                    "repeats": cfg.call_repeats,
                    "seed_calls_per_s": seed_rate,
                    "seed_us": 1e6 / seed_rate,
                    "ours_frames_per_call": counts["call"] / counted,
                    "ours_c_calls_per_call": counts["c_call"] / counted,
                }
                for loop, (best, median) in per_call.items():
                    entry[f"{loop}_us"] = best * 1e6
                    entry[f"{loop}_median_us"] = median * 1e6
                    entry[f"{loop}_calls_per_s"] = 1.0 / best
                entry["overhead_us"] = entry["ours_us"] - entry["direct_us"]
                if "direct_thread_us" in entry:
                    entry["overhead_vs_thread_us"] = entry["ours_us"] - entry["direct_thread_us"]
                entry["vs_seed"] = entry["ours_calls_per_s"] / seed_rate
                results[key] = entry
    return results
