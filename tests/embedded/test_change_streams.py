"""Change streams, event by event and option by option, through async PyMongo.

Event shapes follow the change-streams unified spec tests
(``source/change-streams/tests/unified/``): nested documents such as ``ns`` and
``updateDescription`` must match exactly.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import anyio
import pytest
from bson.int64 import Int64
from bson.timestamp import Timestamp
from pymongo import AsyncMongoClient
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from host.embedded import EmbeddedMongo
from tests.support import wait_until

Doc = dict[str, Any]
pytestmark = pytest.mark.anyio


async def take(stream: AsyncChangeStream[Doc], n: int) -> list[Doc]:
    """The next ``n`` events of ``stream`` (fails the test after 10 s)."""
    events = []
    with anyio.fail_after(10):
        for _ in range(n):
            events.append(await stream.next())
    return events


def core(event: Doc) -> Doc:
    """An event without its time fields and token, for exact comparisons."""
    return {k: v for k, v in event.items() if k not in ("_id", "clusterTime", "wallTime")}


def assert_envelope(event: Doc) -> None:
    """Every event has a token, an operationType, clusterTime and wallTime."""
    assert set(event["_id"]) == {"_data"}
    assert isinstance(event["_id"]["_data"], str)
    assert isinstance(event["operationType"], str)
    assert isinstance(event["clusterTime"], Timestamp)
    assert isinstance(event["wallTime"], datetime)


async def test_insert_event(db: AsyncDatabase[Doc]) -> None:
    """insert: ns, documentKey and fullDocument."""
    async with await db.c.watch() as stream:
        await db.c.insert_one({"_id": 1, "a": {"b": [1, 2]}})
        (event,) = await take(stream, 1)
    assert_envelope(event)
    assert core(event) == {
        "operationType": "insert",
        "fullDocument": {"_id": 1, "a": {"b": [1, 2]}},
        "ns": {"db": db.name, "coll": "c"},
        "documentKey": {"_id": 1},
    }


async def test_update_event_description(db: AsyncDatabase[Doc]) -> None:
    """update: a minimal diff with dotted paths, removed fields and truncated arrays."""
    await db.c.insert_one(
        {
            "_id": 1,
            "arr": [{"b": 1}, {"b": 2}],
            "sub": {"x": 1, "y": 2},
            "gone": 1,
            "shrink": [1, 2],
        }
    )
    async with await db.c.watch() as stream:
        await db.c.update_one(
            {"_id": 1},
            {
                "$set": {"arr.1.b": 5, "sub.x": 9, "new": "n"},
                "$unset": {"gone": ""},
                "$pop": {"shrink": 1},
            },
        )
        await db.c.update_one({"_id": 1}, {"$push": {"shrink": 7}})
        update, push = await take(stream, 2)
    assert_envelope(update)
    assert core(update) == {
        "operationType": "update",
        "ns": {"db": db.name, "coll": "c"},
        "documentKey": {"_id": 1},
        "updateDescription": {
            "updatedFields": {"arr.1.b": 5, "sub.x": 9, "new": "n"},
            "removedFields": ["gone"],
            "truncatedArrays": [{"field": "shrink", "newSize": 1}],
        },
    }
    assert push["updateDescription"] == {
        "updatedFields": {"shrink.1": 7},
        "removedFields": [],
        "truncatedArrays": [],
    }


async def test_replace_and_delete_events(db: AsyncDatabase[Doc]) -> None:
    """replace carries the new fullDocument; delete only the documentKey; upsert is insert."""
    await db.c.insert_one({"_id": 1, "a": 1})
    async with await db.c.watch() as stream:
        await db.c.replace_one({"_id": 1}, {"b": 2})
        await db.c.find_one_and_replace({"_id": 1}, {"c": 3})
        await db.c.update_one({"_id": 2}, {"$set": {"u": 1}}, upsert=True)
        await db.c.delete_one({"_id": 1})
        events = await take(stream, 4)
    ns = {"db": db.name, "coll": "c"}
    assert [core(e) for e in events] == [
        {
            "operationType": "replace",
            "fullDocument": {"_id": 1, "b": 2},
            "ns": ns,
            "documentKey": {"_id": 1},
        },
        {
            "operationType": "replace",
            "fullDocument": {"_id": 1, "c": 3},
            "ns": ns,
            "documentKey": {"_id": 1},
        },
        {
            "operationType": "insert",
            "fullDocument": {"_id": 2, "u": 1},
            "ns": ns,
            "documentKey": {"_id": 2},
        },
        {"operationType": "delete", "ns": ns, "documentKey": {"_id": 1}},
    ]


async def test_drop_invalidates_collection_stream(db: AsyncDatabase[Doc]) -> None:
    """Dropping the collection: a drop event, then invalidate (no ns), then the cursor closes."""
    await db.c.insert_one({})
    async with await db.c.watch() as stream:
        await db.c.drop()
        drop, invalidate = await take(stream, 2)
        assert core(drop) == {"operationType": "drop", "ns": {"db": db.name, "coll": "c"}}
        assert_envelope(invalidate)
        assert core(invalidate) == {"operationType": "invalidate"}
        assert invalidate["clusterTime"] == drop["clusterTime"]
        assert invalidate["_id"]["_data"] > drop["_id"]["_data"]
        assert not stream.alive


async def test_rename_invalidates_collection_stream(db: AsyncDatabase[Doc]) -> None:
    """Renaming the collection: a rename event with ``to``, then invalidate."""
    await db.c.insert_one({})
    async with await db.c.watch() as stream:
        await db.c.rename("d")
        rename, invalidate = await take(stream, 2)
    assert core(rename) == {
        "operationType": "rename",
        "ns": {"db": db.name, "coll": "c"},
        "to": {"db": db.name, "coll": "d"},
    }
    assert invalidate["operationType"] == "invalidate"


async def test_drop_database_on_each_kind_of_stream(
    client: AsyncMongoClient[Doc], db: AsyncDatabase[Doc]
) -> None:
    """dropDatabase: drops come first; a db stream is invalidated, a cluster stream is not."""
    await db.a.insert_one({})
    await db.b.insert_one({})
    coll_stream = await db.a.watch()
    db_stream = await db.watch()
    cluster_stream = await client.watch()
    try:
        await client.drop_database(db.name)
        await db.after.insert_one({"_id": "after"})
        drop_a, invalidate = await take(coll_stream, 2)
        assert core(drop_a) == {"operationType": "drop", "ns": {"db": db.name, "coll": "a"}}
        assert invalidate["operationType"] == "invalidate"

        db_events = await take(db_stream, 4)
        assert [core(e) for e in db_events] == [
            {"operationType": "drop", "ns": {"db": db.name, "coll": "a"}},
            {"operationType": "drop", "ns": {"db": db.name, "coll": "b"}},
            {"operationType": "dropDatabase", "ns": {"db": db.name}},
            {"operationType": "invalidate"},
        ]
        assert not db_stream.alive

        seen: list[Doc] = []
        with anyio.fail_after(10):
            while not seen or seen[-1]["operationType"] != "insert":
                event = await cluster_stream.next()
                if event["ns"]["db"] == db.name:
                    seen.append(event)
        assert [e["operationType"] for e in seen] == ["drop", "drop", "dropDatabase", "insert"]
        assert seen[-1]["documentKey"] == {"_id": "after"}
        assert cluster_stream.alive
    finally:
        await coll_stream.close()
        await db_stream.close()
        await cluster_stream.close()


async def test_tokens_and_cluster_times_increase(db: AsyncDatabase[Doc]) -> None:
    """Event tokens sort strictly in event order; clusterTime never goes backwards."""
    async with await db.c.watch() as stream:
        await db.c.insert_many([{"_id": i} for i in range(5)])
        await db.c.update_many({}, {"$set": {"x": 1}})
        await db.c.delete_many({})
        events = await take(stream, 15)
    tokens = [e["_id"]["_data"] for e in events]
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == len(tokens)
    times = [e["clusterTime"] for e in events]
    assert times == sorted(times)
    for event in events:
        assert_envelope(event)


async def test_full_document_modes(db: AsyncDatabase[Doc]) -> None:
    """fullDocument: absent by default, current doc with updateLookup, null when unavailable."""
    await db.c.insert_one({"_id": 1, "n": 0})
    default = await db.c.watch()
    lookup = await db.c.watch(full_document="updateLookup")
    when = await db.c.watch(full_document="whenAvailable")
    try:
        await db.c.update_one({"_id": 1}, {"$inc": {"n": 1}})
        await db.c.update_one({"_id": 1}, {"$inc": {"n": 1}})
        await db.c.delete_one({"_id": 1})
        assert "fullDocument" not in (await take(default, 1))[0]
        # updateLookup returns the document as it is now: deleted, so null.
        first, second = await take(lookup, 2)
        assert first["fullDocument"] is None
        assert second["fullDocument"] is None
        (no_image,) = await take(when, 1)
        assert no_image["fullDocument"] is None
    finally:
        await default.close()
        await lookup.close()
        await when.close()
    async with await db.c.watch(full_document="updateLookup") as stream:
        await db.c.insert_one({"_id": 2, "n": 0})
        await db.c.update_one({"_id": 2}, {"$set": {"n": 5}})
        _, update = await take(stream, 2)
        assert update["fullDocument"] == {"_id": 2, "n": 5}


async def test_pre_and_post_images(db: AsyncDatabase[Doc]) -> None:
    """With changeStreamPreAndPostImages, fullDocumentBeforeChange and post-images are exact."""
    await db.create_collection("c", changeStreamPreAndPostImages={"enabled": True})
    await db.c.insert_one({"_id": 1, "n": 0})
    async with await db.c.watch(
        full_document="required", full_document_before_change="required"
    ) as stream:
        await db.c.update_one({"_id": 1}, {"$inc": {"n": 1}})
        await db.c.replace_one({"_id": 1}, {"r": 1})
        await db.c.delete_one({"_id": 1})
        update, replace, delete = await take(stream, 3)
    assert update["fullDocumentBeforeChange"] == {"_id": 1, "n": 0}
    assert update["fullDocument"] == {"_id": 1, "n": 1}
    assert replace["fullDocumentBeforeChange"] == {"_id": 1, "n": 1}
    assert replace["fullDocument"] == {"_id": 1, "r": 1}
    assert delete["fullDocumentBeforeChange"] == {"_id": 1, "r": 1}


async def test_before_change_without_images(db: AsyncDatabase[Doc]) -> None:
    """Without pre-images: whenAvailable gives null, required fails the stream."""
    await db.c.insert_one({"_id": 1})
    async with await db.c.watch(full_document_before_change="whenAvailable") as stream:
        await db.c.delete_one({"_id": 1})
        (event,) = await take(stream, 1)
    assert event["fullDocumentBeforeChange"] is None
    await db.c.insert_one({"_id": 2})
    async with await db.c.watch(full_document_before_change="required") as stream:
        await db.c.delete_one({"_id": 2})
        with pytest.raises(OperationFailure), anyio.fail_after(10):
            await stream.next()


async def test_pipeline_after_change_stream(db: AsyncDatabase[Doc]) -> None:
    """$match and $project after $changeStream apply to events; _id is kept."""
    pipeline: list[Doc] = [
        {"$match": {"operationType": {"$in": ["insert", "delete"]}}},
        {"$project": {"operationType": 1, "documentKey": 1}},
    ]
    async with await db.c.watch(pipeline) as stream:
        await db.c.insert_one({"_id": 1, "big": "x"})
        await db.c.update_one({"_id": 1}, {"$set": {"big": "y"}})
        await db.c.delete_one({"_id": 1})
        insert, delete = await take(stream, 2)
    assert set(insert) == {"_id", "operationType", "documentKey"}
    assert (insert["operationType"], delete["operationType"]) == ("insert", "delete")


async def test_disallowed_stage_is_an_error(db: AsyncDatabase[Doc]) -> None:
    """Disallowed stages after $changeStream are 20, unknown ones 40324, a late one 40602."""
    with pytest.raises(OperationFailure) as disallowed:
        await db.c.watch([{"$group": {"_id": "$operationType"}}])
    assert disallowed.value.code == 20
    with pytest.raises(OperationFailure) as unknown:
        await db.c.watch([{"$unsupported": "foo"}])
    assert unknown.value.code == 40324
    with pytest.raises(OperationFailure) as info:
        await db.command(
            "aggregate", "c", pipeline=[{"$match": {}}, {"$changeStream": {}}], cursor={}
        )
    assert info.value.code == 40602


async def test_modifying_id_fails_at_get_more(db: AsyncDatabase[Doc]) -> None:
    """A pipeline that changes _id fails with 280 when an event passes through it."""
    async with await db.c.watch([{"$project": {"_id": 0}}]) as stream:
        await db.c.insert_one({"_id": 1})
        with pytest.raises(OperationFailure) as info, anyio.fail_after(10):
            await stream.next()
    assert info.value.code == 280


async def test_post_batch_resume_token_in_every_batch(db: AsyncDatabase[Doc]) -> None:
    """Every aggregate and getMore reply carries postBatchResumeToken; a cut batch ends on it."""
    await db.create_collection("c")
    opened = await db.command(
        "aggregate", "c", pipeline=[{"$changeStream": {}}], cursor={"batchSize": 2}
    )
    cursor = opened["cursor"]
    assert cursor["firstBatch"] == []
    assert cursor["id"] != 0
    assert isinstance(cursor["id"], Int64)
    assert cursor["ns"] == f"{db.name}.c"
    high_water = cursor["postBatchResumeToken"]
    empty = await db.command("getMore", cursor["id"], collection="c", maxTimeMS=50)
    assert empty["cursor"]["nextBatch"] == []
    assert empty["cursor"]["id"] == cursor["id"]
    assert empty["cursor"]["postBatchResumeToken"]["_data"] >= high_water["_data"]
    await db.c.insert_many([{"_id": i} for i in range(3)])
    cut = await db.command("getMore", cursor["id"], collection="c", batchSize=2)
    batch = cut["cursor"]["nextBatch"]
    assert [e["documentKey"] for e in batch] == [{"_id": 0}, {"_id": 1}]
    assert cut["cursor"]["postBatchResumeToken"] == batch[-1]["_id"]
    rest = await db.command("getMore", cursor["id"], collection="c")
    (last,) = rest["cursor"]["nextBatch"]
    assert rest["cursor"]["postBatchResumeToken"]["_data"] >= last["_id"]["_data"]
    await db.command("killCursors", "c", cursors=[cursor["id"]])


async def test_get_more_returns_empty_batch_after_max_time(db: AsyncDatabase[Doc]) -> None:
    """A change-stream getMore with nothing to report returns an empty batch, not an error."""
    async with await db.c.watch(max_await_time_ms=50) as stream:
        assert await stream.try_next() is None
        assert stream.alive


async def test_get_more_wakes_on_commit(db: AsyncDatabase[Doc]) -> None:
    """A watcher blocked in next() returns once an insert commits (long maxAwaitTimeMS)."""
    received: list[Doc] = []
    async with await db.c.watch(max_await_time_ms=60_000) as stream:

        async def watcher() -> None:
            received.append(await stream.next())

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watcher)
                await anyio.wait_all_tasks_blocked()
                await db.c.insert_one({"_id": "wake"})
    assert received[0]["documentKey"] == {"_id": "wake"}


async def test_resume_after_and_start_after(db: AsyncDatabase[Doc]) -> None:
    """resumeAfter/startAfter a token start strictly after it; the aggregate returns events."""
    async with await db.c.watch() as stream:
        await db.c.insert_many([{"_id": i} for i in range(4)])
        events = await take(stream, 4)
    token = events[1]["_id"]
    for option in ("resume_after", "start_after"):
        async with await db.c.watch(**{option: token}) as resumed:
            assert [e["documentKey"]["_id"] for e in await take(resumed, 2)] == [2, 3]
    reply = await db.command(
        "aggregate", "c", pipeline=[{"$changeStream": {"resumeAfter": token}}], cursor={}
    )
    assert [e["documentKey"]["_id"] for e in reply["cursor"]["firstBatch"]] == [2, 3]
    await db.command("killCursors", "c", cursors=[reply["cursor"]["id"]])


async def test_start_at_operation_time(db: AsyncDatabase[Doc]) -> None:
    """startAtOperationTime is inclusive; from a ping's operationTime it sees later writes."""
    async with db.client.start_session() as session:
        await db.c.insert_one({"_id": "before"}, session=session)
        ping = await db.command("ping", session=session)
    start = ping["operationTime"]
    await db.c.insert_one({"_id": "later"})
    async with await db.c.watch(start_at_operation_time=start) as stream:
        (first,) = await take(stream, 1)
        if first["documentKey"] == {"_id": "before"}:
            # Inclusive: the ping reported the time of the last write, which was ours.
            assert first["clusterTime"] == start
            (event,) = await take(stream, 1)
        else:
            event = first
    assert event["documentKey"] == {"_id": "later"}
    assert event["clusterTime"] > start
    async with await db.c.watch(start_at_operation_time=event["clusterTime"]) as stream:
        (again,) = await take(stream, 1)
    assert again["_id"] == event["_id"]


