"""Shadow runs (issue 16 item 5): mirrored calls, JSON comparison, a read-only ctx.db."""

from __future__ import annotations

import json

import anyio
import anyio.lowlevel
import pytest

from host import PluginHost
from host.errors import PluginFailed
from host.fleetview import fleet_status
from host.metrics import Metrics
from host.publish import publish
from host.rollout import MIRROR_SPAN
from tests.support import Db, next_event, wait_until

from .rollout_support import promote, start
from .test_fleet_cli import FAST

pytestmark = pytest.mark.anyio

STABLE = "async def main(ctx, args):\n    return {'x': args['x']}\n"
SHADOW = """
async def main(ctx, args):
    try:
        await ctx.db.audit.insert_one({"x": args["x"]})
    except PermissionError:
        pass
    await ctx.db.audit.count_documents({})  # reads pass through
    x = args["x"]
    return {"x": x if x % 2 == 0 else -x}
"""
RAISING_SHADOW = "async def main(ctx, args):\n    raise ValueError('shadow bug')\n"


async def test_shadow_never_writes_and_counts_mismatches(db: Db) -> None:
    """A 100% shadow serves no caller; its writes are refused and counted, and its results
    are compared with the stable's: matches, mismatches and a sampled, bounded event."""
    await publish(db, "p", STABLE)
    async with PluginHost(db) as host, host.events() as events:
        revision = await start(db, "p", SHADOW, weight=100, mode="shadow")
        await next_event(events, "rollout.started")
        stable = host.current("p")
        assert stable is not None
        for x in range(40):
            served: list[str] = []
            assert await host.call("p", {"x": x}, served=served) == {"x": x}
            assert served == [stable.version]

        def compared() -> bool:
            counts = host.shadow_counts().get("p", {})
            return counts.get("match", 0) + counts.get("mismatch", 0) == 40

        await wait_until(compared, "all 40 mirrors are compared")
        counts = host.shadow_counts()["p"]
        assert counts["match"] == 20 and counts["mismatch"] == 20
        assert counts["refused_writes"] == 40 and counts["candidate_error"] == 0
        assert await db.audit.count_documents({}) == 0
        mismatch = await next_event(events, "shadow.mismatch")
        stable_x = json.loads(mismatch["stable"])["x"]
        assert stable_x % 2 == 1 and json.loads(mismatch["candidate"]) == {"x": -stable_x}
        assert mismatch["args"] == json.dumps({"x": stable_x}, separators=(",", ":"))
        assert mismatch["candidate_version"].startswith(f"p@r{revision}:")
        live = host.rollout("p")
        assert live is not None and live.candidate_stats.calls == 40

        metrics = Metrics(process=False)
        metrics.shadow = host.shadow_counts
        text = metrics.render()
        assert 'plugin_host_shadow_calls_total{outcome="mismatch",plugin="p"} 20.0' in text
        assert 'plugin_host_shadow_refused_writes_total{plugin="p"} 40.0' in text


async def test_shadow_errors_are_counted_and_promoted_shadow_can_write(db: Db) -> None:
    """A failing shadow counts candidate errors; a promoted shadow gets the real ctx.db."""
    writer = (
        "async def main(ctx, args):\n"
        "    await ctx.db.audit.insert_one({'x': args})\n"
        "    return args\n"
    )
    await publish(db, "p", "async def main(ctx, args):\n    return args\n")
    await publish(db, "q", "async def main(ctx, args):\n    return args\n")
    async with PluginHost(db) as host, host.events() as events:
        await start(db, "q", RAISING_SHADOW, weight=100, mode="shadow")
        await next_event(events, "rollout.started")
        for x in range(10):
            assert await host.call("q", x) == x
        await wait_until(
            lambda: host.shadow_counts().get("q", {}).get("candidate_error") == 10,
            "the shadow's failures are counted",
        )
        revision = await start(db, "p", writer, weight=100, mode="shadow")
        await next_event(events, "rollout.started", lambda e: e["plugin"] == "p")
        assert await host.call("p", 1) == 1
        await wait_until(
            lambda: host.shadow_counts().get("p", {}).get("candidate_error") == 1,
            "the refused write fails the mirrored call",
        )
        assert await db.audit.count_documents({}) == 0
        assert await promote(db, "p", revision)
        await next_event(events, "rollout.promoted", lambda e: e["plugin"] == "p")
        assert await host.call("p", 2) == 2
        assert await db.audit.count_documents({"x": 2}) == 1


