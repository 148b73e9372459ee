"""The embedded server's TTL monitor: expired documents are deleted as MongoDB's monitor does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymongo import ASCENDING, MongoClient
from pymongo.errors import OperationFailure

from host.embedded import EmbeddedMongoThread
from host.embedded.ttl import TTLMonitor, expired
from tests.support import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.embedded_only("the embedded server's TTL monitor")]

Doc = dict[str, Any]


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def test_expired_follows_mongodb_rules() -> None:
    """Dates at or before the cutoff expire, arrays by their earliest date, non-dates never."""
    cutoff = datetime(2026, 1, 1, 12, 0, 0)
    assert expired(cutoff, cutoff)
    assert expired(cutoff - timedelta(seconds=1), cutoff)
    assert not expired(cutoff + timedelta(milliseconds=1), cutoff)
    assert expired(datetime(2026, 1, 1, 11, 0, tzinfo=UTC), cutoff)
    assert expired([cutoff + timedelta(days=1), cutoff - timedelta(days=1)], cutoff)
    assert not expired([cutoff + timedelta(days=1), "yesterday"], cutoff)
    assert not expired("2020-01-01", cutoff)
    assert not expired(None, cutoff)


def test_monitor_rejects_a_bad_period() -> None:
    """A zero, negative or infinite period is refused, naming the value."""
    with EmbeddedMongoThread(port=0, ttl_monitor_period=None) as thread:
        assert thread.server is not None
        for bad in (0.0, -1.0, float("inf")):
            with pytest.raises(ValueError, match="positive"):
                TTLMonitor(thread.server.storage, bad)


async def test_sweep_deletes_expired_documents_and_streams_see_it() -> None:
    """Expired documents are deleted (change streams get delete events); fresh ones stay."""
    with EmbeddedMongoThread(port=0, ttl_monitor_period=0.05) as thread:
        client: MongoClient[Doc] = MongoClient(thread.uri)
        try:
            coll = client.ttl.hosts
            coll.create_index([("beat", ASCENDING)], name="beat_ttl", expireAfterSeconds=30)
            spec = next(i for i in coll.list_indexes() if i["name"] == "beat_ttl")
            assert spec["expireAfterSeconds"] == 30
            now = _now()
            with coll.watch() as stream:
                coll.insert_many(
                    [
                        {"_id": "old", "beat": now - timedelta(seconds=31)},
                        {"_id": "fresh", "beat": now},
                        {"_id": "no-date", "beat": "2000-01-01"},
                        {"_id": "array", "beat": [now, now - timedelta(minutes=5)]},
                        {"_id": "missing"},
                    ]
                )
                inserts = [stream.next()["operationType"] for _ in range(5)]
                assert inserts == ["insert"] * 5
                deleted = {stream.next()["documentKey"]["_id"] for _ in range(2)}
            assert deleted == {"old", "array"}
            assert sorted(d["_id"] for d in coll.find()) == ["fresh", "missing", "no-date"]
        finally:
            client.close()


def test_compound_and_conflicting_ttl_indexes() -> None:
    """A compound index ignores expireAfterSeconds; a same-name index with another TTL is 85."""
    with EmbeddedMongoThread(port=0, ttl_monitor_period=None) as thread:
        assert thread.server is not None
        client: MongoClient[Doc] = MongoClient(thread.uri)
        try:
            coll = client.ttl.c
            coll.create_index([("a", ASCENDING), ("b", ASCENDING)], expireAfterSeconds=1)
            coll.create_index([("beat", ASCENDING)], name="t", expireAfterSeconds=10)
            with pytest.raises(OperationFailure) as conflict:
                coll.create_index([("beat", ASCENDING)], name="t", expireAfterSeconds=20)
            assert conflict.value.code == 85
            with pytest.raises(OperationFailure) as bad:
                coll.create_index([("x", ASCENDING)], expireAfterSeconds=-1)
            assert bad.value.code == 67
            coll.insert_one({"a": _now() - timedelta(days=1), "b": 1})
            monitor = TTLMonitor(thread.server.storage, 60.0, clock=lambda: _now())
            assert thread.server.storage.info("ttl", "c") is not None
            assert list(thread.server.storage.info("ttl", "c").ttl) == ["t"]  # type: ignore[union-attr]
            coll.drop_index("t")
            assert monitor.sweep() == 0
            assert coll.count_documents({}) == 1
        finally:
            client.close()


async def test_ttl_index_survives_a_restart(tmp_path: Path) -> None:
    """A TTL index kept in a data directory still expires documents after a restart."""
    with EmbeddedMongoThread(port=0, data_dir=tmp_path, ttl_monitor_period=None) as thread:
        client: MongoClient[Doc] = MongoClient(thread.uri)
        client.ttl.h.create_index([("beat", ASCENDING)], expireAfterSeconds=5)
        client.ttl.h.insert_one({"_id": 1, "beat": _now() - timedelta(seconds=10)})
        client.close()
    with EmbeddedMongoThread(port=0, data_dir=tmp_path, ttl_monitor_period=0.05) as thread:
        client = MongoClient(thread.uri)
        try:
            spec = next(i for i in client.ttl.h.list_indexes() if i["name"] == "beat_1")
            assert spec["expireAfterSeconds"] == 5
            await wait_until(
                lambda: client.ttl.h.count_documents({}) == 0, "the expired document is deleted"
            )
        finally:
            client.close()