async def test_start_after_invalidate_sees_recreated_collection(db: AsyncDatabase[Doc]) -> None:
    """startAfter an invalidate token opens a new stream; resumeAfter it is 260."""
    await db.c.insert_one({"_id": 0})
    async with await db.c.watch() as stream:
        await db.c.drop()
        _, invalidate = await take(stream, 2)
    await db.c.insert_one({"_id": "reborn"})
    async with await db.c.watch(start_after=invalidate["_id"]) as reopened:
        (event,) = await take(reopened, 1)
    assert event["operationType"] == "insert"
    assert event["documentKey"] == {"_id": "reborn"}
    with pytest.raises(OperationFailure) as info:
        await db.c.watch(resume_after=invalidate["_id"])
    assert info.value.code == 260


async def test_conflicting_resume_options(db: AsyncDatabase[Doc]) -> None:
    """resumeAfter with startAfter is 50865; a token with startAtOperationTime is 40674."""
    async with await db.c.watch() as stream:
        await db.c.insert_one({})
        (event,) = await take(stream, 1)
    token = event["_id"]
    with pytest.raises(OperationFailure) as both:
        await db.command(
            "aggregate",
            "c",
            pipeline=[{"$changeStream": {"resumeAfter": token, "startAfter": token}}],
            cursor={},
        )
    assert both.value.code == 50865
    with pytest.raises(OperationFailure) as mixed:
        await db.command(
            "aggregate",
            "c",
            pipeline=[
                {"$changeStream": {"resumeAfter": token, "startAtOperationTime": Timestamp(1, 1)}}
            ],
            cursor={},
        )
    assert mixed.value.code == 40674


