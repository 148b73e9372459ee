"""Change-stream triggers as readers see them: owner, lag, dead letters, history-lost gaps.

Shared by ``plugin-host triggers`` and the daemon's ``GET /triggers``. The trigger
runners (:mod:`host.triggers`) write one state document per trigger in
``<collection>_triggers`` and their dead letters in ``<collection>_deadletters``; this
module only reads both (the contract is ``TRIGGERS_CONTRACT.md``).

*Owner alive* is judged the way :mod:`host.fleetview` judges hosts: the owner's
heartbeat in ``<collection>_hosts`` against its own TTL, on the server's clock. A trigger
whose owner is dead (or that has no owner) with a lease that has run out is waiting for
another host to take it over; ``lease_valid`` says whether the lease still holds, also on
the server's clock. Host clocks never enter into it.

Dead letters are *counted in the dead-letter collection*, not read from the state
document's counter, so ``deadletter drop``/``retry`` show at once and the count is right
even for a trigger whose runner is down.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bson.timestamp import Timestamp

from .fleet import hosts_collection_name
from .fleetview import _server_clock, host_status
from .triggers.lease import deadletters_collection_name, state_collection_name

__all__ = (
    "HistoryGap",
    "TriggerStatus",
    "summarize_triggers",
    "trigger_status",
)


def _when(value: Any) -> datetime | None:
    """A UTC datetime from a BSON datetime or a cluster-time ``Timestamp`` (else None)."""
    if isinstance(value, Timestamp):
        return value.as_datetime()
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(frozen=True, slots=True)
class HistoryGap:
    """Events a trigger never saw: its resume point had fallen out of the oplog.

    Attributes:
        start: The cluster time of the checkpoint it could not resume from (None: unknown).
        end: Where it resumed (or stopped).
        at: When the runner found out.
        policy: The ``on_history_lost`` policy applied (``resume_from_now``, ``fail``,
            ``rescan``).
    """

    start: datetime | None
    end: datetime | None
    at: datetime | None
    policy: str

    @property
    def seconds(self) -> float | None:
        """The length of the gap, when both ends are known."""
        if self.start is None or self.end is None:
            return None
        return max((self.end - self.start).total_seconds(), 0.0)

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape (``from``/``to`` as in the state document)."""
        return {
            "from": _iso(self.start),
            "to": _iso(self.end),
            "at": _iso(self.at),
            "policy": self.policy,
            "seconds": self.seconds,
        }


