"""Tests for host.dispatch: routing calls to current versions, limits, timeouts, errors."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import structlog

from host.compiler import compile_plugin
from host.dispatch import Dispatcher
from host.errors import (
    HostClosed,
    PluginBusy,
    PluginFailed,
    PluginNotFound,
    PluginTimeout,
    RequireDepthExceeded,
)
from host.events import EventBus
from host.plugin import Plugin
from host.records import PluginRecord
from host.registry import Registry
from host.threads import ThreadLimiter
from tests.support import next_event, wait_until

# Generous load bound: these tests are not about load timeouts, and CI machines are busy.
LOAD_TIMEOUT = 30.0


class Host:
    """A running registry and a dispatcher over it."""

    def __init__(self, registry: Registry, dispatcher: Dispatcher) -> None:
        self.registry = registry
        self.dispatcher = dispatcher

    async def load(
        self, name: str, source: str, *, default_max_concurrency: int | None = None, **fields: Any
    ) -> Plugin:
        """Compile and install a version of ``name``; return it."""
        plugin = await compile_plugin(
            PluginRecord(name=name, source=source, **fields),
            exec_timeout=LOAD_TIMEOUT,
            default_max_concurrency=default_max_concurrency,
        )
        await self.registry.install(plugin, self.dispatcher.make_context)
        return plugin


def make_host(registry: Registry, **kw: Any) -> Host:
    """Build a Host with globals from ``kw`` (dispatcher options are popped first)."""
    options = {k: kw.pop(k) for k in list(kw) if k in DISPATCHER_OPTIONS}
    return Host(registry, Dispatcher(registry, db="the-db", globals=kw, **options))


DISPATCHER_OPTIONS = {"default_timeout", "max_waiting", "require_depth"}


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    """A running registry."""
    async with Registry(grace_period=5.0) as registry:
        yield registry


@pytest.mark.anyio
async def test_call_returns_the_plugin_result(registry: Registry) -> None:
    """An async entrypoint gets ctx and args and its result is returned."""
    host = make_host(registry)
    await host.load("greet", "async def main(ctx, args):\n    return f\"Hello {args['n']}\"\n")
    assert await host.dispatcher.call("greet", {"n": "Ada"}) == "Hello Ada"


@pytest.mark.anyio
async def test_unknown_plugin_raises_not_found(registry: Registry) -> None:
    """Calling a name with no current version raises PluginNotFound naming it."""
    host = make_host(registry)
    with pytest.raises(PluginNotFound) as info:
        await host.dispatcher.call("nope", None)
    assert info.value.name == "nope"
    assert "'nope' is not loaded" in str(info.value)


@pytest.mark.anyio
async def test_timeout_raises_plugin_timeout_and_logs(registry: Registry) -> None:
    """A call running past its timeout raises PluginTimeout and logs call.timeout."""
    host = make_host(registry)
    plugin = await host.load(
        "slow", "import anyio\nasync def main(ctx, a):\n    await anyio.sleep_forever()\n"
    )
    with structlog.testing.capture_logs() as logs, pytest.raises(PluginTimeout) as info:
        await host.dispatcher.call("slow", None, timeout=0.05)
    assert (info.value.name, info.value.version, info.value.timeout) == (
        "slow",
        plugin.version,
        0.05,
    )
    assert logs == [
        {
            "event": "call.timeout",
            "log_level": "warning",
            "plugin": "slow",
            "version": plugin.version,
            "timeout": 0.05,
        }
    ]
    assert plugin.in_flight == 0


@pytest.mark.anyio
async def test_outer_cancellation_is_not_a_plugin_timeout(registry: Registry) -> None:
    """An enclosing cancel scope that fires first cancels the call: no PluginTimeout, no
    call.timeout, the version's in-flight count back to 0."""
    host = make_host(registry)
    plugin = await host.load(
        "slow", "import anyio\nasync def main(ctx, a):\n    await anyio.sleep_forever()\n"
    )
    with structlog.testing.capture_logs() as logs:
        with anyio.move_on_after(0.05) as outer:
            await host.dispatcher.call("slow", None, timeout=30)
    assert outer.cancelled_caught
    assert [e for e in logs if e["event"] == "call.timeout"] == []
    assert plugin.in_flight == 0


