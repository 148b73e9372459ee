"""Regression tests, without npm, for server fixes the Node driver and mongosh needed.

Each test pins one behaviour found by ``test_node.py`` so it stays covered where Node.js
is not installed: exhaust (streaming) hello, the replica-set admin commands behind
``rs.status()``/``rs.conf()``/``rs.initiate()``, and clean replies to mongosh's start-up
commands.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import bson
import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from .support import HEADER, OP_MSG, address, command, op_msg, raw_socket, recv_exactly

Doc = dict[str, Any]

MORE_TO_COME = 1 << 1
EXHAUST_ALLOWED = 1 << 16


def _read_op_msg(sock: socket.socket) -> tuple[tuple[int, int, int, int], int, Doc]:
    """Read one OP_MSG reply: its header, its flag bits and its body."""
    header = HEADER.unpack(recv_exactly(sock, HEADER.size))
    assert header[3] == OP_MSG
    payload = recv_exactly(sock, header[0] - HEADER.size)
    (flags,) = struct.unpack_from("<I", payload)
    assert payload[4] == 0, "a reply is one kind-0 section"
    return header, flags, bson.decode(payload[5:])


def _awaitable_hello(sock: socket.socket, *, flags: int, request_id: int) -> None:
    first = command(sock, {"hello": 1, "$db": "admin"}, request_id=request_id)
    body = {
        "hello": 1,
        "topologyVersion": first["topologyVersion"],
        "maxAwaitTimeMS": 20,
        "$db": "admin",
    }
    sock.sendall(op_msg(body, request_id=request_id + 1, flags=flags))


def test_exhaust_hello_streams_replies(mongo_uri: str) -> None:
    """An awaitable hello with exhaustAllowed gets moreToCome replies chained by responseTo."""
    with raw_socket(mongo_uri) as sock:
        _awaitable_hello(sock, flags=EXHAUST_ALLOWED, request_id=10)
        header, flags, reply = _read_op_msg(sock)
        assert header[2] == 11
        assert flags & MORE_TO_COME
        assert reply["ok"] == 1.0
        previous = header[1]
        for _ in range(2):  # further replies arrive with no further request
            header, flags, reply = _read_op_msg(sock)
            assert header[2] == previous, "each exhaust reply answers the previous reply"
            assert flags & MORE_TO_COME
            assert reply["isWritablePrimary"] is True
            assert "topologyVersion" in reply
            previous = header[1]


def test_awaitable_hello_without_exhaust_is_one_reply(mongo_uri: str) -> None:
    """Without exhaustAllowed an awaitable hello gets one reply with no flags."""
    with raw_socket(mongo_uri) as sock:
        _awaitable_hello(sock, flags=0, request_id=20)
        header, flags, reply = _read_op_msg(sock)
        assert (header[2], flags, reply["ok"]) == (21, 0, 1.0)
        assert command(sock, {"ping": 1, "$db": "admin"}, request_id=22)["ok"] == 1.0


def test_exhaust_allowed_on_plain_hello_is_one_reply(mongo_uri: str) -> None:
    """exhaustAllowed on a hello without topologyVersion (an RTT probe) gets one plain reply."""
    with raw_socket(mongo_uri) as sock:
        sock.sendall(op_msg({"hello": 1, "$db": "admin"}, request_id=30, flags=EXHAUST_ALLOWED))
        header, flags, reply = _read_op_msg(sock)
        assert (header[2], flags, reply["ok"]) == (30, 0, 1.0)
        assert command(sock, {"ping": 1, "$db": "admin"}, request_id=31)["ok"] == 1.0


def test_pymongo_streaming_monitor_with_exhaust(mongo_uri: str) -> None:
    """PyMongo's streaming monitor keeps working against exhaust hello replies."""
    client: MongoClient[Doc] = MongoClient(
        mongo_uri, heartbeatFrequencyMS=500, serverSelectionTimeoutMS=5000
    )
    try:
        for _ in range(3):
            assert client.admin.command("ping")["ok"] == 1.0
        assert client.primary is not None
    finally:
        client.close()


