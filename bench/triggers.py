"""Change-stream triggers: lag, throughput against a bare ``watch()`` loop, failover, loss.

``python -m bench.triggers [--quick]`` (and the ``triggers`` group of ``make bench``).
The embedded server runs in its own process (``bench/common.py``). What it measures:

* **lag**: from an insert's acknowledgment (``await insert_one`` returned) to the start
  of the trigger's handler for that document, at light load (one insert at a time, the
  next 10 ms after the previous handler started): p50 / p99 / max. Same process, same
  ``perf_counter`` clock. A handler may start before the client has read its own ack
  (the change stream's reply and the insert's reply race): such samples are negative.
* **throughput**: N inserts are written first; then a bare PyMongo loop (``async for``
  over ``watch(start_at_operation_time=T0)``) and a trigger with a no-op handler
  (``start_at`` T0, the default ``per_key`` ordering over distinct keys, and ``total``)
  read the same N events, alternately, in the same run, through the same client.
  Events/s is N over the time from the stream's opening (the ``aggregate`` with
  ``$changeStream`` on the collection, seen by a command listener on the client: the
  bare loop's own, or the trigger runner's) to the N-th event (loop body, or handler
  start); the ratio is trigger / bare (medians). Both windows hold the same server work
  (building, sending and decoding the batches); the trigger's also holds its first
  checkpoint write (one ``hello`` + ``update``, sent beside the first batch's handling),
  not its host's start or lease acquisition. Each figure is the median of the repeats
  (3 with ``--quick``, 5 without), run alternately. ``in_batch`` is the old figure, first
  event to N-th: it leaves the batches' production out, and since the embedded server answers an
  ``aggregate`` without ``batchSize`` with every event in its first batch, for the bare
  loop it only times PyMongo popping decoded documents (hundreds of thousands a second),
  which no loop that calls a handler can approach: it is not the goal's yardstick.
* **failover**: two ``plugin-host run`` daemons (``--trigger-lease-ttl``), a trigger
  recording each delivery, a writer inserting 50 documents/s; ``kill -9`` of the lease
  holder; from the kill until the survivor holds the lease (the state document, read
  every 10 ms) and until the survivor handles its first event. Then every inserted
  document must have been delivered: **lost** counts those that were not (must be 0),
  **repeats** the deliveries beyond the first.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.database import AsyncDatabase

from host import PluginHost
from host.fleetview import fleet_status
from host.triggers import TriggerOptions, state_collection_name

from . import fleet
from .common import Config, Doc, embedded_server, fresh_name, machine_info, summarize
from .common import Target as BenchTarget

PROBE = "_plugin_host_bench_trigger_probe"
LAG_SOURCE = f"""
import time
import {PROBE} as probe

async def on_change(ctx, event):
    probe.started(event["documentKey"]["_id"], time.perf_counter())
"""
NOOP_SOURCE = f"""
import {PROBE} as probe

async def on_change(ctx, event):
    probe.tick()
"""
RECORDER_SOURCE = """
import os

async def on_change(ctx, event):
    await ctx.db.fo_seen.insert_one({"key": event["documentKey"]["_id"], "pid": os.getpid()})
"""
DEADLINE = 60.0
FAILOVER_TTL = 3.0
WRITES_PER_S = 50.0


class _Probe:
    """What the benchmark's handlers report to: handler starts, and a tick counter."""

    def __init__(self) -> None:
        self.starts: dict[Any, float] = {}
        self.waiting: dict[Any, asyncio.Event] = {}
        self.ticks = 0
        self.first = 0.0
        self.last = 0.0
        self.target = 0
        self.done = asyncio.Event()

    def started(self, key: Any, at: float) -> None:
        self.starts[key] = at
        event = self.waiting.pop(key, None)
        if event is not None:
            event.set()

    def tick(self) -> None:
        now = time.perf_counter()
        if self.ticks == 0:
            self.first = now
        self.ticks += 1
        self.last = now
        if self.ticks == self.target:
            self.done.set()

    def reset(self, target: int = 0) -> None:
        self.starts.clear()
        self.waiting.clear()
        self.ticks = 0
        self.first = self.last = 0.0
        self.target = target
        self.done = asyncio.Event()


