"""Dead letters of change-stream triggers: list, retry through the current version, drop.

A trigger's runner (:mod:`host.triggers`) writes an event it gave up on to
``<collection>_deadletters`` (shape in ``TRIGGERS_CONTRACT.md``) and moves its stream on.
These functions are what ``plugin-host deadletter list|retry|drop`` runs.

Retry, at least once
--------------------
The dead letter is the only durable copy of the event (the checkpoint is past it), so it
is deleted only *after* the handler returned, and only by the retry that claimed it:

1. **claim**: a compare-and-set stamps ``retry_claim`` (a fresh token) and
   ``retry_until`` (server clock + ``claim_ttl``) on a dead letter that has no live claim.
   Two concurrent retries of the same dead letter cannot both run it; a retry that died
   mid-way leaves a claim that expires, so the dead letter is never stuck.
2. **deliver**: the caller's ``deliver`` runs the stored event through the plugin's
   current version, with the same ``ctx.event_id`` and ``ctx.attempt`` = attempts + 1
   (:func:`host_deliverer`: through a :class:`~host.PluginHost` of the caller's own).
3. **settle**, conditional on the claim token: success deletes the dead letter; failure
   records the new error, traceback and attempt count and releases the claim.

A crash between 2 and 3 leaves the dead letter in place, so the next retry runs the event
again: a retry can repeat a delivery, never lose one. Handlers are idempotent on
``ctx.event_id`` for this reason (as for the stream's own repeats).

The retry runs the event *after* later events on the same document key have run: a
retried event is out of order by nature. Handlers that must not apply stale data should
read the document's current state (the example aggregator does).

Why the retry runs in the caller's process, not on the trigger's owner: a dead letter
must stay retryable when no host runs its trigger (the plugin disabled, the trigger
failed, the fleet down), and the caller wants the outcome and an exit code, not a
request that some host may pick up later. ``plugin-host deadletter retry`` loads the
collection's current versions in a :class:`~host.PluginHost` of its own with triggers
off (the same record parsing, compilation and ``--trusted-keys`` check a daemon applies)
and runs the handler through its dispatcher exactly as a runner does. What differs from
a daemon is only the process: host globals (``context=``) of the daemons are not there.
"""

from __future__ import annotations

import secrets
import traceback as tb
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from bson import ObjectId
from bson.errors import InvalidId

from .errors import PluginFailed, PluginHostError
from .fleetview import _server_clock
from .triggers.lease import deadletters_collection_name
from .triggers.runner import event_id_of, handle_event

if TYPE_CHECKING:
    from .runtime import PluginHost

__all__ = (
    "DeadLetter",
    "DeadLetterError",
    "Deliver",
    "NotDeliverable",
    "RetryOutcome",
    "drop_dead_letters",
    "host_deliverer",
    "list_dead_letters",
    "parse_ids",
    "retry_dead_letters",
    "selector",
)

DEFAULT_CLAIM_TTL = 300.0
"""Seconds a retry's claim on a dead letter holds before another retry may take it."""

Deliver = Callable[[Mapping[str, Any], int], Awaitable[str | None]]
"""``deliver(dead letter document, attempt) -> version`` runs the event; raises on failure."""


class DeadLetterError(PluginHostError, ValueError):
    """A bad dead-letter selection (a malformed id, an empty name)."""


class NotDeliverable(PluginHostError):
    """The event cannot run now: its plugin is not loaded or no longer declares the trigger.

    Attributes:
        version: The plugin's current version, if it has one.
    """

    def __init__(self, message: str, version: str | None = None) -> None:
        super().__init__(message)
        self.version = version


def host_deliverer(host: PluginHost) -> Deliver:
    """A :data:`Deliver` running events on ``host``'s current versions, as a runner would.

    Args:
        host: A started host over the trigger's functions collection (``triggers=False``:
            the retry must not take leases).

    Returns:
        The deliver function: the handler gets an ``EventContext`` with the event's own
        ``event_id`` and the given attempt; the record's ``timeout`` bounds it.
    """

    async def deliver(doc: Mapping[str, Any], attempt: int) -> str:
        trigger = str(doc.get("trigger") or "")
        plugin_name, _, name = trigger.partition("/")
        plugin = host.current(plugin_name)
        if plugin is None:
            raise NotDeliverable(
                f"plugin {plugin_name!r} is not loaded (disabled, deleted or refused: "
                "`plugin-host status` says which)"
            )
        spec = next((t for t in plugin.record.triggers if t.name == name), None)
        if spec is None:
            raise NotDeliverable(
                f"{plugin.version} no longer declares trigger {trigger!r}", plugin.version
            )
        event = doc.get("event") if isinstance(doc.get("event"), Mapping) else {}
        assert isinstance(event, Mapping)
        # The host's dispatcher, exactly as a runner delivers (TriggerEngine.handle does
        # the same but always with attempt 1; a retry is attempt n + 1).
        await handle_event(
            host._dispatcher,
            plugin,
            trigger,
            spec,
            event,
            event_id=event_id_of(doc.get("event_id", event.get("_id"))),
            attempt=attempt,
        )
        return plugin.version

    return deliver


