"""Commands and their reply shapes, through async PyMongo (and raw commands where needed)."""

from __future__ import annotations

import socket
import uuid
from typing import Any

import bson
import pytest
from bson import Binary, ObjectId
from bson.int64 import Int64
from bson.timestamp import Timestamp
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    BulkWriteError,
    CursorNotFound,
    DuplicateKeyError,
    OperationFailure,
    WriteConcernError,
    WriteError,
)
from pymongo.synchronous.database import Database
from pymongo.write_concern import WriteConcern

from .support import command, raw_socket

Doc = dict[str, Any]
pytestmark = pytest.mark.anyio


async def test_build_info_matches_wire_version(client: AsyncMongoClient[Doc]) -> None:
    """buildInfo's version and versionArray agree with each other and with wire version 21."""
    info = await client.admin.command("buildInfo")
    hello = await client.admin.command("hello")
    assert info["version"].split(".")[:3] == [str(p) for p in info["versionArray"][:3]]
    assert len(info["versionArray"]) == 4
    if hello["maxWireVersion"] == 21:
        assert info["versionArray"][:2] == [7, 0]
    assert info["versionArray"] >= [6, 0]


async def test_get_parameter_fcv(client: AsyncMongoClient[Doc], using_embedded: bool) -> None:
    """getParameter returns featureCompatibilityVersion (and enableTestCommands here)."""
    reply = await client.admin.command({"getParameter": 1, "featureCompatibilityVersion": 1})
    info = await client.admin.command("buildInfo")
    major_minor = ".".join(str(p) for p in info["versionArray"][:2])
    assert reply["featureCompatibilityVersion"]["version"] == major_minor
    if using_embedded:
        reply = await client.admin.command({"getParameter": 1, "enableTestCommands": 1})
        assert reply["enableTestCommands"] == 1
        opts = await client.admin.command("getCmdLineOpts")
        assert (opts["argv"], opts["parsed"]) == ([], {})


async def test_unknown_command_is_59(db: AsyncDatabase[Doc]) -> None:
    """An unknown command fails with 59 CommandNotFound naming it."""
    with pytest.raises(OperationFailure) as info:
        await db.command("frobnicateTheWidgets")
    assert info.value.code == 59
    assert "frobnicateTheWidgets" in str(info.value)
    assert info.value.details is not None
    assert info.value.details["codeName"] == "CommandNotFound"


async def test_list_databases_and_collections(db: AsyncDatabase[Doc]) -> None:
    """listDatabases and listCollections shapes; collections carry a UUID in info."""
    await db.create_collection("a")
    await db.b.insert_one({})
    reply = await db.client.admin.command("listDatabases")
    mine = [d for d in reply["databases"] if d["name"] == db.name]
    assert len(mine) == 1
    assert set(mine[0]) >= {"name", "sizeOnDisk", "empty"}
    assert mine[0]["empty"] is False
    assert "totalSize" in reply
    names = await db.client.list_database_names()
    assert db.name in names
    colls = {c["name"]: c async for c in await db.list_collections()}
    assert set(colls) == {"a", "b"}
    for spec in colls.values():
        assert spec["type"] == "collection"
        assert spec["options"] == {}
        assert spec["info"]["readOnly"] is False
        assert isinstance(spec["info"]["uuid"], uuid.UUID | Binary)
        assert spec["idIndex"]["key"] == {"_id": 1}
    assert colls["a"]["info"]["uuid"] != colls["b"]["info"]["uuid"]
    assert await db.list_collection_names(filter={"name": "a"}) == ["a"]


async def test_create_existing_is_48_and_pre_images_option(db: AsyncDatabase[Doc]) -> None:
    """create on an existing collection is 48; changeStreamPreAndPostImages is stored."""
    await db.create_collection("c", changeStreamPreAndPostImages={"enabled": True})
    with pytest.raises(OperationFailure) as info:
        await db.command("create", "c")
    assert info.value.code == 48
    (spec,) = [c async for c in await db.list_collections(filter={"name": "c"})]
    assert spec["options"]["changeStreamPreAndPostImages"] == {"enabled": True}


async def test_coll_mod_sets_pre_images(db: AsyncDatabase[Doc]) -> None:
    """collMod changes changeStreamPreAndPostImages; on a missing collection it is 26."""
    await db.create_collection("c")
    await db.command("collMod", "c", changeStreamPreAndPostImages={"enabled": True})
    (spec,) = [c async for c in await db.list_collections(filter={"name": "c"})]
    assert spec["options"]["changeStreamPreAndPostImages"] == {"enabled": True}
    with pytest.raises(OperationFailure) as info:
        await db.command("collMod", "missing", changeStreamPreAndPostImages={"enabled": True})
    assert info.value.code == 26