WRITER = (
    "async def main(ctx, args):\n"
    "    await ctx.db.log.insert_one({'by': 'writer', 'args': args})\n"
    "    return 'written'\n"
)
READER = "async def main(ctx, args):\n    return await ctx.db.log.count_documents({})\n"
SYNC_WRITER = (
    "def main(ctx, args):\n"
    "    return type(ctx.db).__name__\n"  # a sync plugin sees the shadow's db handle too
)
NESTED_SHADOW = """
async def main(ctx, args):
    seen = await ctx.call("reader")  # a nested read passes
    kind = await ctx.call("sync_writer")
    try:
        await ctx.db.audit.insert_one({"x": args["x"]})
    except PermissionError:
        pass
    await ctx.call("writer", args["x"])  # refused in the callee: this call fails
    return {"x": args["x"], "seen": seen, "kind": kind}
"""


async def test_shadow_writes_through_nested_calls_are_blocked(db: Db) -> None:
    """A shadow's direct ctx.db write and a nested ctx.call's write are both refused: the
    collections are unchanged, callers get the stable's results, reads pass, and the
    comparison report (on the host and in the fleet view) names each blocked write."""
    await db.log.insert_one({"by": "setup"})
    await publish(db, "writer", WRITER)
    await publish(db, "reader", READER)
    await publish(db, "sync_writer", SYNC_WRITER)
    await publish(db, "p", STABLE)
    async with PluginHost(db, report_status=FAST) as host, host.events() as events:
        await start(db, "p", NESTED_SHADOW, weight=100, mode="shadow")
        await next_event(events, "rollout.started")
        stable = host.current("p")
        assert stable is not None
        for x in range(10):
            served: list[str] = []
            assert await host.call("p", {"x": x}, served=served) == {"x": x}
            assert served == [stable.version]
        live = host.rollout("p")
        assert live is not None

        await wait_until(
            lambda: live.report.get("candidate_error") == 10, "every mirror fails on the write"
        )
        assert await db.log.count_documents({}) == 1  # only the test's own document
        assert await db.audit.count_documents({}) == 0
        report = live.describe()["shadow"]
        assert report["refused_writes"] == 20 and report["match"] == 0
        assert report["blocked"] == [
            "p: audit.insert_one",
            "writer: log.insert_one (nested ctx.call)",
        ]
        assert "ShadowWriteRefused" in report["last_error"]
        assert "log.insert_one refused" in report["last_error"]
        assert host.shadow_counts()["p"]["refused_writes"] == 20
        # Outside a mirror, the same plugins write as usual.
        assert await host.call("writer", "real") == "written"
        assert await db.log.count_documents({"args": "real"}) == 1
        assert await host.call("sync_writer") != "ReadOnlyDatabase"

        async def fleet_report() -> dict[str, object] | None:
            rollout = (await fleet_status(db, name="p")).plugins["p"].rollout
            shadow = (rollout or {}).get("shadow")
            return shadow if shadow and shadow["candidate_error"] == 10 else None

        shadow = await wait_until(fleet_report, "the host reports the comparison")
        assert shadow["hosts"] == 1 and shadow["refused_writes"] == 20
        assert "writer: log.insert_one (nested ctx.call)" in shadow["blocked"]
        assert "ShadowWriteRefused" in str(shadow["errors"])


async def test_nested_reads_of_a_shadow_pass_and_match(db: Db) -> None:
    """A shadow that only reads, through nested calls too, matches the stable: nothing is
    refused, and the sync callee runs with the shadow's read-only handle."""
    await publish(db, "reader", READER)
    await publish(db, "sync_writer", SYNC_WRITER)
    await publish(db, "p", "async def main(ctx, args):\n    return 'ReadOnlyDatabase'\n")
    async with PluginHost(db) as host, host.events() as events:
        source = (
            "async def main(ctx, args):\n"
            "    await ctx.call('reader')\n"
            "    return await ctx.call('sync_writer')\n"
        )
        await start(db, "p", source, weight=100, mode="shadow")
        await next_event(events, "rollout.started")
        for _ in range(5):
            assert await host.call("p") == "ReadOnlyDatabase"
        live = host.rollout("p")
        assert live is not None
        await wait_until(lambda: live.report.get("match") == 5, "the 5 mirrors match")
        report = live.describe()["shadow"]
        assert report["refused_writes"] == 0 and report["candidate_error"] == 0
        assert report["blocked"] == [] and report["last_error"] is None


