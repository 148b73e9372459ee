"""Tests for the batched initial load: compile_plugins and Loader.submit_many."""

from __future__ import annotations

import contextlib
import random
import sys
import types
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, cast

import anyio
import pytest
import structlog

from host import PluginHost, PluginNotFound
from host.compiler import compile_plugins
from host.errors import CompileError
from host.events import EventBus
from host.loader import Change, Loader
from host.plugin import Plugin
from host.records import PluginRecord
from host.registry import Registry
from host.types import ContextFactory
from tests.support import PROBE, Db, events_for, next_event, returning, wait_until

pytestmark = pytest.mark.anyio


def rec(name: str, source: str) -> PluginRecord:
    """A record built directly."""
    return PluginRecord(name=name, source=source, revision=1)


async def test_batch_runaway_record_times_out_and_the_rest_load(
    probe: types.SimpleNamespace,
) -> None:
    """In a batch, a record looping at import fails with stage timeout; the others load."""
    runaway = (
        f"import {PROBE}\ntry:\n    while True:\n        pass\nfinally:\n"
        f"    {PROBE}.stopped.set()\n"
    )
    records = [rec(f"p{i}", returning(i)) for i in range(10)]
    records.insert(4, rec("spin", runaway))
    results = await compile_plugins(records, exec_timeout=0.2)
    assert len(results) == len(records)
    for record, result in zip(records, results, strict=True):
        if record.name == "spin":
            assert isinstance(result, CompileError)
            assert result.stage == "timeout"
            assert "0.2 s" in str(result)
        else:
            assert isinstance(result, Plugin), result
            assert await result.entrypoint(None, None) == int(record.name[1:])
    assert await anyio.to_thread.run_sync(probe.stopped.wait, 30), "runaway not interrupted"


async def test_batch_blocked_record_is_abandoned_and_the_rest_load(
    probe: types.SimpleNamespace,
) -> None:
    """A record blocked in C at import times out on wall time; records after it still load."""
    blocked = (
        f"import {PROBE}\ntry:\n    {PROBE}.gate.wait()\nfinally:\n    {PROBE}.stopped.set()\n"
    )
    records = [rec("a", returning(1)), rec("block", blocked), rec("b", returning(2))]
    results = await compile_plugins(records, exec_timeout=0.1)
    assert isinstance(results[0], Plugin)
    assert isinstance(results[1], CompileError) and results[1].stage == "timeout"
    assert isinstance(results[2], Plugin)
    assert not probe.stopped.is_set(), "the thread is still blocked in C"
    probe.gate.set()
    assert await anyio.to_thread.run_sync(probe.stopped.wait, 30)


async def test_batch_failures_stay_per_record() -> None:
    """Syntax, import and entrypoint errors in a batch fail only their own record."""
    records = [
        rec("ok", returning(1)),
        rec("syntax", "def main(:\n"),
        rec("import", "raise ValueError('boom')\n"),
        rec("noentry", "x = 1\n"),
        rec("ok2", returning(2)),
    ]
    results = await compile_plugins(records, exec_timeout=30.0)
    stages = [r.stage if isinstance(r, CompileError) else "ok" for r in results]
    assert stages == ["ok", "syntax", "import", "entrypoint", "ok"]


async def test_cold_start_of_hundreds_loads_all(db: Db) -> None:
    """A cold start of a few hundred records loads every one, with one summary line."""
    count = 300
    await db.functions.insert_many([{"_id": f"c{i}", "source": returning(i)} for i in range(count)])
    with structlog.testing.capture_logs() as logs:
        async with PluginHost(db) as host:
            assert len(host._registry) == count
            assert await host.call(f"c{count - 1}") == count - 1
            assert all(info.status == "serving" for info in host.plugins())
    started = [e for e in logs if e["event"] == "watch.started"]
    assert len(started) == 1
    assert started[0]["serving"] == count and started[0]["failed"] == 0
    loaded = [e for e in logs if e["event"] == "plugin.loaded"]
    assert len(loaded) == count
    assert {e["log_level"] for e in loaded} == {"debug"}


async def test_cold_start_with_a_runaway_record(db: Db) -> None:
    """At start-up, a record looping at import fails with stage timeout; the others serve."""
    docs = [{"_id": f"c{i}", "source": returning(i)} for i in range(100)]
    docs.insert(50, {"_id": "spin", "source": "while True:\n    pass\n"})
    await db.functions.insert_many(docs)
    async with PluginHost(db, exec_timeout=0.2) as host:
        assert len(host._registry) == 100
        info = host.plugin("spin")
        assert info is not None and info.status == "failed"
        assert info.last_error is not None and "CPU time" in info.last_error