async def test_database_stream(db: AsyncDatabase[Doc], client: AsyncMongoClient[Doc]) -> None:
    """A database stream sees every collection of that database only."""
    other = client[db.name + "_other"]
    try:
        async with await db.watch() as stream:
            await other.c.insert_one({"_id": "elsewhere"})
            await db.a.insert_one({"_id": "a"})
            await db.b.insert_one({"_id": "b"})
            events = await take(stream, 2)
    finally:
        await client.drop_database(other.name)
    assert [(e["ns"], e["documentKey"]) for e in events] == [
        ({"db": db.name, "coll": "a"}, {"_id": "a"}),
        ({"db": db.name, "coll": "b"}, {"_id": "b"}),
    ]


async def test_cluster_stream_excludes_internal_databases(
    client: AsyncMongoClient[Doc], db: AsyncDatabase[Doc]
) -> None:
    """A cluster stream sees user databases, never admin/config/local."""
    async with await client.watch() as stream:
        await client.admin.embedded_test.insert_one({"_id": "hidden"})
        await db.c.insert_one({"_id": "shown"})
        (event,) = await take(stream, 1)
    await client.admin.embedded_test.drop()
    assert event["ns"] == {"db": db.name, "coll": "c"}
    assert event["documentKey"] == {"_id": "shown"}