def selector(name: str) -> dict[str, Any]:
    """The dead letters ``name`` designates: ``plugin/trigger`` is one trigger, else a plugin.

    Args:
        name: A trigger id (``sales_by_region/sales``) or a plugin name.

    Returns:
        The MongoDB filter.

    Raises:
        DeadLetterError: The name is empty.
    """
    if not name or name.strip("/") != name or name.count("/") > 1:
        raise DeadLetterError(f"{name!r} is neither a plugin name nor a trigger id plugin/name")
    return {"trigger": name} if "/" in name else {"plugin": name}


def parse_ids(ids: Sequence[str]) -> list[ObjectId]:
    """Dead-letter ids as given on the command line.

    Args:
        ids: 24-hex-digit ObjectId strings.

    Returns:
        The ObjectIds.

    Raises:
        DeadLetterError: One of them is not an ObjectId.
    """
    parsed: list[ObjectId] = []
    for raw in ids:
        try:
            parsed.append(ObjectId(raw))
        except (InvalidId, TypeError):
            raise DeadLetterError(
                f"dead-letter id {raw!r} is not an ObjectId (24 hex digits, "
                "as `deadletter list` prints)"
            ) from None
    return parsed


def _filter(name: str, ids: Sequence[ObjectId] | None) -> dict[str, Any]:
    query = selector(name)
    if ids is not None:
        query["_id"] = {"$in": list(ids)}
    return query


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One event a trigger gave up on.

    Attributes:
        id: The dead letter's ObjectId, as hex.
        trigger: ``<plugin>/<name>``.
        plugin: The plugin.
        event_id: The event's resume token (the handler's ``ctx.event_id`` comes from it).
        operation: The change event's ``operationType``.
        document_key: The change event's ``documentKey``.
        error: The last error.
        traceback: The last traceback's lines.
        attempts: Attempts so far (stream and retries).
        version: The plugin version of the last attempt.
        first_failed_at: When the first attempt failed.
        last_failed_at: When the last one did.
        event: The stored change event.
    """

    id: str
    trigger: str
    plugin: str
    event_id: Any
    operation: str | None
    document_key: Any
    error: str
    traceback: tuple[str, ...]
    attempts: int
    version: str | None
    first_failed_at: datetime | None
    last_failed_at: datetime | None
    event: Mapping[str, Any]

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> DeadLetter:
        """Read one dead-letter document (missing fields read as empty)."""
        event = doc.get("event") if isinstance(doc.get("event"), Mapping) else {}
        assert isinstance(event, Mapping)
        trigger = str(doc.get("trigger") or "")
        attempts = doc.get("attempts")
        first, last = doc.get("first_failed_at"), doc.get("last_failed_at")
        return cls(
            id=str(doc.get("_id")),
            trigger=trigger,
            plugin=str(doc.get("plugin") or trigger.partition("/")[0]),
            event_id=doc.get("event_id", event.get("_id")),
            operation=event.get("operationType"),
            document_key=event.get("documentKey"),
            error=str(doc.get("error") or ""),
            traceback=tuple(str(line) for line in doc.get("traceback") or ()),
            attempts=attempts if isinstance(attempts, int) else 0,
            version=doc.get("version") if isinstance(doc.get("version"), str) else None,
            first_failed_at=first if isinstance(first, datetime) else None,
            last_failed_at=last if isinstance(last, datetime) else None,
            event=event,
        )

    def as_dict(self, *, full: bool = False) -> dict[str, Any]:
        """The JSON shape of ``deadletter list --json`` (``full``: with event and traceback)."""
        out: dict[str, Any] = {
            "id": self.id,
            "trigger": self.trigger,
            "plugin": self.plugin,
            "operation": self.operation,
            "document_key": self.document_key,
            "error": self.error,
            "attempts": self.attempts,
            "version": self.version,
            "first_failed_at": self.first_failed_at.isoformat() if self.first_failed_at else None,
            "last_failed_at": self.last_failed_at.isoformat() if self.last_failed_at else None,
        }
        if full:
            out["event_id"] = self.event_id
            out["traceback"] = list(self.traceback)
            out["event"] = dict(self.event)
        return out


async def list_dead_letters(
    db: Any,
    name: str,
    *,
    collection: str = "functions",
    ids: Sequence[ObjectId] | None = None,
    limit: int = 0,
) -> list[DeadLetter]:
    """The dead letters of a trigger or plugin, oldest failure first.

    Args:
        db: The database (PyMongo async).
        name: A trigger id or a plugin name (see :func:`selector`).
        collection: The functions collection.
        ids: Only these dead letters.
        limit: At most this many (0: all).

    Returns:
        The dead letters.
    """
    cursor = (
        db[deadletters_collection_name(collection)]
        .find(_filter(name, ids))
        .sort([("first_failed_at", 1), ("_id", 1)])
        .limit(limit)
    )
    return [DeadLetter.from_doc(doc) for doc in await cursor.to_list(None)]


async def drop_dead_letters(
    db: Any, name: str, *, collection: str = "functions", ids: Sequence[ObjectId] | None = None
) -> int:
    """Delete dead letters for good (``ids`` None: all of ``name``'s).

    Args:
        db: The database.
        name: A trigger id or a plugin name.
        collection: The functions collection.
        ids: Only these dead letters.

    Returns:
        How many were deleted.
    """
    result = await db[deadletters_collection_name(collection)].delete_many(_filter(name, ids))
    return int(result.deleted_count)


@dataclass(frozen=True, slots=True)
class RetryOutcome:
    """What became of one dead letter's retry.

    Attributes:
        id: The dead letter's id.
        trigger: Its trigger.
        outcome: ``succeeded`` (deleted), ``failed`` (kept, error updated) or ``claimed``
            (another retry holds it: skipped).
        attempt: The attempt number the handler saw (None when skipped).
        version: The version that ran it.
        error: The error when it failed.
    """

    id: str
    trigger: str
    outcome: str
    attempt: int | None = None
    version: str | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of ``deadletter retry --json``."""
        return {
            "id": self.id,
            "trigger": self.trigger,
            "outcome": self.outcome,
            "attempt": self.attempt,
            "version": self.version,
            "error": self.error,
        }


async def retry_dead_letters(
    db: Any,
    name: str,
    deliver: Deliver,
    *,
    collection: str = "functions",
    ids: Sequence[ObjectId] | None = None,
    claim_ttl: float = DEFAULT_CLAIM_TTL,
) -> list[RetryOutcome]:
    """Run dead letters again through ``deliver``; delete each one that succeeds.

    One at a time, oldest first (see the module docstring for the claim protocol).

    Args:
        db: The database.
        name: A trigger id or a plugin name.
        deliver: Runs one stored event; returns the version that ran it; raises on failure.
        collection: The functions collection.
        ids: Only these dead letters (None: all of ``name``'s).
        claim_ttl: Seconds a claim holds (longer than the slowest handler).

    Returns:
        One outcome per dead letter selected.
    """
    coll = db[deadletters_collection_name(collection)]
    outcomes: list[RetryOutcome] = []
    for letter in await list_dead_letters(db, name, collection=collection, ids=ids):
        oid = ObjectId(letter.id)
        token = secrets.token_hex(8)
        server_now, _ = await _server_clock(db)
        # Invariant: at most one unexpired retry_claim per dead letter; only its holder
        # may delete the dead letter or record the attempt (every settle filters on it).
        claimed = await coll.find_one_and_update(
            {
                "_id": oid,
                "$or": [{"retry_until": None}, {"retry_until": {"$lt": server_now}}],
            },
            {
                "$set": {
                    "retry_claim": token,
                    "retry_until": server_now + timedelta(seconds=claim_ttl),
                }
            },
            return_document=True,
        )
        if claimed is None:
            outcomes.append(RetryOutcome(letter.id, letter.trigger, "claimed"))
            continue
        attempt = (claimed.get("attempts") or 0) + 1
        try:
            version = await deliver(claimed, attempt)
        except Exception as exc:
            error = str(exc) if isinstance(exc, PluginHostError) else f"{type(exc).__name__}: {exc}"
            lines = (
                exc.traceback.splitlines()
                if isinstance(exc, PluginFailed)
                else tb.format_exception(exc)
            )
            failed_at, _ = await _server_clock(db)
            await coll.update_one(
                {"_id": oid, "retry_claim": token},
                {
                    "$set": {
                        "error": error,
                        "traceback": lines[-200:],
                        "last_failed_at": failed_at,
                        **({"version": v} if (v := getattr(exc, "version", None)) else {}),
                    },
                    "$inc": {"attempts": 1},
                    "$unset": {"retry_claim": "", "retry_until": ""},
                },
            )
            outcomes.append(
                RetryOutcome(
                    letter.id,
                    letter.trigger,
                    "failed",
                    attempt,
                    getattr(exc, "version", None),
                    error,
                )
            )
            continue
        await coll.delete_one({"_id": oid, "retry_claim": token})
        outcomes.append(RetryOutcome(letter.id, letter.trigger, "succeeded", attempt, version))
    return outcomes
