"""Tests for host.watchdog: a blocked event loop is reported, naming the plugin that held it."""

from __future__ import annotations

import time

import anyio
import anyio.lowlevel
import pytest

from host.compiler import compile_plugin
from host.context import Context
from host.dispatch import Dispatcher
from host.events import EventBus, HostEvent
from host.naming import identify, module_name, plugin_filename
from host.records import PluginRecord
from host.registry import Registry
from host.watchdog import LoopWatchdog
from tests.support import next_event, wait_until

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("revision", [7, None])
def test_identify_reads_back_what_naming_wrote(revision: int | None) -> None:
    """The watchdog recovers name and version from a frame's filename and module name."""
    record = PluginRecord(name="greet", source="def main(ctx, a): pass\n", revision=revision)
    assert identify(plugin_filename(record), module_name(record)) == ("greet", record.version)


def test_threshold_must_be_positive() -> None:
    """A zero threshold is refused with a message naming it."""
    with pytest.raises(ValueError, match="threshold must be > 0"):
        LoopWatchdog(EventBus(), threshold=0)


@pytest.mark.allow_blocking  # the plugin blocks the loop on purpose
async def test_blocking_plugin_is_named_in_loop_blocked() -> None:
    """An async plugin that sleeps on the loop yields loop.blocked with its name and version."""
    bus = EventBus()
    watchdog = LoopWatchdog(bus, threshold=0.05)
    source = "import time\nasync def main(ctx, args):\n    time.sleep(0.4)\n"
    plugin = await compile_plugin(PluginRecord(name="hog", source=source, revision=3))
    async with Registry() as registry:
        ctx = Context(plugin, Dispatcher(registry, db=None))
        async with bus.subscribe(100) as events, anyio.create_task_group() as tg:
            tg.start_soon(watchdog.run)
            started = time.monotonic()
            # The thread starts before the first beat; a beat after `started` means both run.
            await wait_until(lambda: watchdog._beat > started, "the watchdog is beating")
            await plugin.entrypoint(ctx, None)
            event = await next_event(events, "loop.blocked")
            tg.cancel_scope.cancel()
    assert event["plugin"] == "hog"
    assert event["version"] == plugin.version
    assert event["blocked_ms"] > 0
    assert watchdog.stalls >= 1


# -- blocked or saturated, on real loops ------------------------------------------------

SPIN_S = 0.0005  # one spinner step: far below any threshold
BUSY_SOURCE = (
    "import time\n"
    "async def main(ctx, args):\n"
    "    end = time.perf_counter() + args\n"
    "    while time.perf_counter() < end:\n"
    "        pass\n"
)


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def _stall(kind: str, tasks: int) -> list[HostEvent]:
    """On the running loop: a watchdog (threshold 0.2 s) and a stall of ``kind``; the
    watchdog's events, up to the first one reporting the stall.

    ``saturate``: ``tasks`` spinners, each step ``SPIN_S`` of CPU then a yield, so one loop
    iteration runs ``tasks`` short callbacks. ``block``: one plugin call holds the loop for
    1 s. ``both``: the spinners, and the plugin call among them.
    """
    bus = EventBus()
    watchdog = LoopWatchdog(bus, threshold=0.2)
    plugin = await compile_plugin(PluginRecord(name="hog", source=BUSY_SOURCE, revision=5))
    go, stop = anyio.Event(), anyio.Event()

    async def spin() -> None:
        await go.wait()  # all of them queue at once, each step then a short callback
        while not stop.is_set():
            _busy(SPIN_S)
            await anyio.lowlevel.checkpoint()

    wanted = "loop.saturated" if kind == "saturate" else "loop.blocked"
    seen: list[HostEvent] = []
    async with Registry() as registry, bus.subscribe(1000) as events:
        ctx = Context(plugin, Dispatcher(registry, db=None))
        async with anyio.create_task_group() as tg:
            tg.start_soon(watchdog.run)
            started = time.monotonic()
            await wait_until(lambda: watchdog._beat > started, "the watchdog is beating")
            if kind != "block":
                for i in range(tasks):
                    tg.start_soon(spin)
                    if i % 50 == 49:
                        await anyio.lowlevel.checkpoint()  # no long callback while spawning
                go.set()
            if kind != "saturate":
                await plugin.entrypoint(ctx, 1.0)
            with anyio.fail_after(30):
                async for event in events:
                    seen.append(event)
                    if event.event == wanted:
                        break
            stop.set()
            tg.cancel_scope.cancel()
    return seen


@pytest.mark.parametrize("uvloop", [False, True], ids=["asyncio", "uvloop"])
@pytest.mark.parametrize("kind", ["saturate", "block", "both"])
async def test_a_block_and_a_saturated_loop_are_told_apart(kind: str, uvloop: bool) -> None:
    """A queue of short callbacks is loop.saturated (with its depth), never loop.blocked;
    one long plugin callback is loop.blocked naming it, alone or amid the queue."""
    if uvloop:
        pytest.importorskip("uvloop", reason="uvloop (speed extra) absent")

    def fresh_loop() -> list[HostEvent]:
        return anyio.run(_stall, kind, 800, backend_options={"use_uvloop": uvloop})

    # A loop of its own (asyncio or uvloop, as the daemon runs), in a worker thread.
    seen = await anyio.to_thread.run_sync(fresh_loop)
    names = [e.event for e in seen]
    if kind == "saturate":
        assert "loop.blocked" not in names, seen
        saturated = seen[-1]
        assert saturated.event == "loop.saturated"
        assert saturated["lag_ms"] > saturated["threshold_ms"] == 200.0
        assert saturated["callbacks_seen"] >= 2
        assert saturated["longest_callback_ms"] < 100.0
        assert saturated["tasks"] >= 800
        if uvloop:
            assert saturated["queue_depth"] is None  # uvloop does not expose its queue
        else:
            assert saturated["queue_depth"] >= 400  # the spinners' steps, queued
    else:
        blocked = seen[-1]
        assert blocked.event == "loop.blocked"
        assert blocked["plugin"] == "hog" and blocked["version"].startswith("hog@r5:")
        assert blocked["blocked_ms"] > blocked["threshold_ms"]
        if kind == "block":
            assert "loop.saturated" not in names, seen
