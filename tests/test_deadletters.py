"""Dead-letter operations (host/deadletters.py): list, drop, and claim-protected retries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from bson import ObjectId

from host.deadletters import (
    DeadLetterError,
    drop_dead_letters,
    list_dead_letters,
    parse_ids,
    retry_dead_letters,
    selector,
)
from host.triggers import deadletters_collection_name

from .support import Db
from .test_triggerview import dead_letter

pytestmark = pytest.mark.anyio


async def seed(db: Db, *trigger_ids: str) -> list[ObjectId]:
    """Insert one dead letter per trigger id; return their ids."""
    docs = [dead_letter(t) for t in trigger_ids]
    for i, doc in enumerate(docs):
        doc["event"]["documentKey"] = {"_id": i}
    await db[deadletters_collection_name("functions")].insert_many(docs)
    return [doc["_id"] for doc in docs]


def test_names_and_ids_are_checked() -> None:
    """A trigger id selects one trigger, a name a plugin; bad names and ids are refused clearly."""
    assert selector("agg/sales") == {"trigger": "agg/sales"}
    assert selector("agg") == {"plugin": "agg"}
    for bad in ("", "/x", "a/b/c", "x/"):
        with pytest.raises(DeadLetterError, match="neither a plugin name nor a trigger id"):
            selector(bad)
    with pytest.raises(DeadLetterError, match="'nope' is not an ObjectId"):
        parse_ids(["nope"])
    oid = ObjectId()
    assert parse_ids([str(oid)]) == [oid]


async def test_list_and_drop_by_trigger_plugin_and_id(db: Db) -> None:
    """list/drop select by trigger id, by plugin or by ids; other triggers are untouched."""
    ids = await seed(db, "agg/sales", "agg/sales", "agg/orders", "other/x")
    letters = await list_dead_letters(db, "agg/sales")
    assert [d.id for d in letters] == [str(ids[0]), str(ids[1])]
    assert letters[0].operation == "insert" and letters[0].attempts == 5
    assert letters[0].as_dict(full=True)["event"]["documentKey"] == {"_id": 0}
    assert len(await list_dead_letters(db, "agg")) == 3
    assert await drop_dead_letters(db, "agg", ids=[ids[2]]) == 1
    assert await drop_dead_letters(db, "agg/sales") == 2
    remaining = await list_dead_letters(db, "other")
    assert [d.trigger for d in remaining] == ["other/x"]


async def test_retry_deletes_successes_and_records_failures(db: Db) -> None:
    """A retry that succeeds deletes the dead letter; one that fails keeps it, error updated."""
    _, bad = await seed(db, "agg/sales", "agg/sales")
    seen: list[tuple[Any, int]] = []

    async def deliver(doc: Mapping[str, Any], attempt: int) -> str:
        seen.append((doc["event"]["documentKey"]["_id"], attempt))
        if doc["_id"] == bad:
            raise RuntimeError("still broken")
        return "agg@r2:00000000"

    outcomes = await retry_dead_letters(db, "agg/sales", deliver)
    assert [(o.outcome, o.attempt) for o in outcomes] == [("succeeded", 6), ("failed", 6)]
    assert outcomes[0].version == "agg@r2:00000000"
    assert outcomes[1].error == "RuntimeError: still broken"
    assert seen == [(0, 6), (1, 6)]
    (left,) = await list_dead_letters(db, "agg/sales")
    assert left.id == str(bad)
    assert (left.attempts, left.error) == (6, "RuntimeError: still broken")
    assert any("still broken" in line for line in left.traceback)
    raw = await db[deadletters_collection_name("functions")].find_one({"_id": bad})
    assert raw is not None and "retry_claim" not in raw  # the claim was released


async def test_concurrent_retries_run_each_dead_letter_once(db: Db) -> None:
    """Two retries racing over the same dead letters: the claim lets only one run each event."""
    ids = await seed(db, *["agg/sales"] * 20)
    runs: list[ObjectId] = []

    async def deliver(doc: Mapping[str, Any], attempt: int) -> str:
        runs.append(doc["_id"])
        await anyio.lowlevel.checkpoint()
        return "agg@r1:00000000"

    results: list[list[str]] = []

    async def one() -> None:
        outcomes = await retry_dead_letters(db, "agg/sales", deliver)
        results.append([o.outcome for o in outcomes])

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        tg.start_soon(one)
    assert sorted(runs) == sorted(ids)  # every event ran exactly once
    assert sum(r.count("succeeded") for r in results) == 20
    assert await list_dead_letters(db, "agg/sales") == []


async def test_a_dead_retry_s_claim_expires(db: Db) -> None:
    """A retry that died holding a claim blocks others only until the claim's TTL passes."""
    (oid,) = await seed(db, "agg/sales")
    coll = db[deadletters_collection_name("functions")]

    async def crash(doc: Mapping[str, Any], attempt: int) -> str:
        raise KeyboardInterrupt  # stands for the process dying between claim and settle

    with pytest.raises(KeyboardInterrupt):
        await retry_dead_letters(db, "agg/sales", crash, claim_ttl=3600)
    raw = await coll.find_one({"_id": oid})
    assert raw is not None and raw.get("retry_claim")

    async def deliver(doc: Mapping[str, Any], attempt: int) -> str:
        return "v"

    (blocked,) = await retry_dead_letters(db, "agg/sales", deliver)
    assert blocked.outcome == "claimed"
    await coll.update_one({"_id": oid}, {"$set": {"retry_until": raw["first_failed_at"]}})
    (done,) = await retry_dead_letters(db, "agg/sales", deliver)
    assert done.outcome == "succeeded"
    assert await coll.count_documents({}) == 0
