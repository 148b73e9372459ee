"""Tests for host.registry: atomic swaps, two-version draining and exactly-once retirement."""

from __future__ import annotations

import asyncio
import gc
import math
import weakref
from collections.abc import AsyncIterator, Coroutine
from functools import partial
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import pytest
import structlog
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from host.compiler import compile_plugin
from host.dispatch import Dispatcher
from host.errors import CompileError, HostClosed
from host.plugin import Phase, Plugin
from host.records import PluginRecord
from host.registry import Registry

HOOKS = """
async def setup(ctx):
    ctx.events.append(("setup", VERSION))
    return {"v": VERSION}

async def teardown(ctx):
    ctx.events.append(("teardown", VERSION))

async def main(ctx, args):
    if args == "hold":
        ctx.started.set()
        await ctx.gate.wait()
    return VERSION
"""


# Generous load bound: these tests are not about load timeouts, and CI machines are busy.
LOAD_TIMEOUT = 30.0


class Env:
    """A registry plus dispatcher whose plugins see the test's globals."""

    def __init__(self, registry: Registry, **globals: Any) -> None:
        self.registry = registry
        self.events: list[tuple[str, int]] = []
        self.started = anyio.Event()
        self.gate = anyio.Event()
        self.dispatcher = Dispatcher(
            registry,
            db=None,
            globals={"events": self.events, "started": self.started, "gate": self.gate, **globals},
        )

    async def load(self, name: str, source: str, *, revision: int = 1) -> Plugin:
        """Compile and install a version; return it."""
        record = PluginRecord(name=name, source=source, revision=revision)
        plugin = await compile_plugin(record, exec_timeout=LOAD_TIMEOUT)
        await self.registry.install(plugin, self.dispatcher.make_context)
        return plugin

    async def load_hooks(self, name: str, version: int) -> Plugin:
        """Install a version of the HOOKS plugin whose VERSION is ``version``."""
        return await self.load(name, f"VERSION = {version}\n{HOOKS}", revision=version)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    """A running registry with a short grace period."""
    async with Registry(grace_period=5.0, history_size=3) as registry:
        yield Env(registry)


@pytest.mark.anyio
async def test_install_swaps_and_returns_the_old_version(env: Env) -> None:
    """install makes the version current and returns the one it replaced."""
    first = await env.load_hooks("p", 1)
    assert env.registry.get("p") is first
    assert first.phase is Phase.LIVE
    assert first.state == {"v": 1}
    second = await env.load_hooks("p", 2)
    assert env.registry.get("p") is second
    assert second.phase is Phase.LIVE
    await first.wait_retired()
    assert env.registry.names() == ("p",)
    assert env.registry.items() == (("p", second),)
    assert len(env.registry) == 1
    assert "p" in env.registry
    assert "q" not in env.registry
    assert env.registry.get("q") is None