async def test_expanded_events_only_when_asked(db: AsyncDatabase[Doc]) -> None:
    """create/createIndexes appear only with showExpandedEvents."""
    async with await db.watch(show_expanded_events=True) as expanded, await db.watch() as plain:
        await db.create_collection("c")
        await db.c.create_index("x")
        await db.c.insert_one({"_id": 1})
        kinds = [e["operationType"] for e in await take(expanded, 3)]
        assert kinds == ["create", "createIndexes", "insert"]
        assert [e["operationType"] for e in await take(plain, 1)] == ["insert"]


async def test_history_lost_when_oplog_trimmed() -> None:
    """Resuming from a token older than the retained oplog is 286, non-resumable."""
    async with EmbeddedMongo(port=0, oplog_max_entries=10) as server:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(server.uri, serverSelectionTimeoutMS=5000)
        try:
            coll = client.t.c
            async with await coll.watch() as stream:
                await coll.insert_one({"_id": 0})
                (first,) = await take(stream, 1)
            await coll.insert_many([{"_id": i} for i in range(1, 40)])
            with pytest.raises(OperationFailure) as info:
                await coll.watch(resume_after=first["_id"])
            assert info.value.code == 286
            assert info.value.has_error_label("NonResumableChangeStreamError")
        finally:
            await client.close()


