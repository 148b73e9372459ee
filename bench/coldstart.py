"""Cold start: time and memory to load N plugins, in a fresh process.

The records are inserted first. A child process (``python -m bench.coldstart``) then
connects and pings (so connection set-up is not counted), reads its RSS, and times
``PluginHost.__aenter__`` from its start until ``ready()`` returns; the RSS delta over
the count is the memory per loaded plugin. A fresh process keeps the RSS delta free of
what earlier benchmarks allocated and freed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from pymongo import AsyncMongoClient

from host import PluginHost

from .common import REPO, Config, Doc, Target, async_source, configure_logging, database, record
from .common import rss_bytes as rss

BATCH = 1_000
CHILD_TIMEOUT = 300.0


def _source(i: int) -> str:
    # Distinct, realistic-sized plugins: every one compiles to its own code object.
    return async_source(
        i,
        pad=f'"""Plugin {i}: greets by name."""\n\nGREETING = "Hello there"\n\n\n'
        "def _name(args):\n"
        "    return f\"{args.get('firstName', '')} {args.get('lastName', '')}\".strip()\n\n\n",
    )


async def _child(uri: str, db_name: str, expected: int) -> dict[str, Any]:
    configure_logging()
    client: AsyncMongoClient[Doc] = AsyncMongoClient(uri, serverSelectionTimeoutMS=10_000)
    try:
        await client.admin.command("ping")
        db = client[db_name]
        gc.collect()
        before = rss()
        started = time.perf_counter()
        host = PluginHost(db, "functions")
        await host.__aenter__()
        try:
            await host.ready()
            ready_s = time.perf_counter() - started
            after = rss()
            loaded = len(host._registry)
            probe = await host.call(f"c{expected - 1}", {})
        finally:
            stop = time.perf_counter()
            await host.__aexit__(None, None, None)
            stop_s = time.perf_counter() - stop
    finally:
        await client.close()
    return {
        "plugins": expected,
        "loaded": loaded,
        "ready_s": ready_s,
        "rss_before_mb": before / 2**20,
        "rss_delta_mb": (after - before) / 2**20,
        "kb_per_plugin": (after - before) / 1024 / max(1, loaded),
        "shutdown_s": stop_s,
        "probe_ok": probe == expected - 1,
    }


async def cold_start(uri: str, count: int) -> dict[str, Any]:
    """Insert ``count`` plugins, then measure a fresh host process loading them."""
    async with database(uri, f"cold{count}") as db:
        coll = db.functions
        inserted = time.perf_counter()
        for start in range(0, count, BATCH):
            await coll.insert_many(
                [record(f"c{i}", _source(i), 1) for i in range(start, min(count, start + BATCH))]
            )
        insert_s = time.perf_counter() - inserted
        cmd = [sys.executable, "-m", "bench.coldstart", uri, db.name, str(count)]
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), CHILD_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"cold start child failed:\n{err.decode()[-2000:]}")
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        result["insert_s"] = insert_s
        return result


async def run(target: Target, cfg: Config) -> dict[str, Any]:
    """Cold start for each count in ``cfg.cold_counts``."""
    return {str(count): await cold_start(target.uri, count) for count in cfg.cold_counts}


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry point: ``python -m bench.coldstart URI DB COUNT`` prints one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("uri")
    parser.add_argument("db")
    parser.add_argument("count", type=int)
    ns = parser.parse_args(argv)
    result = asyncio.run(_child(ns.uri, ns.db, ns.count))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
