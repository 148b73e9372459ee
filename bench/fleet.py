"""The fleet: N `plugin-host run` daemons on one server; push → every host serving.

``python -m bench.fleet [--quick] [--hosts 4,16] [--pushes 30] [--watchers 0,50,200]``
(and the ``fleet`` group of ``make bench``). What it measures:

* **start-up**: from spawning N daemon processes until all N report ready in the hosts
  collection; and, per process, ``python -X importtime -c "import host.cli"`` (the
  largest cumulative imports) to say whether start-up is import-bound;
* **convergence**: for each of >= 30 pushes, from the push's acknowledgment until
  :func:`host.fleetview.wait_for_fleet` (what ``push --wait`` runs, its own set-up of
  ``hello`` + change stream + snapshot included) sees every host serving the revision:
  p50 / p99 / max;
* **refusal**: from the ack of a push the hosts refuse (a missing import) until the wait
  fails naming them;
* **report cost**: writes/s to the hosts collection (one change event per write),
  at idle and during a storm of back-to-back pushes;
* **watchers** (``--watchers``): W change streams on one embedded server under a
  background write load of 100 writes/s, as a stand-in for many hosts on one primary
  (SERVER-32946): p50 / p99 / max from sending an update to each watcher's event.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import bson
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from host.fleet import hosts_collection_name
from host.fleetview import FleetRefused, Target, fleet_status, wait_for_fleet
from host.publish import publish

from .common import REPO, Config, Doc, embedded_server, fresh_name, machine_info, summarize
from .common import Target as BenchTarget

HEARTBEAT = 5.0
START_TIMEOUT = 240.0
NAME = "fleetbench"
BROKEN = "import plugin_host_bench_no_such_module\n\nasync def main(ctx, args):\n    return 0\n"


def _source(i: int) -> str:
    return f"async def main(ctx, args):\n    return {i}\n"


def _daemon(
    uri: str, db_name: str, log: Path, extra: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "host.cli", "run", "--mongodb-uri", uri, "--database", db_name]
    cmd += ["--http", "127.0.0.1:0", "--log-format", "json", "--heartbeat", str(HEARTBEAT)]
    cmd += extra  # later options win: callers may override the heartbeat
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)


@contextlib.asynccontextmanager
async def daemons(
    uri: str, db: AsyncDatabase[Doc], n: int, logs: Path, extra: Sequence[str] = ()
) -> AsyncIterator[tuple[list[subprocess.Popen[bytes]], float]]:
    """Start ``n`` daemons (``extra``: more ``run`` options); yield them and the seconds
    until all ``n`` reported ready."""
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
    started = time.perf_counter()
    procs = [_daemon(uri, db.name, logs / f"daemon{i}.log", extra) for i in range(n)]
    try:
        deadline = started + START_TIMEOUT
        while True:
            view = await fleet_status(db)
            if sum(1 for h in view.hosts if h.alive and h.ready) >= n:
                break
            dead = [p.pid for p in procs if p.poll() is not None]
            if dead or time.perf_counter() > deadline:
                raise RuntimeError(f"daemons did not all start (exited: {dead}); see {logs}")
            await asyncio.sleep(0.05)  # bench-side start-up probe, not the product's wait
        yield procs, time.perf_counter() - started
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _count_writes(db: AsyncDatabase[Doc], seconds: float, during: Any = None) -> float:
    """Writes/s to the hosts collection over ``seconds`` (while ``during`` runs, if given)."""
    coll = db[hosts_collection_name("functions")]
    count = 0
    async with await coll.watch(max_await_time_ms=100) as stream:
        started = time.perf_counter()
        task = asyncio.ensure_future(during) if during is not None else None
        while time.perf_counter() - started < seconds or (task is not None and not task.done()):
            if await stream.try_next() is not None:
                count += 1
        elapsed = time.perf_counter() - started
        if task is not None:
            await task
    return count / elapsed


async def _storm(db: AsyncDatabase[Doc], first: int, pushes: int) -> None:
    for i in range(pushes):
        await publish(db, NAME, _source(first + i))


async def fleet_run(uri: str, n: int, pushes: int, logs: Path) -> dict[str, Any]:
    """One fleet of ``n`` daemons: start-up, convergence, refusal, report cost."""
    client: AsyncMongoClient[Doc] = AsyncMongoClient(uri)
    db = client[fresh_name(f"fleet{n}")]
    try:
        await publish(db, NAME, _source(0))
        async with daemons(uri, db, n, logs / f"n{n}") as (_, startup_s):
            idle = await _count_writes(db, 3 * HEARTBEAT)
            converge_ms: list[float] = []
            for i in range(1, pushes + 1):
                pushed = await publish(db, NAME, _source(i))
                acked = time.perf_counter()
                await wait_for_fleet(db, [Target(NAME, pushed.revision)], timeout=60)
                converge_ms.append((time.perf_counter() - acked) * 1000)
            bad = await publish(db, NAME, BROKEN)
            acked = time.perf_counter()
            try:
                await wait_for_fleet(db, [Target(NAME, bad.revision)], timeout=60)
                refused: dict[str, Any] = {"error": "the hosts served a broken plugin"}
            except FleetRefused as exc:
                refused = {
                    "ms": (time.perf_counter() - acked) * 1000,
                    "hosts": len({r["host"] for r in exc.refusals}),
                }
            storm_pushes = 30
            storm = await _count_writes(db, 0.0, _storm(db, 1000, storm_pushes))
            view = await fleet_status(db)
            docs = db[hosts_collection_name("functions")].find({})
            doc_bytes = sum([len(bson.encode(d)) async for d in docs])
    finally:
        await client.drop_database(db.name)
        await client.close()
    return {
        "hosts": n,
        "startup_s": startup_s,
        "convergence_ms": summarize(converge_ms),
        "convergence_samples": converge_ms,
        "refusal": refused,
        "writes_per_s_idle": idle,
        "writes_per_s_storm": storm,
        "storm_pushes": storm_pushes,
        "alive_after": sum(1 for h in view.hosts if h.alive),
        "hosts_collection_bytes": doc_bytes,
    }


PROFILED = "import host.cli, host.daemon"
"""What ``plugin-host run`` imports before it serves (the CLI imports lazily per command)."""


def import_profile(top: int = 8) -> dict[str, Any]:
    """``python -X importtime -c PROFILED``: total and the largest imports."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", PROFILED],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    cumulative: dict[str, int] = {}
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)", line)
        if match:
            cumulative[match.group(2)] = int(match.group(1))
    total = sum(us for m, us in cumulative.items() if "." not in m)  # top-level imports
    # Where the time goes: third-party packages (top-level names) and our own modules.
    packages = sorted(
        ((us, m) for m, us in cumulative.items() if "." not in m and m != "host"), reverse=True
    )
    ours = sorted(((us, m) for m, us in cumulative.items() if m.startswith("host.")), reverse=True)
    return {
        "process_s": wall,
        "import_s": total / 1e6,
        "largest": [{"module": m, "ms": us / 1000} for us, m in packages[:top]],
        "host_modules": [{"module": m, "ms": us / 1000} for us, m in ours[:top]],
    }


