"""Tests for host.watchdog: a blocked event loop is reported, naming the plugin that held it."""

from __future__ import annotations

import time

import anyio
import pytest

from host.compiler import compile_plugin
from host.context import Context
from host.dispatch import Dispatcher
from host.events import EventBus
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