_probe = _Probe()


def _install_probe() -> None:
    module = types.ModuleType(PROBE)
    module.started = _probe.started  # type: ignore[attr-defined]
    module.tick = _probe.tick  # type: ignore[attr-defined]
    sys.modules[PROBE] = module


async def _server_time(db: AsyncDatabase[Doc]) -> Any:
    return (await db.command("hello"))["operationTime"]


async def _running(db: AsyncDatabase[Doc], tid: str, owner: str | None = None) -> Doc:
    """Wait until the trigger runs (optionally on ``owner``); its state document."""
    deadline = time.perf_counter() + DEADLINE
    while True:
        doc = await db[state_collection_name("functions")].find_one({"_id": tid})
        if (
            doc is not None
            and doc.get("status") == "running"
            and doc.get("checkpoint") is not None
            and (owner is None or doc.get("owner") == owner)
        ):
            return doc
        if time.perf_counter() > deadline:
            raise TimeoutError(f"trigger {tid} not running after {DEADLINE} s: {doc}")
        await asyncio.sleep(0.01)  # bench-side probe of the state, not the product's wait


async def lag(db: AsyncDatabase[Doc], samples: int) -> dict[str, Any]:
    """Insert ack → handler start, one insert at a time."""
    coll = db[fresh_name("lag")]
    await db.functions.insert_one(
        {"_id": "lagbench", "source": LAG_SOURCE, "triggers": [{"collection": coll.name}]}
    )
    _probe.reset()
    values: list[float] = []
    insert_ms: list[float] = []
    async with PluginHost(db, triggers=TriggerOptions(lease_ttl=5.0)):
        await _running(db, "lagbench/" + coll.name)
        for i in range(-20, samples):  # 20 warm-up inserts
            waiter = _probe.waiting[i] = asyncio.Event()
            sent = time.perf_counter()
            await coll.insert_one({"_id": i})
            acked = time.perf_counter()
            await asyncio.wait_for(waiter.wait(), DEADLINE)
            if i >= 0:
                values.append((_probe.starts[i] - acked) * 1000.0)
                insert_ms.append((acked - sent) * 1000.0)
            await asyncio.sleep(0.01)
    return {
        "lag_ms": summarize(values),
        "insert_ms": summarize(insert_ms),
        "negative": sum(v < 0 for v in values),
    }


class _StreamOpens(monitoring.CommandListener):
    """When a change stream was opened on each collection (its ``aggregate`` sent)."""

    def __init__(self) -> None:
        self.opened: dict[str, float] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name != "aggregate":
            return
        pipeline = event.command.get("pipeline") or []
        if pipeline and "$changeStream" in pipeline[0]:
            self.opened.setdefault(str(event.command.get("aggregate")), time.perf_counter())

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


_opens = _StreamOpens()


def _rates(coll: str, n: int, first: float, last: float) -> dict[str, float]:
    """Events/s from the stream's opening and from the first event, to the n-th."""
    opened = _opens.opened.pop(coll)
    return {"stream": n / (last - opened), "in_batch": (n - 1) / (last - first)}


async def _bare(coll: Any, start: Any, n: int) -> dict[str, float]:
    """Events/s of a bare ``watch()`` loop over the ``n`` events from ``start``."""
    count = 0
    first = last = 0.0
    _opens.opened.pop(coll.name, None)
    async with await coll.watch(start_at_operation_time=start) as stream:
        async for _ in stream:
            last = time.perf_counter()
            if count == 0:
                first = last
            count += 1
            if count == n:
                break
    return _rates(coll.name, n, first, last)


async def _trigger(
    db: AsyncDatabase[Doc], coll: Any, start: Any, n: int, ordered: str
) -> dict[str, float]:
    """Events/s of a no-op trigger handler over the same ``n`` events."""
    name = fresh_name("tp")
    await db.functions.insert_one(
        {
            "_id": name,
            "source": NOOP_SOURCE,
            "triggers": [
                {"collection": coll.name, "start_at": start.as_datetime(), "ordered": ordered}
            ],
        }
    )
    _probe.reset(n)
    _opens.opened.pop(coll.name, None)
    try:
        async with PluginHost(db, triggers=TriggerOptions(lease_ttl=30.0)):
            await asyncio.wait_for(_probe.done.wait(), DEADLINE * 2)
    finally:
        await db.functions.delete_one({"_id": name})
    if _probe.ticks != n:
        raise RuntimeError(f"trigger saw {_probe.ticks} events, expected exactly {n}")
    return _rates(coll.name, n, _probe.first, _probe.last)


