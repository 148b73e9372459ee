"""The trigger view (host/triggerview.py): owners judged on the server clock, letters counted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from bson import ObjectId
from bson.timestamp import Timestamp

from host.fleet import hosts_collection_name
from host.triggers import deadletters_collection_name, state_collection_name
from host.triggerview import summarize_triggers, trigger_status

from .support import Db, Doc

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


async def server_now(db: Db) -> datetime:
    """The server's clock, as the view reads it."""
    reply = await db.command("hello")
    local = reply["localTime"]
    assert isinstance(local, datetime)
    return local if local.tzinfo else local.replace(tzinfo=UTC)


async def beat(db: Db, host_id: str, *, age: float = 0.0, ttl: float = 15.0) -> None:
    """Write a hosts-collection heartbeat ``age`` seconds old on the server's clock."""
    now = await server_now(db)
    await db[hosts_collection_name("functions")].replace_one(
        {"_id": host_id},
        {
            "_id": host_id,
            "heartbeat": now - timedelta(seconds=age),
            "heartbeat_s": ttl / 3,
            "ttl_s": ttl,
            "plugins": [],
        },
        upsert=True,
    )


def state(trigger_id: str, **fields: object) -> Doc:
    """A trigger state document as the engine writes it."""
    plugin, _, name = trigger_id.partition("/")
    return {
        "_id": trigger_id,
        "plugin": plugin,
        "name": name,
        "collection": "sales",
        "owner": None,
        "lease_expires": None,
        "lease_epoch": 0,
        "checkpoint": None,
        "checkpoint_time": None,
        "status": "running",
        "error": None,
        "processed": 0,
        "failed_attempts": 0,
        "dead_letters": 0,
        "lag_ms": None,
        "events_per_s": None,
        "history_lost": [],
        **fields,
    }


def dead_letter(trigger_id: str) -> Doc:
    """A dead-letter document as the engine writes it."""
    return {
        "_id": ObjectId(),
        "trigger": trigger_id,
        "plugin": trigger_id.partition("/")[0],
        "event_id": {"_data": "00"},
        "event": {"operationType": "insert", "documentKey": {"_id": 1}},
        "error": "ValueError: boom",
        "traceback": [],
        "attempts": 5,
        "version": "agg@r1:00000000",
        "first_failed_at": NOW,
        "last_failed_at": NOW,
    }


async def test_owner_liveness_lease_and_dead_letters_come_from_the_server(db: Db) -> None:
    """A live owner with a valid lease is fine, a dead one's is orphaned; letters counted."""
    now = await server_now(db)
    await beat(db, "a:1")
    await beat(db, "b:1", age=60)
    await db[state_collection_name("functions")].insert_many(
        [
            state(
                "agg/sales",
                owner="a:1",
                lease_expires=now + timedelta(seconds=10),
                lease_epoch=3,
                processed=41,
                lag_ms=2.5,
                events_per_s=120.0,
                dead_letters=99,  # the view counts the collection, not this counter
                checkpoint_time=Timestamp(int(now.timestamp()) - 4, 1),
            ),
            state("agg/orders", owner="b:1", lease_expires=now - timedelta(seconds=30)),
            state("other/x", status="paused"),
        ]
    )
    await db[deadletters_collection_name("functions")].insert_many(
        [dead_letter("agg/sales"), dead_letter("agg/sales"), dead_letter("gone/old")]
    )
    rows = {row.id: row for row in await trigger_status(db)}
    assert sorted(rows) == ["agg/orders", "agg/sales", "gone/old", "other/x"]
    sales = rows["agg/sales"]
    assert (sales.owner, sales.owner_alive, sales.lease_valid, sales.orphaned) == (
        "a:1",
        True,
        True,
        False,
    )
    assert (sales.processed, sales.lag_ms, sales.events_per_s, sales.lease_epoch) == (
        41,
        2.5,
        120.0,
        3,
    )
    assert sales.dead_letters == 2
    assert sales.checkpoint_age_s is not None and 3.0 <= sales.checkpoint_age_s < 60.0
    orders = rows["agg/orders"]
    assert (orders.owner_alive, orders.lease_valid, orders.orphaned) == (False, False, True)
    assert rows["other/x"].orphaned is False  # paused: nobody is meant to run it
    gone = rows["gone/old"]
    assert (gone.status, gone.dead_letters, gone.plugin, gone.name) == ("removed", 1, "gone", "old")
    only = await trigger_status(db, plugin="agg")
    assert [row.id for row in only] == ["agg/orders", "agg/sales"]


async def test_history_lost_gaps_are_listed_with_their_length(db: Db) -> None:
    """Recorded history-lost gaps come back with from/to/policy and their length in seconds."""
    gap = {
        "from": NOW - timedelta(seconds=90),
        "to": NOW,
        "at": NOW + timedelta(seconds=1),
        "policy": "resume_from_now",
    }
    await db[state_collection_name("functions")].insert_one(
        state("agg/sales", history_lost=[gap, {"from": None, "to": NOW, "policy": "rescan"}])
    )
    (row,) = await trigger_status(db)
    assert [g.policy for g in row.history_lost] == ["resume_from_now", "rescan"]
    assert row.history_lost[0].seconds == 90.0
    assert row.history_lost[1].seconds is None
    shape = row.as_dict()
    assert shape["history_lost"][0]["from"] == (NOW - timedelta(seconds=90)).isoformat()
    assert shape["history_lost"][0]["seconds"] == 90.0


def test_an_owner_without_a_hosts_document_is_dead() -> None:
    """An owner that never reported (or whose document is gone) counts as dead."""
    (row,) = summarize_triggers(
        [state("agg/sales", owner="ghost:1", lease_expires=NOW + timedelta(seconds=5))], {}, [], NOW
    )
    assert (row.owner_alive, row.lease_valid, row.orphaned) == (False, True, True)
    assert row.as_dict()["lease_expires"] == (NOW + timedelta(seconds=5)).isoformat()


def test_malformed_state_fields_read_as_empty() -> None:
    """Wrong types in a state document degrade to None/0 rather than crash the view."""
    (row,) = summarize_triggers(
        [{"_id": "p/t", "processed": "many", "lag_ms": True, "history_lost": "no", "status": None}],
        {"p/t": 0},
        [],
        NOW,
    )
    assert (row.processed, row.lag_ms, row.history_lost, row.status) == (0, None, (), "waiting")
    assert (row.plugin, row.name) == ("p", "t")
