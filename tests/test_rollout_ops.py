"""Rollout operations on the record (host.publish: start, weight, promote, abort, supersede),
through the embedded server and real PyMongo, including races between them."""

from __future__ import annotations

import contextlib
import functools
import random
from typing import Any

import anyio
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from host.publish import (
    NoRollout,
    Published,
    PublishError,
    RolloutPolicy,
    RolloutRunning,
    UnknownPlugin,
    abort_rollout,
    history,
    promote,
    publish,
    rollback,
    set_rollout_weight,
    start_rollout,
)
from host.trust import SignatureError, TrustedKeys, sign_record, verify_signature

from .support import Db, returning

pytestmark = pytest.mark.anyio


async def record(db: Db, name: str = "greet") -> dict[str, Any]:
    """The plugin's record (it must exist)."""
    doc = await db.functions.find_one({"_id": name})
    assert doc is not None
    return doc


async def test_start_rollout_writes_the_candidate_and_its_history(db: Db) -> None:
    """start_rollout adds a rollout sub-document (next revision, policy) and a history entry."""
    await publish(db, "greet", returning(1))
    await publish(db, "greet", returning(2))
    policy = RolloutPolicy(max_error_rate=0.05, min_calls=10, max_p99_ms=250)
    started = await start_rollout(
        db, "greet", returning(3), weight=5, sticky_key="userId", policy=policy
    )
    assert started == Published("greet", 3, changed=True)
    doc = await record(db)
    assert doc["revision"] == 2 and doc["source"] == returning(2)  # the stable is untouched
    rollout = doc["rollout"]
    assert rollout["revision"] == 3 and rollout["source"] == returning(3)
    assert rollout["entrypoint"] == "main" and rollout["signature"] is None
    assert rollout["mode"] == "canary" and rollout["weight"] == 5.0
    assert rollout["sticky_key"] == "userId" and rollout["steps"] is None
    assert rollout["policy"] == {
        "max_error_rate": 0.05,
        "min_calls": 10,
        "max_p99_ms": 250.0,
        "window_s": 60.0,
    }
    assert rollout["started_at"] == rollout["updated_at"]
    entries = await history(db, "greet")
    assert [e["revision"] for e in entries] == [3, 2, 1]
    assert entries[0]["rollout"] == "canary" and entries[0]["source"] == returning(3)


async def test_the_candidate_is_signed_for_its_own_revision(db: Db) -> None:
    """With a signer, the candidate's signature covers its name, source, entrypoint, revision."""
    key = Ed25519PrivateKey.generate()
    sign = functools.partial(sign_record, key)
    await publish(db, "greet", returning(1), sign=sign)
    await start_rollout(
        db, "greet", "def handle(ctx, args):\n    return 2\n", entrypoint="handle", weight=10,
        sign=sign,
    )  # fmt: skip
    rollout = (await record(db))["rollout"]
    trusted = TrustedKeys([key.public_key()])
    verify_signature(
        trusted,
        rollout["signature"],
        name="greet",
        source=rollout["source"],
        entrypoint="handle",
        revision=2,
    )
    with pytest.raises(SignatureError, match="altered after signing"):  # not for another revision
        verify_signature(
            trusted,
            rollout["signature"],
            name="greet",
            source=rollout["source"],
            entrypoint="handle",
            revision=1,
        )


async def test_start_rollout_refusals_are_clear(db: Db) -> None:
    """No record, a running rollout, an identical candidate, bad weight/mode/policy: clear."""
    with pytest.raises(UnknownPlugin, match="'greet'"):
        await start_rollout(db, "greet", returning(1), weight=5)
    await publish(db, "greet", returning(1))
    with pytest.raises(PublishError, match="identical to the stable r1"):
        await start_rollout(db, "greet", returning(1), weight=5)
    with pytest.raises(PublishError, match="percent 0-100, got 101"):
        await start_rollout(db, "greet", returning(2), weight=101)
    with pytest.raises(PublishError, match="canary or shadow, got 'blue'"):
        await start_rollout(db, "greet", returning(2), weight=5, mode="blue")
    with pytest.raises(ValueError, match=r"max_error_rate must be a number in \[0, 1\]"):
        RolloutPolicy(max_error_rate=5)
    with pytest.raises(PublishError, match="syntax error"):
        await start_rollout(db, "greet", "def main(:\n", weight=5)
    await start_rollout(db, "greet", returning(2), weight=5)
    with pytest.raises(RolloutRunning, match=r"'greet': a rollout of r2 on stable r1 is running"):
        await start_rollout(db, "greet", returning(3), weight=5)
    assert [e["revision"] for e in await history(db, "greet")] == [2, 1]


