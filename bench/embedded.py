"""Benchmark the embedded server: insert-ack → change-event latency and insert throughput.

Run ``python -m bench.embedded`` (or ``python bench/embedded.py``); ``--quick`` for smaller
counts, ``--json PATH`` to also write the figures. Everything is measured in this run:
the table reports what this machine did, with a mongomock baseline for context.

What is measured:

1. Latency: a change stream is open on a collection (``async for`` over
   ``await coll.watch()`` in a task). For each of N sequential inserts, the time from
   ``await insert_one`` returning (the acknowledgment) to the event reaching the watcher,
   matched by ``_id``. The next insert waits for the event, so samples are independent.
   The reply and the event travel on two sockets, so the event often reaches the watcher
   before the inserting coroutine resumes: those samples are negative (kept as they are,
   and counted). For context, the time from just before ``insert_one`` to the event
   (the full write-to-notification path) is reported too.
2. Throughput: N small documents with sequential ``insert_one``, and with
   ``insert_many`` in batches of 1,000.
3. Baseline: the same ``insert_one`` loop straight into a mongomock collection, the
   storage engine the server is built on: the floor the wire protocol, oplog and
   change-stream machinery add to.
4. Heavy reads (100,000 documents; 20,000 with ``--quick``): ``count_documents`` with a
   filter every document matches, a ``find`` of every document (all batches) and a
   ``find`` by ``_id``, each against bare mongomock on the same documents; and the ping
   round trip (p50/p99/max) on another connection while the count and the find run,
   next to the idle ping of the same run. A ping that waits for the heavy query shows
   up here as a p99 of seconds (head-of-line blocking).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mongomock
import pymongo
import structlog
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection

from host.embedded import EmbeddedMongoThread

Doc = dict[str, Any]

BATCH = 1_000
MONGOMOCK_FIND_CAP = 20_000


@dataclass(frozen=True, slots=True)
class Counts:
    """How much work each measurement does."""

    latency_inserts: int
    throughput_docs: int
    warmup: int
    heavy_docs: int


FULL = Counts(latency_inserts=1_000, throughput_docs=10_000, warmup=100, heavy_docs=100_000)
QUICK = Counts(latency_inserts=200, throughput_docs=2_000, warmup=20, heavy_docs=20_000)


@dataclass(frozen=True, slots=True)
class Results:
    """The figures of one run (what ``--json`` writes)."""

    machine: dict[str, Any]
    counts: dict[str, int]
    latency_ms_median: float
    latency_ms_p99: float
    latency_ms_max: float
    latency_events_before_ack: int
    write_to_event_ms_median: float
    write_to_event_ms_p99: float
    insert_one_per_s: float
    insert_many_per_s: float
    mongomock_insert_one_per_s: float
    mongomock_insert_many_per_s: float
    count_documents_s: float
    find_all_s: float
    find_by_id_ms: float
    mongomock_count_documents_s: float
    mongomock_find_all_s: float
    mongomock_find_by_id_ms: float
    ping_idle_ms_p50: float
    ping_idle_ms_p99: float
    ping_heavy_ms_p50: float
    ping_heavy_ms_p99: float
    ping_heavy_ms_max: float
    ping_heavy_samples: int


def percentile(samples: Sequence[float], pct: float) -> float:
    """The nearest-rank percentile of ``samples`` (``pct`` in 0..100)."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil(n * pct / 100), at least 1
    return ordered[int(rank) - 1]


def small_doc(i: int) -> Doc:
    """A small document (about 60 bytes of BSON)."""
    return {"_id": i, "name": f"plugin-{i}", "version": 1, "enabled": True}


