"""Bad plugin code: every failure is reported with its stage and the old version keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from host import PluginHost
from tests.support import Db, drain, loop_ticks, next_event, torn_pair

pytestmark = pytest.mark.anyio

BAD_SOURCES = {
    # name: (source, stage)
    "syntax_error": ("async def main(ctx, args)\n    return 1\n", "syntax"),
    "indentation": ("async def main(ctx, args):\nreturn 1\n", "syntax"),
    "missing_module": (
        "from no_such_pkg_q9 import thing\nasync def main(c, a):\n    pass\n",
        "import",
    ),
    "raises_at_import": ("1 / 0\nasync def main(ctx, args):\n    return 1\n", "import"),
    "system_exit_at_import": ("raise SystemExit(3)\n", "import"),
    "keyboard_interrupt_at_import": ("raise KeyboardInterrupt\n", "import"),
    "recursion_at_import": ("def f():\n    return f()\nf()\n", "import"),
    "entrypoint_missing": ("async def handler(ctx, args):\n    return 1\n", "entrypoint"),
    "entrypoint_not_callable": ("main = 42\n", "entrypoint"),
    "entrypoint_generator": ("def main(ctx, args):\n    yield 1\n", "entrypoint"),
    "hook_not_callable": ("setup = 'x'\nasync def main(ctx, args):\n    return 1\n", "entrypoint"),
    "cpu_loop_at_import": ("while True:\n    pass\n", "timeout"),
    "sleep_loop_at_import": ("import time\nwhile True:\n    time.sleep(0.01)\n", "timeout"),
}


@pytest.fixture
async def host(db: Db) -> AsyncIterator[PluginHost]:
    """A host with a short top-level bound (0.2 s CPU, 2 s wall)."""
    async with PluginHost(db, exec_timeout=0.2) as plugin_host:
        yield plugin_host


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
async def test_bad_update_fails_with_stage_and_old_version_serves(
    db: Db, host: PluginHost, case: str
) -> None:
    """A broken update → plugin.reload_failed with the right stage; the old version serves."""
    source, stage = BAD_SOURCES[case]
    async with host.events() as events:
        await db.functions.insert_one({"_id": "p", "source": torn_pair(1)})
        loaded = await next_event(events, "plugin.loaded")
        async with loop_ticks(0.005) as ticks:
            before = ticks.count
            await db.functions.update_one({"_id": "p"}, {"$set": {"source": source}})
            failed = await next_event(events, "plugin.reload_failed", timeout=20)
            # The loop stayed responsive while the bad top level ran in its thread.
            assert ticks.count > before
            assert await host.call("p") == (1, 1)
    assert failed["stage"] == stage, failed["error"]
    assert failed["serving"] == loaded["version"]
    assert failed["plugin"] == "p"
    info = host.plugin("p")
    assert info is not None
    assert info.status == "degraded"
    # The host still loads good code afterwards.
    async with host.events() as events:
        await db.functions.update_one({"_id": "p"}, {"$set": {"source": torn_pair(2)}})
        await next_event(events, "plugin.reloaded")
    assert await host.call("p") == (2, 2)


async def test_runaway_top_level_keeps_loop_ticking(db: Db, host: PluginHost) -> None:
    """An infinite loop at import is stopped; a ticker on the loop ticks throughout the load."""
    async with host.events() as events, host.events() as every:
        async with loop_ticks(0.01) as ticks:
            await db.functions.insert_one({"_id": "spin", "source": "while True:\n    pass\n"})
            await next_event(events, "plugin.reload_failed", lambda e: e["plugin"] == "spin")
            started = ticks.count
            await db.functions.update_one(
                {"_id": "spin"}, {"$set": {"source": "x = 0\nwhile True:\n    x += 1\n"}}
            )
            failed = await next_event(
                events, "plugin.reload_failed", lambda e: e["plugin"] == "spin"
            )
            ticked = ticks.count - started
        rest = await drain(every, quiet=0.2)
    assert failed["stage"] == "timeout"
    assert ticked >= 5, "the loop stalled while the runaway top level ran"
    assert not [e for e in rest if e.event == "loop.blocked" and e["plugin"] == "spin"]
    info = host.plugin("spin")
    assert info is not None
    assert info.status == "failed"  # nothing ever served


async def test_first_version_broken_then_fixed(db: Db, host: PluginHost) -> None:
    """A plugin whose first record is broken serves nothing (status failed) until it is fixed."""
    async with host.events() as events:
        await db.functions.insert_one({"_id": "late", "source": "def main(:\n"})
        failed = await next_event(events, "plugin.reload_failed")
        assert failed["serving"] is None
        info = host.plugin("late")
        assert info is not None
        assert info.status == "failed"
        await db.functions.update_one({"_id": "late"}, {"$set": {"source": torn_pair(7)}})
        await next_event(events, "plugin.loaded")
    assert await host.call("late") == (7, 7)
