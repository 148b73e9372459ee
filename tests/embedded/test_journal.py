"""The journal on failure: a full disk is refused with MongoDB's error and rolled back; a torn
tail is reported and cut at recovery; compaction keeps everything."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bson
import pytest
from bson import Binary
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import OperationFailure, WriteError
from structlog.testing import capture_logs

from host.embedded import EmbeddedMongoThread
from host.embedded.journal import JOURNAL, Journal, JournalFailed
from host.embedded.server import EmbeddedMongo

from .support import command, raw_socket, remount

Doc = dict[str, Any]


@contextmanager
def served(data_dir: Path) -> Iterator[tuple[EmbeddedMongoThread, MongoClient[Doc]]]:
    """A server on ``data_dir`` (in a thread) and a client of it."""
    with EmbeddedMongoThread(port=0, data_dir=data_dir) as server:
        client: MongoClient[Doc] = MongoClient(server.uri, serverSelectionTimeoutMS=5000)
        try:
            yield server, client
        finally:
            client.close()


def _whole_records(path: Path) -> int:
    """The byte length of the whole BSON records at the start of ``path``."""
    data = path.read_bytes()
    offset = 0
    while offset + 4 <= len(data):
        size = int.from_bytes(data[offset : offset + 4], "little")
        if size < 5 or offset + size > len(data):
            break
        bson.decode(data[offset : offset + size])
        offset += size
    return offset


def test_full_disk_refuses_rolls_back_and_recovers(tiny_dir: Path) -> None:
    """On ENOSPC a write gets 14031 OutOfDiskSpace, is not kept, is never replayed as a success.

    Every acknowledged insert is readable; the failed one is not, in memory or after a
    retry with the same txnNumber; the journal holds only whole records; once there is
    room again writes succeed and a restart finds exactly the acknowledged documents.
    """
    acknowledged: list[int] = []
    failure: OperationFailure | None = None
    with served(tiny_dir) as (server, client):
        coll = client.app.items
        for i in range(2000):
            try:
                coll.insert_one({"_id": i, "pad": "p" * 8000})
            except (WriteError, OperationFailure) as exc:
                failure = exc
                break
            acknowledged.append(i)
        assert failure is not None, "the 2 MiB disk never filled up"
        assert failure.code == 14031
        assert failure.details is not None
        assert failure.details.get("codeName") == "OutOfDiskSpace"
        failed_id = len(acknowledged)
        assert coll.find_one({"_id": failed_id}) is None
        assert coll.count_documents({}) == len(acknowledged)
        journal = tiny_dir / JOURNAL
        assert _whole_records(journal) == journal.stat().st_size

        # The same retryable write (one lsid and txnNumber, on a raw connection so
        # the driver does not substitute its session) is executed again each time,
        # and refused: never a remembered outcome of a write that was not journaled.
        retry = {
            "insert": "items",
            "documents": [{"_id": "retried", "pad": "p" * 8000}],
            "lsid": {"id": Binary.from_uuid(uuid.uuid4())},
            "txnNumber": 1,
            "$db": "app",
        }
        with raw_socket(server.uri) as sock:
            for request_id in (1, 2):
                reply = command(sock, retry, request_id=request_id)
                assert (reply["ok"], reply["code"]) == (0.0, 14031)
                assert reply["codeName"] == "OutOfDiskSpace"
            assert coll.find_one({"_id": "retried"}) is None
            remount(tiny_dir, "64m")
            assert command(sock, retry, request_id=3)["n"] == 1
            assert command(sock, retry, request_id=4)["n"] == 1  # now remembered
        coll.insert_one({"_id": "after", "pad": "ok"})
    with served(tiny_dir) as (server, client):
        ids = {d["_id"] for d in client.app.items.find({}, {"_id": 1})}
    assert ids == {*acknowledged, "retried", "after"}


def test_torn_tail_is_reported_and_cut(tmp_path: Path) -> None:
    """A half-written record at the journal's end is logged, truncated and never replayed."""
    with served(tmp_path) as (_, client):
        client.app.t.insert_many([{"_id": i} for i in range(10)])
    journal = tmp_path / JOURNAL
    whole = journal.stat().st_size
    assert whole > 0
    torn = bson.encode({"ts": 1, "op": "insert", "post": {"_id": "torn"}})[:-7]
    with open(journal, "ab") as out:
        out.write(torn)
    with capture_logs() as logs, served(tmp_path) as (_, client):
        assert client.app.t.count_documents({}) == 10
        client.app.t.insert_one({"_id": "later"})
    torn_events = [e for e in logs if e["event"] == "embedded.journal_torn"]
    assert len(torn_events) == 1
    assert torn_events[0]["offset"] == whole
    assert torn_events[0]["dropped_bytes"] == len(torn)
    with capture_logs() as logs, served(tmp_path) as (_, client):
        assert client.app.t.count_documents({}) == 11
        assert client.app.t.find_one({"_id": "torn"}) is None
    assert not [e for e in logs if e["event"] == "embedded.journal_torn"]