async def test_loaded_after_startup_logs_at_info(db: Db) -> None:
    """plugin.loaded for a load after start-up is logged at info, as before."""
    async with PluginHost(db) as host:
        with structlog.testing.capture_logs() as logs:
            async with host.events() as events:
                await db.functions.insert_one({"_id": "late", "source": returning(7)})
                async for event in events:
                    if event.event == "plugin.loaded":
                        break
        assert await host.call("late") == 7
    loaded = [e for e in logs if e["event"] == "plugin.loaded"]
    assert [e["log_level"] for e in loaded] == ["info"]


async def test_spawn_starts_a_supervisor_lazily(db: Db) -> None:
    """ctx.spawn in setup and in calls runs tasks under a supervisor started on first use."""
    source = (
        "import anyio\n"
        "async def _bg(ctx, box):\n"
        "    box.append(1)\n"
        "    await anyio.sleep_forever()\n"
        "async def setup(ctx):\n"
        "    box = []\n"
        "    ctx.spawn(_bg, ctx, box)\n"
        "    return box\n"
        "async def main(ctx, args):\n"
        "    return len(ctx.state)\n"
    )
    await db.functions.insert_many(
        [{"_id": "spawner", "source": source}, {"_id": "plain", "source": returning(1)}]
    )
    async with PluginHost(db) as host:
        plain = host.current("plain")
        spawner = host.current("spawner")
        assert plain is not None and spawner is not None
        assert plain.task_group is None, "a version that never spawns has no supervisor"
        await wait_until(lambda: host.call("spawner"), "the task spawned in setup did not run")
        assert spawner.task_group is not None
    assert spawner.released and spawner.task_group is None


@pytest.mark.anyio
async def test_a_crashing_verifier_does_not_stop_the_host(db: Any) -> None:
    """A verifier that raises something unexpected fails that load; the host keeps serving."""
    calls = 0

    def verifier(record: Any, current: Any) -> None:
        nonlocal calls
        calls += 1
        if "boom" in record.source:
            raise KeyError("verifier bug")

    await db.functions.insert_one(
        {"_id": "v", "source": "async def main(ctx, args):\n    return 1\n"}
    )
    async with PluginHost(db, verifier=verifier) as host, host.events() as events:
        await db.functions.update_one(
            {"_id": "v"}, {"$set": {"source": "async def main(ctx, args):\n    return 'boom'\n"}}
        )
        failed = await next_event(events, "plugin.reload_failed")
        assert failed["stage"] == "verify"
        assert "KeyError" in failed["error"]
        assert await host.call("v") == 1
        await db.functions.update_one(
            {"_id": "v"}, {"$set": {"source": "async def main(ctx, args):\n    return 2\n"}}
        )
        await next_event(events, "plugin.reloaded")
        assert await host.call("v") == 2
    assert calls >= 3


async def test_slow_records_load_side_by_side_and_fail_alone(
    db: Db, probe: types.SimpleNamespace
) -> None:
    """Four records blocked at top level run at once, each fails at its own bound, and
    start-up becomes ready without them.

    With ``exec_timeout=0.5`` each is cut off after 5 s of wall time. Loaded one after
    another, the second could not even start within 4 s; side by side, all four start
    at once, and the plugin behind them in the same batch loads at once too.
    """
    started: list[int] = []
    sys.modules[PROBE].started = started  # type: ignore[attr-defined]
    blocked = f"import {PROBE}\n{PROBE}.started.append(1)\n{PROBE}.gate.wait()\n"
    docs: list[dict[str, Any]] = [{"_id": f"slow{i}", "source": blocked} for i in range(4)]
    docs.append({"_id": "fine", "source": returning(7)})
    await db.functions.insert_many(docs)
    async with (
        PluginHost(db, exec_timeout=0.5, wait_ready=False) as host,
        host.events() as events,
    ):
        await wait_until(lambda: len(started) == 4, "all four slow records run", timeout=4)
        await wait_until(
            lambda: host.current("fine") is not None, "the plugin behind them loads", timeout=4
        )
        failed = await events_for(events, "plugin.reload_failed", {f"slow{i}" for i in range(4)})
        await host.ready(timeout=10)
        assert await host.call("fine") == 7
        for event in failed.values():
            assert event["stage"] == "timeout"
            assert "did not finish within 5 s" in event["error"]
        with pytest.raises(PluginNotFound):
            await host.call("slow0")