async def throughput(db: AsyncDatabase[Doc], n: int, repeats: int) -> dict[str, Any]:
    """The same N events through a bare watch loop and a no-op trigger, alternately."""
    coll = db[fresh_name("tp")]
    start = await _server_time(db)
    for first in range(0, n, 1000):
        await coll.insert_many([{"_id": i} for i in range(first, min(first + 1000, n))])
    runs: dict[str, list[dict[str, float]]] = {"bare": [], "per_key": [], "total": []}
    for _ in range(repeats):
        runs["bare"].append(await _bare(coll, start, n))
        runs["per_key"].append(await _trigger(db, coll, start, n, "per_key"))
        runs["total"].append(await _trigger(db, coll, start, n, "total"))
    med = {k: statistics.median(r["stream"] for r in v) for k, v in runs.items()}
    in_batch = {k: statistics.median(r["in_batch"] for r in v) for k, v in runs.items()}
    return {
        "events": n,
        "repeats": repeats,
        "events_per_s": med,
        "in_batch_events_per_s": in_batch,
        "runs": runs,
        "ratio_per_key": med["per_key"] / med["bare"],
        "ratio_total": med["total"] / med["bare"],
    }


async def failover(uri: str, db: AsyncDatabase[Doc], *, ttl: float, logs: Path) -> dict[str, Any]:
    """kill -9 the lease holder of two daemons: time to take over, and what was lost."""
    tid = "fobench/fo_events"
    await db.functions.insert_one(
        {"_id": "fobench", "source": RECORDER_SOURCE, "triggers": [{"collection": "fo_events"}]}
    )
    inserted: dict[int, float] = {}
    stop = asyncio.Event()

    async def writer() -> None:
        i = 0
        while not stop.is_set():
            await db.fo_events.insert_one({"_id": i})
            inserted[i] = time.perf_counter()
            i += 1
            await asyncio.sleep(1.0 / WRITES_PER_S)

    extra = ["--heartbeat", "0.5", "--host-ttl", "1.5", "--trigger-lease-ttl", str(ttl)]
    async with fleet.daemons(uri, db, 2, logs, extra) as (started, _):
        procs = {p.pid: p for p in started}
        hosts = {h.pid: h.id for h in (await fleet_status(db)).hosts if h.pid is not None}
        doc = await _running(db, tid)
        holder = next(pid for pid, hid in hosts.items() if hid == doc["owner"])
        (survivor,) = set(procs) - {holder}
        task = asyncio.ensure_future(writer())
        await asyncio.sleep(1.0)
        killed = time.perf_counter()
        first_after = len(inserted)
        os.kill(holder, signal.SIGKILL)
        await _running(db, tid, owner=hosts[survivor])
        takeover = time.perf_counter() - killed
        deadline = time.perf_counter() + DEADLINE
        while not await db.fo_seen.find_one({"pid": survivor, "key": {"$gte": first_after}}):
            if time.perf_counter() > deadline:
                raise TimeoutError("the survivor handled no event after the kill")
            await asyncio.sleep(0.01)
        first_event = time.perf_counter() - killed
        await asyncio.sleep(1.0)
        stop.set()
        await task
        deadline = time.perf_counter() + DEADLINE
        while len(await db.fo_seen.distinct("key")) < len(inserted):
            if time.perf_counter() > deadline:
                break
            await asyncio.sleep(0.05)
        seen = set(await db.fo_seen.distinct("key"))
        deliveries = await db.fo_seen.count_documents({})
    return {
        "lease_ttl_s": ttl,
        "takeover_s": takeover,
        "first_event_s": first_event,
        "over_ttl_s": takeover - ttl,
        "inserted": len(inserted),
        "lost": len(set(inserted) - seen),
        "repeats": deliveries - len(seen),
    }


