"""Helpers for the rollout tests: write rollout records the way the contract says.

rollout-ops builds ``host.publish.start_rollout``/``promote`` in parallel; these helpers
write the same documents directly with PyMongo (the contract's compare-and-sets), so the
host side is tested on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from host.publish import history_collection_name
from host.records import PluginRecord

Doc = dict[str, Any]
Sign = Callable[[str, str, str, int], str]


def value_source(value: object) -> str:
    """A plugin returning ``value``."""
    return f"async def main(ctx, args):\n    return {value!r}\n"


RAISING = "async def main(ctx, args):\n    raise RuntimeError('candidate is broken')\n"


async def start(
    db: Any,
    name: str,
    source: str,
    *,
    weight: float,
    mode: str = "canary",
    sticky_key: str | None = None,
    policy: Mapping[str, Any] | None = None,
    sign: Sign | None = None,
    signature: str | None = None,
    collection: str = "functions",
) -> int:
    """Start a rollout of ``source`` (CAS on the stable revision); return its revision."""
    coll = db[collection]
    record = await coll.find_one({"_id": name})
    assert record is not None, f"no record {name!r}"
    assert record.get("rollout") is None, "a rollout is already running"
    hist = db[history_collection_name(collection)]
    last = await hist.find_one({"name": name}, sort=[("revision", -1)])
    revision = max(record.get("revision") or 0, (last or {}).get("revision") or 0) + 1
    if sign is not None:
        signature = sign(name, source, "main", revision)
    now = datetime.now(UTC)
    rollout: Doc = {
        "revision": revision,
        "source": source,
        "entrypoint": "main",
        "signature": signature,
        "mode": mode,
        "weight": weight,
        "sticky_key": sticky_key,
        "policy": {"min_calls": 20, "window_s": 60.0, **(policy or {})},
        "started_at": now,
        "updated_at": now,
    }
    result = await coll.update_one(
        {"_id": name, "revision": record.get("revision"), "rollout": None},
        {"$set": {"rollout": rollout, "updatedAt": now}},
    )
    assert result.modified_count == 1, "the rollout's compare-and-set lost"
    await hist.insert_one(
        {
            "name": name,
            "revision": revision,
            "source": source,
            "entrypoint": "main",
            "publishedAt": now,
            "rollout": mode,
        }
    )
    return revision


async def set_weight(db: Any, name: str, revision: int, weight: float) -> None:
    """Change the running rollout's weight (CAS on ``rollout.revision``)."""
    result = await db.functions.update_one(
        {"_id": name, "rollout.revision": revision},
        {"$set": {"rollout.weight": weight, "rollout.updated_at": datetime.now(UTC)}},
    )
    assert result.modified_count == 1


async def promote(db: Any, name: str, revision: int) -> bool:
    """Promote candidate ``revision`` (the contract's CAS); True iff this call did it."""
    record = await db.functions.find_one({"_id": name})
    rollout = (record or {}).get("rollout")
    if not rollout or rollout.get("revision") != revision:
        return False
    version = PluginRecord(name, rollout["source"], revision=revision).version
    update: Doc = {
        "$set": {
            "source": rollout["source"],
            "entrypoint": rollout["entrypoint"],
            "revision": revision,
            "updatedAt": datetime.now(UTC),
            "last_rollout": {
                "revision": revision,
                "version": version,
                "outcome": "promoted",
                "reason": "by operator",
                "by": "test",
                "at": datetime.now(UTC),
                "stats": None,
            },
        },
        "$unset": {"rollout": ""},
    }
    if rollout.get("signature") is None:
        update["$unset"]["signature"] = ""
    else:
        update["$set"]["signature"] = rollout["signature"]
    result = await db.functions.update_one({"_id": name, "rollout.revision": revision}, update)
    return bool(result.modified_count == 1)


def revision_of(version: str) -> int:
    """``greet@r7:3f9a1c2e`` -> 7."""
    return int(version.rpartition("@r")[2].partition(":")[0])