def _storm_source(rev: int, kind: int) -> str:
    """Source of revision ``rev``: declarative, with an awaiting setup, or a running top level."""
    if kind == 0:
        return returning(rev)
    if kind == 1:  # setup awaits: the worker suspends, so later changes queue and coalesce
        return (
            "import anyio\n"
            "async def setup(ctx):\n    await anyio.sleep(0.001)\n"
            f"async def main(ctx, args):\n    return {rev}\n"
        )
    # a top level that runs code: compiled on the loop, executed in a worker thread
    return f"X = sum(range(3))\nasync def main(ctx, args):\n    return {rev}\n"


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_storm_of_changes_is_coalesced_without_losing_or_reordering_one(
    seed: int,
) -> None:
    """Under a storm every change goes live once or is counted superseded, in order."""
    rng = random.Random(seed)
    names = [f"n{i}" for i in range(12)]
    kinds = {name: i % 3 for i, name in enumerate(names)}
    submitted = dict.fromkeys(names, 0)
    bus = EventBus()
    no_ctx = cast("ContextFactory", lambda plugin: None)
    async with bus.subscribe(0) as events:
        async with (
            Registry(grace_period=5.0, events=bus) as registry,
            anyio.create_task_group() as tg,
        ):
            loader = Loader(registry, no_ctx, bus)
            loader.bind(tg)
            for _ in range(600):
                name = rng.choice(names)
                submitted[name] += 1
                rev = submitted[name]
                source = _storm_source(rev, kinds[name])
                doc = {"_id": name, "source": source, "revision": rev}
                loader.submit(Change(name, doc, datetime.now(UTC), "update"))
                for _ in range(rng.randrange(3)):
                    await anyio.lowlevel.checkpoint()
            await loader.wait_idle()
            for name in names:
                current = registry.get(name)
                assert current is not None and current.record.revision == submitted[name]
            await loader.aclose()
            tg.cancel_scope.cancel()
        live: dict[str, list[tuple[int, int]]] = {name: [] for name in names}
        retired = 0
        while (event := events.receive_nowait()) is not None:
            if event.event in ("plugin.loaded", "plugin.reloaded"):
                live[event["plugin"]].append((event["revision"], event.get("superseded", 0)))
            elif event.event == "plugin.retired":
                retired += 1
            else:
                raise AssertionError(f"unexpected {event.event}: {dict(event.fields)}")
    coalesced = 0
    for name in names:
        revisions = [rev for rev, _ in live[name]]
        assert revisions == sorted(set(revisions)), f"{name} went back or twice: {revisions}"
        accounted = sum(1 + superseded for _, superseded in live[name])
        assert accounted == submitted[name], f"{name}: {live[name]} vs {submitted[name]}"
        coalesced += submitted[name] - len(revisions)
    assert retired == sum(len(versions) for versions in live.values()), "retired once each"
    assert coalesced > 0, "the storm never coalesced: it did not exercise the queue"


class _Host:
    """A registry and a loader on a bare event bus, changes submitted by hand."""

    def __init__(self, registry: Registry, loader: Loader, events: Any) -> None:
        self.registry = registry
        self.loader = loader
        self.events = events
        self.revision = 0

    def submit(self, name: str, source: str, **extra: Any) -> int:
        """Submit the next revision of ``name``; return it."""
        self.revision += 1
        doc = {"_id": name, "source": source, "revision": self.revision, **extra}
        self.loader.submit(Change(name, doc, datetime.now(UTC), "update"))
        return self.revision

    def drain(self) -> list[Any]:
        """The events emitted so far."""
        out = []
        while (event := self.events.receive_nowait()) is not None:
            out.append(event)
        return out


@contextlib.asynccontextmanager
async def _bare_host() -> AsyncIterator[_Host]:
    bus = EventBus()
    no_ctx = cast("ContextFactory", lambda plugin: None)
    async with (
        bus.subscribe(0) as events,
        Registry(grace_period=5.0, events=bus) as registry,
        anyio.create_task_group() as tg,
    ):
        loader = Loader(registry, no_ctx, bus)
        loader.bind(tg)
        yield _Host(registry, loader, events)
        await loader.wait_idle()
        await loader.aclose()
        tg.cancel_scope.cancel()