@pytest.mark.anyio
async def test_a_plugins_own_timeout_error_is_a_failure(registry: Registry) -> None:
    """TimeoutError raised by plugin code inside a call with a deadline is PluginFailed."""
    host = make_host(registry)
    await host.load("raises", "async def main(ctx, a):\n    raise TimeoutError('upstream')\n")
    with pytest.raises(PluginFailed) as info:
        await host.dispatcher.call("raises", None, timeout=30)
    assert (info.value.error_type, info.value.error_message) == ("TimeoutError", "upstream")


@pytest.mark.anyio
async def test_record_and_default_timeouts_apply(registry: Registry) -> None:
    """Without a per-call timeout, the record's timeout, then the default, applies."""
    host = make_host(registry, default_timeout=0.05)
    forever = "import anyio\nasync def main(ctx, a):\n    await anyio.sleep_forever()\n"
    await host.load("by-record", forever, timeout=0.05)
    await host.load("by-default", forever)
    with pytest.raises(PluginTimeout) as info:
        await host.dispatcher.call("by-record", None)
    assert info.value.timeout == 0.05
    with pytest.raises(PluginTimeout):
        await host.dispatcher.call("by-default", None)


@pytest.mark.anyio
async def test_sync_plugin_runs_in_a_worker_thread(registry: Registry) -> None:
    """A plain-def entrypoint runs in a worker thread, not on the event loop thread."""
    host = make_host(registry)
    await host.load(
        "sync", "import threading\ndef main(ctx, args):\n    return threading.get_ident()\n"
    )
    assert await host.dispatcher.call("sync", None) != threading.get_ident()


@pytest.mark.anyio
async def test_sync_plugin_timeout_interrupts_its_thread(registry: Registry) -> None:
    """A runaway sync plugin times out and its thread is interrupted."""
    stopped = threading.Event()
    host = make_host(registry, stopped=stopped)
    source = (
        "def main(ctx, args):\n"
        "    try:\n"
        "        while True:\n"
        "            pass\n"
        "    finally:\n"
        "        ctx.stopped.set()\n"
    )
    await host.load("spin", source)
    with pytest.raises(PluginTimeout):
        await host.dispatcher.call("spin", None, timeout=0.05)
    assert await anyio.to_thread.run_sync(stopped.wait, 30)


@pytest.mark.anyio
async def test_failure_carries_the_plugin_traceback(registry: Registry) -> None:
    """A raising plugin yields PluginFailed with its source lines, cause and a log event."""
    host = make_host(registry)
    source = (
        "def helper(x):\n    return 1 / x\n\nasync def main(ctx, args):\n    return helper(args)\n"
    )
    plugin = await host.load("div", source, revision=3)
    with structlog.testing.capture_logs() as logs, pytest.raises(PluginFailed) as info:
        await host.dispatcher.call("div", 0)
    error = info.value
    assert (error.name, error.version) == ("div", plugin.version)
    assert error.error_type == "ZeroDivisionError"
    assert error.error_message == "division by zero"
    assert isinstance(error.__cause__, ZeroDivisionError)
    assert 'File "<plugin div@r3>", line 5, in main' in error.traceback
    assert "return helper(args)" in error.traceback
    assert "return 1 / x" in error.traceback
    assert "dispatch.py" not in error.traceback
    assert f"plugin {plugin.version} failed: ZeroDivisionError: division by zero" == str(error)
    assert logs == [
        {
            "event": "call.failed",
            "log_level": "error",
            "plugin": "div",
            "version": plugin.version,
            "error_type": "ZeroDivisionError",
            "error": "division by zero",
            "traceback": error.traceback,
        }
    ]
    assert await host.dispatcher.call("div", 2) == 0.5  # the host is unharmed


@pytest.mark.anyio
async def test_sync_failure_and_system_exit_are_wrapped(registry: Registry) -> None:
    """Sync plugin exceptions, even SystemExit, become PluginFailed."""
    host = make_host(registry)
    await host.load("boom", "def main(ctx, args):\n    raise ValueError(args)\n")
    await host.load("exit", "import sys\nasync def main(ctx, args):\n    sys.exit(2)\n")
    with pytest.raises(PluginFailed) as info:
        await host.dispatcher.call("boom", "bad input")
    assert info.value.error_message == "bad input"
    assert "raise ValueError(args)" in info.value.traceback
    with pytest.raises(PluginFailed) as exit_info:
        await host.dispatcher.call("exit", None)
    assert exit_info.value.error_type == "SystemExit"


