"""Trigger leases: one owner per trigger across the fleet, by compare-and-set on its state doc.

Design note — the lease (no home-made consensus, only single-document atomicity):

* The state document ``{_id: "<plugin>/<name>", owner, lease_expires, lease_epoch, ...}``
  in ``<functions>_triggers`` is the lease. A host takes it with one ``update`` whose
  filter says "free, expired or already mine" and which ``$inc``-s ``lease_epoch``;
  MongoDB applies an update to one document atomically
  (https://www.mongodb.com/docs/manual/core/write-operations-atomicity/), so two hosts
  racing for it cannot both match. A missing document is created by the same update
  (``upsert``); two hosts upserting at once collide on ``_id`` (duplicate key) and only
  one wins (https://www.mongodb.com/docs/manual/reference/method/db.collection.updateOne/#upsert-with-duplicate-values).
* Time is the server's: expiries are ``localTime`` of a ``hello`` plus the TTL, and the
  "expired" test compares with the server's ``localTime`` read just before (the
  embedded server has no ``$$NOW``; the read costs one round trip per acquire or renew,
  every TTL/3 seconds, never per event). Host clocks do not matter.
* INVARIANT: every write a lease holder makes (renewal, checkpoint, release, status) is
  conditional on ``{owner: me, lease_epoch: E}``. A host that lost its lease (paused by a
  GC, partitioned past the TTL) matches nothing and learns it lost the lease; it can
  never move the checkpoint back or forth under the new owner.
* A holder stops handling events as soon as a conditional write matches nothing, and
  also when its own clock says the TTL has passed since its last successful renewal
  (so a partitioned holder stops before the new owner starts, give or take clock drift
  over one TTL).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

__all__ = (
    "DEADLETTERS_SUFFIX",
    "STATE_SUFFIX",
    "LeaseHolder",
    "deadletters_collection_name",
    "preferred_owner",
    "server_now",
    "state_collection_name",
    "trigger_id",
)

STATE_SUFFIX = "_triggers"
DEADLETTERS_SUFFIX = "_deadletters"


def state_collection_name(functions: str) -> str:
    """The trigger state collection beside ``functions`` (``functions_triggers``)."""
    return f"{functions}{STATE_SUFFIX}"


def deadletters_collection_name(functions: str) -> str:
    """The dead-letter collection beside ``functions`` (``functions_deadletters``)."""
    return f"{functions}{DEADLETTERS_SUFFIX}"


def trigger_id(plugin: str, name: str) -> str:
    """A trigger's id: ``"<plugin>/<name>"``."""
    return f"{plugin}/{name}"


async def server_now(db: Any) -> datetime:
    """The server's clock (``localTime`` of a ``hello``), as an aware UTC datetime."""
    reply = await db.command("hello")
    local = reply.get("localTime")
    if not isinstance(local, datetime):  # pragma: no cover - every server sends localTime
        return datetime.now(UTC)
    return local if local.tzinfo is not None else local.replace(tzinfo=UTC)


def preferred_owner(tid: str, hosts: Iterable[str]) -> str | None:
    """The host that should run trigger ``tid``: rendezvous (highest random weight) hashing.

    Every host computes the same answer from the same set of live hosts, and when a host
    joins or leaves only the triggers it wins or held move
    (https://en.wikipedia.org/wiki/Rendezvous_hashing).

    Args:
        tid: The trigger id.
        hosts: Ids of the live hosts.

    Returns:
        The preferred host, or None if there is none.
    """
    best: tuple[bytes, str] | None = None
    for host in hosts:
        weight = hashlib.sha256(f"{host}\x00{tid}".encode()).digest()
        if best is None or (weight, host) > best:
            best = (weight, host)
    return None if best is None else best[1]


@dataclass(slots=True)
class LeaseHolder:
    """This host's lease on one trigger (held while ``epoch`` is not None).

    Args:
        coll: The state collection.
        db: Its database (for the server clock).
        tid: The trigger id.
        host_id: This host's id (the ``owner`` value).
        ttl: Lease time to live, in seconds.
    """

    coll: Any
    db: Any
    tid: str
    host_id: str
    ttl: float
    epoch: int | None = None

    def mine(self) -> dict[str, Any]:
        """The filter every write of the holder carries (see the INVARIANT above)."""
        return {"_id": self.tid, "owner": self.host_id, "lease_epoch": self.epoch}

    async def acquire(
        self, fields: Mapping[str, Any], *, grace: float, create: bool
    ) -> Mapping[str, Any] | None:
        """Take the lease if it is expired, released ``grace`` seconds ago, or already ours.

        Args:
            fields: Descriptive fields set with the lease (plugin, name, collection).
            grace: How long a released lease must have been free before this host takes
                it: 0 for the preferred owner, more for the others.
            create: Create the state document if it does not exist.

        Returns:
            The state document after the take, or None if another host holds it.
        """
        now = await server_now(self.db)
        limit = now - timedelta(seconds=grace)
        query = {
            "_id": self.tid,
            "$or": [
                {"owner": self.host_id},
                # Expired: its holder stopped renewing (died, partitioned); anyone may take it.
                {"owner": {"$ne": None}, "lease_expires": {"$lt": now}},
                # Released (a clean hand-over): the preferred host at once, others later.
                {"owner": None, "lease_expires": {"$lt": limit}},
                {"lease_expires": None},
            ],
        }
        update = {
            "$set": {
                **fields,
                "owner": self.host_id,
                "lease_expires": now + timedelta(seconds=self.ttl),
                "updated_at": now,
            },
            "$inc": {"lease_epoch": 1},
        }
        try:
            doc = await self.coll.find_one_and_update(
                query, update, upsert=create, return_document=ReturnDocument.AFTER
            )
        except DuplicateKeyError:
            return None  # it exists and is held: the upsert's insert collided on _id
        if doc is None:
            return None
        self.epoch = int(doc["lease_epoch"])
        return doc  # type: ignore[no-any-return]

    async def write(self, fields: Mapping[str, Any], *, renew: bool = True) -> bool:
        """Write ``fields`` (and renew the lease) if the lease is still ours.

        Returns:
            False if the lease was lost (another host took it, or it was reset).
        """
        if self.epoch is None:
            return False
        now = await server_now(self.db)
        changes: dict[str, Any] = {**fields, "updated_at": now}
        if renew:
            changes["lease_expires"] = now + timedelta(seconds=self.ttl)
        result = await self.coll.update_one(self.mine(), {"$set": changes})
        if result.matched_count == 0:
            self.epoch = None
            return False
        return True

    async def release(self, fields: Mapping[str, Any]) -> bool:
        """Write ``fields`` and give the lease up (a clean hand-over).

        Returns:
            False if the lease had already been lost.
        """
        if self.epoch is None:
            return False
        now = await server_now(self.db)
        result = await self.coll.update_one(
            self.mine(),
            {"$set": {**fields, "owner": None, "lease_expires": now, "updated_at": now}},
        )
        self.epoch = None
        return bool(result.matched_count == 1)
