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

Change-to-live under load: the same sequential updates while ``callers`` tasks spin on
``host.call`` of that plugin (each awaits the call, then ``asyncio.sleep(0)``), at each
level of ``load_callers`` (0 is the idle figure). A PyMongo command listener on the
host's client times each event's getMore: ``stream_ms`` runs from the ack to the reply
that carried the event, and ``await_timeout_events`` counts events for which a getMore
already waiting at the ack came back only after most of the await time, with or without
the event (the missed-wakeup signature, see ``_StreamTimer.missed_wakeup``; it must stay 0).

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

from pymongo import monitoring

from host import PluginHost

from .baselines import POLL_INTERVAL, PollingReloader
from .common import Config, Target, async_source, database, record, summarize, update

WARMUP = 20
POLL_LANES = 25
DEADLINE = 30.0
AWAIT_MS = 1000.0  # the server's default getMore await time (the host sets none)


async def _until_served(call: Any, name: str, expected: int, probe: float) -> None:
    """Call ``name`` until it returns ``expected``; ``probe`` seconds between calls."""
    deadline = time.perf_counter() + DEADLINE
    while await call(name) != expected:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{name} did not serve revision {expected} in {DEADLINE} s")
        await asyncio.sleep(probe)


class _StreamTimer(monitoring.CommandListener):
    """Times every getMore of the host's stream, and which revisions each one carried."""

    def __init__(self) -> None:
        self._sent: dict[int, float] = {}
        self.carried: dict[int, tuple[float, float]] = {}
        self.get_mores: list[tuple[float, float]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "getMore":
            self._sent[event.request_id] = time.perf_counter()

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        if event.command_name != "getMore":
            return
        now = time.perf_counter()
        sent = self._sent.pop(event.request_id, now)
        for change in event.reply.get("cursor", {}).get("nextBatch", []):
            revision = (change.get("fullDocument") or {}).get("revision")
            if isinstance(revision, int):
                self.carried.setdefault(revision, (sent, now))
        self.get_mores.append((sent, now))

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._sent.pop(event.request_id, None)

    def missed_wakeup(self, acked: float) -> bool:
        """Whether the write acknowledged at ``acked`` failed to wake a waiting getMore.

        Two shapes, both for a getMore that was already waiting when the write was
        acknowledged and so should have been woken by it: it carried the event but only
        after waiting out the await time, or it came back at the timeout *without* the
        event, which then rode on the next getMore. The second is what a missed wake-up
        in the server looks like (the first version of this counter saw only the first,
        and read 0 while a mutated server delayed 8% of the events by a second).
        """
        floor = 0.9 * AWAIT_MS / 1000.0
        return any(
            sent < acked < answered and answered - sent >= floor
            for sent, answered in self.get_mores
        )


async def ours_change_to_live(uri: str, updates: int, callers: int = 0) -> dict[str, Any]:
    """Sequential updates of one plugin; ack → first call served by the new version.

    ``callers`` tasks spin on ``host.call`` of the same plugin meanwhile.
    """
    timer = _StreamTimer()
    async with database(uri, "latency", [timer]) as db:
        coll = db.functions
        await coll.insert_one(record("lat", async_source(0), 0))
        served: list[float] = []
        event_ms: list[float] = []
        stream_ms: list[float] = []
        late = 0
        calls = 0
        async with PluginHost(db, "functions") as host, host.events() as events:
            arrivals: dict[int, float] = {}
            stop = asyncio.Event()

            async def listen() -> None:
                async for event in events:
                    if event.event == "plugin.reloaded":
                        arrivals[int(event["revision"])] = time.perf_counter()

            async def spin() -> None:
                nonlocal calls
                while not stop.is_set():
                    await host.call("lat")
                    calls += 1
                    await asyncio.sleep(0)

            listener = asyncio.create_task(listen())
            spinners = [asyncio.create_task(spin()) for _ in range(callers)]
            try:
                for rev in range(1, WARMUP + updates + 1):
                    if rev == WARMUP + 1:
                        calls, started = 0, time.perf_counter()
                    await coll.update_one({"_id": "lat"}, update(async_source(rev), rev))
                    acked = time.perf_counter()
                    await _until_served(host.call, "lat", rev, 0.0)
                    done = time.perf_counter()
                    await asyncio.sleep(0)  # let the listener record the event
                    if rev > WARMUP:
                        served.append((done - acked) * 1000.0)
                        if rev in arrivals:
                            event_ms.append((arrivals[rev] - acked) * 1000.0)
                        if rev in timer.carried:
                            stream_ms.append((timer.carried[rev][1] - acked) * 1000.0)
                        if timer.missed_wakeup(acked):
                            late += 1
                elapsed = time.perf_counter() - started
            finally:
                stop.set()
                await asyncio.gather(*spinners)
                listener.cancel()
    return {
        "method": "sequential updates of one plugin; caller loop with sleep(0) between calls",
        "callers": callers,
        "served_ms": summarize(served),
        "event_ms": summarize(event_ms),
        "stream_ms": summarize(stream_ms),
        "await_timeout_events": late,
        "calls_per_s": calls / elapsed,
        "samples_ms": served,
    }


async def under_load(uri: str, updates: int, levels: tuple[int, ...]) -> dict[str, Any]:
    """Change-to-live at each number of spinning callers in ``levels``."""
    out: dict[str, Any] = {}
    for callers in levels:
        result = await ours_change_to_live(uri, updates, callers)
        out[str(callers)] = {k: v for k, v in result.items() if k != "samples_ms"}
    return out


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
    loaded = await under_load(target.uri, cfg.load_updates, cfg.load_callers)
    return {
        "ours": ours,
        "under_load": loaded,
        "issue": {k: v for k, v in issue.items() if k != "samples_ms"},
        "polling": polling,
        "reload": reloads,
    }
