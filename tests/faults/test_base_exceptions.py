"""BaseExceptions raised by plugin code (issue 13 item 1) are plugin failures, in process.

``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit``, a custom ``BaseException`` and a
``CancelledError`` the plugin raised by itself, from ``setup``, ``teardown``, a
``ctx.spawn`` task or a call, async or sync: the load fails (the old version serves), the
teardown fails (logged, retirement completes), the task fails (logged), the call fails
with ``PluginFailed``. The host's own cancellation (timeouts) still travels as
cancellation. The daemon-level reproductions are in ``test_base_exceptions_daemon.py``.
"""

from __future__ import annotations

import functools
from collections.abc import MutableMapping
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from host import PluginFailed, PluginHost, PluginTimeout
from tests.support import Db, drain, next_event, returning, wait_until

pytestmark = pytest.mark.anyio

# How plugin code raises each kind; ``Custom`` is defined by the plugin itself.
RAISES = {
    "KeyboardInterrupt": "raise KeyboardInterrupt()",
    "SystemExit": "import sys; sys.exit(3)",
    "GeneratorExit": "raise GeneratorExit()",
    "Custom": "raise Custom('mine')",
    "CancelledError": "import asyncio; raise asyncio.CancelledError()",
}
PRELUDE = "class Custom(BaseException):\n    pass\n\n"
KINDS = pytest.mark.parametrize("kind", sorted(RAISES))
STYLES = pytest.mark.parametrize("style", ["async def", "def"])


def hook(style: str, name: str, body: str) -> str:
    """Source of a hook (or main) ``name`` in ``style`` that runs ``body``."""
    return f"{style} {name}(ctx, *args):\n    {body}\n\n"


def main_returning(value: str) -> str:
    """Source of an async main returning the literal ``value``."""
    return f"async def main(ctx, args):\n    return {value!r}\n"


@KINDS
@STYLES
async def test_setup_raising_a_base_exception_fails_the_load_only(
    db: Db, kind: str, style: str
) -> None:
    """setup raising a BaseException: reload_failed stage setup, the old version serves."""
    async with PluginHost(db) as host, host.events() as events:
        await db.functions.insert_one({"_id": "s", "source": main_returning("v1")})
        loaded = await next_event(events, "plugin.loaded")
        bad = PRELUDE + hook(style, "setup", RAISES[kind]) + main_returning("v2")
        await db.functions.update_one({"_id": "s"}, {"$set": {"source": bad}})
        failed = await next_event(events, "plugin.reload_failed")
        assert failed["stage"] == "setup"
        assert failed["serving"] == loaded["version"]
        expected = "Custom" if kind == "Custom" else kind
        assert f"setup raised {expected}" in failed["error"]
        assert await host.call("s") == "v1"
        # A record that fails this way at first load leaves nothing serving, and no harm.
        await db.functions.insert_one({"_id": "first", "source": bad})
        first = await next_event(events, "plugin.reload_failed")
        assert first["plugin"] == "first"
        assert host.current("first") is None
        assert await host.call("s") == "v1"


@KINDS
@STYLES
async def test_teardown_raising_a_base_exception_is_logged_and_retirement_completes(
    db: Db, kind: str, style: str
) -> None:
    """teardown raising a BaseException: teardown_failed, then retired; the new version serves."""
    bad = PRELUDE + hook(style, "teardown", RAISES[kind]) + main_returning("v1")
    async with PluginHost(db) as host, host.events() as events:
        await db.functions.insert_one({"_id": "t", "source": bad})
        loaded = await next_event(events, "plugin.loaded")
        old = host.current("t")
        assert old is not None
        await db.functions.update_one({"_id": "t"}, {"$set": {"source": returning(2)}})
        failed = await next_event(events, "plugin.teardown_failed")
        retired = await next_event(events, "plugin.retired")
        assert failed["version"] == retired["version"] == loaded["version"]
        assert failed["error_type"] == kind
        assert old.released
        assert await host.call("t") == 2
        assert host.is_ready
    del old