async def test_drop_and_drop_database(db: AsyncDatabase[Doc]) -> None:
    """drop replies {ns, nIndexesWas}; dropDatabase replies {dropped}."""
    await db.c.create_index("x")
    await db.c.insert_one({"x": 1})
    reply = await db.command("drop", "c")
    assert reply["ns"] == f"{db.name}.c"
    assert reply["nIndexesWas"] == 2
    assert await db.list_collection_names() == []
    await db.d.insert_one({})
    reply = await db.command("dropDatabase")
    assert reply["dropped"] == db.name
    assert db.name not in await db.client.list_database_names()


async def test_rename_collection(db: AsyncDatabase[Doc]) -> None:
    """renameCollection runs on admin only; the documents and indexes move; 48 on a target."""
    await db.a.insert_many([{"_id": 1, "u": 1}, {"_id": 2, "u": 2}])
    await db.a.create_index("u", unique=True)
    await db.a.rename("b")
    assert await db.list_collection_names() == ["b"]
    assert [d async for d in db.b.find().sort("_id")] == [{"_id": 1, "u": 1}, {"_id": 2, "u": 2}]
    assert "u_1" in await db.b.index_information()
    with pytest.raises(DuplicateKeyError):
        await db.b.insert_one({"u": 1})
    with pytest.raises(OperationFailure) as info:
        await db.command("renameCollection", f"{db.name}.b", to=f"{db.name}.c")
    assert info.value.code == 13
    await db.x.insert_one({})
    with pytest.raises(OperationFailure) as info:
        await db.b.rename("x")
    assert info.value.code == 48
    await db.b.rename("x", dropTarget=True)
    assert await db.x.count_documents({}) == 2


async def test_insert_update_delete(db: AsyncDatabase[Doc]) -> None:
    """insert {n}; update with operators, multi and upsert {n, nModified, upserted}; delete."""
    reply = await db.command("insert", "c", documents=[{"_id": i, "n": i} for i in range(5)])
    assert reply["n"] == 5
    reply = await db.command(
        "update",
        "c",
        updates=[
            {
                "q": {"n": {"$gte": 3}},
                "u": {"$inc": {"n": 10}, "$set": {"big": True}},
                "multi": True,
            },
            {"q": {"_id": 0}, "u": {"$unset": {"n": ""}}},
            {"q": {"_id": 99}, "u": {"$set": {"n": 99}}, "upsert": True},
            {"q": {"_id": 1}, "u": {"$set": {"n": 1}}},
        ],
    )
    assert reply["n"] == 5
    assert reply["nModified"] == 3
    assert reply["upserted"] == [{"index": 2, "_id": 99}]
    assert await db.c.find_one({"_id": 3}) == {"_id": 3, "n": 13, "big": True}
    assert await db.c.find_one({"_id": 0}) == {"_id": 0}
    result = await db.c.update_one({"_id": 1}, {"$push": {"tags": "a"}, "$min": {"n": 0}})
    assert (result.matched_count, result.modified_count) == (1, 1)
    assert await db.c.find_one({"_id": 1}) == {"_id": 1, "n": 0, "tags": ["a"]}
    upsert = await db.c.update_one({"k": "new"}, {"$set": {"v": 1}}, upsert=True)
    assert isinstance(upsert.upserted_id, ObjectId)
    assert await db.c.find_one({"_id": upsert.upserted_id}) == {
        "_id": upsert.upserted_id,
        "k": "new",
        "v": 1,
    }
    replaced = await db.c.replace_one({"_id": 2}, {"whole": "new"})
    assert replaced.modified_count == 1
    assert await db.c.find_one({"_id": 2}) == {"_id": 2, "whole": "new"}
    one = await db.c.delete_one({"_id": {"$gte": 3}})
    assert one.deleted_count == 1
    many = await db.c.delete_many({"_id": {"$gte": 3}})
    assert many.deleted_count == 2
    reply = await db.command("delete", "c", deletes=[{"q": {}, "limit": 0}])
    assert reply["n"] == 4  # _ids 0, 1, 2 and the upserted ObjectId


async def test_update_array_filters(db: AsyncDatabase[Doc]) -> None:
    """arrayFilters with $[ident], all-positional $[] and nested $[i] update the right items."""
    await db.c.insert_one(
        {
            "_id": 1,
            "grades": [80, 95, 100, 70],
            "items": [{"q": 1, "tags": [1, 5]}, {"q": 7, "tags": [6, 2]}],
        }
    )
    await db.c.update_one(
        {"_id": 1}, {"$set": {"grades.$[g]": 0}}, array_filters=[{"g": {"$gte": 95}}]
    )
    await db.c.update_one({"_id": 1}, {"$inc": {"items.$[].q": 1}})
    await db.c.update_one(
        {"_id": 1},
        {"$set": {"items.$[it].tags.$[t]": -1}},
        array_filters=[{"it.q": {"$gt": 5}}, {"t": {"$gt": 4}}],
    )
    assert await db.c.find_one({"_id": 1}) == {
        "_id": 1,
        "grades": [80, 0, 0, 70],
        "items": [{"q": 2, "tags": [1, 5]}, {"q": 8, "tags": [-1, 2]}],
    }
    with pytest.raises(OperationFailure):
        await db.c.update_one({"_id": 1}, {"$set": {"grades.$[nope]": 1}})