@pytest.mark.anyio
async def test_max_concurrency_queues_then_rejects(registry: Registry) -> None:
    """Beyond max_concurrency calls wait; beyond max_waiting waiters, PluginBusy."""
    gate = anyio.Event()
    state = {"running": 0, "peak": 0}
    source = (
        "async def main(ctx, args):\n"
        "    s = ctx.state_box\n"
        "    s['running'] += 1\n"
        "    s['peak'] = max(s['peak'], s['running'])\n"
        "    await ctx.gate.wait()\n"
        "    s['running'] -= 1\n"
        "    return args\n"
    )
    host = make_host(registry, gate=gate, state_box=state, max_waiting=2)
    plugin = await host.load("one", source, max_concurrency=1)
    results: list[int] = []

    async def call(n: int) -> None:
        results.append(await host.dispatcher.call("one", n))

    async with anyio.create_task_group() as tg:
        for n in range(3):
            tg.start_soon(call, n)
        await anyio.wait_all_tasks_blocked()
        assert plugin.waiting == 2
        with pytest.raises(PluginBusy) as info:
            await host.dispatcher.call("one", 99)
        assert info.value.max_waiting == 2
        gate.set()
    assert sorted(results) == [0, 1, 2]
    assert state["peak"] == 1
    assert plugin.waiting == 0
    assert plugin.in_flight == 0