def test_repl_set_get_status(
    sync_client: MongoClient[Doc], mongo_uri: str, using_embedded: bool
) -> None:
    """replSetGetStatus (rs.status()) reports this node as the set's healthy primary."""
    status = sync_client.admin.command("replSetGetStatus")
    assert status["ok"] == 1.0
    assert status["myState"] == 1
    me = [m for m in status["members"] if m.get("self")]
    assert len(me) == 1
    assert (me[0]["stateStr"], me[0]["health"], me[0]["state"]) == ("PRIMARY", 1.0, 1)
    if using_embedded:
        host, port = address(mongo_uri)
        assert status["set"] == "rs0"
        assert me[0]["name"] == f"{host}:{port}"
        assert status["optimes"]["appliedOpTime"]["ts"] == status["operationTime"]


def test_repl_set_get_config(
    sync_client: MongoClient[Doc], mongo_uri: str, using_embedded: bool
) -> None:
    """replSetGetConfig (rs.conf()) describes the set with this node as a member."""
    config = sync_client.admin.command("replSetGetConfig")["config"]
    assert isinstance(config["_id"], str)
    assert config["members"]
    if using_embedded:
        host, port = address(mongo_uri)
        assert config["_id"] == "rs0"
        assert [m["host"] for m in config["members"]] == [f"{host}:{port}"]


def test_repl_set_initiate_already_initialized(sync_client: MongoClient[Doc]) -> None:
    """replSetInitiate (rs.initiate()) fails cleanly: 23 AlreadyInitialized."""
    with pytest.raises(OperationFailure) as info:
        sync_client.admin.command("replSetInitiate", {})
    assert info.value.code == 23
    assert info.value.details is not None
    assert info.value.details["codeName"] == "AlreadyInitialized"


def test_repl_set_commands_admin_only(sync_client: MongoClient[Doc], db_name: str) -> None:
    """replSetGetStatus outside admin is 13 Unauthorized, with MongoDB's code name."""
    with pytest.raises(OperationFailure) as info:
        sync_client[db_name].command("replSetGetStatus")
    assert info.value.code == 13
    assert info.value.details is not None
    assert info.value.details["codeName"] == "Unauthorized"


@pytest.mark.parametrize(
    "body",
    [
        {"buildInfo": 1},
        {"getCmdLineOpts": 1},
        {"hello": 1},
        {"isMaster": 1, "helloOk": True},
        {"atlasVersion": 1},
        {"getLog": "startupWarnings"},
        {"getParameter": 1, "featureCompatibilityVersion": 1},
        {"count": "atlascli", "query": {"managedClusterType": "atlasCliDeployment"}},
        {"hostInfo": 1},
        {"connectionStatus": 1},
        {"listDatabases": 1, "nameOnly": True},
    ],
    ids=lambda body: next(iter(body)),
)
def test_mongosh_startup_command_answers_cleanly(mongo_uri: str, body: Doc) -> None:
    """Each command mongosh sends at start-up succeeds or fails with a well-formed error."""
    with raw_socket(mongo_uri) as sock:
        reply = command(sock, {**body, "$db": "admin"})
    assert reply["ok"] in (0.0, 1.0)
    if reply["ok"] == 0.0:
        assert isinstance(reply["code"], int)
        assert isinstance(reply["codeName"], str)
        assert isinstance(reply["errmsg"], str)
    assert "$clusterTime" in reply
    assert "operationTime" in reply


def test_mongosh_startup_command_shapes(mongo_uri: str, using_embedded: bool) -> None:
    """The start-up replies mongosh reads have its expected fields (FCV, atlascli, no Atlas)."""
    with raw_socket(mongo_uri) as sock:
        fcv = command(sock, {"getParameter": 1, "featureCompatibilityVersion": 1, "$db": "admin"})
        atlascli = command(sock, {"count": "atlascli", "$db": "admin"})
        log = command(sock, {"getLog": "startupWarnings", "$db": "admin"})
        atlas = command(sock, {"atlasVersion": 1, "$db": "admin"})
        opts = command(sock, {"getCmdLineOpts": 1, "$db": "admin"})
    assert isinstance(fcv["featureCompatibilityVersion"]["version"], str)
    assert atlascli["n"] == 0
    assert isinstance(log["log"], list)
    assert isinstance(opts["argv"], list)
    if using_embedded:
        assert fcv["featureCompatibilityVersion"]["version"] == "7.0"
        assert (atlas["ok"], atlas["code"], atlas["codeName"]) == (0.0, 59, "CommandNotFound")