async def test_find_options_and_get_more(db: AsyncDatabase[Doc]) -> None:
    """find honours filter, projection, sort, skip and limit; batchSize pages through getMore."""
    await db.c.insert_many([{"_id": i, "n": i % 7, "x": "y" * 10} for i in range(250)])
    got = [
        d
        async for d in db.c.find({"n": {"$in": [1, 2]}}, {"x": 0})
        .sort([("n", DESCENDING), ("_id", ASCENDING)])
        .skip(3)
        .limit(20)
    ]
    expected = sorted(
        ({"_id": i, "n": i % 7} for i in range(250) if i % 7 in (1, 2)),
        key=lambda d: (-d["n"], d["_id"]),
    )[3:23]
    assert got == expected
    ids = [d["_id"] async for d in db.c.find({}, {"_id": 1}).sort("_id").batch_size(7)]
    assert ids == list(range(250))
    reply = await db.command("find", "c", batchSize=10, sort={"_id": 1})
    cursor = reply["cursor"]
    assert cursor["ns"] == f"{db.name}.c"
    assert len(cursor["firstBatch"]) == 10
    assert isinstance(cursor["id"], Int64)
    assert cursor["id"] != 0
    seen = [d["_id"] for d in cursor["firstBatch"]]
    cursor_id = cursor["id"]
    while cursor_id:
        more = await db.command("getMore", cursor_id, collection="c", batchSize=60)
        seen += [d["_id"] for d in more["cursor"]["nextBatch"]]
        cursor_id = more["cursor"]["id"]
    assert seen == list(range(250))
    default = await db.command("find", "c")
    assert len(default["cursor"]["firstBatch"]) == 101


async def test_kill_cursors_and_unknown_cursor(db: AsyncDatabase[Doc]) -> None:
    """killCursors reply shape; getMore on a killed cursor is 43 CursorNotFound."""
    await db.c.insert_many([{"_id": i} for i in range(10)])
    reply = await db.command("find", "c", batchSize=2)
    cursor_id = reply["cursor"]["id"]
    killed = await db.command("killCursors", "c", cursors=[cursor_id, Int64(12345)])
    assert killed["cursorsKilled"] == [cursor_id]
    assert killed["cursorsNotFound"] == [12345]
    assert killed["cursorsAlive"] == []
    assert killed["cursorsUnknown"] == []
    with pytest.raises(CursorNotFound) as info:
        await db.command("getMore", cursor_id, collection="c")
    assert info.value.code == 43


async def test_aggregate(db: AsyncDatabase[Doc]) -> None:
    """aggregate with $match/$group/$sort/$project; countDocuments; no cursor option is 9."""
    await db.c.insert_many([{"k": i % 3, "v": i} for i in range(30)])
    rows = [
        r
        async for r in await db.c.aggregate(
            [
                {"$match": {"v": {"$lt": 20}}},
                {"$group": {"_id": "$k", "total": {"$sum": "$v"}, "n": {"$sum": 1}}},
                {"$sort": {"_id": -1}},
                {"$project": {"total": 1, "avg": {"$divide": ["$total", "$n"]}}},
            ]
        )
    ]
    expected = []
    for k in (2, 1, 0):
        vals = [v for v in range(20) if v % 3 == k]
        expected.append({"_id": k, "total": sum(vals), "avg": sum(vals) / len(vals)})
    assert rows == expected
    assert await db.c.count_documents({"k": 1}) == 10
    assert await db.c.count_documents({"k": 1}, skip=2, limit=5) == 5
    with pytest.raises(OperationFailure) as info:
        await db.command("aggregate", "c", pipeline=[])
    assert info.value.code == 9


async def test_count_and_distinct(db: AsyncDatabase[Doc]) -> None:
    """count {n} backs estimated_document_count; distinct {values}."""
    assert await db.c.estimated_document_count() == 0
    await db.c.insert_many([{"t": t} for t in ["a", "b", "a", "c", "b"]])
    assert await db.c.estimated_document_count() == 5
    reply = await db.command("count", "c", query={"t": "a"})
    assert reply["n"] == 2
    assert sorted(await db.c.distinct("t")) == ["a", "b", "c"]
    assert sorted(await db.c.distinct("t", {"t": {"$ne": "a"}})) == ["b", "c"]
    assert await db.missing.distinct("t") == []