async def _run(uri: str, quick: bool, logs: Path) -> dict[str, Any]:
    _install_probe()
    client: AsyncMongoClient[Doc] = AsyncMongoClient(uri, event_listeners=[_opens])
    results: dict[str, Any] = {}
    try:
        jobs: list[tuple[str, Callable[[AsyncDatabase[Doc]], Awaitable[dict[str, Any]]]]] = [
            ("lag", functools.partial(lag, samples=200 if quick else 1000)),
            (
                "throughput",
                functools.partial(
                    throughput, n=3000 if quick else 10_000, repeats=3 if quick else 5
                ),
            ),
            ("failover", functools.partial(failover, uri, ttl=FAILOVER_TTL, logs=logs / "fo")),
        ]
        for name, job in jobs:
            db = client[fresh_name("trig")]
            try:
                results[name] = await job(db)
            except Exception as exc:
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                await client.drop_database(db.name)
    finally:
        await client.close()
    return results


async def run(target: BenchTarget, cfg: Config) -> dict[str, Any]:
    """The ``triggers`` group of ``python -m bench``."""
    with tempfile.TemporaryDirectory(prefix="bench-triggers-") as tmp:
        return await _run(target.uri, cfg.quick, Path(tmp))


def _f(value: Any, digits: int = 2) -> str:
    if not isinstance(value, int | float):
        return "—"
    return f"{value:,.{digits}f}"


def markdown_lines(results: dict[str, Any]) -> list[str]:
    """The trigger figures as Markdown rows (for the report)."""
    lines = ["| Trigger figure | value |", "| --- | ---: |"]
    lag_r = results.get("lag", {})
    if "error" in lag_r:
        lines.append(f"| lag | failed: {lag_r['error']} |")
    elif lag_r:
        s = lag_r["lag_ms"]
        lines.append(
            f"| insert ack → handler start, p50 / p99 / max ms ({s['n']} inserts, one at a "
            f"time) | {_f(s['p50'])} / {_f(s['p99'])} / {_f(s['max'])} |"
        )
    tp = results.get("throughput", {})
    if "error" in tp:
        lines.append(f"| throughput | failed: {tp['error']} |")
    elif tp:
        eps = tp["events_per_s"]
        lines += [
            f"| no-op handler events/s from the stream's opening, `per_key` / `total` / "
            f"bare `watch()` loop ({tp['events']} events) | {_f(eps['per_key'], 0)} / "
            f"{_f(eps['total'], 0)} / {_f(eps['bare'], 0)} |",
            f"| ratio to the bare loop, `per_key` / `total` | {_f(tp['ratio_per_key'])} / "
            f"{_f(tp['ratio_total'])} |",
        ]
        batch = tp.get("in_batch_events_per_s")
        if batch:
            lines.append(
                f"| the same, first event to last (batches in hand), `per_key` / `total` / "
                f"bare | {_f(batch['per_key'], 0)} / {_f(batch['total'], 0)} / "
                f"{_f(batch['bare'], 0)} |"
            )
    fo = results.get("failover", {})
    if "error" in fo:
        lines.append(f"| failover | failed: {fo['error']} |")
    elif fo:
        lines += [
            f"| kill -9 of the owner → survivor holds the lease / handles an event, s "
            f"(TTL {fo['lease_ttl_s']:g} s) | {_f(fo['takeover_s'])} / {_f(fo['first_event_s'])} |",
            f"| events lost / repeated ({fo['inserted']} inserted at {WRITES_PER_S:g}/s) | "
            f"{fo['lost']} / {fo['repeats']} |",
        ]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.triggers``: print the figures as JSON and Markdown."""
    parser = argparse.ArgumentParser(prog="python -m bench.triggers", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    ns = parser.parse_args(argv)
    with embedded_server("process") as uri, tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(_run(uri, ns.quick, Path(tmp)))
    out = {"machine": machine_info(), "load_avg": os.getloadavg(), "results": results}
    sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
    sys.stdout.write("\n".join(markdown_lines(results)) + "\n")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