async def test_disambiguated_paths_only_with_expanded_events(db: AsyncDatabase[Doc]) -> None:
    """disambiguatedPaths: absent by default; with showExpandedEvents, indexes are integers."""
    await db.c.insert_many([{"_id": 1, "a": {"1": 1}}, {"_id": 2, "a": [{"1": 1}]}])
    async with await db.c.watch() as plain:
        await db.c.update_one({"_id": 1}, {"$set": {"a.1": 2}})
        (event,) = await take(plain, 1)
    assert "disambiguatedPaths" not in event["updateDescription"]
    async with await db.c.watch(show_expanded_events=True) as expanded:
        await db.c.update_one({"_id": 1}, {"$set": {"a.1": 3}})
        await db.c.update_one({"_id": 2}, {"$set": {"a.0.1": 2}})
        first, second = await take(expanded, 2)
    assert first["updateDescription"]["disambiguatedPaths"] == {"a.1": ["a", "1"]}
    assert second["updateDescription"]["disambiguatedPaths"] == {"a.0.1": ["a", 0, "1"]}
    assert first["collectionUUID"] == second["collectionUUID"]


async def test_rename_with_drop_target_expanded(db: AsyncDatabase[Doc]) -> None:
    """rename onto an existing collection: operationDescription names to and dropTarget."""
    await db.foo.insert_one({})
    await db.c.insert_one({})
    async with (
        await db.c.watch(show_expanded_events=True) as stream,
        await db.foo.watch() as target,
    ):
        await db.c.rename("foo", dropTarget=True)
        rename, invalidate = await take(stream, 2)
        target_events = await take(target, 2)
    assert rename["to"] == {"db": db.name, "coll": "foo"}
    assert rename["operationDescription"]["to"] == {"db": db.name, "coll": "foo"}
    assert "dropTarget" in rename["operationDescription"]
    assert invalidate["operationType"] == "invalidate"
    assert [e["operationType"] for e in target_events] == ["rename", "invalidate"]