async def test_find_and_modify(db: AsyncDatabase[Doc]) -> None:
    """findAndModify: update/replace/delete, new vs old, upsert, projection and sort."""
    await db.c.insert_many([{"_id": i, "n": i} for i in range(3)])
    old = await db.c.find_one_and_update({"n": {"$gte": 1}}, {"$inc": {"n": 10}}, sort=[("n", -1)])
    assert old == {"_id": 2, "n": 2}
    new = await db.c.find_one_and_update(
        {"_id": 1}, {"$inc": {"n": 5}}, return_document=ReturnDocument.AFTER, projection={"_id": 0}
    )
    assert new == {"n": 6}
    replaced = await db.c.find_one_and_replace(
        {"_id": 0}, {"r": True}, return_document=ReturnDocument.AFTER
    )
    assert replaced == {"_id": 0, "r": True}
    assert await db.c.find_one_and_update({"_id": 42}, {"$set": {"n": 1}}) is None
    upserted = await db.c.find_one_and_update(
        {"_id": 42}, {"$set": {"n": 1}}, upsert=True, return_document=ReturnDocument.AFTER
    )
    assert upserted == {"_id": 42, "n": 1}
    deleted = await db.c.find_one_and_delete({"_id": 42})
    assert deleted == {"_id": 42, "n": 1}
    assert await db.c.find_one_and_delete({"_id": 42}) is None
    raw = await db.command(
        "findAndModify", "c", query={"_id": 7}, update={"$set": {"a": 1}}, upsert=True
    )
    assert raw["lastErrorObject"] == {"n": 1, "updatedExisting": False, "upserted": 7}
    assert raw["value"] is None
    raw = await db.command("findAndModify", "c", query={"_id": 7}, update={"$set": {"a": 2}})
    assert raw["lastErrorObject"] == {"n": 1, "updatedExisting": True}
    assert raw["value"] == {"_id": 7, "a": 1}


async def test_indexes(db: AsyncDatabase[Doc]) -> None:
    """createIndexes/listIndexes/dropIndexes shapes; listIndexes on a missing collection is 26."""
    reply = await db.command(
        "createIndexes", "c", indexes=[{"key": {"a": 1, "b": -1}, "name": "a_1_b_-1"}]
    )
    assert reply["numIndexesBefore"] == 1
    assert reply["numIndexesAfter"] == 2
    assert reply["createdCollectionAutomatically"] is True
    await db.c.create_index([("u", ASCENDING)], unique=True)
    specs = [s async for s in await db.c.list_indexes()]
    assert [(s["name"], dict(s["key"]), s["v"]) for s in specs] == [
        ("_id_", {"_id": 1}, 2),
        ("a_1_b_-1", {"a": 1, "b": -1}, 2),
        ("u_1", {"u": 1}, 2),
    ]
    assert specs[2]["unique"] is True
    reply = await db.command("dropIndexes", "c", index="a_1_b_-1")
    assert reply["nIndexesWas"] == 3
    await db.c.drop_indexes()
    assert list(await db.c.index_information()) == ["_id_"]
    with pytest.raises(OperationFailure) as info:
        await db.command("listIndexes", "missing")
    assert info.value.code == 26


async def test_unique_index_duplicate_key_details(db: AsyncDatabase[Doc]) -> None:
    """A unique violation is 11000 with keyPattern/keyValue, in writeErrors and findAndModify."""
    await db.c.create_index("email", unique=True)
    await db.c.insert_one({"_id": 1, "email": "a@x"})
    with pytest.raises(DuplicateKeyError) as dup:
        await db.c.insert_one({"_id": 2, "email": "a@x"})
    assert dup.value.code == 11000
    details = dup.value.details
    assert details is not None
    assert details["keyPattern"] == {"email": 1}
    assert details["keyValue"] == {"email": "a@x"}
    with pytest.raises(BulkWriteError) as bulk:
        await db.c.insert_many([{"_id": 3, "email": "b@x"}, {"_id": 1}, {"_id": 4}])
    errors = bulk.value.details["writeErrors"]
    assert len(errors) == 1
    assert errors[0]["index"] == 1
    assert errors[0]["code"] == 11000
    assert errors[0]["keyPattern"] == {"_id": 1}
    assert errors[0]["keyValue"] == {"_id": 1}
    assert bulk.value.details["nInserted"] == 1
    with pytest.raises(BulkWriteError) as unordered:
        await db.c.insert_many([{"_id": 3}, {"_id": 5}], ordered=False)
    assert unordered.value.details["nInserted"] == 1
    with pytest.raises(DuplicateKeyError) as fam:
        await db.c.find_one_and_update({"_id": 3}, {"$set": {"email": "a@x"}})
    assert fam.value.details is not None
    assert fam.value.details["keyPattern"] == {"email": 1}
    assert fam.value.details["keyValue"] == {"email": "a@x"}
    with pytest.raises(DuplicateKeyError) as upd:
        await db.c.update_one({"_id": 3}, {"$set": {"email": "a@x"}})
    assert upd.value.details is not None
    assert upd.value.details["keyValue"] == {"email": "a@x"}
    assert await db.c.find_one({"_id": 3}) == {"_id": 3, "email": "b@x"}


