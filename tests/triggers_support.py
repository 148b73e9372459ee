"""Helpers of the trigger tests: fast engine options, records with triggers, state reads."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from pymongo import AsyncMongoClient

from host.triggers import TriggerOptions
from tests.support import Db, Doc, wait_until

FAST = TriggerOptions(
    lease_ttl=3.0,
    poll_interval=0.05,
    takeover_grace=0.3,
    checkpoint_interval=0.05,
    checkpoint_every=50,
    retry_backoff=0.01,
    retry_backoff_max=0.05,
)
"""Short leases, polls and backoffs, so that the tests run quickly."""

RECORDER = """
async def on_change(ctx, event):
    await ctx.db.seen.insert_one({
        "event_id": ctx.event_id,
        "attempt": ctx.attempt,
        "op": event["operationType"],
        "key": event["documentKey"]["_id"],
        "version": ctx.version,
    })
"""
"""A handler that writes one ``seen`` document per delivery."""


def record(name: str, source: str, *triggers: dict[str, Any], **fields: Any) -> Doc:
    """A plugin record with ``triggers``."""
    return {"_id": name, "source": source, "triggers": list(triggers), **fields}


async def state(db: Db, tid: str) -> Doc | None:
    """The trigger's state document."""
    return await db.functions_triggers.find_one({"_id": tid})


async def wait_seen(db: Db, count: int, *, timeout: float = 30.0, **query: Any) -> None:
    """Wait until ``seen`` holds at least ``count`` documents matching ``query``."""

    async def enough() -> bool:
        return await db.seen.count_documents(query) >= count

    await wait_until(enough, f"{count} seen documents matching {query}", timeout=timeout)


async def wait_keys(db: Db, count: int, *, timeout: float = 30.0) -> None:
    """Wait until ``seen`` holds ``count`` distinct keys (repeats, allowed at least once,
    do not count twice)."""

    async def enough() -> bool:
        return len(await db.seen.distinct("key")) >= count

    await wait_until(enough, f"{count} distinct keys seen", timeout=timeout)


async def wait_running(db: Db, tid: str, owner: str | None = None) -> Doc:
    """Wait until the trigger runs (on ``owner``, if given) and has a checkpoint."""

    async def running() -> Doc | None:
        doc = await state(db, tid)
        if doc is None or doc.get("status") != "running" or doc.get("checkpoint") is None:
            return None
        if owner is not None and doc.get("owner") != owner:
            return None
        return doc

    result: Doc = await wait_until(running, f"trigger {tid} running (owner {owner})")
    return result


async def duplicates(db: Db) -> list[Doc]:
    """Event ids delivered successfully more than once (the ``seen`` collection)."""
    pipeline: list[dict[str, Any]] = [
        {"$group": {"_id": "$event_id", "n": {"$sum": 1}}},
        {"$match": {"n": {"$gt": 1}}},
    ]
    return [d async for d in await db.seen.aggregate(pipeline)]


@contextlib.asynccontextmanager
async def app_client(mongo_uri: str, app_name: str) -> AsyncIterator[AsyncMongoClient[Doc]]:
    """A client whose commands carry ``appName`` (so a failpoint can pick one host)."""
    client: AsyncMongoClient[Doc] = AsyncMongoClient(
        mongo_uri, appname=app_name, serverSelectionTimeoutMS=5000
    )
    try:
        yield client
    finally:
        await client.close()