async def test_weight_changes_are_pinned_to_the_candidate(db: Db) -> None:
    """set_rollout_weight moves the running candidate only, and records a walker's plan."""
    await publish(db, "greet", returning(1))
    with pytest.raises(NoRollout, match=r"'greet' has no rollout running \(stable r1\)"):
        await set_rollout_weight(db, "greet", 50)
    await start_rollout(db, "greet", returning(2), weight=5)
    plan = {"weights": [5.0, 50.0], "interval_s": 60.0, "next_at": None}
    await set_rollout_weight(db, "greet", 50, revision=2, steps=plan)
    rollout = (await record(db))["rollout"]
    assert rollout["weight"] == 50.0 and rollout["steps"] == plan
    with pytest.raises(NoRollout, match=r"no rollout of r9 running \(the rollout running is r2\)"):
        await set_rollout_weight(db, "greet", 75, revision=9)
    await set_rollout_weight(db, "greet", 75)
    rollout = (await record(db))["rollout"]
    assert rollout["weight"] == 75.0 and rollout["steps"] is None


async def test_promote_makes_the_candidate_stable_in_one_write(db: Db) -> None:
    """promote copies source, entrypoint, revision and signature and records last_rollout."""
    key = Ed25519PrivateKey.generate()
    sign = functools.partial(sign_record, key)
    await publish(db, "greet", returning(1), sign=sign)
    await start_rollout(db, "greet", returning(2), weight=20, sign=sign)
    signature = (await record(db))["rollout"]["signature"]
    stats = {"stable": {"calls": 8}, "candidate": {"calls": 2}}
    promoted = await promote(db, "greet", stats=stats, by="ops")
    assert promoted == Published("greet", 2, changed=True)
    doc = await record(db)
    assert "rollout" not in doc
    assert (doc["revision"], doc["source"], doc["signature"]) == (2, returning(2), signature)
    last = doc["last_rollout"]
    assert last["outcome"] == "promoted" and last["revision"] == 2 and last["by"] == "ops"
    assert last["reason"] == "promoted over r1" and last["stats"] == stats
    assert last["version"].startswith("greet@r2:")
    with pytest.raises(NoRollout, match="the last rollout, r2, was promoted by ops"):
        await promote(db, "greet")


async def test_promote_turns_a_shadow_into_a_canary(db: Db) -> None:
    """promote(canary=P) keeps the candidate as a canary at P percent; the stable stays."""
    await publish(db, "greet", returning(1))
    await start_rollout(db, "greet", returning(2), mode="shadow", weight=10)
    await promote(db, "greet", canary=25)
    doc = await record(db)
    assert doc["revision"] == 1
    assert doc["rollout"]["mode"] == "canary" and doc["rollout"]["weight"] == 25.0
    with pytest.raises(PublishError, match="canary weight must be a percent"):
        await promote(db, "greet", canary=-1)


async def test_abort_is_recorded_once(db: Db) -> None:
    """abort_rollout returns True for the writer that recorded it, False afterwards."""
    await publish(db, "greet", returning(1))
    with pytest.raises(NoRollout, match="'greet' has no rollout running"):
        await abort_rollout(db, "greet")
    await start_rollout(db, "greet", returning(2), weight=5)
    assert await abort_rollout(db, "greet", expected_revision=7) is False  # not that one
    stats = {"stable": {"calls": 20, "failures": 0}, "candidate": {"calls": 20, "failures": 20}}
    reason = "error rate 1.00 > 0.05 after 20 calls (stable 0.00)"
    assert await abort_rollout(
        db, "greet", reason=reason, by="host-a", stats=stats, expected_revision=2
    )
    assert await abort_rollout(db, "greet", by="host-b", expected_revision=2) is False
    doc = await record(db)
    assert "rollout" not in doc and doc["revision"] == 1 and doc["source"] == returning(1)
    last = doc["last_rollout"]
    assert (last["outcome"], last["by"], last["reason"]) == ("aborted", "host-a", reason)
    assert last["stats"] == stats and last["version"].startswith("greet@r2:")


async def test_a_publish_during_a_rollout_supersedes_it(db: Db) -> None:
    """A plain publish takes the next revision above the candidate and ends the rollout."""
    await publish(db, "greet", returning(1))
    await start_rollout(db, "greet", returning(2), weight=5)
    published = await publish(db, "greet", returning(1))  # the same source as stable: still new
    assert published.revision == 3 and published.changed
    doc = await record(db)
    assert "rollout" not in doc and doc["revision"] == 3
    last = doc["last_rollout"]
    assert last["outcome"] == "superseded" and last["revision"] == 2
    assert last["reason"] == "superseded by r3, published while it ran"
    assert [e["revision"] for e in await history(db, "greet")] == [3, 2, 1]