async def test_transactions_refused(client: AsyncMongoClient[Doc], db: AsyncDatabase[Doc]) -> None:
    """Starting a transaction fails with a clear error instead of running unprotected."""
    await db.c.insert_one({"_id": 0})
    async with client.start_session() as session:
        await session.start_transaction()
        with pytest.raises(OperationFailure) as info:
            await db.c.insert_one({"_id": 1}, session=session)
        assert "transaction" in str(info.value).lower()
    assert await db.c.count_documents({}) == 1


async def test_write_concern_w2_unsatisfiable(db: AsyncDatabase[Doc]) -> None:
    """w:2 on one node: the write applies and writeConcernError 100 is reported."""
    coll = db.get_collection("c", write_concern=WriteConcern(w=2))
    with pytest.raises(WriteConcernError) as info:
        await coll.insert_one({"_id": 1})
    assert info.value.code == 100
    assert await db.c.count_documents({}) == 1


def test_retryable_write_replays_outcome(mongo_uri: str, db_name: str) -> None:
    """A retried write (same lsid and txnNumber) replays its outcome instead of re-executing.

    Sent over a raw connection: drivers overwrite ``lsid`` with their own session's.
    """
    lsid = {"id": Binary.from_uuid(uuid.uuid4())}

    def run(sock: socket.socket, body: Doc) -> Doc:
        reply = command(sock, {**body, "$db": db_name})
        assert reply["ok"] == 1.0, reply
        return reply

    with raw_socket(mongo_uri) as sock:
        run(sock, {"insert": "c", "documents": [{"_id": 1, "n": 0}]})
        update = {
            "update": "c",
            "updates": [{"q": {"_id": 1}, "u": {"$inc": {"n": 1}}}],
            "lsid": lsid,
            "txnNumber": Int64(1),
        }
        first = run(sock, update)
        again = run(sock, update)
        assert (first["n"], first["nModified"]) == (1, 1)
        assert (again["n"], again["nModified"]) == (1, 1)
        after = run(sock, {"find": "c", "filter": {"_id": 1}})
        assert after["cursor"]["firstBatch"] == [{"_id": 1, "n": 1}]
        run(sock, {**update, "txnNumber": Int64(2)})
        insert = {"insert": "c", "documents": [{"_id": 2}], "lsid": lsid, "txnNumber": Int64(3)}
        assert run(sock, insert)["n"] == 1
        replay = run(sock, insert)
        assert replay["n"] == 1
        assert "writeErrors" not in replay
        fam = {
            "findAndModify": "c",
            "query": {"_id": 1},
            "update": {"$inc": {"n": 10}},
            "new": True,
            "lsid": lsid,
            "txnNumber": Int64(4),
        }
        assert run(sock, fam)["value"] == {"_id": 1, "n": 12}
        assert run(sock, fam)["value"] == {"_id": 1, "n": 12}
        after = run(sock, {"find": "c", "filter": {"_id": 1}})
        assert after["cursor"]["firstBatch"] == [{"_id": 1, "n": 12}]
        run(sock, {"dropDatabase": 1})


async def test_retryable_writes_through_pymongo(db: AsyncDatabase[Doc]) -> None:
    """PyMongo's default retryWrites sends lsid/txnNumber; writes succeed once each."""
    await db.c.insert_one({"_id": 1})
    await db.c.update_one({"_id": 1}, {"$inc": {"n": 1}})
    await db.c.find_one_and_update({"_id": 1}, {"$inc": {"n": 1}})
    assert await db.c.find_one({"_id": 1}) == {"_id": 1, "n": 2}


def test_group_output_puts_id_first(sync_db: Database[dict[str, Any]]) -> None:
    """A $group stage's output documents start with `_id`, as MongoDB returns them."""
    sync_db.g.insert_many([{"k": i % 2, "v": i} for i in range(6)])
    pipeline: list[dict[str, Any]] = [
        {"$group": {"_id": "$k", "total": {"$sum": "$v"}}},
        {"$sort": {"_id": 1}},
    ]
    out = list(sync_db.g.aggregate(pipeline))
    assert out == [{"_id": 0, "total": 6}, {"_id": 1, "total": 9}]
    assert all(next(iter(doc)) == "_id" for doc in out)