@pytest.mark.anyio
async def test_in_flight_call_finishes_on_old_version(env: Env) -> None:
    """A call in flight during a swap finishes on the old version; new calls get the new."""
    old = await env.load_hooks("p", 1)
    results: list[int] = []

    async def held_call() -> None:
        results.append(await env.dispatcher.call("p", "hold"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(held_call)
        await env.started.wait()
        new = await env.load_hooks("p", 2)
        assert await env.dispatcher.call("p", "now") == 2
        await anyio.wait_all_tasks_blocked()  # let the retirement run as far as it can
        assert old.phase is Phase.RETIRING
        assert old.in_flight == 1
        assert ("teardown", 1) not in env.events
        env.gate.set()
    assert results == [1]
    await old.wait_retired()
    assert env.events.count(("teardown", 1)) == 1
    assert env.registry.get("p") is new


@pytest.mark.anyio
async def test_setup_and_teardown_run_exactly_once_per_version(env: Env) -> None:
    """Across installs, a remove and close, each version is set up and torn down once."""
    versions = [await env.load_hooks("p", n) for n in range(1, 4)]
    await env.registry.remove("p")
    await env.registry.remove("p")  # nothing left: a no-op
    await env.registry.aclose(drain_timeout=0)
    await env.registry.aclose(drain_timeout=0)
    for plugin in versions:
        assert plugin.phase is Phase.RETIRED
    for n in range(1, 4):
        assert env.events.count(("setup", n)) == 1
        assert env.events.count(("teardown", n)) == 1


@pytest.mark.anyio
async def test_setup_failure_keeps_old_version_serving(env: Env) -> None:
    """A failing setup raises CompileError(stage='setup'); the old version keeps serving."""
    old = await env.load_hooks("p", 1)
    failing = "VERSION = 2\n" + HOOKS.replace(
        '    return {"v": VERSION}', "    raise ValueError('no database')"
    )
    with pytest.raises(CompileError) as info:
        await env.load("p", failing, revision=2)
    assert info.value.stage == "setup"
    assert "ValueError: no database" in str(info.value)
    assert "raise ValueError('no database')" in info.value.traceback
    assert env.registry.get("p") is old
    assert old.phase is Phase.LIVE
    assert await env.dispatcher.call("p", None) == 1
    assert ("teardown", 1) not in env.events
    assert ("teardown", 2) not in env.events  # setup never completed: no teardown
    assert env.registry.history("p")[0] is old.record


@pytest.mark.anyio
async def test_setup_timeout_is_a_setup_failure() -> None:
    """A setup that does not finish within setup_timeout fails with stage 'setup'."""
    async with Registry(setup_timeout=0.05) as registry:
        env = Env(registry)
        source = "import anyio\nasync def setup(ctx):\n    await anyio.sleep_forever()\n"
        with pytest.raises(CompileError) as info:
            await env.load("p", source + "def main(ctx, a): pass\n")
        assert info.value.stage == "setup"
        assert "did not finish" in str(info.value)
        assert registry.get("p") is None


@pytest.mark.anyio
async def test_failed_setup_cancels_the_tasks_it_started(env: Env) -> None:
    """Tasks a failing setup started (spawn and create_task) are cancelled."""
    cancelled: list[str] = []
    env2 = Env(env.registry, cancelled=cancelled)
    source = """
import asyncio
async def _forever(ctx, kind, ready):
    ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        ctx.cancelled.append(kind)

async def setup(ctx):
    a, b = asyncio.Event(), asyncio.Event()
    ctx.spawn(_forever, ctx, "spawn", a)
    asyncio.create_task(_forever(ctx, "raw", b))
    await a.wait()
    await b.wait()
    raise RuntimeError("setup failed late")

def main(ctx, args):
    return None
"""
    with pytest.raises(CompileError):
        await env2.load("p", source)
    assert sorted(cancelled) == ["raw", "spawn"]


TICKER = """
import asyncio

async def _tick(ctx, kind, ready):
    ctx.alive[kind].append(VERSION)
    ready.set()
    try:
        while True:
            ctx.ticks[VERSION] = ctx.ticks.get(VERSION, 0) + 1
            await asyncio.sleep(0.001)
    finally:
        ctx.alive[kind].remove(VERSION)

async def setup(ctx):
    spawned, raw = asyncio.Event(), asyncio.Event()
    ctx.spawn(_tick, ctx, "spawn", spawned)
    task = asyncio.create_task(_tick(ctx, "raw", raw))
    await spawned.wait()
    await raw.wait()
    return task

async def main(ctx, args):
    return VERSION
"""


@pytest.mark.anyio
async def test_background_work_never_doubles_across_reloads(env: Env) -> None:
    """After 3 reloads exactly one spawned and one create_task ticker are alive."""
    alive: dict[str, list[int]] = {"spawn": [], "raw": []}
    ticks: dict[int, int] = {}
    env2 = Env(env.registry, alive=alive, ticks=ticks)
    versions = []
    for n in range(1, 5):
        versions.append(await env2.load("ticker", f"VERSION = {n}\n{TICKER}", revision=n))
    for old in versions[:-1]:
        await old.wait_retired()
    assert alive == {"spawn": [4], "raw": [4]}
    raw_task = versions[-1].state
    assert isinstance(raw_task, asyncio.Task) and not raw_task.done()
    await env.registry.remove("ticker")
    await versions[-1].wait_retired()
    assert alive == {"spawn": [], "raw": []}
    assert raw_task.cancelled()


@pytest.mark.anyio
async def test_tasks_created_by_calls_belong_to_the_version(env: Env) -> None:
    """asyncio tasks a handler creates are cancelled when its version retires."""
    cancelled: list[int] = []
    env2 = Env(env.registry, cancelled=cancelled)
    source = """
import asyncio
async def _forever(ctx):
    try:
        await asyncio.Event().wait()
    finally:
        ctx.cancelled.append(1)

async def main(ctx, args):
    asyncio.create_task(_forever(ctx))
    await asyncio.sleep(0)
    return "started"
"""
    plugin = await env2.load("bg", source)
    assert await env2.dispatcher.call("bg", None) == "started"
    assert len(plugin.tasks) == 1
    await env.registry.remove("bg")
    await plugin.wait_retired()
    assert cancelled == [1]


@pytest.mark.anyio
async def test_grace_period_bounds_the_wait_for_in_flight_calls() -> None:
    """A version whose call never ends is torn down after the grace period anyway."""
    async with Registry(grace_period=0.05) as registry:
        env = Env(registry)
        old = await env.load_hooks("p", 1)
        results: list[int] = []

        async def held_call() -> None:
            results.append(await env.dispatcher.call("p", "hold"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(held_call)
            await env.started.wait()
            with structlog.testing.capture_logs() as logs:
                await env.load_hooks("p", 2)
                await old.wait_retired()
            assert ("teardown", 1) in env.events
            assert old.released
            env.gate.set()  # the call kept its own references and still finishes
        assert results == [1]
        retired = [e for e in logs if e["event"] == "plugin.retired"]
        assert retired == [
            {
                "event": "plugin.retired",
                "log_level": "info",
                "plugin": "p",
                "version": old.version,
                "in_flight": 1,
                "forced": True,
            }
        ]


@pytest.mark.anyio
async def test_cancelled_registry_still_tears_down_each_version_once() -> None:
    """Cancelling the scope around a registry still tears every version down exactly once."""
    with anyio.CancelScope() as scope:
        async with Registry() as registry:
            env = Env(registry)
            versions = [await env.load_hooks("p", 1), await env.load_hooks("p", 2)]
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert sorted(env.events) == [("setup", 1), ("setup", 2), ("teardown", 1), ("teardown", 2)]
    assert all(plugin.released for plugin in versions)


@pytest.mark.anyio
async def test_retired_module_is_garbage_collected(env: Env) -> None:
    """After retirement and gc.collect(), a weakref to the old module is dead."""
    old = await env.load_hooks("p", 1)
    assert await env.dispatcher.call("p", None) == 1
    ref = weakref.ref(old.module)
    await env.load_hooks("p", 2)
    await old.wait_retired()
    gc.collect()
    assert ref() is None
    assert old.released


@pytest.mark.anyio
async def test_history_keeps_the_last_n_records(env: Env) -> None:
    """history(name) holds at most history_size records, newest first, after remove too."""
    plugins = [await env.load_hooks("p", n) for n in range(1, 6)]
    history = env.registry.history("p")
    assert history == tuple(p.record for p in reversed(plugins[-3:]))
    await env.registry.remove("p")
    assert env.registry.history("p") == history
    assert env.registry.history("unknown") == ()


@pytest.mark.anyio
async def test_remove_unloads_and_retires(env: Env) -> None:
    """remove() makes the name unknown and retires its version."""
    plugin = await env.load_hooks("p", 1)
    assert await env.registry.remove("p") is plugin
    assert env.registry.get("p") is None
    await plugin.wait_retired()
    assert env.events == [("setup", 1), ("teardown", 1)]
    assert await env.registry.remove("p") is None


@pytest.mark.anyio
async def test_teardown_failure_is_logged_and_contained(env: Env) -> None:
    """A raising teardown is logged as plugin.teardown_failed; retirement completes."""
    source = "def main(ctx, a): pass\nasync def teardown(ctx):\n    raise OSError('disk gone')\n"
    plugin = await env.load("p", source)
    with structlog.testing.capture_logs() as logs:
        await env.registry.remove("p")
        await plugin.wait_retired()
    failed = [e for e in logs if e["event"] == "plugin.teardown_failed"]
    assert len(failed) == 1
    assert failed[0]["error_type"] == "OSError"
    assert "raise OSError('disk gone')" in failed[0]["traceback"]
    assert plugin.released


@pytest.mark.anyio
async def test_sync_hooks_run_in_a_worker_thread(env: Env) -> None:
    """Plain-def setup/teardown run off the event loop thread."""
    import threading

    loop_thread = threading.get_ident()
    seen: list[int] = []
    env2 = Env(env.registry, seen=seen)
    source = (
        "import threading\n"
        "def setup(ctx):\n    ctx.seen.append(threading.get_ident())\n    return 'ok'\n"
        "def teardown(ctx):\n    ctx.seen.append(threading.get_ident())\n"
        "def main(ctx, a):\n    return ctx.state\n"
    )
    plugin = await env2.load("p", source)
    assert await env2.dispatcher.call("p", None) == "ok"
    await env.registry.remove("p")
    await plugin.wait_retired()
    assert len(seen) == 2
    assert loop_thread not in seen


@pytest.mark.anyio
async def test_install_rules(env: Env) -> None:
    """A version installs once; nothing installs after close."""
    plugin = await env.load_hooks("p", 1)
    with pytest.raises(ValueError, match="already installed"):
        await env.registry.install(plugin, env.dispatcher.make_context)
    await env.registry.aclose(drain_timeout=0)
    record = PluginRecord(name="q", source="def main(c, a): pass\n")
    fresh = await compile_plugin(record, exec_timeout=LOAD_TIMEOUT)
    with pytest.raises(HostClosed):
        await env.registry.install(fresh, env.dispatcher.make_context)
    with pytest.raises(HostClosed):
        await env.registry.remove("p")


@pytest.mark.anyio
async def test_install_now_swaps_in_one_step_and_refuses_what_needs_an_await(env: Env) -> None:
    """install_now swaps like install; a setup hook or a busy name is refused."""

    async def compiled(source: str, revision: int) -> Plugin:
        record = PluginRecord(name="p", source=source, revision=revision)
        return await compile_plugin(record, exec_timeout=LOAD_TIMEOUT)

    first = await env.load(
        "p",
        "async def teardown(ctx):\n    ctx.events.append(('teardown', 1))\n"
        "async def main(ctx, args):\n    return 1\n",
    )
    second = await compiled("async def main(ctx, args):\n    return 2\n", 2)
    assert env.registry.installs_now(second)
    assert env.registry.install_now(second, env.dispatcher.make_context) is first
    assert env.registry.get("p") is second and second.phase is Phase.LIVE
    assert env.registry.history("p")[0] is second.record
    await first.wait_retired()
    assert env.events == [("teardown", 1)]
    with pytest.raises(ValueError, match="already installed"):
        env.registry.install_now(second, env.dispatcher.make_context)

    hooked = await compiled(f"VERSION = 3\n{HOOKS}", 3)
    assert not env.registry.installs_now(hooked)
    with pytest.raises(ValueError, match="setup hook"):
        env.registry.install_now(hooked, env.dispatcher.make_context)
    hooked.release()

    gated = await compiled(
        "async def setup(ctx):\n    await ctx.gate.wait()\n"
        "async def main(ctx, args):\n    return 4\n",
        4,
    )
    fresh = await compiled("async def main(ctx, args):\n    return 5\n", 5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(env.registry.install, gated, env.dispatcher.make_context)
        while gated.phase is not Phase.STARTING:
            await anyio.lowlevel.checkpoint()
        assert not env.registry.installs_now(fresh), "the name's install is under way"
        with pytest.raises(ValueError, match="busy"):
            env.registry.install_now(fresh, env.dispatcher.make_context)
        env.gate.set()
    assert env.registry.get("p") is gated
    fresh.release()
    await env.registry.aclose(drain_timeout=0)
    with pytest.raises(HostClosed):
        env.registry.install_now(
            await compiled("def main(c, a): pass\n", 6), env.dispatcher.make_context
        )


@pytest.mark.anyio
async def test_task_factory_chains_and_is_restored() -> None:
    """The registry's task factory chains to an existing one and restores it on exit."""
    loop = asyncio.get_running_loop()
    created: list[str] = []

    def outer_factory(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Task[Any]:
        created.append("outer")
        return asyncio.Task(coro, loop=loop, **kwargs)

    previous = loop.get_task_factory()
    loop.set_task_factory(outer_factory)  # type: ignore[arg-type]
    try:
        async with Registry() as registry:
            assert loop.get_task_factory() is not outer_factory
            env = Env(registry)
            plugin = await env.load("p", "import asyncio\nasync def main(c, a):\n    pass\n")
            created.clear()
            task = asyncio.create_task(asyncio.sleep(0))
            await task
            assert created == ["outer"]
            assert task not in plugin.tasks  # not created by plugin code
        assert loop.get_task_factory() is outer_factory
    finally:
        loop.set_task_factory(previous)


# ------------------------------------------------------------------ state machine

NAMES = ("a", "b")


class RegistryMachine(RuleBasedStateMachine):
    """Random install/remove/begin-call/end-call/close sequences on a live registry.

    The registry runs on an event loop in a blocking portal thread, so its state persists
    across rules; in-flight calls are held with the same begin/end hooks the dispatcher
    uses. The grace period is infinite: only draining (or close) retires a version.
    """

    def __init__(self) -> None:
        super().__init__()
        self._portal_cm = anyio.from_thread.start_blocking_portal("asyncio")
        self.portal = self._portal_cm.__enter__()
        self.registry = Registry(grace_period=math.inf, history_size=3)
        self._registry_cm = self.portal.wrap_async_context_manager(self.registry)
        self._registry_cm.__enter__()
        self.env = self.portal.call(self._make_env)
        self.model: dict[str, Plugin] = {}
        self.installed: list[Plugin] = []  # versions whose setup succeeded
        self.failed: list[Plugin] = []  # versions whose setup raised
        self.held: list[Plugin] = []
        self.closed = False
        self.counter = 0

    async def _make_env(self) -> Env:
        return Env(self.registry)

    def teardown(self) -> None:
        """Close the registry (forcing drains) and stop the portal."""
        self.portal.call(self.registry.aclose, 0.0)
        self._registry_cm.__exit__(None, None, None)
        self._portal_cm.__exit__(None, None, None)

    def held_count(self, plugin: Plugin) -> int:
        return sum(1 for p in self.held if p is plugin)

    def settle(self) -> None:
        """Wait (with a deadline) for every version that should retire to be retired."""

        async def wait() -> None:
            for plugin in self.installed:
                if self.model.get(plugin.name) is plugin:
                    continue
                if self.closed or self.held_count(plugin) == 0:
                    with anyio.fail_after(5):
                        await plugin.wait_retired()

        self.portal.call(wait)

    @precondition(lambda self: not self.closed)
    @rule(name=st.sampled_from(NAMES), setup_fails=st.booleans())
    def install(self, name: str, setup_fails: bool) -> None:
        self.counter += 1
        source = f"VERSION = {self.counter}\n{HOOKS}"
        if setup_fails:
            source = source.replace('    return {"v": VERSION}', "    raise RuntimeError('x')")
        record = PluginRecord(name=name, source=source, revision=self.counter)
        plugin = self.portal.call(partial(compile_plugin, record, exec_timeout=LOAD_TIMEOUT))

        async def install() -> Plugin | None:
            return await self.registry.install(plugin, self.env.dispatcher.make_context)

        if setup_fails:
            with pytest.raises(CompileError):
                self.portal.call(install)
            assert plugin.phase is Phase.RETIRED
            self.failed.append(plugin)
        else:
            old = self.portal.call(install)
            assert old is self.model.get(name)
            self.model[name] = plugin
            self.installed.append(plugin)
        self.settle()

    @precondition(lambda self: not self.closed)
    @rule(name=st.sampled_from(NAMES))
    def remove(self, name: str) -> None:
        removed = self.portal.call(self.registry.remove, name)
        assert removed is self.model.pop(name, None)
        self.settle()

    @precondition(lambda self: not self.closed)
    @rule(name=st.sampled_from(NAMES))
    def begin_call(self, name: str) -> None:
        plugin = self.registry.get(name)
        assert plugin is self.model.get(name)
        if plugin is not None:
            self.portal.call(self._begin, plugin)
            self.held.append(plugin)

    async def _begin(self, plugin: Plugin) -> None:
        plugin.begin_call()

    async def _end(self, plugin: Plugin) -> None:
        plugin.end_call()

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def end_call(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.held) - 1))
        plugin = self.held.pop(index)
        self.portal.call(self._end, plugin)
        self.settle()

    @rule(name=st.sampled_from(NAMES))
    def lookup(self, name: str) -> None:
        assert self.registry.get(name) is self.model.get(name)
        assert (name in self.registry) == (name in self.model)

    @precondition(lambda self: not self.closed)
    @rule()
    def close(self) -> None:
        self.portal.call(self.registry.aclose, 0.0)
        self.closed = True
        self.model.clear()
        self.settle()

    @invariant()
    def one_live_current_version_per_name(self) -> None:
        """(1) The registry's current versions are exactly the model's, all LIVE."""
        assert dict(self.registry.items()) == self.model
        for plugin in self.model.values():
            assert plugin.phase is Phase.LIVE

    @invariant()
    def retired_exactly_once(self) -> None:
        """(2) Each version is set up once, torn down at most once, and once retired."""
        events = self.env.events
        for plugin in self.installed:
            version = plugin.record.revision
            assert version is not None
            assert events.count(("setup", version)) == 1
            teardowns = events.count(("teardown", version))
            assert teardowns <= 1
            assert teardowns == (1 if plugin.phase is Phase.RETIRED else 0)
        for plugin in self.failed:
            assert ("teardown", plugin.record.revision) not in events

    @invariant()
    def in_flight_versions_are_not_torn_down(self) -> None:
        """(3) Without close, a version with calls in flight is never torn down."""
        if self.closed:
            return
        for plugin in self.held:
            assert plugin.phase in (Phase.LIVE, Phase.RETIRING)
            assert plugin.in_flight == self.held_count(plugin)

    @invariant()
    def history_is_bounded(self) -> None:
        """(4) history(name) never exceeds history_size and starts with the current one."""
        for name in NAMES:
            history = self.registry.history(name)
            assert len(history) <= 3
            if name in self.model:
                assert history[0] is self.model[name].record

    @invariant()
    def retired_versions_hold_no_code(self) -> None:
        """(5) A retired version holds no module, entrypoint, hooks or state."""
        for plugin in self.installed:
            if plugin.phase is Phase.RETIRED:
                assert plugin.released
                assert "main" not in plugin.module.__dict__
                assert plugin.setup is None and plugin.teardown is None
                assert plugin.state is None


RegistryMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


# hypothesis builds TestCase dynamically, which mypy cannot see as a class.
class TestRegistryInvariants(RegistryMachine.TestCase):  # type: ignore[misc,valid-type]
    """The registry keeps its invariants under random install/remove/call/close steps."""
