"""Progressive delivery (issue 16): candidate records, routing, statistics, automatic abort."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from host import PluginHost
from host.errors import PluginFailed, VersionNotLive
from host.fleet import StatusReporting
from host.publish import abort_rollout, publish
from host.records import RolloutPolicy, parse_record
from host.rollout import FAILED, OK, STABLE_SAMPLE, VersionStats, sticky_fraction
from host.trust import TrustedKeys, sign_record
from tests.support import Db, next_event, wait_until

from .rollout_support import RAISING, promote, revision_of, set_weight, start, value_source

pytestmark = pytest.mark.anyio


def _doc(**rollout: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "revision": 2,
        "source": value_source("b"),
        "entrypoint": "main",
        "mode": "canary",
        "weight": 10,
        "policy": {"min_calls": 5},
    }
    base.update(rollout)
    return {"_id": "p", "source": value_source("a"), "revision": 1, "rollout": base}


# -- the record ---------------------------------------------------------------------------


def test_rollout_parses_into_a_candidate_record() -> None:
    """A valid rollout gives a candidate record with its own revision, source and policy."""
    record = parse_record(_doc(sticky_key="userId", policy={"max_error_rate": 0.05}))
    assert record.rollout_error is None
    rollout = record.rollout
    assert rollout is not None
    assert rollout.candidate.revision == 2
    assert rollout.candidate.source == value_source("b")
    assert rollout.candidate.version.startswith("p@r2:")
    assert rollout.sticky_key == "userId"
    assert rollout.policy == RolloutPolicy(max_error_rate=0.05, min_calls=20)
    assert record == parse_record({"_id": "p", "source": value_source("a"), "revision": 1})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"weight": 150}, "rollout.weight"),
        ({"weight": "10"}, "rollout.weight"),
        ({"mode": "blue-green"}, "rollout.mode"),
        ({"revision": 1}, "rollout.revision"),
        ({"revision": None}, "rollout.revision"),
        ({"source": None}, "rollout.source"),
        ({"source": "   "}, "rollout.source"),
        ({"entrypoint": "not an identifier"}, "rollout.entrypoint"),
        ({"signature": 5}, "rollout.signature"),
        ({"sticky_key": ""}, "rollout.sticky_key"),
        ({"policy": {"min_calls": 0}}, "rollout.policy.min_calls"),
        ({"policy": {"min_calls": 2.5}}, "rollout.policy.min_calls"),
        ({"policy": {"max_error_rate": 2}}, "rollout.policy.max_error_rate"),
        ({"policy": {"window_s": 0}}, "rollout.policy.window_s"),
        ({"policy": {"max_p99_ms": "fast"}}, "rollout.policy.max_p99_ms"),
        ({"policy": []}, "rollout.policy"),
    ],
)
def test_invalid_rollout_refuses_only_the_candidate(change: dict[str, Any], field: str) -> None:
    """Every rollout field is checked and named; the stable record still parses."""
    record = parse_record(_doc(**change))
    assert record.rollout is None
    assert record.rollout_error is not None
    assert record.rollout_error.field == field, str(record.rollout_error)
    assert record.source == value_source("a")


def test_sticky_fraction_is_the_contract_hash() -> None:
    """The sticky hash is sha256 of the compact JSON [name, revision, str(key)], first 8 bytes."""
    import hashlib

    digest = hashlib.sha256(b'["greet",7,"user-1"]').digest()
    assert sticky_fraction("greet", 7, "user-1") == int.from_bytes(digest[:8], "big") / 2**64
    assert sticky_fraction("greet", 7, 42) == sticky_fraction("greet", 7, "42")


@pytest.mark.parametrize(
    "key", ["user-1", "", 'quote"d', "back\\slash", "h\u00e9", "\x7f", "tab\t", 42, 4.5, True]
)
def test_router_fast_path_hashes_like_the_contract(key: object) -> None:
    """The router's fast path and memo give exactly the contract's sticky fraction."""
    from host.rollout import _StickyRouter

    router = _StickyRouter("greet.v2", 7)
    assert router.fraction(key) == sticky_fraction("greet.v2", 7, key)
    assert router.fraction(key) == sticky_fraction("greet.v2", 7, key)  # memoized


def test_stats_window_expires_old_seconds() -> None:
    """Calls older than the window leave the totals; the histogram gives sane percentiles."""
    stats = VersionStats(window_s=3, slow_ms=50.0, now=100.0)
    for i in range(10):
        stats.record(FAILED if i < 5 else OK, 0.010, 100.5)
    stats.record(OK, 0.100, 101.2)
    assert (stats.calls, stats.failures, stats.slow) == (11, 5, 1)
    p50 = stats.percentile_ms(0.5)
    assert p50 is not None and 10.0 <= p50 <= 12.0
    snap = stats.snapshot(103.1)  # second 100 left the 3 s window
    assert (snap["calls"], snap["failures"]) == (1, 0)
    assert stats.slow == 1
    assert stats.snapshot(200.0)["calls"] == 0
    assert sum(stats.hist) == 0


# -- routing --------------------------------------------------------------------------------


async def test_ten_percent_canary_serves_about_ten_percent(db: Db) -> None:
    """A 10% canary serves 10% of unkeyed calls, within six standard deviations."""
    await publish(db, "p", value_source("stable"))
    async with PluginHost(db) as host, host.events() as events:
        await start(db, "p", value_source("candidate"), weight=10)
        await next_event(events, "rollout.started")
        n = 4000
        results = Counter([await host.call("p") for _ in range(n)])
        share = results["candidate"] / n
        bound = 6 * math.sqrt(0.1 * 0.9 / n)
        assert abs(share - 0.1) < bound, results
        assert set(results) == {"stable", "candidate"}


async def test_sticky_keys_agree_across_hosts_and_only_move_forward(db: Db) -> None:
    """Two hosts route every key alike; raising the weight moves keys only stable→candidate."""
    await publish(db, "p", value_source("stable"))
    async with (
        PluginHost(db) as one,
        PluginHost(db) as two,
        one.events() as ev1,
        two.events() as ev2,
    ):
        revision = await start(db, "p", value_source("candidate"), weight=20, sticky_key="u")
        await next_event(ev1, "rollout.started")
        await next_event(ev2, "rollout.started")
        keys = [f"user-{i}" for i in range(300)]
        first = {k: await one.call("p", {"u": k}) for k in keys}
        assert first == {k: await two.call("p", {"u": k}) for k in keys}
        # The header key (key=) wins over the args field, as X-Plugin-Key does.
        assert [await one.call("p", {"u": "x"}, key=k) for k in keys] == list(first.values())
        assert 20 < Counter(first.values())["candidate"] < 100
        await set_weight(db, "p", revision, 50)
        await next_event(ev1, "rollout.weight_changed")
        await next_event(ev2, "rollout.weight_changed")
        second = {k: await two.call("p", {"u": k}) for k in keys}
        moved = {k for k in keys if first[k] != second[k]}
        assert moved and all(first[k] == "stable" for k in moved)
        assert second == {k: await one.call("p", {"u": k}) for k in keys}


async def test_pinned_versions_are_served(db: Db) -> None:
    """A pinned call runs the named version, even at weight 0; unknown pins name what is live."""
    await publish(db, "p", value_source("stable"))
    async with PluginHost(db) as host, host.events() as events:
        revision = await start(db, "p", value_source("candidate"), weight=0)
        await next_event(events, "rollout.started")
        candidate = host.candidate("p")
        stable = host.current("p")
        assert candidate is not None and stable is not None
        for pin in (str(revision), f"r{revision}", f"p@r{revision}", candidate.version):
            served: list[str] = []
            assert await host.call("p", version=pin, served=served) == "candidate"
            assert served == [candidate.version]
        assert await host.call("p", version=stable.version) == "stable"
        assert {await host.call("p") for _ in range(50)} == {"stable"}
        with pytest.raises(VersionNotLive) as info:
            await host.call("p", version="r99")
        assert info.value.live[0] == stable.version
        assert candidate.version in info.value.live[1]
        assert "r99" in str(info.value)


# -- automatic abort -----------------------------------------------------------------------


async def test_failing_candidate_is_aborted_fleet_wide_and_recorded_once(db: Db) -> None:
    """A candidate raising on every call is aborted by the host that sees it fail; both hosts
    drop it, the abort is recorded once (by that host, with both versions' stats), and
    callers then get only the stable version."""
    await publish(db, "p", value_source("stable"))
    fast = StatusReporting(heartbeat=0.2)
    async with (
        PluginHost(db, report_status=fast) as one,
        PluginHost(db, report_status=fast) as two,
        one.events() as ev1,
        two.events() as ev2,
    ):
        revision = await start(
            db, "p", RAISING, weight=50, policy={"max_error_rate": 0.05, "min_calls": 20}
        )
        await next_event(ev1, "rollout.started")
        await next_event(ev2, "rollout.started")
        failures = 0
        while one.rollout("p") is not None and one.rollout("p").routing:  # type: ignore[union-attr]
            try:
                await one.call("p")
            except Exception:
                failures += 1
            assert failures <= 20, "still routing to the candidate after min_calls failures"
        detected = await next_event(ev1, "rollout.auto_abort")
        assert detected["by"] == one.host_id
        assert "error rate 1.00 > 0.05 after 20 calls" in detected["reason"]
        # Out of rotation at once on the detecting host, before the record even changes.
        assert {await one.call("p") for _ in range(50)} == {"stable"}
        for host, events in ((one, ev1), (two, ev2)):
            aborted = await next_event(events, "rollout.aborted")
            assert aborted["by"] == one.host_id
            assert aborted["stats"]["candidate"]["failures"] == 20
            assert host.candidate("p") is None
            assert {await host.call("p") for _ in range(50)} == {"stable"}
        record = await db.functions.find_one({"_id": "p"})
        assert record is not None and "rollout" not in record
        last = record["last_rollout"]
        assert (last["revision"], last["outcome"], last["by"]) == (revision, "aborted", one.host_id)
        assert last["stats"]["candidate"]["calls"] == 20
        # The compare-and-set: a second abort of the same candidate records nothing.
        assert not await abort_rollout(
            db, "p", expected_revision=revision, by=two.host_id, reason="late"
        )
        again = await db.functions.find_one({"_id": "p"})
        assert again is not None and again["last_rollout"]["by"] == one.host_id


async def test_concurrent_aborts_record_exactly_one(db: Db) -> None:
    """Of many hosts aborting the same candidate at once, exactly one write records it."""
    import anyio

    await publish(db, "p", value_source("stable"))
    revision = await start(db, "p", RAISING, weight=50)
    results: list[bool] = []

    async def abort(i: int) -> None:
        results.append(await abort_rollout(db, "p", expected_revision=revision, by=f"h{i}"))

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(abort, i)
    assert results.count(True) == 1


async def test_slow_candidate_breaks_its_p99_policy(db: Db) -> None:
    """A candidate slower than max_p99_ms is aborted with a p99 reason."""
    await publish(db, "p", value_source("stable"))
    slow = (
        "import asyncio\n\nasync def main(ctx, args):\n"
        "    await asyncio.sleep(0.03)\n    return 's'\n"
    )
    async with PluginHost(db) as host, host.events() as events:
        await start(db, "p", slow, weight=100, policy={"max_p99_ms": 5, "min_calls": 10})
        await next_event(events, "rollout.started")
        served = Counter([await host.call("p") for _ in range(30)])
        assert served["s"] == 10, served  # judged at the 10th call, then out of rotation
        detected = await next_event(events, "rollout.auto_abort")
        assert detected["reason"].startswith("p99 ")
        assert "> 5 ms after 10 calls" in detected["reason"]
        await next_event(events, "rollout.aborted")
        await wait_until(lambda: host.candidate("p") is None, "the candidate is dropped")


# -- lifecycle, events, reporting ------------------------------------------------------------


async def test_promote_reuses_the_candidate_and_reports(db: Db) -> None:
    """Promotion makes the held candidate stable in place; events and the hosts doc follow."""
    await publish(db, "p", value_source("stable"))
    async with (
        PluginHost(db, report_status=StatusReporting(heartbeat=0.1)) as host,
        host.events() as events,
    ):
        revision = await start(db, "p", value_source("candidate"), weight=30)
        started = await next_event(events, "rollout.started")
        candidate = host.candidate("p")
        assert candidate is not None and started["candidate"] == candidate.version
        results = Counter([await host.call("p") for _ in range(80)])
        reporter = host.status_reporter
        assert reporter is not None

        async def entry() -> dict[str, Any] | None:
            doc = await db[reporter.collection_name].find_one({"_id": reporter.host_id})
            # Every candidate call is counted; the stable's successes are sampled one in
            # STABLE_SAMPLE (weighted).
            for item in (doc or {}).get("plugins", ()):
                stats = item.get("stats") or {}
                if stats and stats["candidate"]["calls"] == results["candidate"]:
                    return dict(item)
            return None

        item = await wait_until(entry, "the hosts doc shows the candidate and its stats")
        assert item["candidate"] == {
            "version": candidate.version,
            "revision": revision,
            "mode": "canary",
            "weight": 30.0,
        }
        stable_calls = item["stats"]["stable"]["calls"]
        assert results["stable"] - STABLE_SAMPLE < stable_calls <= results["stable"]
        assert stable_calls % STABLE_SAMPLE == 0
        assert set(item["stats"]["candidate"]) == {
            "calls",
            "failures",
            "timeouts",
            "error_rate",
            "p50_ms",
            "p99_ms",
        }
        assert await promote(db, "p", revision)
        promoted = await next_event(events, "rollout.promoted")
        assert promoted["candidate"] == candidate.version
        assert host.current("p") is candidate  # no recompile
        assert host.candidate("p") is None
        assert {await host.call("p") for _ in range(20)} == {"candidate"}


async def test_invalid_rollout_is_refused_and_stable_serves(db: Db) -> None:
    """A rollout with a bad field is refused as a candidate; the stable serves everything."""
    await publish(db, "p", value_source("stable"))
    async with (
        PluginHost(db, report_status=StatusReporting(heartbeat=0.1)) as host,
        host.events() as events,
    ):
        revision = await start(db, "p", value_source("candidate"), weight=10)
        await next_event(events, "rollout.started")
        await db.functions.update_one({"_id": "p"}, {"$set": {"rollout.weight": 300}})
        rejected = await next_event(events, "plugin.rejected")
        assert rejected["candidate"] is True
        assert rejected["field"] == "rollout.weight"
        assert rejected["revision"] == revision
        await next_event(events, "rollout.aborted")
        assert host.candidate("p") is None
        assert {await host.call("p") for _ in range(50)} == {"stable"}
        reporter = host.status_reporter
        assert reporter is not None

        async def refused() -> list[dict[str, Any]]:
            doc = await db[reporter.collection_name].find_one({"_id": reporter.host_id})
            return [r for r in (doc or {}).get("refused", ()) if r.get("candidate")]

        [refusal] = await wait_until(refused, "the candidate's refusal is reported")
        assert refusal["name"] == "p" and refusal["revision"] == revision


async def test_new_push_supersedes_a_running_candidate(db: Db) -> None:
    """A plain publish during a rollout: the new stable serves and the older candidate never."""
    await publish(db, "p", value_source("v1"))
    async with PluginHost(db) as host, host.events() as events:
        await start(db, "p", value_source("cand"), weight=100)
        await next_event(events, "rollout.started")
        assert await host.call("p") == "cand"
        published = await publish(db, "p", value_source("v3"))
        await next_event(events, "plugin.reloaded")
        assert host.current("p") is not None
        assert host.current("p").record.revision == published.revision  # type: ignore[union-attr]
        assert host.candidate("p") is None
        assert {await host.call("p") for _ in range(30)} == {"v3"}


# -- signatures ----------------------------------------------------------------------------


async def test_signatures_cover_the_candidate(db: Db) -> None:
    """On a trusting host a candidate runs only with its own signature; unsigned or signed over
    other fields, it is refused with candidate: true and the stable keeps serving."""
    key = Ed25519PrivateKey.generate()
    trusted = TrustedKeys([key.public_key()])

    def sign(name: str, source: str, entrypoint: str, revision: int) -> str:
        return sign_record(key, name, source, entrypoint, revision)

    await publish(db, "p", value_source("stable"), sign=sign)
    async with PluginHost(db, trusted_keys=trusted) as host, host.events() as events:
        assert await host.call("p") == "stable"
        # Unsigned.
        revision = await start(db, "p", value_source("unsigned"), weight=100)
        rejected = await next_event(events, "plugin.rejected")
        assert rejected["candidate"] is True and rejected["field"] == "rollout.signature"
        assert rejected["code"] == "unsigned"
        assert {await host.call("p") for _ in range(20)} == {"stable"}
        await abort_rollout(db, "p", expected_revision=revision)
        # Signed over another revision's payload (the stable's signature, replayed).
        stable_doc = await db.functions.find_one({"_id": "p"})
        assert stable_doc is not None
        revision = await start(
            db, "p", value_source("replayed"), weight=100, signature=stable_doc["signature"]
        )
        rejected = await next_event(events, "plugin.rejected")
        assert rejected["candidate"] is True and rejected["code"] != "unsigned"
        assert await host.call("p") == "stable"
        await abort_rollout(db, "p", expected_revision=revision)
        # Properly signed over its own fields.
        await start(db, "p", value_source("signed"), weight=100, sign=sign)
        await next_event(events, "rollout.started")
        assert await host.call("p") == "signed"


async def test_aborted_candidate_leaves_the_stable_reloadable_on_a_trusting_host(db: Db) -> None:
    """A candidate's revision is not remembered as accepted: after its abort, the stable
    version (an older revision) still reloads, e.g. after a disable/enable."""
    from host.publish import set_enabled

    key = Ed25519PrivateKey.generate()

    def sign(name: str, source: str, entrypoint: str, revision: int) -> str:
        return sign_record(key, name, source, entrypoint, revision)

    await publish(db, "p", value_source("stable"), sign=sign)
    async with (
        PluginHost(db, trusted_keys=TrustedKeys([key.public_key()])) as host,
        host.events() as events,
    ):
        revision = await start(db, "p", value_source("c"), weight=100, sign=sign)
        await next_event(events, "rollout.started")
        assert await abort_rollout(db, "p", expected_revision=revision)
        await next_event(events, "rollout.aborted")
        await set_enabled(db, "p", False)
        await next_event(events, "plugin.unloaded")
        await set_enabled(db, "p", True)
        await next_event(events, "plugin.loaded")
        assert await host.call("p") == "stable"


async def test_served_version_comes_from_the_router(db: Db) -> None:
    """``served`` names the version that ran each call, candidate or stable."""
    await publish(db, "p", value_source("stable"))
    async with PluginHost(db) as host, host.events() as events:
        await start(db, "p", value_source("candidate"), weight=50)
        await next_event(events, "rollout.started")
        for _ in range(100):
            served: list[str] = []
            result = await host.call("p", served=served)
            candidate = host.candidate("p")
            assert candidate is not None
            assert (served[0] == candidate.version) == (result == "candidate")
            assert revision_of(served[0]) in (1, 2)


async def test_promotion_and_abort_racing_new_pushes_never_serve_older(db: Db) -> None:
    """Pushes, rollouts, aborts and promotions race callers: no call is served by a version
    older than the stable one, and the stable revision never goes backwards."""
    import random

    import anyio

    await publish(db, "p", value_source("v"))
    async with PluginHost(db) as host:
        stop = anyio.Event()
        violations: list[str] = []
        calls = 0

        async def caller() -> None:
            nonlocal calls
            highest = 0
            while not stop.is_set():
                current = host.current("p")
                assert current is not None and current.record.revision is not None
                stable = current.record.revision
                served: list[str] = []
                await host.call("p", served=served)
                calls += 1
                if revision_of(served[0]) < stable:
                    violations.append(f"{served[0]} served while r{stable} was stable")
                if stable < highest:
                    violations.append(f"stable went back from r{highest} to r{stable}")
                highest = max(highest, stable)
                await anyio.lowlevel.checkpoint()

        async def writer() -> None:
            rng = random.Random(16)
            for i in range(80):
                record = await db.functions.find_one({"_id": "p"})
                assert record is not None
                rollout = record.get("rollout")
                op = rng.choice(("push", "start", "abort", "promote", "weight"))
                if op == "push":
                    published = await publish(db, "p", value_source(f"push{i}"))
                    # What a rollout-aware publish does in the same write (contract).
                    await db.functions.update_one(
                        {"_id": "p", "rollout.revision": {"$lte": published.revision}},
                        {"$unset": {"rollout": ""}},
                    )
                elif op == "start" and rollout is None:
                    await start(db, "p", value_source(f"cand{i}"), weight=rng.choice((10, 50)))
                elif op == "abort" and rollout is not None:
                    await abort_rollout(db, "p", expected_revision=rollout["revision"])
                elif op == "promote" and rollout is not None:
                    await promote(db, "p", rollout["revision"])
                elif op == "weight" and rollout is not None:
                    await db.functions.update_one(
                        {"_id": "p", "rollout.revision": rollout["revision"]},
                        {"$set": {"rollout.weight": rng.choice((0, 25, 100))}},
                    )
                await anyio.sleep(rng.random() * 0.005)

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(caller)
            await writer()
            final = await db.functions.find_one({"_id": "p"})
            assert final is not None

            def converged() -> bool:
                current = host.current("p")
                return current is not None and current.record.revision == final["revision"]

            await wait_until(converged, "the host serves the newest stable revision")
            stop.set()
        assert calls > 100
        assert violations == []


async def test_registry_candidate_invariants_under_load() -> None:
    """Registry invariants (6)-(8): a newer stable drops an older candidate in the swap step,
    promote and remove keep rollouts and candidates in step, and concurrent callers only
    ever see the stable or a newer candidate."""
    import anyio

    from host.compiler import compile_plugin
    from host.dispatch import Dispatcher
    from host.registry import Registry

    def record(revision: int, tag: str) -> Any:
        return parse_record({"_id": "p", "source": value_source(tag), "revision": revision})

    def rollout_of(stable: int, revision: int) -> Any:
        doc = {
            "_id": "p",
            "source": value_source("s"),
            "revision": stable,
            "rollout": {
                "revision": revision,
                "source": value_source(f"c{revision}"),
                "mode": "canary",
                "weight": 50,
            },
        }
        return parse_record(doc).rollout

    async with Registry(grace_period=0.05) as registry:
        dispatcher = Dispatcher(registry, db=None)
        violations: list[str] = []
        stop = anyio.Event()

        def check() -> None:
            stable, candidate = registry.get("p"), registry.candidate("p")
            live = registry.rollouts.get("p")
            if (candidate is None) != (live is None) or (live and live.candidate is not candidate):
                violations.append("rollouts and candidates out of step")
            if stable is None and candidate is not None:
                violations.append("a candidate without a stable version")
            if (
                stable
                and candidate
                and (candidate.record.revision or 0) <= (stable.record.revision or 0)
            ):
                violations.append(f"{candidate.version} older than {stable.version}")

        async def caller() -> None:
            while not stop.is_set():
                check()
                stable = registry.get("p")
                if stable is not None:
                    served: list[str] = []
                    await dispatcher.call("p", served=served)
                    if revision_of(served[0]) < (stable.record.revision or 0):
                        violations.append(f"served {served[0]} below {stable.version}")
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(caller)
            revision = 1
            for step in range(30):
                await registry.install(
                    await compile_plugin(record(revision, "s")), dispatcher.make_context
                )
                spec = rollout_of(revision, revision + 1)
                candidate = await compile_plugin(spec.candidate)
                await registry.install_candidate(candidate, dispatcher.make_context, spec, 0.0)
                check()
                await anyio.sleep(0.001)
                if step % 3 == 0:
                    promoted, _ = await registry.promote("p")
                    assert promoted is candidate and registry.get("p") is candidate
                    revision += 1
                elif step % 3 == 1:
                    # A plain push of a newer stable: the candidate goes in the same step.
                    revision += 2
                    await registry.install(
                        await compile_plugin(record(revision, "s")), dispatcher.make_context
                    )
                    assert registry.candidate("p") is None and "p" not in registry.rollouts
                    assert candidate.phase.value in ("retiring", "retired")
                else:
                    assert await registry.remove_candidate("p") is not None
                    revision += 1
                check()
                await anyio.sleep(0.001)
            stop.set()
        assert violations == []


async def test_sampling_countdowns_survive_weight_changes(db: Db) -> None:
    """Across weight changes, every STABLE_SAMPLE-th stable success is counted (with that
    weight) and every candidate call is, whatever mix of routed and pinned calls ran."""
    await publish(db, "p", value_source("stable"))
    async with PluginHost(db) as host, host.events() as events:
        revision = await start(db, "p", value_source("candidate"), weight=0)
        await next_event(events, "rollout.started")
        served: Counter[str] = Counter()
        for n, weight in ((13, 30), (29, 70), (3, 5), (41, 0)):
            served.update([await host.call("p") for _ in range(n)])
            served.update([await host.call("p", version="r1") for _ in range(2)])
            await set_weight(db, "p", revision, weight)
            await next_event(events, "rollout.weight_changed")
        served.update([await host.call("p") for _ in range(17)])
        live = host.rollout("p")
        assert live is not None
        sampled = served["stable"] // STABLE_SAMPLE * STABLE_SAMPLE
        assert live.stable_stats.calls == sampled, served
        assert live.candidate_stats.calls == served["candidate"] > 0


async def test_untimed_stable_failures_count_without_skewing_latencies(db: Db) -> None:
    """A stable failure in a quiet span (its start not timed) counts as a call and a
    failure, while the percentiles stay over the timed calls only."""
    flaky = (
        "async def main(ctx, args):\n"
        "    if args == 'fail':\n"
        "        raise ValueError('flaky')\n"
        "    return 'stable'\n"
    )
    await publish(db, "p", flaky)
    async with PluginHost(db) as host, host.events() as events:
        await start(db, "p", value_source("candidate"), weight=0)
        await next_event(events, "rollout.started")
        for _ in range(3 * STABLE_SAMPLE):
            assert await host.call("p") == "stable"
        failures = 5
        for _ in range(failures):  # each starts while successes are still skipped (quiet)
            live = host.rollout("p")
            assert live is not None and live.quiet > 0
            with pytest.raises(PluginFailed):
                await host.call("p", "fail")
        live = host.rollout("p")
        assert live is not None
        stats = live.stable_stats
        assert stats.failures == failures
        assert stats.calls == 3 * STABLE_SAMPLE + failures
        assert sum(stats.hist) == 3 * STABLE_SAMPLE  # the sampled successes, weighted
        p99 = stats.percentile_ms(0.99)
        assert p99 is not None and p99 < 10_000  # a latency, not the clock since boot
        assert stats.error_rate == failures / (3 * STABLE_SAMPLE + failures)