async def test_pipeline_style_updates(db: AsyncDatabase[Doc]) -> None:
    """Updates given as stages: update, upsert and findAndModify; bad stages and _id refused."""
    await db.c.insert_one({"_id": 1, "a": 1, "t": {"x": 5}})
    result = await db.c.update_one(
        {"_id": 1}, [{"$set": {"b": {"$add": ["$a", 1]}}}, {"$unset": "t"}]
    )
    assert result.modified_count == 1
    assert await db.c.find_one({"_id": 1}) == {"_id": 1, "a": 1, "b": 2}
    await db.c.update_one({"_id": 2, "a": 7}, [{"$set": {"c": "$a"}}], upsert=True)
    assert await db.c.find_one({"_id": 2}) == {"_id": 2, "a": 7, "c": 7}
    after = await db.c.find_one_and_update(
        {"_id": 1}, [{"$replaceWith": {"_id": "$_id", "n": "$b"}}], return_document=True
    )
    assert after == {"_id": 1, "n": 2}
    with pytest.raises(OperationFailure) as info:
        await db.c.update_one({"_id": 1}, [{"$group": {"_id": None}}])
    assert info.value.code == 72
    with pytest.raises(OperationFailure) as info:
        await db.c.update_one({"_id": 1}, [{"$set": {"_id": 9}}])
    assert info.value.code == 66


async def test_views_read_through_their_pipeline(db: AsyncDatabase[Doc]) -> None:
    """A view reads its source through its pipeline; writes to it are 166; it lists as a view."""
    await db.src.insert_many([{"_id": i, "x": i} for i in range(1, 5)])
    await db.create_collection("big", viewOn="src", pipeline=[{"$match": {"x": {"$gt": 1}}}])
    await db.create_collection("bigger", viewOn="big", pipeline=[{"$match": {"x": {"$gt": 2}}}])
    assert [d["_id"] async for d in db.big.find({}, sort=[("_id", -1)])] == [4, 3, 2]
    assert await db.big.estimated_document_count() == 3
    assert await db.bigger.count_documents({}) == 2
    assert [d async for d in await db.bigger.aggregate([{"$project": {"_id": 1}}])] == [
        {"_id": 3},
        {"_id": 4},
    ]
    with pytest.raises(OperationFailure) as info:
        await db.big.insert_one({"_id": 9})
    assert info.value.code == 166
    listed = {c["name"]: c async for c in await db.list_collections()}
    assert listed["big"]["type"] == "view"
    assert listed["big"]["options"] == {
        "viewOn": "src",
        "pipeline": [{"$match": {"x": {"$gt": 1}}}],
    }
    assert listed["src"]["type"] == "collection"


async def test_let_variables(db: AsyncDatabase[Doc]) -> None:
    """The let option binds $$variables in $expr filters, pipelines and update pipelines."""
    await db.c.insert_many([{"_id": 1, "x": 11}, {"_id": 2, "x": 22}])
    let = {"id": 2, "bump": 5}
    expr = {"$expr": {"$eq": ["$_id", "$$id"]}}
    assert [d async for d in db.c.find(expr, let=let)] == [{"_id": 2, "x": 22}]
    pipeline: list[Doc] = [{"$match": expr}, {"$project": {"_id": 0, "y": "$$bump"}}]
    assert [d async for d in await db.c.aggregate(pipeline, let=let)] == [{"y": 5}]
    await db.c.update_one(expr, [{"$set": {"x": {"$add": ["$x", "$$bump"]}}}], let=let)
    assert await db.c.find_one({"_id": 2}) == {"_id": 2, "x": 27}
    await db.c.delete_many(expr, let=let)
    assert [d["_id"] async for d in db.c.find()] == [1]
    # Outside $expr, "$$id" is only a string.
    assert await db.c.find_one({"x": "$$id"}, let=let) is None


async def test_distinct_values_in_bson_order(db: AsyncDatabase[Doc]) -> None:
    """distinct returns its values sorted in BSON order, as mongod."""
    await db.c.insert_many([{"x": 33}, {"x": 11}, {"x": "a"}, {"x": 22}, {"x": 11}])
    assert await db.c.distinct("x") == [11, 22, 33, "a"]


