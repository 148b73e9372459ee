"""Wire protocol and handshake: OP_MSG sections, checksums, moreToCome, OP_QUERY, hello."""

from __future__ import annotations

import select
import struct
import time
from typing import Any

import bson
import pytest
from bson import ObjectId
from bson.timestamp import Timestamp
from pymongo import MongoClient

from host.embedded import EmbeddedMongoThread

from .support import (
    HEADER,
    OP_COMPRESSED,
    OP_MSG,
    OP_REPLY,
    address,
    command,
    is_closed,
    op_msg,
    op_query,
    raw_socket,
    read_reply,
    wait_until,
)

Doc = dict[str, Any]


def _assert_cluster_time(reply: Doc) -> None:
    cluster_time = reply["$clusterTime"]
    assert isinstance(cluster_time["clusterTime"], Timestamp)
    assert cluster_time["signature"]["hash"] == b"\x00" * 20
    assert cluster_time["signature"]["keyId"] == 0
    assert isinstance(reply["operationTime"], Timestamp)


def test_op_msg_body_section(mongo_uri: str) -> None:
    """A kind-0 OP_MSG is answered with an OP_MSG whose responseTo is the requestID."""
    with raw_socket(mongo_uri) as sock:
        sock.sendall(op_msg({"ping": 1, "$db": "admin"}, request_id=4242))
        header, reply = read_reply(sock)
    assert header[2] == 4242
    assert header[3] == OP_MSG
    assert reply["ok"] == 1.0
    _assert_cluster_time(reply)


def test_op_msg_document_sequence(mongo_uri: str, db_name: str) -> None:
    """Kind-1 sections are merged into the body under their identifier."""
    docs = [{"_id": i, "v": f"x{i}"} for i in range(3)]
    with raw_socket(mongo_uri) as sock:
        reply = command(
            sock, {"insert": "c", "$db": db_name}, sequences={"documents": docs}, request_id=7
        )
        assert reply["ok"] == 1.0
        assert reply["n"] == 3
        found = command(sock, {"find": "c", "filter": {}, "sort": {"_id": 1}, "$db": db_name}, 8)
        updated = command(
            sock,
            {"update": "c", "$db": db_name},
            sequences={"updates": [{"q": {"_id": 1}, "u": {"$set": {"v": "y"}}}]},
            request_id=9,
        )
        deleted = command(
            sock,
            {"delete": "c", "$db": db_name},
            sequences={"deletes": [{"q": {"_id": 2}, "limit": 1}]},
            request_id=10,
        )
        command(sock, {"dropDatabase": 1, "$db": db_name}, 11)
    assert found["cursor"]["firstBatch"] == docs
    assert (updated["n"], updated["nModified"]) == (1, 1)
    assert deleted["n"] == 1


def test_op_msg_valid_checksum_accepted(mongo_uri: str) -> None:
    """An OP_MSG with checksumPresent and a correct CRC-32C is executed."""
    with raw_socket(mongo_uri) as sock:
        reply = command(sock, {"ping": 1, "$db": "admin"}, checksum=True)
    assert reply["ok"] == 1.0


def test_op_msg_bad_checksum_closes_connection(mongo_uri: str) -> None:
    """A wrong CRC-32C closes the connection without a reply."""
    with raw_socket(mongo_uri) as sock:
        sock.sendall(op_msg({"ping": 1, "$db": "admin"}, checksum=True, corrupt_checksum=True))
        assert is_closed(sock)


def test_more_to_come_executes_without_reply(mongo_uri: str, db_name: str) -> None:
    """moreToCome: the command runs and no reply is sent; the next reply is the next command's."""
    with raw_socket(mongo_uri) as sock:
        sock.sendall(
            op_msg(
                {
                    "insert": "c",
                    "documents": [{"_id": 1}],
                    "writeConcern": {"w": 0},
                    "$db": db_name,
                },
                request_id=1,
                flags=2,
            )
        )
        reply = command(sock, {"find": "c", "$db": db_name}, request_id=2)
        command(sock, {"dropDatabase": 1, "$db": db_name}, request_id=3)
    assert reply["cursor"]["firstBatch"] == [{"_id": 1}]