@KINDS
async def test_spawned_task_raising_a_base_exception_is_logged(db: Db, kind: str) -> None:
    """A ctx.spawn task raising a BaseException: plugin.task_failed; the version keeps serving."""
    src = (
        PRELUDE
        + hook("async def", "boom", RAISES[kind])
        + "async def main(ctx, args):\n    ctx.spawn(boom, ctx)\n    return 'spawned'\n"
    )
    with capture_logs() as logs:
        async with PluginHost(db) as host, host.events() as events:
            await db.functions.insert_one({"_id": "sp", "source": src})
            await next_event(events, "plugin.loaded")

            def failures() -> list[MutableMapping[str, Any]]:
                return [e for e in logs if e["event"] == "plugin.task_failed"]

            def logged(n: int) -> bool:
                return len(failures()) == n

            for n in (1, 2):
                assert await host.call("sp") == "spawned"
                await wait_until(functools.partial(logged, n), f"task failure {n} logged")
            assert [(e["plugin"], e["error_type"]) for e in failures()] == [("sp", kind)] * 2
            assert host.is_ready


@KINDS
@STYLES
async def test_call_raising_a_base_exception_is_a_plugin_failure(
    db: Db, kind: str, style: str
) -> None:
    """A call raising a BaseException: PluginFailed naming the type, and a call.failed event."""
    src = PRELUDE + hook(style, "main", RAISES[kind])
    async with PluginHost(db) as host, host.events() as events:
        await db.functions.insert_one({"_id": "c", "source": src})
        loaded = await next_event(events, "plugin.loaded")
        with pytest.raises(PluginFailed) as caught:
            await host.call("c")
        assert caught.value.error_type == kind
        failed = await next_event(events, "call.failed")
        assert (failed["plugin"], failed["version"]) == ("c", loaded["version"])
        assert failed["error_type"] == kind
        plugin = host.current("c")
        assert plugin is not None and plugin.in_flight == 0


async def test_host_timeouts_still_travel_as_cancellation(db: Db) -> None:
    """The host's own cancellation is kept exact: a call timeout, a caller's cancel scope.

    (The setup timeout is covered by test_registry.test_setup_timeout_is_a_setup_failure.)
    """
    slow_call = "import asyncio\nasync def main(ctx, args):\n    await asyncio.sleep(30)\n"
    async with PluginHost(db) as host, host.events() as events:
        await db.functions.insert_one({"_id": "slow", "source": slow_call})
        await next_event(events, "plugin.loaded")
        with pytest.raises(PluginTimeout):
            await host.call("slow", timeout=0.05)
        await next_event(events, "call.timeout")
        with anyio.move_on_after(0.05) as scope:
            await host.call("slow")
        assert scope.cancelled_caught
        plugin = host.current("slow")
        assert plugin is not None
        await wait_until(lambda: plugin.in_flight == 0, "the cancelled call ended")
        assert [e.event for e in await drain(events) if e.event == "call.failed"] == []


@KINDS
async def test_raw_asyncio_task_raising_a_base_exception_cannot_stop_the_host(
    db: Db, kind: str
) -> None:
    """A raw create_task of plugin code raising one never reaches the loop; awaited, it fails.

    KeyboardInterrupt and SystemExit would leave the event loop (the host stops) and a
    GeneratorExit thrown into the awaiting call would close it: those three arrive as
    TaskExit. The others stay as they are.
    """
    src = (
        PRELUDE
        + "import asyncio\n"
        + hook("async def", "boom", RAISES[kind])
        + "async def main(ctx, args):\n"
        "    task = asyncio.get_running_loop().create_task(boom(ctx))\n"
        "    if args == 'await':\n"
        "        await task\n"
        "    while not task.done():\n"
        "        await asyncio.sleep(0)\n"
        "    return type(task.exception()).__name__\n"
    )
    contained = kind in ("KeyboardInterrupt", "SystemExit", "GeneratorExit")
    expected = "TaskExit" if contained else kind
    async with PluginHost(db) as host, host.events() as events:
        await db.functions.insert_one({"_id": "raw", "source": src})
        await next_event(events, "plugin.loaded")
        if kind != "CancelledError":  # a cancelled task has no exception() to retrieve
            assert await host.call("raw") == expected
        with pytest.raises(PluginFailed) as caught:
            await host.call("raw", "await")
        assert caught.value.error_type == expected
        assert host.is_ready
