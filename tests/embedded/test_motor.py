"""Other drivers: Motor (asyncio) and synchronous PyMongo, CRUD and change-stream round trips."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from motor.motor_asyncio import AsyncIOMotorClient
from pymongo.synchronous.database import Database

Doc = dict[str, Any]

# Motor is deprecated in favour of PyMongo's async API and may say so at runtime.
motor_warnings = pytest.mark.filterwarnings("ignore::DeprecationWarning:motor.*")


@pytest.mark.anyio
@motor_warnings
async def test_motor_crud_round_trip(mongo_uri: str, db_name: str) -> None:
    """Motor inserts, finds, updates, aggregates and deletes."""
    client: Any = AsyncIOMotorClient(mongo_uri, serverSelectionTimeoutMS=5000)
    try:
        coll = client[db_name].c
        await coll.insert_many([{"_id": i, "n": i} for i in range(10)])
        assert await coll.find_one({"_id": 3}) == {"_id": 3, "n": 3}
        await coll.update_many({"n": {"$gte": 5}}, {"$set": {"big": True}})
        assert await coll.count_documents({"big": True}) == 5
        docs = await coll.find({}, {"_id": 1}).sort("_id", -1).to_list(length=None)
        assert [d["_id"] for d in docs] == list(range(9, -1, -1))
        total = await coll.aggregate([{"$group": {"_id": None, "t": {"$sum": "$n"}}}]).to_list(None)
        assert total == [{"_id": None, "t": 45}]
        assert (await coll.delete_many({"big": True})).deleted_count == 5
    finally:
        await client.drop_database(db_name)
        client.close()


@pytest.mark.anyio
@motor_warnings
async def test_motor_watch_round_trip(mongo_uri: str, db_name: str) -> None:
    """Motor's (lazy) watch sees an insert made after the stream is open."""
    client: Any = AsyncIOMotorClient(mongo_uri, serverSelectionTimeoutMS=5000)
    try:
        coll = client[db_name].c
        async with coll.watch() as stream:  # Motor sends the aggregate on entry
            await coll.insert_one({"_id": "m"})
            with anyio.fail_after(10):
                event = await stream.next()
        assert event["operationType"] == "insert"
        assert event["fullDocument"] == {"_id": "m"}
        assert event["ns"] == {"db": db_name, "coll": "c"}
    finally:
        await client.drop_database(db_name)
        client.close()


def test_sync_pymongo_crud_round_trip(sync_db: Database[Doc]) -> None:
    """Synchronous MongoClient: insert, find, update, findAndModify, delete."""
    coll = sync_db.c
    coll.insert_many([{"_id": i, "tags": []} for i in range(5)])
    coll.update_one({"_id": 1}, {"$push": {"tags": "x"}})
    assert coll.find_one({"_id": 1}) == {"_id": 1, "tags": ["x"]}
    assert coll.find_one_and_delete({"_id": 2}) == {"_id": 2, "tags": []}
    assert [d["_id"] for d in coll.find().sort("_id")] == [0, 1, 3, 4]
    assert coll.delete_many({}).deleted_count == 4


def test_sync_pymongo_watch_round_trip(sync_db: Database[Doc]) -> None:
    """Synchronous MongoClient: watch a collection and see an insert and an update."""
    coll = sync_db.c
    with coll.watch(full_document="updateLookup") as stream:
        coll.insert_one({"_id": 1})
        coll.update_one({"_id": 1}, {"$set": {"a": 1}})
        insert, update = stream.next(), stream.next()
    assert insert["documentKey"] == {"_id": 1}
    assert update["updateDescription"]["updatedFields"] == {"a": 1}
    assert update["fullDocument"] == {"_id": 1, "a": 1}
