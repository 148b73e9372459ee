"""Change-to-live of the daemon under wrk load, and what reloads cost its throughput.

A real ``plugin-host run`` (:func:`bench.http.daemon_server`) serves the async echo plugin
of :mod:`bench.http` while ``wrk`` (:func:`bench.http.wrk`) keeps 32 or 256 connections
busy on it. At each connection count:

* ``quiet`` — wrk alone: req/s and latency with no reloads;
* ``reloading`` — the same wrk run while the plugin is updated again and again: each
  update waits until the previous one is live, then 50 ms more (about 10 reloads/s).

Change-to-live runs from the update's acknowledgment (a sync PyMongo ``update_one`` in
this process returned) to the first HTTP response that names the new version (the
``version`` field of the call's reply, ``echo@r<revision>:...``). A probe thread sends
one request at a time on its own keep-alive connection, queued with wrk's, so the figure
is what a client of the loaded daemon sees: the swap plus up to two request latencies
(the request in flight at the swap still gets the old version). ``drop_pct`` is how much
lower wrk's req/s is while reloads run. Quiet and reloading runs take turns, ``repeats``
times, and the best of each is kept (on a shared machine the slower runs measure the
neighbours); change-to-live keeps every sample.

What bounds it (a diagnostic run at 32 connections, load average 12 on 2 cores): the
daemon's own ``plugin.reloaded`` events said ``change_to_live_ms`` (the write's wall time
to the swap) p50 85 ms, of which ``load_ms`` (the change submitted to live) was 0.7 ms,
against 98 ms at the probe. So the time goes before the loader sees the change: the
stream's getMore reply waits behind the HTTP work of the daemon's loop (and a server
process that shares the cores with wrk and the daemon), not in compile or install.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import time
import urllib.parse
from typing import Any

from pymongo import MongoClient

from .common import Config, Target, database, record, summarize, update
from .http import BODY, ECHO, daemon_server, ensure_wrk, wrk

CONNECTIONS = (32, 256)
PAUSE = 0.05  # after each update is live, before the next
PROBE_DEADLINE = 30.0


def _source(rev: int) -> str:
    return f"{ECHO}# revision {rev}\n"


class _Probe:
    """One keep-alive connection that calls the echo plugin and reads the serving version."""

    def __init__(self, base: str) -> None:
        url = urllib.parse.urlsplit(base)
        self._conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)
        self._path = f"{url.path.rstrip('/')}/functions/echo/call"

    def version(self) -> str:
        """The version that served one call."""
        self._conn.request("POST", self._path, BODY, {"Content-Type": "application/json"})
        reply = self._conn.getresponse()
        body = json.loads(reply.read())
        if reply.status != 200:
            raise RuntimeError(f"probe call failed: {reply.status} {body}")
        return str(body["version"])

    def until(self, rev: int) -> float:
        """Call until revision ``rev`` serves; the time of that response (perf_counter)."""
        tag = f"@r{rev}:"
        deadline = time.perf_counter() + PROBE_DEADLINE
        while tag not in self.version():
            if time.perf_counter() > deadline:
                raise TimeoutError(f"revision {rev} did not serve in {PROBE_DEADLINE} s")
        return time.perf_counter()

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


def _reload_while(
    uri: str, db_name: str, probe: _Probe, wrk_done: concurrent.futures.Future[Any], rev: int
) -> tuple[list[float], int]:
    """Update the echo plugin until wrk's run ends; change-to-live samples (ms), last rev."""
    client: MongoClient[dict[str, Any]] = MongoClient(uri)
    coll = client[db_name].functions
    samples: list[float] = []
    try:
        while not wrk_done.done():
            rev += 1
            coll.update_one({"_id": "echo"}, update(_source(rev), rev))
            acked = time.perf_counter()
            served = probe.until(rev)
            if not wrk_done.done():  # a sample only counts while wrk's load runs
                samples.append((served - acked) * 1000.0)
            time.sleep(PAUSE)
    finally:
        client.close()
    return samples, rev


def _point(
    binary: str,
    uri: str,
    db_name: str,
    base: str,
    conns: int,
    seconds: float,
    repeats: int,
    rev: int,
) -> tuple[dict[str, Any], int]:
    """Quiet and reloading runs, taking turns ``repeats`` times; the best of each kept."""
    url = f"{base}/functions/echo/call"
    quiets: list[dict[str, Any]] = []
    loads: list[dict[str, Any]] = []
    samples: list[float] = []
    for _ in range(repeats):
        quiets.append(wrk(binary, url, conns, seconds))
        probe = _Probe(base)
        try:
            probe.version()  # connect and warm up before the clock starts
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                loaded = pool.submit(wrk, binary, url, conns, seconds)
                more, rev = _reload_while(uri, db_name, probe, loaded, rev)
                samples += more
                loads.append(loaded.result())
        finally:
            probe.close()
    quiet = max(quiets, key=lambda r: float(r["req_per_s"]))
    reloading = max(loads, key=lambda r: float(r["req_per_s"]))
    quiet_rps, rps = quiet["req_per_s"], reloading["req_per_s"]
    return {
        "connections": conns,
        "quiet": quiet,
        "reloading": reloading,
        "reloads": len(samples),
        "served_ms": summarize(samples),
        "drop_pct": 100.0 * (1.0 - rps / quiet_rps) if quiet_rps else None,
    }, rev


async def run(target: Target, cfg: Config) -> dict[str, Any]:
    """The daemon under wrk at each of :data:`CONNECTIONS`, quiet and while reloading."""
    binary = ensure_wrk()
    if binary is None:
        return {"skipped": "wrk is not installed and could not be installed with apt-get"}
    seconds, repeats = (4.0, 2) if cfg.quick else (8.0, 3)
    results: dict[str, Any] = {
        "seconds": seconds,
        "repeats": repeats,
        "pause_s": PAUSE,
        "wrk_threads": 1,
    }
    async with database(target.uri, "reloadhttp") as db:
        await db.functions.insert_one(record("echo", _source(1), 1))
        with daemon_server(target.uri, db.name) as ready:
            base = str(ready["http"])
            wrk(binary, f"{base}/functions/echo/call", 8, 1)  # warm-up
            rev = 1
            for conns in CONNECTIONS:
                results[str(conns)], rev = _point(
                    binary, target.uri, db.name, base, conns, seconds, repeats, rev
                )
    return results