async def test_get_mores_issued_late_never_wait_for_the_await_timeout(
    db: AsyncDatabase[Doc],
) -> None:
    """Events written before, during and between late getMores all arrive without a timeout.

    The await time is 60 s and the whole exchange must finish within 10 s, so an event
    that reached the consumer only when a getMore timed out fails the test. Writes land
    in every position relative to the getMores: while one waits, before one is issued
    (the consumer is busy), after a write on another namespace (a wake-up with nothing
    to report), and in bursts that one getMore returns together.
    """
    written: list[int] = []
    seen: list[int] = []
    async with await db.c.watch(max_await_time_ms=60_000) as stream:

        async def consumer() -> None:
            while True:
                event = await stream.try_next()
                if event is not None:
                    seen.append(event["fullDocument"]["n"])
                    if len(seen) % 3 == 0:
                        await anyio.sleep(0.002)  # busy: the next getMore is issued late

        async def write(n: int) -> None:
            written.append(n)
            await db.c.insert_one({"_id": n, "n": n})

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consumer)
                for n in range(40):
                    if n % 4 == 0:
                        await anyio.wait_all_tasks_blocked()  # a getMore is waiting
                    elif n % 4 == 1:
                        await db.other.insert_one({"n": n})  # wakes it with nothing to say
                    await write(n)
                    if n % 4 == 3:
                        await write(1000 + n)  # a burst
                await wait_until(lambda: len(seen) >= len(written), "every event arrived")
                tg.cancel_scope.cancel()
    assert seen == written