async def watchers_run(uri: str, watchers: int, updates: int, noise_per_s: float) -> dict[str, Any]:
    """``watchers`` change streams on one collection under background writes elsewhere."""
    client: AsyncMongoClient[Doc] = AsyncMongoClient(uri, maxPoolSize=watchers + 20)
    db = client[fresh_name(f"watch{watchers}")]
    delays: list[float] = []
    try:
        await db.functions.insert_one({"_id": "w", "n": 0})
        await db.noise.insert_one({"_id": 0})
        streams = [await db.functions.watch(max_await_time_ms=1000) for _ in range(watchers)]
        stop = asyncio.Event()

        async def noise() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                await db.noise.update_one({"_id": 0}, {"$set": {"i": i}})
                await asyncio.sleep(1 / noise_per_s)

        noise_task = asyncio.ensure_future(noise()) if noise_per_s > 0 else None
        try:
            for n in range(1, updates + 1):
                seen: list[float] = []

                async def follow(stream: Any, seen: list[float]) -> None:
                    while True:
                        event = await stream.try_next()
                        if event is not None:
                            seen.append(time.perf_counter())
                            return

                tasks = [asyncio.ensure_future(follow(s, seen)) for s in streams]
                await asyncio.sleep(0)
                # From the send: an event may arrive before the writer's own ack.
                sent = time.perf_counter()
                await db.functions.update_one({"_id": "w"}, {"$set": {"n": n}})
                await asyncio.wait_for(asyncio.gather(*tasks), 60)
                delays.extend((t - sent) * 1000 for t in seen)
        finally:
            stop.set()
            if noise_task is not None:
                await noise_task
            for stream in streams:
                await stream.close()
    finally:
        await client.drop_database(db.name)
        await client.close()
    return {
        "watchers": watchers,
        "noise_writes_per_s": noise_per_s,
        "updates": updates,
        "delay_ms": summarize(delays),
    }


async def run(target: BenchTarget, cfg: Config) -> dict[str, Any]:
    """The ``fleet`` group of ``make bench``."""
    return await measure(target.uri, _hosts(cfg.quick), 30, _watchers(cfg.quick))


def _hosts(quick: bool) -> tuple[int, ...]:
    return (4,) if quick else (4, 16)