@dataclass(frozen=True, slots=True)
class TriggerStatus:
    """One trigger, as its state document, its owner's heartbeat and its dead letters say.

    Attributes:
        id: ``<plugin>/<name>``.
        plugin: The plugin declaring it.
        name: The trigger's name within the plugin.
        collection: The collection it watches.
        owner: The host holding its lease (None: nobody).
        owner_alive: That host's heartbeat is within its TTL (server clock).
        lease_valid: The lease has not expired (server clock).
        lease_expires: When the lease expires.
        lease_epoch: Bumped at every acquisition (a fencing token).
        status: ``starting`` (leased, its change stream not open yet), ``running``,
            ``paused``, ``failed``, ``waiting`` (``removed``: dead letters remain but the
            trigger has no state any more).
        error: Why it failed, if it did.
        lag_ms: The last handler start's lag behind the event's cluster time.
        events_per_s: Recent throughput.
        processed: Events handled to completion.
        failed_attempts: Handler attempts that raised.
        dead_letters: Dead letters in the dead-letter collection.
        history_lost: The recorded gaps, oldest first.
        checkpoint_time: Cluster time of the last event the checkpoint moved past.
        checkpoint_age_s: How far that is behind the server's clock now.
        updated_at: The state document's last write.
    """

    id: str
    plugin: str
    name: str
    collection: str | None
    owner: str | None
    owner_alive: bool
    lease_valid: bool
    lease_expires: datetime | None
    lease_epoch: int
    status: str
    error: str | None
    lag_ms: float | None
    events_per_s: float | None
    processed: int
    failed_attempts: int
    dead_letters: int
    history_lost: tuple[HistoryGap, ...]
    checkpoint_time: datetime | None
    checkpoint_age_s: float | None
    updated_at: datetime | None

    @property
    def orphaned(self) -> bool:
        """Meant to run, but no live host holds a valid lease on it (a takeover is due)."""
        if self.status in ("paused", "failed", "removed"):
            return False
        return not (self.owner is not None and self.owner_alive and self.lease_valid)

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of ``triggers --json`` / ``GET /triggers``."""
        return {
            "id": self.id,
            "plugin": self.plugin,
            "name": self.name,
            "collection": self.collection,
            "owner": self.owner,
            "owner_alive": self.owner_alive,
            "lease_valid": self.lease_valid,
            "lease_expires": _iso(self.lease_expires),
            "lease_epoch": self.lease_epoch,
            "orphaned": self.orphaned,
            "status": self.status,
            "error": self.error,
            "lag_ms": self.lag_ms,
            "events_per_s": self.events_per_s,
            "processed": self.processed,
            "failed_attempts": self.failed_attempts,
            "dead_letters": self.dead_letters,
            "history_lost": [gap.as_dict() for gap in self.history_lost],
            "checkpoint_time": _iso(self.checkpoint_time),
            "checkpoint_age_s": self.checkpoint_age_s,
            "updated_at": _iso(self.updated_at),
        }


def _gaps(raw: Any) -> tuple[HistoryGap, ...]:
    gaps: list[HistoryGap] = []
    for item in raw if isinstance(raw, list) else ():
        if isinstance(item, Mapping):
            gaps.append(
                HistoryGap(
                    start=_when(item.get("from")),
                    end=_when(item.get("to")),
                    at=_when(item.get("at")),
                    policy=str(item.get("policy") or "unknown"),
                )
            )
    return tuple(gaps)


def _split_id(trigger_id: str) -> tuple[str, str]:
    plugin, _, name = trigger_id.partition("/")
    return plugin, name


def summarize_triggers(
    states: Sequence[Mapping[str, Any]],
    dead_letter_counts: Mapping[str, int],
    host_docs: Sequence[Mapping[str, Any]],
    server_now: datetime,
) -> list[TriggerStatus]:
    """Judge trigger state documents at ``server_now`` (pure: no I/O).

    Args:
        states: Documents of the trigger state collection.
        dead_letter_counts: ``{trigger id: dead letters}``.
        host_docs: Documents of the hosts collection (for the owners' liveness).
        server_now: The server's clock.

    Returns:
        One row per state document, plus one ``removed`` row per trigger that has dead
        letters but no state document; sorted by id.
    """
    alive = {str(d.get("_id")): host_status(d, server_now).alive for d in host_docs}
    rows: list[TriggerStatus] = []
    seen: set[str] = set()
    for doc in states:
        trigger_id = str(doc.get("_id"))
        seen.add(trigger_id)
        plugin, name = _split_id(trigger_id)
        owner = doc.get("owner")
        owner = str(owner) if owner is not None else None
        expires = _when(doc.get("lease_expires"))
        checkpoint = _when(doc.get("checkpoint_time"))
        rows.append(
            TriggerStatus(
                id=trigger_id,
                plugin=str(doc.get("plugin") or plugin),
                name=str(doc.get("name") or name),
                collection=coll if isinstance(coll := doc.get("collection"), str) else None,
                owner=owner,
                owner_alive=owner is not None and alive.get(owner, False),
                lease_valid=owner is not None and expires is not None and expires > server_now,
                lease_expires=expires,
                lease_epoch=_count(doc.get("lease_epoch")),
                status=str(doc.get("status") or "waiting"),
                error=doc.get("error") if isinstance(doc.get("error"), str) else None,
                lag_ms=_number(doc.get("lag_ms")),
                events_per_s=_number(doc.get("events_per_s")),
                processed=_count(doc.get("processed")),
                failed_attempts=_count(doc.get("failed_attempts")),
                dead_letters=dead_letter_counts.get(trigger_id, 0),
                history_lost=_gaps(doc.get("history_lost")),
                checkpoint_time=checkpoint,
                checkpoint_age_s=(
                    max((server_now - checkpoint).total_seconds(), 0.0)
                    if checkpoint is not None
                    else None
                ),
                updated_at=_when(doc.get("updated_at")),
            )
        )
    for trigger_id, count in dead_letter_counts.items():
        if trigger_id in seen or count == 0:
            continue
        plugin, name = _split_id(trigger_id)
        rows.append(
            TriggerStatus(
                id=trigger_id,
                plugin=plugin,
                name=name,
                collection=None,
                owner=None,
                owner_alive=False,
                lease_valid=False,
                lease_expires=None,
                lease_epoch=0,
                status="removed",
                error=None,
                lag_ms=None,
                events_per_s=None,
                processed=0,
                failed_attempts=0,
                dead_letters=count,
                history_lost=(),
                checkpoint_time=None,
                checkpoint_age_s=None,
                updated_at=None,
            )
        )
    rows.sort(key=lambda row: row.id)
    return rows


async def trigger_status(
    db: Any, *, collection: str = "functions", plugin: str | None = None
) -> list[TriggerStatus]:
    """Read every trigger's state, its owner's liveness and its dead letters.

    Args:
        db: The database (PyMongo async).
        collection: The functions collection; the state, dead-letter and hosts
            collections are named after it.
        plugin: Only this plugin's triggers.

    Returns:
        One :class:`TriggerStatus` per trigger, sorted by id.
    """
    query: dict[str, Any] = {} if plugin is None else {"plugin": plugin}
    states = await db[state_collection_name(collection)].find(query).to_list(None)
    pipeline: list[dict[str, Any]] = []
    if plugin is not None:
        pipeline.append({"$match": {"plugin": plugin}})
    pipeline.append({"$group": {"_id": "$trigger", "n": {"$sum": 1}}})
    cursor = await db[deadletters_collection_name(collection)].aggregate(pipeline)
    counts = {str(row["_id"]): int(row["n"]) for row in await cursor.to_list(None)}
    owners = sorted({str(s["owner"]) for s in states if s.get("owner") is not None})
    host_docs: list[Mapping[str, Any]] = []
    if owners:
        host_docs = await (
            db[hosts_collection_name(collection)].find({"_id": {"$in": owners}}).to_list(None)
        )
    server_now, _ = await _server_clock(db)
    return summarize_triggers(states, counts, host_docs, server_now)
