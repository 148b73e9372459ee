"""Shutdown under load: SIGTERM to a busy `plugin-host run` drains, refuses, tears down once."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import anyio
import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from host.publish import publish

from ..daemon_support import Daemon, free_port, wait_ready
from ..support import Doc, wait_until

pytestmark = pytest.mark.anyio

SLOW_CALLERS = 10
FAST_CALLERS = 40
# Slow calls run until the file named by their args exists: the test decides when they end.
PLUGIN = """
import asyncio
import os


async def setup(ctx):
    return {"calls": 0}


async def main(ctx, args):
    ctx.state["calls"] += 1
    if args:
        while not os.path.exists(args):
            await asyncio.sleep(0.01)
        return "slow done"
    return "fast"


async def teardown(ctx):
    await ctx.db.teardowns.insert_one({"plugin": ctx.plugin_name, "version": ctx.version})
"""


async def test_sigterm_under_load_drains_refuses_and_tears_down_once(
    mongo_uri: str, db: AsyncDatabase[Doc], tmp_path: Path, daemons: list[Daemon]
) -> None:
    """50 callers: in-flight calls end 200, new calls 503, each teardown runs once, exit 0."""
    await publish(db, "work", PLUGIN)
    await publish(db, "other", PLUGIN)
    gate = tmp_path / "gate"
    port = free_port()
    daemon = Daemon.run(
        tmp_path,
        mongo_uri,
        db.name,
        f"127.0.0.1:{port}",
    )
    daemons.append(daemon)
    limits = httpx.Limits(max_connections=SLOW_CALLERS + FAST_CALLERS + 5)
    slow_replies: list[httpx.Response] = []
    fast_ok = [0] * FAST_CALLERS
    refused: list[httpx.Response] = []
    late_refusals: list[str] = []
    unexpected: list[str] = []
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=30, limits=limits
    ) as client:
        await wait_ready(client, daemon)

        async def slow(i: int) -> None:
            name = "work" if i % 2 else "other"
            slow_replies.append(await client.post(f"/functions/{name}/call", json=str(gate)))

        async def fast(i: int) -> None:
            name = "work" if i % 2 else "other"
            while True:
                try:
                    reply = await client.post(f"/functions/{name}/call", json=None)
                except httpx.TransportError as exc:
                    if refused:  # the listener closed after the 503 phase: acceptable
                        late_refusals.append(type(exc).__name__)
                    else:
                        unexpected.append(f"{type(exc).__name__} before any 503")
                    return
                if reply.status_code == 200:
                    fast_ok[i] += 1
                elif reply.status_code == 503:
                    refused.append(reply)
                    return
                else:
                    unexpected.append(f"HTTP {reply.status_code}: {reply.text}")
                    return

        async with anyio.create_task_group() as tg:
            for i in range(SLOW_CALLERS):
                tg.start_soon(slow, i)

            async def all_slow_in_flight() -> bool:
                text = (await client.get("/metrics")).text
                return f"plugin_host_in_flight_calls {SLOW_CALLERS}" in text

            await wait_until(all_slow_in_flight, "every slow call is in flight", timeout=20)
            for i in range(FAST_CALLERS):
                tg.start_soon(fast, i)
            await wait_until(lambda: all(fast_ok), "every fast caller got a 200", timeout=20)
            daemon.proc.send_signal(signal.SIGTERM)
            await wait_until(
                lambda: len(refused) + len(late_refusals) + len(unexpected) == FAST_CALLERS,
                "every fast caller is refused",
                timeout=20,
            )
            assert not slow_replies, "a slow call ended before its gate opened"
            gate.touch()
    assert not unexpected, unexpected
    assert refused, "no 503 was observed"
    assert {r.json()["error"]["type"] for r in refused} == {"HostClosed"}
    assert len(slow_replies) == SLOW_CALLERS
    assert {(r.status_code, r.json()["result"]) for r in slow_replies} == {(200, "slow done")}
    assert await daemon.exit_code() == 0
    teardowns = [doc async for doc in db.teardowns.find({}, {"_id": 0})]
    assert sorted(d["plugin"] for d in teardowns) == ["other", "work"], teardowns
    assert len({d["version"] for d in teardowns}) == 2, teardowns
    _, err = daemon.output()
    assert "Traceback" not in err, err
    print(f"\n{len(refused)} refused with 503, {len(late_refusals)} after the listener closed")


SLEEPER = """
import time


def main(ctx, args):
    time.sleep(40)  # blocked in C: the interrupt cannot reach it
    return "slept"
"""
# Swallows the interrupt the host injects, and keeps spinning: a thread that will not stop.
SPINNER = """
def main(ctx, args):
    while True:
        try:
            while True:
                pass
        except BaseException:
            continue
"""


async def test_sigterm_exit_is_bounded_whatever_plugin_threads_do(
    mongo_uri: str, db: AsyncDatabase[Doc], tmp_path: Path, daemons: list[Daemon]
) -> None:
    """time.sleep(40) in flight and a spinning thread: JSON 503, exit 0, the culprit named."""
    await publish(db, "sleeper", SLEEPER)
    spinner = await publish(db, "spinner", SPINNER)
    port = free_port()
    daemon = Daemon.run(tmp_path, mongo_uri, db.name, f"127.0.0.1:{port}", "--drain-timeout", "1")
    daemons.append(daemon)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        await wait_ready(client, daemon)
        timed_out = await client.post("/functions/spinner/call?timeout=0.2", json=None)
        assert timed_out.status_code == 504, timed_out.text

        def stuck_logged() -> bool:
            return '"event": "plugin.thread_stuck"' in daemon.output()[0]

        await wait_until(stuck_logged, "the stuck spinner thread is reported", timeout=20)
        replies: list[httpx.Response] = []
        async with anyio.create_task_group() as tg:

            async def sleep_call() -> None:
                replies.append(await client.post("/functions/sleeper/call", json=None))

            tg.start_soon(sleep_call)

            async def in_flight() -> bool:
                return "plugin_host_in_flight_calls 1" in (await client.get("/metrics")).text

            await wait_until(in_flight, "the sleeping call is in flight")
            daemon.proc.send_signal(signal.SIGTERM)
        reply = replies[0]
        assert reply.status_code == 503, reply.text
        assert reply.headers["content-type"].startswith("application/json")
        assert reply.json()["error"]["type"] == "HostClosed"
    # Without the exit bound the process lived until time.sleep(40) returned (and, with
    # the spinner, forever); 20 s is a deadline for the wait, not a measured figure.
    assert await daemon.exit_code(timeout=20) == 0
    out, _ = daemon.output()
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    stuck = [e for e in events if e["event"] == "plugin.thread_stuck"]
    assert stuck[0]["plugin"] == "spinner"
    assert stuck[0]["version"].startswith(f"spinner@r{spinner.revision}:")
    forced = [e for e in events if e["event"] == "daemon.exit_forced"]
    assert len(forced) == 1
    assert stuck[0]["version"] in forced[0]["stuck_threads"]
