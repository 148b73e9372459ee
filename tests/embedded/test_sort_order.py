"""BSON comparison order in sorts and range queries (host/embedded/bsonorder.py), by PyMongo."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import pytest
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.timestamp import Timestamp
from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase

pytestmark = pytest.mark.anyio

Doc = dict[str, Any]

# (time, inc): _id 1 < 3 < 2 < 0; 2 and 0 share a time, so inc decides between them.
STAMPS = [(5, 2), (3, 9), (5, 1), (4, 0)]


async def _stamped(db: AsyncDatabase[Doc]) -> None:
    await db.stamps.insert_many(
        [{"_id": i, "ts": Timestamp(t, inc)} for i, (t, inc) in enumerate(STAMPS)]
    )


async def test_find_sorts_timestamps_by_time_then_increment(db: AsyncDatabase[Doc]) -> None:
    """find().sort on a Timestamp field orders by (time, inc), both directions, with skip/limit."""
    await _stamped(db)
    up = [d["_id"] async for d in db.stamps.find().sort("ts", ASCENDING)]
    down = [d["_id"] async for d in db.stamps.find().sort("ts", DESCENDING)]
    assert up == [1, 3, 2, 0]
    assert down == [0, 2, 3, 1]
    page = db.stamps.find({}, {"_id": 1}).sort("ts", ASCENDING).skip(1).limit(2)
    assert [d["_id"] async for d in page] == [3, 2]
    newest = await db.stamps.find_one({}, sort=[("ts", DESCENDING)])
    assert newest is not None and newest["ts"] == Timestamp(5, 2)


async def test_aggregate_sort_and_range_queries_on_timestamps(db: AsyncDatabase[Doc]) -> None:
    """$sort orders Timestamps as find does; $gt/$lte compare them by (time, inc)."""
    await _stamped(db)
    pipeline = [{"$sort": {"ts": DESCENDING}}, {"$project": {"_id": 1}}]
    assert [d["_id"] async for d in await db.stamps.aggregate(pipeline)] == [0, 2, 3, 1]
    later = db.stamps.find({"ts": {"$gt": Timestamp(4, 5)}}).sort("_id", ASCENDING)
    assert [d["_id"] async for d in later] == [0, 2]
    upto = db.stamps.find({"ts": {"$lte": Timestamp(5, 1)}}).sort("ts", ASCENDING)
    assert [d["_id"] async for d in upto] == [1, 3, 2]
    assert sorted(await db.stamps.distinct("ts")) == sorted(Timestamp(*s) for s in STAMPS)


async def test_mixed_types_sort_in_bson_comparison_order(db: AsyncDatabase[Doc]) -> None:
    """MinKey < number < bool < Date < Timestamp < regex < MaxKey, in find and $sort alike."""
    values = {
        "maxkey": MaxKey(),
        "regex": re.compile("a"),
        "timestamp": Timestamp(1, 1),
        "date": datetime(2020, 1, 1),
        "bool": True,
        "number": 3,
        "minkey": MinKey(),
    }
    await db.mixed.insert_many([{"_id": name, "v": value} for name, value in values.items()])
    expected = ["minkey", "number", "bool", "date", "timestamp", "regex", "maxkey"]
    assert [d["_id"] async for d in db.mixed.find().sort("v", ASCENDING)] == expected
    cursor = await db.mixed.aggregate([{"$sort": {"v": DESCENDING}}])
    assert [d["_id"] async for d in cursor] == expected[::-1]
