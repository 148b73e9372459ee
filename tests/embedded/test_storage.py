"""Storage: the index fast paths keep mongomock's answers, and stored documents stay immutable.

These drive ``Storage`` directly (the unit the fast paths live in) and compare every
answer with a bare mongomock collection holding the same documents, which scans.
"""

from __future__ import annotations

import threading
from typing import Any

import mongomock
import pytest
from bson import ObjectId
from bson.int64 import Int64
from hypothesis import given, settings
from hypothesis import strategies as st
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import OperationFailure

from host.embedded.oplog import Oplog
from host.embedded.server import EmbeddedMongo
from host.embedded.storage import Storage

Doc = dict[str, Any]

scalars = st.one_of(
    st.integers(-3, 3),
    st.sampled_from([1.0, 2.5, -0.0, True, False, None, Int64(2)]),
    st.sampled_from(["a", "b", "", "é"]),
    st.sampled_from([ObjectId("64b7f0000000000000000001"), ObjectId("64b7f0000000000000000002")]),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.fixed_dictionaries({"b": scalars}),
    st.lists(st.fixed_dictionaries({"b": scalars}), max_size=2),
)
documents = st.lists(
    st.fixed_dictionaries({}, optional={"a": values, "c": scalars}), min_size=0, max_size=12
)
conditions = st.one_of(
    scalars,
    st.fixed_dictionaries({"$eq": scalars}),
    st.fixed_dictionaries({"$in": st.lists(scalars, max_size=3)}),
    st.fixed_dictionaries({"$gt": st.integers(-3, 3)}),
)


def _fields(draw_path: str, cond: Any) -> Doc:
    return {draw_path: cond}


filters = st.one_of(
    st.builds(_fields, st.sampled_from(["a", "a.b", "c", "_id"]), conditions),
    st.builds(
        lambda x, y: {"$and": [x, y]},
        st.builds(_fields, st.just("a"), conditions),
        st.builds(_fields, st.just("_id"), conditions),
    ),
)


def _pair(docs: list[Doc]) -> tuple[Storage, Any]:
    storage = Storage(Oplog())
    storage.create_indexes(
        "db", "c", [{"key": {"a": 1}, "name": "a_1"}, {"key": {"a.b": 1}, "name": "ab_1"}]
    )
    bare: Any = mongomock.MongoClient()["db"]["c"]
    with_ids = [{"_id": i, **d} for i, d in enumerate(docs)]
    if with_ids:
        storage.insert("db", "c", [dict(d) for d in with_ids], ordered=True)
        bare.insert_many([dict(d) for d in with_ids])
    return storage, bare


@settings(max_examples=300, deadline=None)
@given(docs=documents, spec=filters)
def test_index_fast_path_matches_a_full_scan(docs: list[Doc], spec: Doc) -> None:
    """find, count and delete through the index give exactly what mongomock's scan gives."""
    storage, bare = _pair(docs)
    expected = list(bare.find(spec))
    assert storage.find("db", "c", spec) == expected
    storage.delete("db", "c", [{"q": spec, "limit": 0}], ordered=True)
    bare.delete_many(spec)
    assert storage.find("db", "c") == list(bare.find())


@settings(max_examples=150, deadline=None)
@given(docs=documents, spec=filters, value=values)
def test_updates_keep_the_index_true(docs: list[Doc], spec: Doc, value: Any) -> None:
    """After multi-updates of an indexed field, lookups on old and new values still agree."""
    storage, bare = _pair(docs)
    update = {"$set": {"a": value}}
    storage.update("db", "c", [{"q": spec, "u": update, "multi": True}], ordered=True)
    bare.update_many(spec, update)
    for probe in ({"a": value}, spec, {"a.b": 1}, {"a": 1}, {"a": None}):
        if isinstance(value, dict | list) and probe.get("a") is value:
            continue
        assert storage.find("db", "c", probe) == list(bare.find(probe))


def test_unique_index_is_enforced_through_the_index() -> None:
    """A unique index still refuses duplicates on insert and on update (the dirty-key rule)."""
    storage = Storage(Oplog())
    storage.create_indexes("db", "u", [{"key": {"sku": 1}, "name": "sku_1", "unique": True}])
    storage.insert("db", "u", [{"_id": i, "sku": f"s{i}"} for i in range(100)], ordered=True)
    dup = storage.insert("db", "u", [{"_id": 500, "sku": "s7"}], ordered=True)
    assert [e["code"] for e in dup.write_errors] == [11000]
    clash = storage.update(
        "db", "u", [{"q": {"_id": 3}, "u": {"$set": {"sku": "s4"}}}], ordered=True
    )
    assert [e["code"] for e in clash.write_errors] == [11000]
    assert storage.find("db", "u", {"_id": 3}) == [{"_id": 3, "sku": "s3"}]
    assert storage.find("db", "u", {"sku": "s3"}) == [{"_id": 3, "sku": "s3"}]
    moved = storage.update(
        "db", "u", [{"q": {"_id": 3}, "u": {"$set": {"sku": "new"}}}], ordered=True
    )
    assert moved.n_modified == 1
    assert storage.find("db", "u", {"sku": "s3"}) == []
    assert storage.find("db", "u", {"sku": "new"}) == [{"_id": 3, "sku": "new"}]