@pytest.mark.parametrize("query_name", ["isMaster", "ismaster", "hello"])
def test_op_query_handshake_answered_with_op_reply(mongo_uri: str, query_name: str) -> None:
    """The legacy OP_QUERY handshake on admin.$cmd gets an OP_REPLY a driver accepts."""
    with raw_socket(mongo_uri) as sock:
        sock.sendall(op_query({query_name: 1, "helloOk": True}, request_id=77))
        header, reply = read_reply(sock)
        # The connection then speaks OP_MSG.
        after = command(sock, {"ping": 1, "$db": "admin"}, request_id=78)
    assert header[2] == 77
    assert header[3] == OP_REPLY
    assert reply["ok"] == 1.0
    assert reply["setName"] == "rs0"
    assert reply["helloOk"] is True
    writable = reply.get("isWritablePrimary") if query_name == "hello" else reply.get("ismaster")
    assert writable is True
    assert after["ok"] == 1.0


def test_op_query_with_query_wrapper(mongo_uri: str) -> None:
    """A ``$query`` wrapper around the handshake is unwrapped."""
    with raw_socket(mongo_uri) as sock:
        sock.sendall(op_query({"$query": {"isMaster": 1}, "$readPreference": {"mode": "primary"}}))
        _, reply = read_reply(sock)
    assert reply["ismaster"] is True


def _frames() -> dict[str, bytes]:
    body = bson.encode({"ping": 1, "$db": "admin"})
    good_payload = b"\x00\x00\x00\x00\x00" + body

    def frame(op_code: int, payload: bytes, length: int | None = None) -> bytes:
        size = HEADER.size + len(payload) if length is None else length
        return HEADER.pack(size, 1, 0, op_code) + payload

    bad_bson = bytearray(body)
    bad_bson[4] = 0x7F  # an undefined BSON element type
    return {
        "unknown opcode": frame(9999, good_payload),
        "OP_COMPRESSED": frame(OP_COMPRESSED, struct.pack("<iib", OP_MSG, len(body), 0) + body),
        "oversize length": frame(OP_MSG, good_payload, length=64_000_000),
        "negative length": frame(OP_MSG, good_payload, length=-5),
        "malformed BSON": frame(OP_MSG, b"\x00\x00\x00\x00\x00" + bytes(bad_bson)),
        "BSON size past the end": frame(
            OP_MSG, b"\x00\x00\x00\x00\x00" + struct.pack("<i", 1000) + body[4:]
        ),
        "unknown required flag": frame(OP_MSG, struct.pack("<I", 1 << 5) + good_payload[4:]),
        "unknown section kind": frame(OP_MSG, b"\x00\x00\x00\x00\x07" + body),
        "no body section": frame(OP_MSG, b"\x00\x00\x00\x00"),
        "two body sections": frame(OP_MSG, good_payload + b"\x00" + body),
        "no $db": frame(OP_MSG, b"\x00\x00\x00\x00\x00" + bson.encode({"ping": 1})),
        "OP_QUERY on a collection": op_query({"find": "x"}, namespace="db.coll"),
        "checksum flag without checksum": frame(OP_MSG, b"\x01\x00\x00\x00\x00"),
    }


@pytest.mark.parametrize("case", sorted(_frames()))
def test_bad_message_closes_only_that_connection(mongo_uri: str, case: str) -> None:
    """A message that cannot be framed or decoded closes its connection; others carry on."""
    with raw_socket(mongo_uri) as healthy, raw_socket(mongo_uri) as victim:
        assert command(healthy, {"ping": 1, "$db": "admin"})["ok"] == 1.0
        victim.sendall(_frames()[case])
        assert is_closed(victim)
        assert command(healthy, {"ping": 1, "$db": "admin"}, request_id=2)["ok"] == 1.0
    with raw_socket(mongo_uri) as fresh:
        assert command(fresh, {"ping": 1, "$db": "admin"})["ok"] == 1.0