def test_failed_append_leaves_only_whole_records(tiny_dir: Path) -> None:
    """A journal write that hits ENOSPC is cut back: the file ends on its last whole record."""
    journal = Journal(tiny_dir)
    journal.lock()
    written = 0
    try:
        failure: JournalFailed | None = None
        for i in range(10_000):
            journal.append({"i": i, "pad": "x" * 50_000})
            try:
                journal.flush()
            except JournalFailed as exc:
                failure = exc
                break
            written += 1
        assert failure is not None, "the 2 MiB disk never filled up"
        assert failure.out_of_space
        assert not failure.broken
        path = tiny_dir / JOURNAL
        assert path.stat().st_size == _whole_records(path)
        assert [r["i"] for r in bson.decode_all(path.read_bytes())] == list(range(written))
    finally:
        journal.close()


async def test_compaction_keeps_every_write(tmp_path: Path) -> None:
    """Background compactions (snapshot in a thread) lose nothing written meanwhile."""
    with capture_logs() as logs:
        async with EmbeddedMongo(port=0, data_dir=tmp_path) as server:
            server.compact_journal_bytes = 64 * 1024
            client: AsyncMongoClient[Doc] = AsyncMongoClient(server.uri)
            coll = client.app.c
            for i in range(300):
                await coll.insert_one({"_id": i, "pad": "q" * 2000})
                await coll.update_one({"_id": i}, {"$set": {"n": i}})
            await client.close()
    assert len([e for e in logs if e["event"] == "embedded.compacted"]) >= 2
    with served(tmp_path) as (_, sync):
        docs = list(sync.app.c.find({}, {"n": 1}).sort("_id", 1))
    assert docs == [{"_id": i, "n": i} for i in range(300)]


def test_replayed_rename_keeps_indexes_and_drops_the_target(tmp_path: Path) -> None:
    """A rename replayed from the journal keeps the source's indexes and drops the target."""
    with served(tmp_path) as (_, client):
        client.app.src.insert_many([{"_id": i, "k": i} for i in range(3)])
        client.app.src.create_index("k", unique=True, name="k_unique")
        client.app.dst.insert_one({"_id": "old"})
        client.admin.command(
            {"renameCollection": "app.src", "to": "app.moved", "dropTarget": False}
        )
        client.app.dst.drop()
        client.app.other.insert_one({"_id": 1})
        client.admin.command(
            {"renameCollection": "app.other", "to": "app.moved2", "dropTarget": True}
        )
        before = sorted(ix["name"] for ix in client.app.moved.list_indexes())
    assert before == ["_id_", "k_unique"]
    with served(tmp_path) as (_, client):  # recovery replays the journal
        assert sorted(client.app.list_collection_names()) == ["moved", "moved2"]
        assert sorted(ix["name"] for ix in client.app.moved.list_indexes()) == before
        assert [d["_id"] for d in client.app.moved.find().sort("_id", 1)] == [0, 1, 2]
        with pytest.raises(WriteError):  # the unique index is enforced, not just listed
            client.app.moved.insert_one({"k": 1})


pytestmark = [
    pytest.mark.anyio,
    pytest.mark.embedded_only("durability of the embedded server's data directory"),
]