@pytest.mark.anyio
async def test_default_max_concurrency_applies(registry: Registry) -> None:
    """default_max_concurrency limits versions whose record sets none."""
    gate = anyio.Event()
    host = make_host(registry, gate=gate, max_waiting=0)
    plugin = await host.load(
        "p", "async def main(ctx, a):\n    await ctx.gate.wait()\n", default_max_concurrency=1
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(host.dispatcher.call, "p", None)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(PluginBusy):
            await host.dispatcher.call("p", None)
        gate.set()
    assert plugin.limiter is not None


@pytest.mark.anyio
async def test_require_is_late_bound(registry: Registry) -> None:
    """One require handle reaches whatever version is current at each invocation."""
    host = make_host(registry)
    greet = host.dispatcher.require("greet")
    with pytest.raises(PluginNotFound):
        await greet(None)
    await host.load("greet", "async def main(ctx, a):\n    return 'v1'\n", revision=1)
    assert await greet(None) == "v1"
    await host.load("greet", "async def main(ctx, a):\n    return 'v2'\n", revision=2)
    assert await greet(None) == "v2"


@pytest.mark.anyio
async def test_ctx_require_and_call_reach_other_plugins(registry: Registry) -> None:
    """ctx.call and ctx.require from inside a plugin call other current plugins."""
    host = make_host(registry)
    await host.load("double", "async def main(ctx, x):\n    return 2 * x\n")
    source = (
        "async def main(ctx, x):\n"
        "    double = ctx.require('double')\n"
        "    return await double(x) + await ctx.call('double', 1)\n"
    )
    await host.load("caller", source)
    assert await host.dispatcher.call("caller", 5) == 12


@pytest.mark.anyio
async def test_call_cycle_is_stopped_by_depth_limit(registry: Registry) -> None:
    """a -> b -> a ... is refused with RequireDepthExceeded naming the chain."""
    host = make_host(registry, require_depth=4)
    await host.load("a", "async def main(ctx, x):\n    return await ctx.call('b', x)\n")
    await host.load("b", "async def main(ctx, x):\n    return await ctx.require('a')(x)\n")
    with pytest.raises(RequireDepthExceeded) as info:
        await host.dispatcher.call("a", None)
    assert info.value.chain == ("a", "b", "a", "b", "a")
    assert "a -> b -> a -> b -> a" in str(info.value)
    for name in ("a", "b"):
        plugin = registry.get(name)
        assert plugin is not None and plugin.in_flight == 0


@pytest.mark.anyio
async def test_a_depth_limit_below_one_is_refused(registry: Registry) -> None:
    """require_depth=0 would refuse every call: the dispatcher refuses it; 1 allows outermost
    calls only."""
    with pytest.raises(ValueError, match="require_depth"):
        make_host(registry, require_depth=0)
    host = make_host(registry, require_depth=1)
    await host.load("leaf", "async def main(ctx, x):\n    return x\n")
    await host.load("a", "async def main(ctx, x):\n    return await ctx.call('leaf', x)\n")
    assert await host.dispatcher.call("leaf", 7) == 7
    with pytest.raises(RequireDepthExceeded) as info:
        await host.dispatcher.call("a", 7)
    assert info.value.chain == ("a", "leaf")


@pytest.mark.anyio
async def test_concurrent_calls_during_swaps_see_whole_versions(registry: Registry) -> None:
    """50 callers during 40 swaps: no failure, and every result comes from one whole version."""
    host = make_host(registry)
    template = (
        "import anyio\n"
        "A = {n}\n"
        "async def setup(ctx):\n"
        "    await anyio.lowlevel.checkpoint()\n"
        "async def main(ctx, args):\n"
        "    a = A\n"
        "    await anyio.lowlevel.checkpoint()\n"
        "    return (a, B)\n"
        "B = {n}\n"
    )
    await host.load("ab", template.format(n=0), revision=0)
    results: list[tuple[int, int]] = []
    done = anyio.Event()

    async def caller() -> None:
        while not done.is_set():
            results.append(await host.dispatcher.call("ab", None))

    async def swapper() -> None:
        for n in range(1, 41):
            await host.load("ab", template.format(n=n), revision=n)
            await anyio.lowlevel.checkpoint()
        done.set()

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(caller)
        tg.start_soon(swapper)
    assert results
    assert all(a == b for a, b in results), [r for r in results if r[0] != r[1]][:5]
    assert len({a for a, _ in results}) > 1  # calls really ran across swaps
    assert results[-1] == (40, 40)


@pytest.mark.anyio
async def test_closed_dispatcher_refuses_new_calls(registry: Registry) -> None:
    """After close(), calls raise HostClosed while calls in flight finish."""
    gate = anyio.Event()
    started = anyio.Event()
    host = make_host(registry, gate=gate, started=started)
    source = (
        "async def main(ctx, a):\n"
        "    ctx.started.set()\n"
        "    await ctx.gate.wait()\n"
        "    return 'done'\n"
    )
    await host.load("p", source)
    results: list[str] = []

    async def held() -> None:
        results.append(await host.dispatcher.call("p", None))

    async with anyio.create_task_group() as tg:
        tg.start_soon(held)
        await started.wait()
        host.dispatcher.close()
        assert host.dispatcher.draining
        with pytest.raises(HostClosed):
            await host.dispatcher.call("p", None)
        gate.set()
    assert results == ["done"]


@pytest.mark.anyio
async def test_ctx_exposes_db_globals_state_and_bound_log(registry: Registry) -> None:
    """ctx carries db, host globals, setup state and a logger bound to plugin/version/call_id."""
    host = make_host(registry, foo="bar")
    source = (
        "async def setup(ctx):\n"
        "    return {'ready': True}\n"
        "async def main(ctx, args):\n"
        "    ctx.log.info('greeting', who=args)\n"
        "    return (ctx.db, ctx.foo, ctx.state, ctx.call_id)\n"
    )
    plugin = await host.load("greet", source, revision=7)
    with structlog.testing.capture_logs() as logs:
        db, foo, state, call_id = await host.dispatcher.call("greet", "Ada")
    assert (db, foo, state) == ("the-db", "bar", {"ready": True})
    assert logs == [
        {
            "event": "greeting",
            "log_level": "info",
            "who": "Ada",
            "plugin": "greet",
            "version": plugin.version,
            "call_id": call_id,
        }
    ]


@pytest.mark.anyio
async def test_a_kept_ctx_keeps_naming_its_own_call(registry: Registry) -> None:
    """A ctx the plugin keeps is never rebound: it keeps its call_id, version and logger."""
    host = make_host(registry)
    source = (
        "kept = []\n"
        "async def main(ctx, args):\n"
        "    if args == 'keep':\n"
        "        kept.append(ctx)\n"
        "    ctx.log.info('seen')\n"
        "    return ctx.call_id\n"
    )
    first = await host.load("keeper", source, revision=1)
    kept_list = first.module.kept
    with structlog.testing.capture_logs() as logs:
        kept_id = await host.dispatcher.call("keeper", "keep")
        later = [await host.dispatcher.call("keeper", None) for _ in range(5)]
        second = await host.load("keeper", source, revision=2)  # a newer version
        newer = [await host.dispatcher.call("keeper", None) for _ in range(3)]
        (kept,) = kept_list
        kept.log.info("seen")  # its logger still names its own call
    ids = [kept_id, *later, *newer]
    assert len(set(ids)) == len(ids), "every call has its own call_id"
    assert (kept.call_id, kept.version) == (kept_id, first.version)
    seen = [(e["call_id"], e["version"]) for e in logs if e["event"] == "seen"]
    assert seen == [
        *[(call_id, first.version) for call_id in (kept_id, *later)],
        *[(call_id, second.version) for call_id in newer],
        (kept_id, first.version),
    ]


@pytest.mark.anyio
async def test_each_call_gets_its_own_ctx_while_others_run(registry: Registry) -> None:
    """Concurrent calls never share a ctx: each sees its own call_id after its awaits."""
    host = make_host(registry)
    source = (
        "import anyio\n"
        "async def main(ctx, args):\n"
        "    before = ctx.call_id\n"
        "    await anyio.sleep(0)\n"
        "    await anyio.sleep(0)\n"
        "    return (before, ctx.call_id, id(ctx))\n"
    )
    await host.load("overlap", source)
    results: list[tuple[int, int, int]] = []

    async def one() -> None:
        results.append(await host.dispatcher.call("overlap", None))

    for _ in range(3):  # rounds: contexts freed by one round may serve the next
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
    assert all(before == after for before, after, _ in results)
    assert len({call_id for call_id, _, _ in results}) == len(results)


BLOCKING_IN_C = """
def main(ctx, args):
    with ctx.lock:
        ctx.live[0] += 1
        ctx.peak[0] = max(ctx.peak[0], ctx.live[0])
    try:
        ctx.gate.wait()  # blocks in C: an injected ThreadInterrupted waits for it
    finally:
        with ctx.lock:
            ctx.live[0] -= 1
    return "done"
"""


@pytest.mark.anyio
async def test_abandoned_threads_keep_their_slot(registry: Registry) -> None:
    """Timed-out sync calls blocked in C never run more threads than the limiter allows."""
    gate = threading.Event()
    live, peak = [0], [0]
    dispatcher = Dispatcher(
        registry,
        db=None,
        globals={"gate": gate, "lock": threading.Lock(), "live": live, "peak": peak},
        thread_limiter_size=2,
    )
    host = Host(registry, dispatcher)
    plugin = await host.load("stuck", BLOCKING_IN_C)
    busy: list[PluginBusy] = []
    try:
        for _ in range(50):
            try:
                await dispatcher.call("stuck", None, timeout=0.05)
            except PluginBusy as exc:
                busy.append(exc)
            except PluginTimeout:
                pass
            assert peak[0] <= 2
            assert dispatcher.abandoned_threads <= 2
        assert busy, "every slot was held by an abandoned thread, yet no call got PluginBusy"
        assert busy[-1].abandoned_threads == 2
        assert "held by calls that timed out" in str(busy[-1])
        assert plugin.threads.abandoned == 2
        assert registry.abandoned_threads("stuck") == 2
    finally:
        gate.set()
    await wait_until(
        lambda: dispatcher.abandoned_threads == 0, "the abandoned threads returned their slots"
    )
    assert plugin.threads.abandoned == 0
    assert peak[0] <= 2
    assert await dispatcher.call("stuck", None, timeout=LOAD_TIMEOUT) == "done"


FAN = (
    "import asyncio\n"
    "async def main(ctx, n):\n"
    "    if n == 0:\n"
    "        return 1\n"
    "    a, b = await asyncio.gather(ctx.call('fan', n - 1), ctx.call('fan', n - 1))\n"
    "    return a + b + 1\n"
)


@pytest.mark.anyio
@pytest.mark.parametrize(("limit", "depth"), [(64, 7), (2, 3), (1, 4)])
async def test_fan_out_to_itself_never_waits_for_its_own_slots(
    registry: Registry, limit: int, depth: int
) -> None:
    """A plugin calling itself twice through gather (2**(d+1)-1 calls) finishes under any limit."""
    host = make_host(registry, default_timeout=20.0)
    plugin = await host.load("fan", FAN, max_concurrency=limit)
    assert await host.dispatcher.call("fan", depth) == 2 ** (depth + 1) - 1
    assert plugin.in_flight == 0 and plugin.waiting == 0
    # Independent callers still share the limit: three fan trees at once all finish.
    results: list[int] = []

    async def tree() -> None:
        results.append(await host.dispatcher.call("fan", 2))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(tree)
    assert results == [7, 7, 7]


@pytest.mark.anyio
async def test_fan_in_still_honours_the_limit_of_a_shared_callee(registry: Registry) -> None:
    """a gathers b and c, both call d (max 1); 4 trees at once: all finish, d runs one at a time."""
    box = {"running": 0, "peak": 0}
    host = make_host(registry, box=box, default_timeout=20.0)
    await host.load(
        "d",
        "import asyncio\n"
        "async def main(ctx, x):\n"
        "    ctx.box['running'] += 1\n"
        "    ctx.box['peak'] = max(ctx.box['peak'], ctx.box['running'])\n"
        "    await asyncio.sleep(0.01)\n"
        "    ctx.box['running'] -= 1\n"
        "    return x\n",
        max_concurrency=1,
    )
    for name in ("b", "c"):
        await host.load(name, "async def main(ctx, x):\n    return await ctx.call('d', x)\n")
    await host.load(
        "a",
        "import asyncio\n"
        "async def main(ctx, x):\n"
        "    return sum(await asyncio.gather(ctx.call('b', x), ctx.call('c', x)))\n",
        max_concurrency=1,
    )
    results: list[int] = []

    async def tree(n: int) -> None:
        results.append(await host.dispatcher.call("a", n))

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(tree, n)
    assert sorted(results) == [0, 2, 4, 6]
    assert box["peak"] == 1, "d ran concurrently although its limit is 1"


@pytest.mark.anyio
async def test_hooks_and_calls_share_one_bound_on_abandoned_threads() -> None:
    """A stuck sync teardown and a stuck sync call hold the host's 2 slots: then PluginBusy.

    Each abandoned thread that would not stop is reported as plugin.thread_stuck, naming
    the plugin, the version and where it was (teardown or call).
    """
    gate = threading.Event()
    limiter = ThreadLimiter(2)
    events = EventBus()
    async with (
        Registry(grace_period=0.0, teardown_timeout=0.05, events=events, threads=limiter) as reg,
        events.subscribe() as seen,
    ):
        dispatcher = Dispatcher(
            reg, db=None, globals={"gate": gate}, events=events, threads=limiter
        )
        host = Host(reg, dispatcher)
        blocked = "def main(ctx, a):\n    ctx.gate.wait()\n"
        old = await host.load(
            "t", "def teardown(ctx):\n    ctx.gate.wait()\n" + blocked, revision=1
        )
        try:
            await host.load("t", blocked, revision=2)  # the old version tears down: stuck
            await old.wait_retired()
            assert limiter.abandoned == 1
            with pytest.raises(PluginTimeout):
                await dispatcher.call("t", None, timeout=0.05)
            assert limiter.abandoned == 2
            with pytest.raises(PluginBusy) as info:
                await dispatcher.call("t", None, timeout=0.05)
            assert info.value.abandoned_threads == 2
            stuck = [await next_event(seen, "plugin.thread_stuck") for _ in range(2)]
            assert sorted((e["where"], e["version"]) for e in stuck) == [
                ("call", reg.get("t").version),  # type: ignore[union-attr]
                ("teardown", old.version),
            ]
            assert dispatcher.stuck_threads() == {reg.get("t").version: 1}  # type: ignore[union-attr]
        finally:
            gate.set()
        await wait_until(lambda: limiter.in_use == 0, "the stuck threads ended")
        assert dispatcher.stuck_threads() == {}


@pytest.mark.anyio
async def test_abort_ends_calls_in_flight_with_host_closed(registry: Registry) -> None:
    """abort(): async, sync (blocked in C) and fanned-out calls end with HostClosed, no residue."""
    gate = threading.Event()
    forever = anyio.Event()
    host = make_host(registry, gate=gate, forever=forever)
    await host.load("wait", "async def main(ctx, a):\n    await ctx.forever.wait()\n")
    await host.load("block", "def main(ctx, a):\n    ctx.gate.wait()\n")
    await host.load(
        "fan",
        "import asyncio\nasync def main(ctx, a):\n"
        "    await asyncio.gather(ctx.call('wait'), ctx.call('wait'))\n",
    )
    outcomes: dict[str, BaseException] = {}

    async def call(name: str) -> None:
        try:
            await host.dispatcher.call(name, None)
        except HostClosed as exc:
            outcomes[name] = exc
            await anyio.lowlevel.checkpoint()  # the task is not left cancelled: it goes on

    try:
        async with anyio.create_task_group() as tg:
            for name in ("wait", "block", "fan"):
                tg.start_soon(call, name)
            await wait_until(lambda: registry.get("wait").in_flight == 3, "calls in flight")  # type: ignore[union-attr]
            host.dispatcher.abort()
    finally:
        gate.set()
    assert sorted(outcomes) == ["block", "fan", "wait"]
    assert "stopped before the call finished" in str(outcomes["wait"])
    with pytest.raises(HostClosed):
        await host.dispatcher.call("wait", None)
    for name in ("wait", "block", "fan"):
        assert registry.get(name).in_flight == 0  # type: ignore[union-attr]