async def measure_latency(
    coll: AsyncCollection[Doc], n: int, warmup: int
) -> tuple[list[float], list[float]]:
    """Change-event latencies in ms for ``n`` sequential inserts.

    Returns:
        Per insert, ack → event (negative when the event came first), and
        insert start → event.
    """
    loop = asyncio.get_running_loop()
    arrived: dict[int, asyncio.Future[int]] = {}

    def slot(key: int) -> asyncio.Future[int]:
        return arrived.setdefault(key, loop.create_future())

    stream = await coll.watch()  # the aggregate runs here: the stream is open from now on

    async def watch() -> None:
        async for change in stream:
            now = time.perf_counter_ns()
            key = change["documentKey"]["_id"]
            if not slot(key).done():
                slot(key).set_result(now)

    watcher = asyncio.create_task(watch())
    from_ack: list[float] = []
    from_start: list[float] = []
    try:
        for i in range(-warmup, n):
            started = time.perf_counter_ns()
            await coll.insert_one(small_doc(i))
            acked = time.perf_counter_ns()
            event_at = await asyncio.wait_for(slot(i), timeout=30)
            if i >= 0:
                from_ack.append((event_at - acked) / 1e6)
                from_start.append((event_at - started) / 1e6)
    finally:
        await stream.close()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    return from_ack, from_start


async def measure_insert_one(coll: AsyncCollection[Doc], n: int) -> float:
    """Documents per second with sequential ``insert_one``."""
    start = time.perf_counter()
    for i in range(n):
        await coll.insert_one(small_doc(i))
    return n / (time.perf_counter() - start)


async def measure_insert_many(coll: AsyncCollection[Doc], n: int) -> float:
    """Documents per second with ``insert_many`` in batches of :data:`BATCH`."""
    start = time.perf_counter()
    for first in range(0, n, BATCH):
        await coll.insert_many([small_doc(i) for i in range(first, min(n, first + BATCH))])
    return n / (time.perf_counter() - start)


def mongomock_rates(n: int) -> tuple[float, float]:
    """mongomock's ``insert_one`` and ``insert_many`` docs/s: the storage engine's floor."""
    client: Any = mongomock.MongoClient()
    one = client.bench.one
    start = time.perf_counter()
    for i in range(n):
        one.insert_one(small_doc(i))
    one_rate = n / (time.perf_counter() - start)
    many = client.bench.many
    start = time.perf_counter()
    for first in range(0, n, BATCH):
        many.insert_many([small_doc(i) for i in range(first, min(n, first + BATCH))])
    return one_rate, n / (time.perf_counter() - start)


def heavy_doc(i: int) -> Doc:
    """A document of the heavy-read collection."""
    return {"_id": i, "v": i % 100, "name": f"doc-{i}", "tags": ["a", "b"]}


class Pinger:
    """Ping round trips in ms from a thread of its own (sync client), until stopped.

    Its own thread and connection: on the benchmark's loop, decoding a big reply would
    delay the pings on the client side and be mistaken for the server blocking.
    """

    def __init__(self, uri: str) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._client: pymongo.MongoClient[Doc] = pymongo.MongoClient(uri)
        self._client.admin.command("ping")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            self._client.admin.command("ping")
            self.samples.append((time.perf_counter() - start) * 1000)
            time.sleep(0.001)

    def stop(self) -> list[float]:
        """Stop pinging; returns the samples."""
        self._stop.set()
        self._thread.join()
        self._client.close()
        return self.samples