async def test_rollback_never_goes_back_to_an_unpromoted_candidate(db: Db) -> None:
    """rollback's default target skips aborted candidates but takes promoted ones."""
    await publish(db, "greet", returning(1))
    await start_rollout(db, "greet", returning(2), weight=5)
    await abort_rollout(db, "greet")
    await start_rollout(db, "greet", returning(3), weight=5)
    await promote(db, "greet")
    await publish(db, "greet", returning(4))
    back, source_rev = await rollback(db, "greet")
    assert (back.revision, source_rev) == (5, 3)  # r3 was promoted, so stable once; r2 never
    await publish(db, "greet", returning(6))
    await start_rollout(db, "greet", returning(7), weight=5)
    await abort_rollout(db, "greet")
    back, source_rev = await rollback(db, "greet")
    assert (back.revision, source_rev) == (8, 5)  # r7 never served as stable


async def race(db: Db, rng: random.Random, round_: int) -> tuple[int, dict[str, list[Any]]]:
    """Start a rollout, then run 12 aborts, 3 promotes, 4 weight changes, 3 publishes at once."""
    candidate = (await start_rollout(db, "greet", returning(1000 + round_), weight=5)).revision
    seen: dict[str, list[Any]] = {"aborted": [], "promoted": [], "published": []}

    async def abort(host: int) -> None:
        recorded = await abort_rollout(db, "greet", by=f"host-{host}", expected_revision=candidate)
        seen["aborted"].append(recorded)

    async def promote_it() -> None:
        with contextlib.suppress(NoRollout):
            seen["promoted"].append((await promote(db, "greet", revision=candidate)).revision)

    async def publish_it(value: int) -> None:
        seen["published"].append((await publish(db, "greet", returning(value))).revision)

    async def weigh() -> None:
        with contextlib.suppress(NoRollout):
            await set_rollout_weight(db, "greet", rng.uniform(0, 100), revision=candidate)

    jobs: list[Any] = [functools.partial(abort, i) for i in range(12)]
    jobs += [promote_it] * 3 + [weigh] * 4
    jobs += [functools.partial(publish_it, 100 * round_ + i + 1) for i in range(3)]
    rng.shuffle(jobs)
    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(job)
    return candidate, seen


async def test_races_record_exactly_one_outcome_and_lose_no_revision(db: Db) -> None:
    """Aborts, promotes, publishes and weight changes at once: one outcome, no lost revision."""
    rng = random.Random(16)
    await publish(db, "greet", returning(0))
    for round_ in range(6):
        candidate, seen = await race(db, rng, round_)
        doc = await record(db)
        last = doc["last_rollout"]
        assert "rollout" not in doc
        assert last["revision"] == candidate
        winners = {
            "aborted": sum(seen["aborted"]),
            "promoted": len(seen["promoted"]),
            "superseded": int(last["outcome"] == "superseded"),
        }
        assert winners[last["outcome"]] == 1, (last, winners)
        assert sum(winners.values()) == 1, (last, winners)
        revisions = [e["revision"] for e in await history(db, "greet")]
        published = seen["published"]
        assert len(revisions) == len(set(revisions)), "a revision was written twice"
        assert set(published) | {candidate} <= set(revisions), "a revision was lost"
        # No version older than the newest is served: the stable is the newest revision.
        assert doc["revision"] == max(revisions) == max(published)
        assert all(p > candidate for p in published), (candidate, seen, last, revisions)


async def test_concurrent_starts_admit_one_rollout(db: Db) -> None:
    """Of many start_rollout calls at once, one wins; the others get RolloutRunning."""
    await publish(db, "greet", returning(0))
    won: list[int] = []
    refused: list[str] = []

    async def start(value: int) -> None:
        try:
            won.append((await start_rollout(db, "greet", returning(value), weight=5)).revision)
        except RolloutRunning as exc:
            refused.append(str(exc))

    async with anyio.create_task_group() as tg:
        for value in range(1, 11):
            tg.start_soon(start, value)
    assert len(won) == 1 and len(refused) == 9
    assert (await record(db))["rollout"]["revision"] == won[0] == 2
    assert all(f"a rollout of r{won[0]}" in message for message in refused)