def _watchers(quick: bool) -> tuple[int, ...]:
    return (1, 50) if quick else (1, 50, 200)


async def measure(
    uri: str, hosts: Sequence[int], pushes: int, watchers: Sequence[int]
) -> dict[str, Any]:
    """Every fleet figure for these fleet sizes and watcher counts."""
    logs = Path(tempfile.gettempdir()) / "plugin-host-bench-fleet"  # daemon logs, per size
    out: dict[str, Any] = {"import": import_profile(), "fleets": {}, "watchers": {}}
    for n in hosts:
        print(f"[bench] fleet: {n} daemons ...", file=sys.stderr, flush=True)
        out["fleets"][str(n)] = await fleet_run(uri, n, pushes, logs)
    for w in watchers:
        print(f"[bench] fleet: {w} watchers ...", file=sys.stderr, flush=True)
        out["watchers"][str(w)] = await watchers_run(uri, w, 20, 100.0)
    return out


def _f(value: Any, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def markdown_lines(fleet: dict[str, Any]) -> list[str]:
    """The fleet figures as Markdown rows (for the report)."""
    if "error" in fleet:
        return [f"fleet benchmark failed: {fleet['error']}"]
    lines = [
        "| Fleet figure | value |",
        "| --- | ---: |",
    ]
    imp = fleet.get("import", {})
    lines.append(
        f"| one process: `{PROFILED}` / whole interpreter, s | "
        f"{_f(imp.get('import_s'), 2)} / {_f(imp.get('process_s'), 2)} |"
    )
    for n, r in fleet.get("fleets", {}).items():
        c = r["convergence_ms"]
        lines += [
            f"| {n} daemons: start-up until all report ready, s | {_f(r['startup_s'], 1)} |",
            f"| {n} daemons: push ack → `--wait` sees all serving, p50 / p99 / max ms "
            f"({c['n']} pushes) | {_f(c['p50'])} / {_f(c['p99'])} / {_f(c['max'])} |",
            f"| {n} daemons: bad push ack → `--wait` fails naming hosts, ms (hosts named) | "
            f"{_f(r['refusal'].get('ms'))} ({r['refusal'].get('hosts', '—')}) |",
            f"| {n} daemons: writes/s to the hosts collection, idle (heartbeat {HEARTBEAT:g} s) "
            f"/ during {r['storm_pushes']} back-to-back pushes | "
            f"{_f(r['writes_per_s_idle'], 2)} / {_f(r['writes_per_s_storm'], 1)} |",
            f"| {n} daemons: hosts collection size, bytes | {r.get('hosts_collection_bytes')} |",
        ]
    for w, r in fleet.get("watchers", {}).items():
        d = r["delay_ms"]
        lines.append(
            f"| {w} change streams, {r['noise_writes_per_s']:g} background writes/s: update sent "
            f"→ each stream's event, p50 / p99 / max ms ({d['n']} events) | "
            f"{_f(d['p50'])} / {_f(d['p99'])} / {_f(d['max'])} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.fleet``: run the fleet figures alone and print Markdown."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="4 daemons, 1 and 50 watchers")
    parser.add_argument("--hosts", help="comma-separated fleet sizes (default 4,16; none)")
    parser.add_argument("--pushes", type=int, default=30, help="pushes per fleet (>= 30)")
    parser.add_argument("--watchers", help="comma-separated watcher counts (default 1,50,200)")
    parser.add_argument("--uri", help="a deployment to use instead of an embedded subprocess")
    ns = parser.parse_args(argv)
    hosts = (
        ()
        if ns.hosts == "none"
        else tuple(int(x) for x in ns.hosts.split(","))
        if ns.hosts
        else _hosts(ns.quick)
    )
    watchers = tuple(int(x) for x in ns.watchers.split(",")) if ns.watchers else _watchers(ns.quick)
    started = time.perf_counter()
    load = [round(x, 2) for x in os.getloadavg()]
    if ns.uri:
        results = asyncio.run(measure(ns.uri, hosts, ns.pushes, watchers))
    else:
        with embedded_server("process") as uri:
            results = asyncio.run(measure(uri, hosts, ns.pushes, watchers))
    machine = machine_info()
    command = " ".join(["python -m bench.fleet", *(sys.argv[1:] if argv is None else argv)])
    text = "\n".join(
        [
            f"Run: `{command}` ({time.perf_counter() - started:.0f} s), "
            f"{machine.get('cpu_count')} CPUs, load average at start {load}.",
            "",
            *markdown_lines(results),
            "",
        ]
    )
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fleet.md").write_text(text)
    (out_dir / "fleet.json").write_text(json.dumps(results, indent=2, default=str))
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