async def test_hint_min_max(db: AsyncDatabase[Doc]) -> None:
    """A hint orders by its index and must exist (2); min/max bound the hinted index."""
    await db.c.insert_many([{"num": i} for i in range(10)])
    await db.c.create_index([("num", -1)])
    first = await db.c.find({}, {"_id": 0}).hint([("num", -1)]).limit(1).to_list()
    assert first == [{"num": 9}]
    with pytest.raises(OperationFailure) as info:
        await db.c.find({}).hint([("foo", 1)]).to_list()
    assert info.value.code == 2
    assert "hint provided does not correspond to an existing index" in str(info.value)
    bounded = db.c.find({}, {"_id": 0}).hint([("num", -1)]).min([("num", 6)]).max([("num", 3)])
    assert [d["num"] for d in await bounded.to_list()] == [6, 5, 4]
    with pytest.raises(OperationFailure) as info:
        await db.command({"find": "c", "min": {"num": 2}})  # PyMongo checks this too
    assert info.value.code == 51173


async def test_explain_reads_only(db: AsyncDatabase[Doc]) -> None:
    """explain of a find reports executionStats; explain of a write is refused, not run."""
    await db.c.insert_many([{"x": i} for i in range(3)])
    plan = await db.c.find({"x": {"$gte": 1}}).explain()
    assert plan["queryPlanner"]["namespace"] == f"{db.name}.c"
    assert plan["executionStats"]["nReturned"] == 2
    with pytest.raises(OperationFailure) as info:
        await db.command({"explain": {"delete": "c", "deletes": [{"q": {}, "limit": 0}]}})
    assert info.value.code == 238
    assert await db.c.count_documents({}) == 3


async def test_write_concern_on_ddl_and_out(db: AsyncDatabase[Doc]) -> None:
    """w: 2 on one node is a writeConcernError for dropIndexes, renameCollection and $out."""
    from pymongo.errors import WriteConcernError

    await db.c.insert_one({"x": 1})
    await db.c.create_index("x")
    unsatisfiable = db.c.with_options(write_concern=WriteConcern(w=2))
    with pytest.raises(WriteConcernError):
        await unsatisfiable.drop_index("x_1")
    with pytest.raises(WriteConcernError):
        await unsatisfiable.aggregate([{"$out": "out"}])
    with pytest.raises(WriteConcernError):
        await unsatisfiable.rename("renamed")
    assert await db.renamed.count_documents({}) == 1  # applied, as on mongod


async def test_update_sort_large_document_and_snapshot(db: AsyncDatabase[Doc]) -> None:
    """7.0 refuses the update sort option (40415) and documents over 16 MiB (10334);
    snapshot reads report atClusterTime."""
    from bson.raw_bson import RawBSONDocument

    await db.c.insert_one({"_id": 1})
    with pytest.raises(OperationFailure) as info:
        await db.command(
            {"update": "c", "updates": [{"q": {}, "u": {"$set": {"a": 1}}, "sort": {"_id": 1}}]}
        )
    assert info.value.code == 40415
    big = RawBSONDocument(bson.encode({"_id": 2, "s": "x" * (16 * 1024 * 1024)}))
    with pytest.raises(OperationFailure) as info:
        await db.command({"insert": "c", "documents": [big]})
    assert info.value.code == 10334
    reply = await db.command({"find": "c", "readConcern": {"level": "snapshot"}})
    assert isinstance(reply["cursor"]["atClusterTime"], Timestamp)


async def test_validator_enforced_unless_bypassed(db: AsyncDatabase[Doc]) -> None:
    """A validator refuses invalid inserts and updates (121); bypassDocumentValidation skips it."""
    from pymongo.errors import WriteError

    coll = await db.create_collection("v", validator={"a": {"$exists": True}})
    await coll.insert_one({"_id": 1, "a": 1})
    with pytest.raises(WriteError) as info:
        await coll.insert_one({"_id": 2})
    assert info.value.code == 121
    with pytest.raises(WriteError) as info:
        await coll.update_one({"_id": 1}, {"$unset": {"a": ""}})
    assert info.value.code == 121
    assert await coll.find_one({"_id": 1}) == {"_id": 1, "a": 1}  # the update was not applied
    await coll.insert_one({"_id": 3}, bypass_document_validation=True)
    await coll.update_one({"_id": 1}, {"$unset": {"a": ""}}, bypass_document_validation=True)
    assert await coll.count_documents({"a": {"$exists": False}}) == 2
    await db.command("collMod", "v", validationAction="warn")
    await coll.insert_one({"_id": 4})  # warn: accepted
    assert await coll.count_documents({}) == 3


async def test_merge_stage(db: AsyncDatabase[Doc]) -> None:
    """$merge inserts unmatched results, merges matched ones, and fails on request (11000)."""
    await db.src.insert_many([{"_id": 1, "a": 1}, {"_id": 2, "a": 2}])
    await db.dst.insert_one({"_id": 1, "b": 9})
    await (await db.src.aggregate([{"$merge": {"into": "dst"}}])).to_list()
    assert await db.dst.find().sort("_id").to_list() == [
        {"_id": 1, "b": 9, "a": 1},
        {"_id": 2, "a": 2},
    ]
    await (
        await db.src.aggregate([{"$merge": {"into": "dst", "whenMatched": "replace"}}])
    ).to_list()
    assert await db.dst.find_one({"_id": 1}) == {"_id": 1, "a": 1}
    with pytest.raises(OperationFailure) as info:
        await db.src.aggregate([{"$merge": {"into": "dst", "whenMatched": "fail"}}])
    assert info.value.code == 11000