async def measure_heavy(uri: str, n: int) -> dict[str, Any]:
    """count_documents, find over ``n`` documents and find by _id, with pings alongside."""
    heavy: AsyncMongoClient[Doc] = AsyncMongoClient(uri)
    try:
        coll = heavy.bench.heavy
        for first in range(0, n, 10_000):
            await coll.insert_many([heavy_doc(i) for i in range(first, min(n, first + 10_000))])
        idle = Pinger(uri)
        await asyncio.sleep(1.0)
        idle_samples = idle.stop()
        pings = Pinger(uri)
        start = time.perf_counter()
        counted = await coll.count_documents({"v": {"$gte": 0}})
        count_s = time.perf_counter() - start
        start = time.perf_counter()
        found = await coll.find({}).to_list(None)
        find_s = time.perf_counter() - start
        heavy_samples = pings.stop()
        assert counted == n and len(found) == n
        start = time.perf_counter()
        for i in range(0, n, max(1, n // 200)):
            await coll.find_one({"_id": i})
        by_id_ms = (time.perf_counter() - start) * 1000 / len(range(0, n, max(1, n // 200)))
        await heavy.drop_database("bench")
    finally:
        await heavy.close()
    return {
        "count_documents_s": count_s,
        "find_all_s": find_s,
        "find_by_id_ms": by_id_ms,
        "ping_idle_ms_p50": statistics.median(idle_samples),
        "ping_idle_ms_p99": percentile(idle_samples, 99),
        "ping_heavy_ms_p50": statistics.median(heavy_samples),
        "ping_heavy_ms_p99": percentile(heavy_samples, 99),
        "ping_heavy_ms_max": max(heavy_samples),
        "ping_heavy_samples": len(heavy_samples),
    }


def mongomock_heavy(n: int) -> dict[str, float]:
    """The same heavy reads straight on mongomock (no wire, no threads)."""
    coll: Any = mongomock.MongoClient().bench.heavy
    coll.insert_many([heavy_doc(i) for i in range(n)])
    start = time.perf_counter()
    coll.count_documents({"v": {"$gte": 0}})
    count_s = time.perf_counter() - start
    # mongomock's cursor copies its result list on every next(): iterating N documents is
    # O(N^2), so this baseline reads at most MONGOMOCK_FIND_CAP of them.
    capped: Any = mongomock.MongoClient().bench.capped
    capped.insert_many([heavy_doc(i) for i in range(min(n, MONGOMOCK_FIND_CAP))])
    start = time.perf_counter()
    list(capped.find({}))
    find_s = time.perf_counter() - start
    probes = range(0, n, max(1, n // 200))
    start = time.perf_counter()
    for i in probes:
        coll.find_one({"_id": i})
    by_id_ms = (time.perf_counter() - start) * 1000 / len(probes)
    return {
        "mongomock_count_documents_s": count_s,
        "mongomock_find_all_s": find_s,
        "mongomock_find_by_id_ms": by_id_ms,
    }


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "pymongo": pymongo.version,
    }


async def run(uri: str, counts: Counts) -> Results:
    """Run every measurement against the server at ``uri``."""
    client: AsyncMongoClient[Doc] = AsyncMongoClient(uri)
    try:
        db = client.bench
        await db.command("ping")
        from_ack, from_start = await measure_latency(
            db.latency, counts.latency_inserts, counts.warmup
        )
        await measure_insert_one(db.warmup, counts.warmup)
        one_rate = await measure_insert_one(db.insert_one, counts.throughput_docs)
        many_rate = await measure_insert_many(db.insert_many, counts.throughput_docs)
        await client.drop_database("bench")
    finally:
        await client.close()
    heavy = await measure_heavy(uri, counts.heavy_docs)
    mock_one, mock_many = mongomock_rates(counts.throughput_docs)
    heavy.update(mongomock_heavy(counts.heavy_docs))
    return Results(
        machine=machine_info(),
        counts=asdict(counts),
        latency_ms_median=statistics.median(from_ack),
        latency_ms_p99=percentile(from_ack, 99),
        latency_ms_max=max(from_ack),
        latency_events_before_ack=sum(1 for x in from_ack if x < 0),
        write_to_event_ms_median=statistics.median(from_start),
        write_to_event_ms_p99=percentile(from_start, 99),
        insert_one_per_s=one_rate,
        insert_many_per_s=many_rate,
        mongomock_insert_one_per_s=mock_one,
        mongomock_insert_many_per_s=mock_many,
        **heavy,
    )


def markdown(results: Results) -> str:
    """The figures as a small Markdown report."""
    m, c = results.machine, results.counts
    n = f"{c['throughput_docs']:,}"
    rows = [
        ("insert-ack → change event, median", f"{results.latency_ms_median:.3f} ms"),
        ("insert-ack → change event, p99", f"{results.latency_ms_p99:.3f} ms"),
        ("insert-ack → change event, max", f"{results.latency_ms_max:.3f} ms"),
        (
            "events that arrived before their ack (negative samples)",
            f"{results.latency_events_before_ack} of {c['latency_inserts']:,}",
        ),
        ("insert start → change event, median", f"{results.write_to_event_ms_median:.3f} ms"),
        ("insert start → change event, p99", f"{results.write_to_event_ms_p99:.3f} ms"),
        (f"insert_one, {n} docs (sequential)", f"{results.insert_one_per_s:,.0f} docs/s"),
        (
            f"insert_many, {n} docs (batches of {BATCH:,})",
            f"{results.insert_many_per_s:,.0f} docs/s",
        ),
        (
            "baseline: mongomock insert_one (engine floor)",
            f"{results.mongomock_insert_one_per_s:,.0f} docs/s",
        ),
        (
            "baseline: mongomock insert_many",
            f"{results.mongomock_insert_many_per_s:,.0f} docs/s",
        ),
        (
            "insert_one: embedded is slower than mongomock by",
            f"{results.mongomock_insert_one_per_s / results.insert_one_per_s:.1f}x",
        ),
        (
            "insert_many: embedded is slower than mongomock by",
            f"{results.mongomock_insert_many_per_s / results.insert_many_per_s:.1f}x",
        ),
    ]
    h = f"{c['heavy_docs']:,}"
    rows += [
        (f"count_documents over {h} docs", f"{results.count_documents_s:.2f} s"),
        (
            f"baseline: mongomock count_documents over {h}",
            f"{results.mongomock_count_documents_s:.2f} s",
        ),
        (f"find of all {h} docs (every batch)", f"{results.find_all_s:.2f} s"),
        (
            f"baseline: mongomock find of all {min(c['heavy_docs'], MONGOMOCK_FIND_CAP):,} "
            "(its cursor is quadratic: capped)",
            f"{results.mongomock_find_all_s:.2f} s",
        ),
        (f"find_one by _id among {h}", f"{results.find_by_id_ms:.2f} ms"),
        (
            f"baseline: mongomock find_one by _id among {h}",
            f"{results.mongomock_find_by_id_ms:.2f} ms",
        ),
        (
            "ping while idle, p50 / p99",
            f"{results.ping_idle_ms_p50:.2f} / {results.ping_idle_ms_p99:.2f} ms",
        ),
        (
            "ping during the count and the find, p50 / p99 / max",
            f"{results.ping_heavy_ms_p50:.2f} / {results.ping_heavy_ms_p99:.2f} / "
            f"{results.ping_heavy_ms_max:.2f} ms ({results.ping_heavy_samples:,} pings)",
        ),
    ]
    lines = [
        "## Embedded server benchmark",
        "",
        f"{m['cpus']} CPUs · {m['implementation']} {m['python']} · {m['platform']} · "
        f"PyMongo {m['pymongo']} · {c['latency_inserts']:,} latency samples",
        "",
        "| measurement | result |",
        "|---|---:|",
        *(f"| {name} | {value} |" for name, value in rows),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    args = parser.parse_args(argv)
    counts = QUICK if args.quick else FULL
    # The server logs start/stop at info; keep the report clean.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    # Design note: the server runs on its own event loop in a background thread
    # (EmbeddedMongoThread), the way tests and synchronous embedders run it. On one shared
    # loop, the client's coroutines and the server's connection tasks would be interleaved
    # by a single scheduler, so each latency sample would include unrelated client work
    # queued ahead of the watcher; in a thread the server answers as soon as a socket is
    # ready. Both share one GIL either way, so this is still an in-process figure, not
    # what a separate mongod process would show.
    with EmbeddedMongoThread(port=0) as server:
        results = asyncio.run(run(server.uri, counts))
    print(markdown(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