async def test_a_declarative_reload_goes_live_inside_submit() -> None:
    """A small declarative record with no setup is live when submit returns, no await."""
    async with _bare_host() as h:
        h.submit("fast", returning(1))
        first = h.registry.get("fast")
        assert first is not None and first.record.revision == 1
        h.submit("fast", returning(2))
        current = h.registry.get("fast")
        assert current is not None and current.record.revision == 2
        assert h.loader.loading() == []
        info = h.loader.info("fast")
        assert info is not None and info.status == "serving" and info.revision == 2
        loaded, reloaded = h.drain()
        assert loaded.event == "plugin.loaded" and loaded["revision"] == 1
        assert reloaded.event == "plugin.reloaded"
        assert reloaded["old_version"] == first.version
        assert reloaded["new_version"] == current.version == reloaded["version"]
        assert reloaded["reason"] == "update" and "change_to_live_ms" in reloaded.fields
        await anyio.lowlevel.checkpoint()  # the replaced version retires one step later
        (retired,) = h.drain()
        assert retired.event == "plugin.retired" and retired["version"] == first.version


async def test_a_refused_record_on_the_fast_path_keeps_the_old_version() -> None:
    """An invalid record, a syntax error or a missing entrypoint leaves the old version."""
    async with _bare_host() as h:
        h.submit("keep", returning(1))
        serving = h.registry.get("keep")
        assert serving is not None
        h.drain()
        h.submit("keep", returning(2), timeout="soon")
        h.submit("keep", "async def main(ctx, args):\n    return (\n")
        h.submit("keep", "async def other(ctx, args):\n    return 3\n")
        assert h.registry.get("keep") is serving
        rejected, syntax, entrypoint = h.drain()
        assert rejected.event == "plugin.rejected" and rejected["field"] == "timeout"
        assert rejected["serving"] == serving.version
        assert syntax.event == "plugin.reload_failed" and syntax["stage"] == "syntax"
        assert entrypoint.event == "plugin.reload_failed"
        assert entrypoint["stage"] == "entrypoint" and entrypoint["serving"] == serving.version
        info = h.loader.info("keep")
        assert info is not None and info.status == "degraded" and info.revision == 1
        h.submit("keep", returning(5))
        current = h.registry.get("keep")
        assert current is not None and current.record.revision == 5


async def test_a_version_with_setup_or_running_code_goes_through_a_worker() -> None:
    """setup, or a top level that runs code, is left to a worker; the old version serves."""
    with_setup = (
        "import anyio\n"
        "async def setup(ctx):\n    await anyio.sleep(0)\n    return 'up'\n"
        "async def main(ctx, args):\n    return ctx\n"
    )
    running = "X = sum(range(3))\nasync def main(ctx, args):\n    return X\n"
    async with _bare_host() as h:
        h.submit("hooked", returning(1))
        serving = h.registry.get("hooked")
        for source in (with_setup, running):
            revision = h.submit("hooked", source)
            assert h.registry.get("hooked") is serving, "installed without its worker"
            assert h.loader.loading() == ["hooked"]
            await h.loader.wait_idle()
            serving = h.registry.get("hooked")
            assert serving is not None and serving.record.revision == revision
        assert serving is not None and serving.module.X == 3
        reloads = [e for e in h.drain() if e.event == "plugin.reloaded"]
        assert [e["revision"] for e in reloads] == [2, 3]


async def test_a_change_behind_a_busy_worker_waits_for_it() -> None:
    """A fast change of a name whose worker runs a setup waits: versions go live in order."""
    slow_setup = (
        "import anyio\n"
        "async def setup(ctx):\n    await anyio.sleep(0.05)\n"
        "async def main(ctx, args):\n    return 'setup'\n"
    )
    async with _bare_host() as h:
        h.submit("order", returning(1))
        h.submit("order", slow_setup)
        h.submit("order", returning(3))
        current = h.registry.get("order")
        assert current is not None and current.record.revision == 1, "overtook the worker"
        await h.loader.wait_idle()
        current = h.registry.get("order")
        assert current is not None and current.record.revision == 3
        live = [
            (e["revision"], e.get("superseded", 0)) for e in h.drain() if "revision" in e.fields
        ]
        assert live in ([(1, 0), (2, 0), (3, 0)], [(1, 0), (3, 1)])


async def test_a_disabled_record_unloads_through_the_worker() -> None:
    """``enabled: false`` (found on the fast path) unloads the name."""
    async with _bare_host() as h:
        h.submit("off", returning(1))
        h.submit("off", returning(2), enabled=False)
        await h.loader.wait_idle()
        assert h.registry.get("off") is None
        info = h.loader.info("off")
        assert info is not None and info.status == "disabled"
        (unloaded,) = [e for e in h.drain() if e.event == "plugin.unloaded"]
        assert unloaded["reason"] == "disabled" and unloaded["version"].startswith("off@r1:")