async def test_capped_collection_and_tailable_cursor(db: AsyncDatabase[Doc]) -> None:
    """A capped collection drops its oldest documents; a tailable cursor sees new inserts."""
    from pymongo import CursorType

    coll = await db.create_collection("cap", capped=True, size=100_000, max=3)
    await coll.insert_many([{"_id": i} for i in range(5)])
    assert [d["_id"] async for d in coll.find()] == [2, 3, 4]
    cursor = coll.find(cursor_type=CursorType.TAILABLE_AWAIT).max_await_time_ms(200)
    assert [d["_id"] for d in await cursor.to_list(3)] == [2, 3, 4]
    assert cursor.alive
    await coll.insert_one({"_id": 5})
    assert await cursor.next() == {"_id": 5}
    await db.plain.insert_one({})
    with pytest.raises(OperationFailure) as info:
        await db.plain.find(cursor_type=CursorType.TAILABLE).to_list()
    assert info.value.code == 2
    with pytest.raises(OperationFailure) as info:
        await db.create_collection("nosize", capped=True)
    assert info.value.code == 72
    await cursor.close()


async def test_unknown_query_operator_refused(db: AsyncDatabase[Doc]) -> None:
    """An unknown query operator is 2 BadValue, not an empty result."""
    await db.c.insert_one({"x": 1})
    with pytest.raises(OperationFailure) as info:
        await db.c.find({"x": {"$bad": 1}}).to_list()
    assert info.value.code == 2
    assert "unknown operator: $bad" in str(info.value)
    with pytest.raises(OperationFailure) as info:
        await db.c.count_documents({"$bogus": 1})
    assert info.value.code == 2
    found = await db.c.find({"x": {"$not": {"$gt": 5}}, "$or": [{"x": 1}]}).to_list()
    assert len(found) == 1


async def test_tailable_cursor_skip_limit_and_rollover(db: AsyncDatabase[Doc]) -> None:
    """A tailable find honours skip/limit; a cursor overtaken by the cap dies quietly (136)."""
    from pymongo import CursorType

    coll = await db.create_collection("cap2", capped=True, size=10_000, max=3)
    await coll.insert_many([{"x": i} for i in (4, 5, 6)])
    sliced = coll.find({}, {"_id": 0}, cursor_type=CursorType.TAILABLE, skip=1, limit=1)
    assert await sliced.to_list() == [{"x": 5}]
    cursor = coll.find(cursor_type=CursorType.TAILABLE)
    assert len(await cursor.to_list()) == 3
    await coll.insert_many([{"x": i} for i in range(7, 11)])  # its position is deleted
    assert await cursor.to_list() == []
    assert not cursor.alive


async def test_collations_are_refused_never_ignored(db: AsyncDatabase[Doc]) -> None:
    """A non-simple collation is refused (238) by every command that takes one, deletes too."""
    from pymongo.collation import Collation

    await db.c.insert_many([{"s": "a"}, {"s": "A"}])
    fold = Collation(locale="en", strength=2)  # would match both "a" and "A"
    attempts = [
        db.c.find({"s": "a"}, collation=fold).to_list(),
        db.c.count_documents({"s": "a"}, collation=fold),
        db.c.distinct("s", {"s": "a"}, collation=fold),
        db.c.aggregate([{"$match": {"s": "a"}}], collation=fold),
        db.c.find_one_and_delete({"s": "a"}, collation=fold),
    ]
    for attempt in attempts:
        with pytest.raises(OperationFailure) as info:
            await attempt
        assert info.value.code == 238, info.value
        assert "collation" in str(info.value)
    for write in (
        db.c.delete_many({"s": "a"}, collation=fold),
        db.c.delete_one({"s": "a"}, collation=fold),
        db.c.update_many({"s": "a"}, {"$set": {"t": 1}}, collation=fold),
    ):
        with pytest.raises(WriteError) as werr:
            await write
        assert werr.value.code == 238, werr.value
    assert sorted(d["s"] for d in await db.c.find({}, {"_id": 0}).to_list()) == ["A", "a"]
    assert await db.c.count_documents({"t": 1}) == 0
    # The simple collation is the engine's own code-point order: accepted.
    simple = Collation(locale="simple")
    assert await db.c.count_documents({"s": "a"}, collation=simple) == 1
    assert (await db.c.delete_one({"s": "a"}, collation=simple)).deleted_count == 1
