"""Tests for host.context: the ctx object plugins receive."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
import structlog

from host.compiler import compile_plugin
from host.context import Context
from host.dispatch import Dispatcher, Required
from host.plugin import Plugin
from host.records import PluginRecord
from host.registry import Registry

# Generous load bound: these tests are not about load timeouts, and CI machines are busy.
LOAD_TIMEOUT = 30.0


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    """A running registry."""
    async with Registry(grace_period=5.0) as registry:
        yield registry


async def load(registry: Registry, dispatcher: Dispatcher, name: str, source: str) -> Plugin:
    """Compile and install a version of ``name``."""
    plugin = await compile_plugin(
        PluginRecord(name=name, source=source, revision=1), exec_timeout=LOAD_TIMEOUT
    )
    await registry.install(plugin, dispatcher.make_context)
    return plugin


async def wait_until(predicate: Callable[[], bool], message: str, within: float = 10) -> None:
    """Poll ``predicate`` until true; fail with ``message`` after ``within`` seconds."""
    with anyio.move_on_after(within):
        while not predicate():  # noqa: ASYNC110 - deadline-bounded poll (async_wait_until)
            await anyio.sleep(0.001)
        return
    pytest.fail(message)


async def bare_context(**globals: Any) -> Context:
    """A Context on a compiled (not installed) plugin, with the given host globals."""
    plugin = await compile_plugin(
        PluginRecord(name="p", source="def main(c, a): pass\n"), exec_timeout=LOAD_TIMEOUT
    )
    dispatcher = Dispatcher(Registry(), db="db", globals=globals)
    return Context(plugin, dispatcher, call_id=41)


@pytest.mark.anyio
async def test_globals_are_attributes() -> None:
    """context={'foo': 'bar'} makes ctx.foo == 'bar'."""
    ctx = await bare_context(foo="bar")
    assert ctx.foo == "bar"
    assert ctx.db == "db"
    assert ctx.call_id == 41
    assert ctx.plugin_name == "p"
    assert ctx.version.startswith("p:")


@pytest.mark.anyio
async def test_unknown_attribute_names_it() -> None:
    """An unknown attribute raises AttributeError naming the attribute."""
    ctx = await bare_context(foo="bar")
    with pytest.raises(AttributeError, match="'missing'") as info:
        _ = ctx.missing
    assert info.value.name == "missing"
    assert not hasattr(ctx, "_hidden")
    assert not hasattr(ctx, "__wrapped__")


@pytest.mark.anyio
async def test_builtins_take_precedence_over_globals() -> None:
    """A global named like a built-in attribute does not shadow it."""
    ctx = await bare_context(db="shadow", state="shadow")
    assert ctx.db == "db"
    assert ctx.state is None


@pytest.mark.anyio
async def test_context_is_slotted_and_copyable() -> None:
    """ctx has no instance dict (cheap per call) and copy() does not recurse."""
    ctx = await bare_context()
    assert not hasattr(ctx, "__dict__")
    with pytest.raises(AttributeError):
        ctx.anything = 1  # type: ignore[attr-defined]
    assert copy.copy(ctx).call_id == 41


@pytest.mark.anyio
async def test_log_is_created_once_and_bound() -> None:
    """ctx.log is built on first access, reused after, and bound to plugin fields."""
    ctx = await bare_context()
    with structlog.testing.capture_logs() as logs:
        log = ctx.log
        assert ctx.log is log
        log.warning("something", detail=1)
    assert logs == [
        {
            "event": "something",
            "log_level": "warning",
            "detail": 1,
            "plugin": "p",
            "version": ctx.version,
            "call_id": 41,
        }
    ]


@pytest.mark.anyio
async def test_require_returns_a_late_bound_handle() -> None:
    """ctx.require returns a handle bound to the name, not to a version."""
    ctx = await bare_context()
    handle = ctx.require("other")
    assert isinstance(handle, Required)
    assert handle.name == "other"


@pytest.mark.anyio
async def test_spawned_tasks_are_cancelled_when_the_version_retires(registry: Registry) -> None:
    """A task started with ctx.spawn from a call is cancelled at retirement."""
    started = anyio.Event()
    cancelled: list[str] = []
    dispatcher = Dispatcher(registry, db=None, globals={"started": started, "cancelled": cancelled})
    source = (
        "import anyio\n"
        "async def _work(ctx):\n"
        "    ctx.started.set()\n"
        "    try:\n"
        "        await anyio.sleep_forever()\n"
        "    finally:\n"
        "        ctx.cancelled.append(ctx.version)\n"
        "async def main(ctx, args):\n"
        "    ctx.spawn(_work, ctx)\n"
    )
    plugin = await load(registry, dispatcher, "bg", source)
    await dispatcher.call("bg", None)
    await started.wait()
    await registry.remove("bg")
    await plugin.wait_retired()
    assert cancelled == [plugin.version]


@pytest.mark.anyio
async def test_spawn_works_from_a_sync_plugin(registry: Registry) -> None:
    """A sync plugin in a worker thread can ctx.spawn async work onto the loop."""
    ran = anyio.Event()
    dispatcher = Dispatcher(registry, db=None, globals={"ran": ran})
    source = (
        "async def _work(ctx):\n"
        "    ctx.ran.set()\n"
        "def main(ctx, args):\n"
        "    ctx.spawn(_work, ctx)\n"
        "    return 'spawned'\n"
    )
    await load(registry, dispatcher, "sync-bg", source)
    assert await dispatcher.call("sync-bg", None) == "spawned"
    await ran.wait()


@pytest.mark.anyio
async def test_spawned_task_failure_is_logged_and_contained(registry: Registry) -> None:
    """A failing spawned task logs plugin.task_failed and harms nothing else."""
    failed = anyio.Event()
    dispatcher = Dispatcher(registry, db=None, globals={"failed": failed})
    source = (
        "async def _work(ctx):\n"
        "    ctx.failed.set()\n"
        "    raise KeyError('lost')\n"
        "async def main(ctx, args):\n"
        "    ctx.spawn(_work, ctx)\n"
        "    return 'ok'\n"
    )
    plugin = await load(registry, dispatcher, "bad-bg", source)
    with structlog.testing.capture_logs() as logs:
        await dispatcher.call("bad-bg", None)
        await failed.wait()
        # Logged after the traceback is formatted off the loop.
        await wait_until(
            lambda: any(e["event"] == "plugin.task_failed" for e in logs),
            "plugin.task_failed was not logged",
        )
    event = next(e for e in logs if e["event"] == "plugin.task_failed")
    assert event["error_type"] == "KeyError"
    assert "raise KeyError('lost')" in event["traceback"]
    assert await dispatcher.call("bad-bg", None) == "ok"  # version still serving
    assert plugin.task_group is not None


@pytest.mark.anyio
async def test_spawn_after_retirement_is_refused(registry: Registry) -> None:
    """ctx.spawn on a retired version raises RuntimeError instead of leaking a task."""
    dispatcher = Dispatcher(registry, db=None)
    plugin = await load(registry, dispatcher, "gone", "async def main(ctx, a): pass\n")
    ctx = Context(plugin, dispatcher, call_id=1)
    await registry.remove("gone")
    await plugin.wait_retired()

    async def work() -> None:
        pass  # pragma: no cover - never started

    with pytest.raises(RuntimeError, match="not running"):
        ctx.spawn(work)
