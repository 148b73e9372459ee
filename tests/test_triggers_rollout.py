"""Triggers follow rollouts (issue 17 item 5): a canary's share of events goes to the
candidate, sticky per document, and the automatic abort applies to failing events."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from bson import json_util

from host import PluginHost
from host.rollout import sticky_fraction
from host.triggers.runner import routing_key
from tests.support import Db, next_event, wait_until
from tests.triggers_support import FAST, RECORDER, duplicates, record, wait_running, wait_seen

from .rollout_support import start

pytestmark = pytest.mark.anyio

TRIGGER: dict[str, Any] = {"collection": "orders", "operations": ["insert", "update"]}
CANDIDATE = RECORDER + "\n# the candidate\n"
FAILING = "async def on_change(ctx, event):\n    raise RuntimeError('candidate is broken')\n"


def test_routing_key_is_the_document_keys_json() -> None:
    """Events route by their documentKey's relaxed Extended JSON; without one, weighted."""
    assert routing_key({"documentKey": {"_id": 7}}) == json_util.dumps({"_id": 7})
    assert routing_key({"documentKey": {"_id": 7}}) != routing_key({"documentKey": {"_id": 7.0}})
    assert routing_key({"operationType": "drop"}) is None


async def test_a_canary_takes_its_share_of_events_sticky_per_document(db: Db) -> None:
    """With a 50% canary, events split between the versions by the documents' sticky hash,
    every event of one document goes to one version, and the candidate's are counted."""
    await db.functions.insert_one(record("t", RECORDER, TRIGGER, revision=1))
    async with PluginHost(db, triggers=FAST) as host, host.events() as events:
        await wait_running(db, "t/orders")
        revision = await start(db, "t", CANDIDATE, weight=50)
        await next_event(events, "rollout.started")
        stable, candidate = host.current("t"), host.candidate("t")
        assert stable is not None and candidate is not None
        keys = [f"d{i}" for i in range(40)]
        await db.orders.insert_many([{"_id": k, "n": 0} for k in keys])
        for n in (1, 2):
            await db.orders.update_many({}, {"$set": {"n": n}})
        await wait_seen(db, 3 * len(keys))
        live = host.rollout("t")
        assert live is not None
        # Counted like calls: every candidate event, the stable's successes sampled.
        candidate_events = await db.seen.count_documents({"version": candidate.version})
        assert live.candidate_stats.calls == candidate_events
    versions: dict[str, set[str]] = {}
    async for doc in db.seen.find({}):
        versions.setdefault(doc["key"], set()).add(doc["version"])
    assert all(len(v) == 1 for v in versions.values()), versions
    expected = {
        k: candidate.version
        if sticky_fraction("t", revision, routing_key({"documentKey": {"_id": k}})) < 0.5
        else stable.version
        for k in keys
    }
    assert {k: next(iter(v)) for k, v in versions.items()} == expected
    split = Counter(expected.values())
    assert split[candidate.version] > 0 and split[stable.version] > 0
    assert candidate_events == 3 * split[candidate.version]
    assert await duplicates(db) == []


async def test_a_shadow_takes_no_events(db: Db) -> None:
    """A shadow serves no one: every event goes to the stable (a shadow must not write)."""
    await db.functions.insert_one(record("s", RECORDER, TRIGGER, revision=1))
    async with PluginHost(db, triggers=FAST) as host, host.events() as events:
        await wait_running(db, "s/orders")
        await start(db, "s", CANDIDATE, weight=100, mode="shadow")
        await next_event(events, "rollout.started")
        stable = host.current("s")
        assert stable is not None and host.candidate("s") is not None
        await db.orders.insert_many([{"_id": i} for i in range(20)])
        await wait_seen(db, 20)
    assert set(await db.seen.distinct("version")) == {stable.version}
    assert host.shadow_counts().get("s", {}).get("refused_writes", 0) == 0


async def test_a_candidate_failing_every_event_is_aborted_and_the_stable_takes_over(
    db: Db,
) -> None:
    """A canary failing every event is aborted by its policy after min_calls failures; the
    failed events are retried on the stable (no dead letter, as max_attempts > min_calls),
    and the rest go to the stable."""
    trigger = {**TRIGGER, "max_attempts": 8}
    await db.functions.insert_one(record("f", RECORDER, trigger, revision=1))
    async with PluginHost(db, triggers=FAST) as host, host.events() as events:
        await wait_running(db, "f/orders")
        revision = await start(
            db, "f", FAILING, weight=100, policy={"max_error_rate": 0.05, "min_calls": 5}
        )
        await next_event(events, "rollout.started")
        stable, candidate = host.current("f"), host.candidate("f")
        assert stable is not None and candidate is not None
        await db.orders.insert_many([{"_id": i} for i in range(30)])
        detected = await next_event(events, "rollout.auto_abort")
        assert detected["by"] == host.host_id
        assert "error rate 1.00 > 0.05 after 5 calls" in detected["reason"]
        await next_event(events, "rollout.aborted")
        await wait_until(lambda: host.candidate("f") is None, "the candidate is dropped")
        await db.orders.insert_many([{"_id": i} for i in range(30, 40)])
        await wait_seen(db, 40)
    docs = [d async for d in db.seen.find({})]
    assert sorted(d["key"] for d in docs) == list(range(40))
    assert {d["version"] for d in docs} == {stable.version}
    # The events the candidate failed were retried on the stable (attempt > 1).
    assert any(d["attempt"] > 1 for d in docs)
    assert await db.functions_deadletters.count_documents({}) == 0
    last = (await db.functions.find_one({"_id": "f"}) or {})["last_rollout"]
    assert (last["revision"], last["outcome"], last["by"]) == (revision, "aborted", host.host_id)
    assert last["stats"]["candidate"]["failures"] >= 5
