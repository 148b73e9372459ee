"""Garbage on the wire and nonsense commands: one connection may close, the server stays up."""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

import bson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .support import HEADER, OP_MSG, OP_QUERY, command, raw_socket, read_reply

Doc = dict[str, Any]
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _server_still_answers(uri: str) -> None:
    with raw_socket(uri) as sock:
        assert command(sock, {"ping": 1, "$db": "admin"})["ok"] == 1.0


def _reply_or_close(sock: socket.socket) -> Doc | None:
    """The reply to a complete frame, or None if the server closed the connection."""
    try:
        return read_reply(sock)[1]
    except ConnectionError:
        return None


@FUZZ
@given(st.binary(min_size=1, max_size=300))
def test_random_bytes(mongo_uri: str, data: bytes) -> None:
    """Random bytes, then end of stream: the server drops that connection and carries on."""
    with raw_socket(mongo_uri) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while True:  # drain until the server closes (it may answer a lucky frame)
            try:
                if not sock.recv(65536):
                    break
            except ConnectionResetError:
                break
    _server_still_answers(mongo_uri)


@FUZZ
@given(st.sampled_from([OP_MSG, OP_QUERY, 1, 2012, 2004, 0, -1]), st.binary(max_size=200))
def test_random_frames(mongo_uri: str, op_code: int, payload: bytes) -> None:
    """A well-framed message with a random body is answered or closes its connection."""
    with raw_socket(mongo_uri) as sock:
        sock.sendall(HEADER.pack(HEADER.size + len(payload), 7, 0, op_code) + payload)
        reply = _reply_or_close(sock)
        if reply is not None:
            assert "ok" in reply
    _server_still_answers(mongo_uri)


@FUZZ
@given(st.binary(max_size=60), st.integers(0, 3))
def test_mutated_op_msg(mongo_uri: str, noise: bytes, where: int) -> None:
    """A valid ping with bytes spliced in is answered or closes its connection."""
    body = bson.encode({"ping": 1, "$db": "admin"})
    payload = struct.pack("<I", 0) + b"\x00" + body
    cut = [0, 4, 5, len(payload)][where]
    payload = payload[:cut] + noise + payload[cut:]
    with raw_socket(mongo_uri) as sock:
        sock.sendall(HEADER.pack(HEADER.size + len(payload), 9, 0, OP_MSG) + payload)
        _reply_or_close(sock)
    _server_still_answers(mongo_uri)


COMMANDS = [
    "find", "insert", "update", "delete", "aggregate", "getMore", "killCursors", "count",
    "distinct", "findAndModify", "createIndexes", "listIndexes", "dropIndexes", "create",
    "collMod", "drop", "listCollections", "listDatabases", "hello", "isMaster", "buildInfo",
    "getParameter", "getLog", "endSessions", "renameCollection", "dbStats", "serverStatus",
]  # fmt: skip
json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-5, 200), st.text(max_size=6), st.floats(-1, 1)
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=4).filter(lambda k: "\0" not in k), inner, max_size=3),
    ),
    max_leaves=8,
)
FIELDS = [
    "filter", "documents", "updates", "deletes", "pipeline", "cursor", "batchSize", "limit",
    "skip", "sort", "projection", "query", "key", "indexes", "index", "collection", "new",
    "upsert", "remove", "update", "fields", "to", "ordered", "arrayFilters", "cursors",
]  # fmt: skip


@FUZZ
@given(
    st.sampled_from(COMMANDS),
    json_values,
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4),
)
def test_nonsense_commands_get_clean_errors(
    mongo_uri: str, name: str, target: Any, fields: Doc
) -> None:
    """Known commands with arguments of random shapes fail cleanly, never as internal errors."""
    body = {name: target, **fields, "$db": "garbage_fuzz"}
    with raw_socket(mongo_uri) as sock:
        reply = command(sock, body)
    assert reply["ok"] in (0.0, 1.0)
    if reply["ok"] == 0.0:
        assert isinstance(reply["code"], int)
        assert reply["code"] != 1, reply["errmsg"]
        assert reply["codeName"]
    assert "$clusterTime" in reply
    _server_still_answers(mongo_uri)
