"""Load: callers during constant reloads never fail nor see half a version; reloads don't leak."""

from __future__ import annotations

import gc
import json
import os
import time
import weakref
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import psutil
import pytest
from pymongo import UpdateOne

from host import PluginHost
from host.embedded import EmbeddedMongo
from tests.support import Db, next_event, torn_pair, wait_until

from .helpers import fail_command

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CALLERS = 200
PLUGINS = 20
WRITE_EVERY = 0.1  # seconds between two rounds of updates (pacing, not waiting)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))
    return sorted_values[index]


async def _callers_during_reloads(
    db: Db, host: PluginHost, seconds: float, *, on_round: Any = None
) -> dict[str, Any]:
    """Run CALLERS callers for ``seconds`` while every plugin is updated every WRITE_EVERY s."""
    names = [f"load{i}" for i in range(PLUGINS)]
    latencies: list[float] = []
    failures: list[BaseException] = []
    torn: list[tuple[str, Any]] = []
    rounds = 0
    stop = anyio.Event()

    async def caller(i: int) -> None:
        k = i
        while not stop.is_set():
            name = names[k % PLUGINS]
            k += 1
            started = time.perf_counter()
            try:
                a, b = await host.call(name)
            except Exception as exc:
                failures.append(exc)
            else:
                latencies.append(time.perf_counter() - started)
                if a != b:
                    torn.append((name, (a, b)))
            await anyio.lowlevel.checkpoint()

    async def writer() -> None:
        nonlocal rounds
        while not stop.is_set():
            rounds += 1
            await db.functions.bulk_write(
                [
                    UpdateOne({"_id": name}, {"$set": {"source": torn_pair(rounds, sync=i == 0)}})
                    for i, name in enumerate(names)
                ]
            )
            if on_round is not None:
                await on_round(rounds)
            await anyio.sleep(WRITE_EVERY)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(CALLERS):
            tg.start_soon(caller, i)
        tg.start_soon(writer)
        await anyio.sleep(seconds)
        stop.set()
    elapsed = time.perf_counter() - started
    assert failures == [], f"{len(failures)} calls failed, e.g. {failures[:3]!r}"
    assert torn == [], f"calls saw half-built versions: {torn[:3]!r}"

    async def newest() -> bool:
        for name in names:
            if await host.call(name) != (rounds, rounds):
                return False
        return True

    await wait_until(newest, "every plugin serves the last round", timeout=30)
    latencies.sort()
    return {
        "callers": CALLERS,
        "plugins": PLUGINS,
        "seconds": round(elapsed, 2),
        "calls": len(latencies),
        "calls_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 3),
        "write_rounds": rounds,
    }


def _report(tmp_path: Path, name: str, figures: dict[str, Any]) -> None:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(figures, indent=2))
    print(f"\n{name}: {json.dumps(figures)}\n(written to {path})")


async def test_callers_during_reloads_never_fail(
    db: Db, load_seconds: float, tmp_path: Path
) -> None:
    """200 callers while 20 plugins reload every 100 ms: no failed call, no half-built version."""
    await db.functions.insert_many(
        [{"_id": f"load{i}", "source": torn_pair(0)} for i in range(PLUGINS)]
    )
    async with PluginHost(db, grace_period=5) as host:
        figures = await _callers_during_reloads(db, host, load_seconds)
    _report(tmp_path, "load", figures)


@pytest.mark.allow_blocking  # psutil reads /proc on the loop thread: a test-side measurement
async def test_reloads_do_not_leak(own_db: Db, reload_count: int, tmp_path: Path) -> None:
    """Thousands of reloads of one plugin: RSS grows < 10 MB after warm-up; old modules die.

    The server is a private one with a 100-entry oplog: the session server keeps 100,000
    oplog entries (each with the record's pre- and post-image) in this same process, and
    its growth is not the host's.
    """
    db = own_db
    process = psutil.Process()
    padding = "X = list(range(200))\n"  # a version that owns some memory of its own
    refs: list[weakref.ref[Any]] = []
    async with PluginHost(db, grace_period=1) as host, host.events() as events:
        await db.functions.insert_one({"_id": "mem", "source": padding + torn_pair(0)})
        await next_event(events, "plugin.loaded")
        warm_up = min(500, reload_count // 4)
        rss_before = 0
        for n in range(1, warm_up + reload_count + 1):
            await db.functions.update_one(
                {"_id": "mem"}, {"$set": {"source": padding + torn_pair(n)}}
            )
            await next_event(events, "plugin.reloaded")
            if n % 100 == 0:
                current = host.current("mem")
                assert current is not None
                refs.append(weakref.ref(current.module))
                del current
            if n == warm_up:
                await wait_until(lambda: not host._registry.retiring(), "old versions retired")
                gc.collect()
                rss_before = process.memory_info().rss
        assert await host.call("mem") == (warm_up + reload_count,) * 2
        await wait_until(lambda: not host._registry.retiring(), "old versions retired")
        gc.collect()
        rss_after = process.memory_info().rss
        alive = [ref for ref in refs[:-1] if ref() is not None]
    growth_mb = (rss_after - rss_before) / 2**20
    _report(
        tmp_path,
        "reload_memory",
        {
            "reloads": reload_count,
            "warm_up": warm_up,
            "rss_before_mb": round(rss_before / 2**20, 1),
            "rss_after_mb": round(rss_after / 2**20, 1),
            "growth_mb": round(growth_mb, 2),
        },
    )
    assert alive == [], f"{len(alive)} retired modules are still referenced"
    assert growth_mb < 10, f"RSS grew by {growth_mb:.1f} MB over {reload_count} reloads"


@pytest.mark.soak
async def test_soak_reloads_with_connection_faults(
    own_server: EmbeddedMongo, own_db: Db, load_seconds: float, tmp_path: Path
) -> None:
    """Soak: 10 min of callers and reloads while the stream's connection drops every 10 rounds."""
    await own_db.functions.insert_many(
        [{"_id": f"load{i}", "source": torn_pair(0)} for i in range(PLUGINS)]
    )
    seconds = float(os.environ.get("PLUGIN_HOST_SOAK_SECONDS", load_seconds))

    async def every_round(n: int) -> None:
        if n % 10 == 0:
            await fail_command(
                own_db, {"times": 3}, failCommands=["getMore", "aggregate"], closeConnection=True
            )

    async with PluginHost(own_db, grace_period=5, max_await_ms=100) as host:
        figures = await _callers_during_reloads(own_db, host, seconds, on_round=every_round)
        assert host.is_ready
    figures["faults_injected"] = own_server.failpoints.times_entered("failCommand")
    _report(tmp_path, "soak", figures)