async def test_a_write_arriving_with_the_get_more_wakes_it(own_db: AsyncDatabase[Doc]) -> None:
    """A write the server reads in the same loop turn as a getMore still wakes that getMore.

    Issue 19's missed-wakeup shape: the getMore finds nothing, the write is appended before
    the getMore starts waiting, and the event then waits for the await timeout (60 s here;
    the test allows 10 s for all of them). The server runs on this test's loop, so the
    getMore and the insert, sent in the same turn, are read by the server in the same turn,
    in both orders; a yield anywhere between the getMore's check and its wait (in
    ``_await_data`` or ``Oplog.wait``) fails this test, as it fails
    ``tests/test_watcher.py``'s busy-host test.
    """
    coll = own_db.c
    async with await coll.watch(max_await_time_ms=60_000) as stream:
        await coll.insert_one({"_id": -1, "n": -1})
        seen = [(await stream.next())["fullDocument"]["n"]]  # the cursor is open and warm
        with anyio.fail_after(10):
            for n in range(30):

                async def write(n: int = n) -> None:
                    await coll.insert_one({"_id": n, "n": n})

                async def read() -> None:
                    event = await stream.try_next()
                    assert event is not None, "a getMore with 60 s to wait came back empty"
                    seen.append(event["fullDocument"]["n"])

                first, second = (read, write) if n % 2 == 0 else (write, read)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(first)
                    tg.start_soon(second)
    assert seen == list(range(-1, 30))


async def test_read_concern_other_than_majority_is_refused(db: AsyncDatabase[Doc]) -> None:
    """$changeStream with readConcern local is 72 InvalidOptions; majority is accepted."""
    from pymongo.read_concern import ReadConcern

    with pytest.raises(OperationFailure) as info:
        await db.c.with_options(read_concern=ReadConcern("local")).watch()
    assert info.value.code == 72
    assert "readConcern other than 'majority'" in str(info.value)
    async with await db.c.with_options(read_concern=ReadConcern("majority")).watch():
        pass


async def test_split_large_event_into_fragments(db: AsyncDatabase[Doc]) -> None:
    """$changeStreamSplitLargeEvent cuts a 20 MiB event into 2 fragments; a token resumes."""
    coll = await db.create_collection("big", changeStreamPreAndPostImages={"enabled": True})
    await coll.insert_one({"_id": 1, "v": "q" * 10 * 1024 * 1024})
    pipeline: list[Doc] = [{"$changeStreamSplitLargeEvent": {}}]
    async with await coll.watch(pipeline, full_document_before_change="required") as stream:
        await coll.update_one({"_id": 1}, {"$set": {"v": "z" * 10 * 1024 * 1024}})
        first, second = await take(stream, 2)
    assert first["splitEvent"] == {"fragment": 1, "of": 2}
    assert second["splitEvent"] == {"fragment": 2, "of": 2}
    assert first["operationType"] == "update"
    assert first["updateDescription"]["updatedFields"]["v"][:1] == "z"
    assert second["fullDocumentBeforeChange"]["v"][:1] == "q"
    assert first["_id"] != second["_id"]
    async with await coll.watch(
        pipeline, full_document_before_change="required", resume_after=first["_id"]
    ) as resumed:
        (again,) = await take(resumed, 1)
    assert again["splitEvent"] == {"fragment": 2, "of": 2}


async def test_project_dotted_computed_field_nests(db: AsyncDatabase[Doc]) -> None:
    """$project of "ns.viewOn" creates ns: {viewOn}, not a literal dotted key."""
    pipeline: list[Doc] = [{"$project": {"operationType": "insert", "ns.viewOn": "db.coll"}}]
    async with await db.c.watch(pipeline) as stream:
        await db.c.insert_one({"_id": 1})
        (event,) = await take(stream, 1)
    assert event["ns"] == {"viewOn": "db.coll"}
    assert "ns.viewOn" not in event


async def test_create_view_event_with_expanded_events(db: AsyncDatabase[Doc]) -> None:
    """Creating a view is a create event under showExpandedEvents."""
    async with await db.watch(show_expanded_events=True) as stream:
        await db.create_collection("v", viewOn="src", pipeline=[])
        (event,) = await take(stream, 1)
    assert event["operationType"] == "create"
    assert event["ns"] == {"db": db.name, "coll": "v"}


async def test_pipeline_update_truncates_array(db: AsyncDatabase[Doc]) -> None:
    """A pipeline-style update that shortens an array reports truncatedArrays."""
    await db.c.insert_one({"_id": 1, "array": ["foo", {"a": "bar"}, 1, 2, 3]})
    async with await db.c.watch() as stream:
        await db.c.update_one({"_id": 1}, [{"$set": {"array": ["foo", {"a": "bar"}]}}])
        (event,) = await take(stream, 1)
    description = event["updateDescription"]
    assert description["updatedFields"] == {}
    assert description["removedFields"] == []
    assert description["truncatedArrays"] == [{"field": "array", "newSize": 2}]