def test_hello_reply_describes_a_primary(mongo_uri: str) -> None:
    """hello: rs0 primary, addresses equal to the dialed one, wire version 21 (MongoDB 7.0)."""
    host, port = address(mongo_uri)
    dialed = f"{host}:{port}"
    with raw_socket(mongo_uri) as sock:
        reply = command(
            sock,
            {"hello": 1, "helloOk": True, "compression": ["zlib", "snappy"], "$db": "admin"},
        )
    assert reply["ok"] == 1.0
    assert reply["isWritablePrimary"] is True
    assert reply["secondary"] is False
    assert reply["helloOk"] is True
    assert reply["setName"] == "rs0"
    assert reply["setVersion"] == 1
    assert reply["electionId"] == ObjectId("7fffffff0000000000000001")
    assert reply["hosts"] == [dialed]
    assert reply["primary"] == dialed
    assert reply["me"] == dialed
    assert isinstance(reply["topologyVersion"]["processId"], ObjectId)
    assert isinstance(reply["topologyVersion"]["counter"], bson.int64.Int64)
    assert reply["minWireVersion"] == 0
    assert reply["maxWireVersion"] == 21
    assert reply["maxBsonObjectSize"] == 16 * 1024 * 1024
    assert reply["maxMessageSizeBytes"] == 48_000_000
    assert reply["maxWriteBatchSize"] == 100_000
    assert reply["logicalSessionTimeoutMinutes"] == 30
    assert reply["readOnly"] is False
    assert isinstance(reply["connectionId"], int)
    assert "lastWrite" in reply
    assert "compression" not in reply
    _assert_cluster_time(reply)


def test_hello_without_hello_ok_does_not_echo_it(mongo_uri: str) -> None:
    """helloOk is only echoed when the client sent it."""
    with raw_socket(mongo_uri) as sock:
        reply = command(sock, {"hello": 1, "$db": "admin"})
    assert "helloOk" not in reply


def test_error_reply_carries_cluster_time(mongo_uri: str) -> None:
    """Error replies carry $clusterTime and operationTime too, with code and codeName."""
    with raw_socket(mongo_uri) as sock:
        reply = command(sock, {"noSuchCommandHere": 1, "$db": "admin"})
    assert reply["ok"] == 0.0
    assert reply["code"] == 59
    assert reply["codeName"] == "CommandNotFound"
    assert "noSuchCommandHere" in reply["errmsg"]
    _assert_cluster_time(reply)


def test_awaitable_hello_waits(mongo_uri: str) -> None:
    """A hello with our topologyVersion and maxAwaitTimeMS is not answered at once."""
    with raw_socket(mongo_uri) as sock:
        first = command(sock, {"hello": 1, "$db": "admin"})
        sock.sendall(
            op_msg(
                {
                    "hello": 1,
                    "topologyVersion": first["topologyVersion"],
                    "maxAwaitTimeMS": 1500,
                    "$db": "admin",
                },
                request_id=2,
            )
        )
        readable, _, _ = select.select([sock], [], [], 0.3)
        assert not readable, "an awaitable hello must wait before answering"
        header, reply = read_reply(sock)
    assert header[2] == 2
    assert reply["isWritablePrimary"] is True


def test_awaitable_hello_with_other_process_id_answers_at_once(mongo_uri: str) -> None:
    """A topologyVersion from another server process is answered without waiting."""
    with raw_socket(mongo_uri, timeout=5) as sock:
        reply = command(
            sock,
            {
                "hello": 1,
                "topologyVersion": {"processId": ObjectId(), "counter": bson.int64.Int64(0)},
                "maxAwaitTimeMS": 60_000,
                "$db": "admin",
            },
        )
    assert reply["ok"] == 1.0


def test_pymongo_monitor_does_not_busy_loop() -> None:
    """PyMongo's streaming monitor sends a handful of hellos, not a stream of them."""
    with EmbeddedMongoThread(port=0) as thread:
        server = thread.server
        assert server is not None
        client: MongoClient[Doc] = MongoClient(thread.uri, serverSelectionTimeoutMS=5000)
        try:
            client.admin.command("ping")

            def hellos() -> int:
                counts = server.command_counts
                return counts["hello"] + counts["isMaster"] + counts["ismaster"]

            wait_until(lambda: server.command_counts["hello"] >= 1, "the monitor's awaitable hello")
            before = hellos()
            # A measurement window, not a wait for an effect: count what arrives in it.
            time.sleep(1.0)
            assert hellos() - before <= 3
        finally:
            client.close()


def test_pymongo_discovers_the_replica_set(sync_client: MongoClient[Doc]) -> None:
    """PyMongo sees an rs0 primary at the dialed address."""
    sync_client.admin.command("ping")
    assert sync_client.primary is not None
    description = sync_client.topology_description
    assert description.topology_type_name == "ReplicaSetWithPrimary"
    server_type = description.server_descriptions()[sync_client.primary].server_type_name
    assert server_type == "RSPrimary"