FLAKY = (
    "async def main(ctx, args):\n"
    "    if args['x'] % 7 == 3:\n"
    "        raise ValueError('flaky')\n"
    "    return {'x': args['x']}\n"
)


async def test_shadow_samples_count_every_stable_call_and_mirror_about_the_weight(
    db: Db,
) -> None:
    """Under a 10% shadow the stable's statistics count every call exactly (spans weigh
    their calls; failures count at once), and about 10% of the successes are mirrored."""
    await publish(db, "p", FLAKY)
    async with PluginHost(db) as host, host.events() as events:
        await start(db, "p", FLAKY, weight=10, mode="shadow")
        await next_event(events, "rollout.started")
        calls, failures = 3000, 0
        for x in range(calls):
            try:
                assert await host.call("p", {"x": x}) == {"x": x}
            except PluginFailed:
                failures += 1
            if x % 50 == 0:
                await anyio.lowlevel.checkpoint()  # let the mirrors run now and then
        live = host.rollout("p")
        assert live is not None

        def compared() -> int:
            counts = host.shadow_counts().get("p", {})
            return counts.get("match", 0) + counts.get("mismatch", 0)

        await wait_until(lambda: live.stable_stats.calls + live.unsampled == calls, "counted")
        stats = live.stable_stats
        assert stats.failures == failures > 0
        assert -MIRROR_SPAN < live.unsampled < MIRROR_SPAN
        assert 0 < sum(stats.hist) <= stats.calls  # the timed samples, weighted
        successes = calls - failures
        mirrored = compared()
        sigma = (successes * 0.1 * 0.9) ** 0.5
        assert abs(mirrored - successes * 0.1) < 5 * sigma, (mirrored, successes)
        assert host.shadow_counts()["p"]["dropped"] == 0
        assert host.shadow_counts()["p"]["mismatch"] == 0


async def test_shadow_ticker_stops_when_idle_and_rearms(db: Db) -> None:
    """The workers' ticker runs while mirrors come, stops once they stop (no timer on an
    idle host), and the next mirror restarts it."""
    await publish(db, "p", STABLE)
    async with PluginHost(db) as host, host.events() as events:
        await start(db, "p", STABLE, weight=100, mode="shadow")
        await next_event(events, "rollout.started")
        runner = host._shadow  # the host's ShadowRunner (no public handle)

        def ticking() -> bool:
            return runner.ticking

        assert not ticking()
        assert await host.call("p", {"x": 1}) == {"x": 1}
        assert ticking()
        await wait_until(lambda: host.shadow_counts().get("p", {}).get("match") == 1, "it ran")
        await wait_until(lambda: not ticking(), "the ticker stops when idle")
        assert await host.call("p", {"x": 2}) == {"x": 2}
        assert ticking()
        await wait_until(lambda: host.shadow_counts()["p"].get("match") == 2, "it re-armed")


async def test_shadow_mirrors_run_under_a_busy_caller(db: Db) -> None:
    """A caller that only yields between calls (never sleeps) does not starve the
    mirrors: they are compared while it is still calling."""
    await publish(db, "p", STABLE)
    async with PluginHost(db) as host, host.events() as events:
        await start(db, "p", STABLE, weight=100, mode="shadow")
        await next_event(events, "rollout.started")
        made = 0
        for made in range(1, 200_000):
            assert await host.call("p", {"x": made}) == {"x": made}
            await anyio.lowlevel.checkpoint()
            if host.shadow_counts().get("p", {}).get("match", 0) >= 10:
                break
        assert host.shadow_counts()["p"]["match"] >= 10, made
        assert made < 199_999  # compared before the caller stopped