def test_snapshots_stay_frozen_while_writes_go_on() -> None:
    """A snapshot taken before updates and deletes never changes (copy-on-write), under load."""
    storage = Storage(Oplog())
    storage.insert(
        "db", "s", [{"_id": i, "n": 0, "sub": {"k": [i]}} for i in range(500)], ordered=True
    )
    snapshot = storage.store("db", "s").snapshot()
    frozen = [repr(d) for d in snapshot]
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            if [repr(d) for d in snapshot] != frozen:
                errors.append("a snapshot document changed")
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for round_ in range(5):
            storage.update(
                "db",
                "s",
                [{"q": {}, "u": {"$inc": {"n": 1}, "$push": {"sub.k": round_}}, "multi": True}],
                ordered=True,
            )
            storage.update("db", "s", [{"q": {"_id": 7}, "u": {"x": round_}}], ordered=True)
        storage.delete("db", "s", [{"q": {"_id": {"$lt": 100}}, "limit": 0}], ordered=True)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert [repr(d) for d in snapshot] == frozen
    assert storage.find("db", "s", {"_id": 200})[0]["n"] == 5
    assert len(storage.find("db", "s")) == 400


def test_deletes_and_updates_by_id_through_pymongo(sync_client: MongoClient[Doc]) -> None:
    """delete_many of thousands and updates by _id answer correctly through the real server."""
    coll = sync_client.t_storage.bulk
    coll.drop()
    coll.insert_many([{"_id": i, "k": i % 2} for i in range(6000)])
    for i in range(0, 6000, 600):
        assert coll.update_one({"_id": i}, {"$set": {"seen": True}}).modified_count == 1
    assert coll.count_documents({"seen": True}) == 10
    assert coll.delete_many({"k": 1}).deleted_count == 3000
    assert coll.count_documents({}) == 3000
    assert coll.find_one({"_id": 1}) is None
    assert coll.find_one({"_id": 600}) == {"_id": 600, "k": 0, "seen": True}
    coll.drop()


@pytest.mark.parametrize("images", [False, True])
def test_oplog_keeps_images_only_when_asked(images: bool) -> None:
    """An update's entry keeps its description; pre/post images only with the option."""
    oplog = Oplog()
    storage = Storage(oplog)
    options = {"changeStreamPreAndPostImages": {"enabled": True}} if images else {}
    storage.create_collection("db", "i", options)
    storage.insert("db", "i", [{"_id": 1, "big": "x" * 1000, "n": 0}], ordered=True)
    storage.update("db", "i", [{"q": {"_id": 1}, "u": {"$inc": {"n": 1}}}], ordered=True)
    storage.delete("db", "i", [{"q": {"_id": 1}, "limit": 1}], ordered=True)
    update, delete = oplog.entries()[-2:]
    assert update.description(disambiguate=False)["updatedFields"] == {"n": 1}
    assert (update.pre is not None, update.post is not None) == (images, images)
    assert (delete.pre is not None) == images


def test_oplog_is_bounded_in_bytes() -> None:
    """Thousands of writes of a 100 KB document keep the oplog under its byte bound."""
    oplog = Oplog(max_bytes=2 * 1024 * 1024)
    storage = Storage(oplog)
    storage.insert("db", "b", [{"_id": 1, "pad": "z" * 100_000, "n": 0}], ordered=True)
    for _ in range(300):
        storage.update("db", "b", [{"q": {"_id": 1}, "u": {"$inc": {"n": 1}}}], ordered=True)
        storage.insert("db", "b", [{"pad": "y" * 100_000}], ordered=True)
    assert oplog.bytes <= oplog.max_bytes
    assert oplog.trimmed_through is not None
    assert len(oplog) >= 2


@pytest.mark.anyio
async def test_server_oplog_size_is_megabytes(using_embedded: bool) -> None:
    """EmbeddedMongo(oplog_size=MB) trims by bytes: a resume point pushed out is 286."""
    if not using_embedded:
        pytest.skip("the embedded server's oplog bound")
    async with EmbeddedMongo(port=0, oplog_size=0.05) as server:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(server.uri)
        try:
            coll = client.app.c
            async with await coll.watch() as stream:
                await coll.insert_one({"_id": "first"})
                token = (await stream.next())["_id"]
            for i in range(60):
                await coll.insert_one({"_id": i, "pad": "x" * 2000})
            assert server.oplog.bytes <= 0.05 * 1024 * 1024
            with pytest.raises(OperationFailure) as info:
                async with await coll.watch(resume_after=token) as resumed:
                    await resumed.try_next()
            assert info.value.code == 286
        finally:
            await client.close()
