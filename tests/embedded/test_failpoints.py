"""``configureFailPoint`` / ``failCommand``: modes, filters and actions.

Failpoints are server-global, so this module runs its own server.
"""

from __future__ import annotations

import select
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient, UpdateOne
from pymongo.errors import (
    AutoReconnect,
    ExecutionTimeout,
    NotPrimaryError,
    OperationFailure,
    WriteConcernError,
)

from host.embedded import EmbeddedMongoThread

from .support import command, is_closed, op_msg, raw_socket, read_reply

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def fault_uri() -> Iterator[str]:
    """A server of this module's own, so its failpoints disturb no other test."""
    with EmbeddedMongoThread(port=0) as server:
        yield server.uri


@pytest.fixture
def admin(fault_uri: str) -> Iterator[MongoClient[Doc]]:
    """A client of the fault server; every failpoint is off again afterwards."""
    # After a 91 ShutdownInProgress (no topologyVersion, as on mongod) PyMongo marks the
    # server Unknown and finds it again with its next hello, up to maxAwaitTimeMS (10 s) away.
    client: MongoClient[Doc] = MongoClient(
        fault_uri, serverSelectionTimeoutMS=20000, appname="admin"
    )
    yield client
    for name in (
        "failCommand",
        "failGetMoreAfterCursorCheckout",
        "onPrimaryTransactionalWrite",
        "maxTimeAlwaysTimeOut",
    ):
        client.admin.command("configureFailPoint", name, mode="off")
    client.close()


def configure(client: MongoClient[Doc], mode: Any, **data: Any) -> Doc:
    """Configure failCommand."""
    return client.admin.command("configureFailPoint", "failCommand", mode=mode, data=data)


def ping_code(sock: Any, request_id: int = 1) -> int | None:
    """Ping over a raw socket; the error code, or None on success."""
    reply = command(sock, {"ping": 1, "$db": "admin"}, request_id=request_id)
    return None if reply["ok"] == 1.0 else int(reply["code"])


def test_error_code_reply_shape(admin: MongoClient[Doc], fault_uri: str) -> None:
    """errorCode: MongoDB's failpoint reply, and the command does not run."""
    reply = configure(admin, {"times": 1}, failCommands=["insert"], errorCode=2)
    assert reply["ok"] == 1.0
    assert "count" in reply
    with raw_socket(fault_uri) as sock:
        failed = command(sock, {"insert": "c", "documents": [{"_id": 1}], "$db": "fp_shape"})
        found = command(sock, {"find": "c", "$db": "fp_shape"}, request_id=2)
        command(sock, {"dropDatabase": 1, "$db": "fp_shape"}, request_id=3)
    assert failed["ok"] == 0.0
    assert failed["errmsg"] == "Failing command via 'failCommand' failpoint"
    assert failed["code"] == 2
    assert failed["codeName"] == "BadValue"
    assert "$clusterTime" in failed
    assert found["cursor"]["firstBatch"] == []


def test_mode_times(admin: MongoClient[Doc], fault_uri: str) -> None:
    """{times: 2} fails twice, then never; the off reply counts how often it fired."""
    configure(admin, {"times": 2}, failCommands=["ping"], errorCode=11)
    with raw_socket(fault_uri) as sock:
        codes = [ping_code(sock, i) for i in range(4)]
    assert codes == [11, 11, None, None]
    off = admin.admin.command("configureFailPoint", "failCommand", mode="off")
    assert off["count"] == 2


def test_mode_skip(admin: MongoClient[Doc], fault_uri: str) -> None:
    """{skip: 2} lets two commands through, then fails every one."""
    configure(admin, {"skip": 2}, failCommands=["ping"], errorCode=11)
    with raw_socket(fault_uri) as sock:
        codes = [ping_code(sock, i) for i in range(4)]
    assert codes == [None, None, 11, 11]


def test_mode_always_on_and_off(admin: MongoClient[Doc], fault_uri: str) -> None:
    """alwaysOn fails until the failpoint is turned off; a new configuration replaces the old."""
    configure(admin, "alwaysOn", failCommands=["ping"], errorCode=11)
    with raw_socket(fault_uri) as sock:
        assert [ping_code(sock, i) for i in range(3)] == [11, 11, 11]
        configure(admin, "alwaysOn", failCommands=["ping"], errorCode=12)
        assert ping_code(sock, 4) == 12
        configure(admin, "off")
        assert ping_code(sock, 5) is None


def test_never_fails_configure_fail_point(admin: MongoClient[Doc]) -> None:
    """A failpoint naming configureFailPoint does not stop it being turned off."""
    configure(admin, "alwaysOn", failCommands=["configureFailPoint"], closeConnection=True)
    configure(admin, "off")


def test_unknown_failpoint_is_an_error(admin: MongoClient[Doc]) -> None:
    """An unknown failpoint name is refused."""
    with pytest.raises(OperationFailure):
        admin.admin.command("configureFailPoint", "noSuchFailPoint", mode="alwaysOn")


def test_app_name_filter(admin: MongoClient[Doc], fault_uri: str) -> None:
    """data.appName fails only the connections whose handshake named that application."""
    configure(admin, "alwaysOn", failCommands=["find"], errorCode=11, appName="victim")
    victim: MongoClient[Doc] = MongoClient(fault_uri, appname="victim")
    bystander: MongoClient[Doc] = MongoClient(fault_uri, appname="bystander")
    try:
        with pytest.raises(OperationFailure) as info:
            victim.fp_app.c.find_one()
        assert info.value.code == 11
        assert bystander.fp_app.c.find_one() is None
    finally:
        victim.close()
        bystander.close()


def test_namespace_filter(admin: MongoClient[Doc]) -> None:
    """data.namespace fails only commands on that namespace."""
    configure(admin, "alwaysOn", failCommands=["find"], errorCode=11, namespace="fp_ns.hit")
    with pytest.raises(OperationFailure):
        admin.fp_ns.hit.find_one()
    assert admin.fp_ns.miss.find_one() is None


def test_close_connection(admin: MongoClient[Doc], fault_uri: str) -> None:
    """closeConnection drops the socket without a reply, and the command does not run."""
    configure(admin, {"times": 1}, failCommands=["insert"], closeConnection=True)
    with raw_socket(fault_uri) as sock:
        sock.sendall(op_msg({"insert": "c", "documents": [{"_id": 1}], "$db": "fp_close"}))
        assert is_closed(sock)
    assert admin.fp_close.c.find_one() is None


def test_close_connection_through_pymongo(admin: MongoClient[Doc], fault_uri: str) -> None:
    """PyMongo sees a closed connection as a network error (retryReads off)."""
    configure(admin, {"times": 1}, failCommands=["find"], closeConnection=True)
    client: MongoClient[Doc] = MongoClient(fault_uri, retryReads=False)
    try:
        with pytest.raises(AutoReconnect):
            client.fp_close2.c.find_one()
        assert client.fp_close2.c.find_one() is None
    finally:
        client.close()


def test_block_connection_stalls_only_that_reply(admin: MongoClient[Doc], fault_uri: str) -> None:
    """blockConnection holds one command's reply back; other connections are answered."""
    configure(
        admin,
        {"times": 1},
        failCommands=["ping"],
        blockConnection=True,
        blockTimeMS=1000,
        appName="blocked",
    )
    with raw_socket(fault_uri) as blocked, raw_socket(fault_uri) as other:
        hello = {"hello": 1, "client": {"application": {"name": "blocked"}}, "$db": "admin"}
        command(blocked, hello)
        blocked.sendall(op_msg({"ping": 1, "$db": "admin"}, request_id=2))
        assert ping_code(other) is None
        readable, _, _ = select.select([blocked], [], [], 0.3)
        assert not readable, "the blocked command must not be answered yet"
        header, reply = read_reply(blocked)
    assert header[2] == 2
    assert reply["ok"] == 1.0


def test_block_then_error(admin: MongoClient[Doc], fault_uri: str) -> None:
    """blockConnection combines with errorCode: the reply comes late and is the error."""
    configure(
        admin,
        {"times": 1},
        failCommands=["ping"],
        blockConnection=True,
        blockTimeMS=50,
        errorCode=7,
    )
    with raw_socket(fault_uri) as sock:
        assert ping_code(sock) == 7


def test_write_concern_error(admin: MongoClient[Doc], fault_uri: str) -> None:
    """writeConcernError: the write is applied and the error is attached."""
    configure(
        admin,
        {"times": 1},
        failCommands=["insert"],
        writeConcernError={"code": 64, "errmsg": "waiting for replication timed out"},
    )
    client: MongoClient[Doc] = MongoClient(fault_uri, retryWrites=False)
    try:
        with pytest.raises(WriteConcernError) as info:
            client.fp_wce.c.insert_one({"_id": 1})
        assert info.value.code == 64
        assert client.fp_wce.c.find_one() == {"_id": 1}
    finally:
        client.drop_database("fp_wce")
        client.close()


def test_retryable_write_label_and_explicit_labels(admin: MongoClient[Doc]) -> None:
    """A retryable code on a write gets RetryableWriteError (PyMongo retries); [] removes it."""
    # 10107 NotWritablePrimary: its reply carries the current topologyVersion, so PyMongo
    # retries at once (a 91 without one makes it rediscover the server first, as on mongod).
    configure(admin, {"times": 1}, failCommands=["insert"], errorCode=10107)
    admin.fp_retry.c.insert_one({"_id": 1})
    assert admin.fp_retry.c.count_documents({}) == 1
    configure(admin, {"times": 1}, failCommands=["insert"], errorCode=91, errorLabels=[])
    with pytest.raises(NotPrimaryError) as info:  # 91 ShutdownInProgress, not retried
        admin.fp_retry.c.insert_one({"_id": 2})
    details = info.value.details
    assert isinstance(details, dict)
    assert details["code"] == 91
    assert not info.value.has_error_label("RetryableWriteError")
    assert admin.fp_retry.c.count_documents({}) == 1
    admin.drop_database("fp_retry")


def test_fail_hello(admin: MongoClient[Doc], fault_uri: str) -> None:
    """failCommand applies to hello as well."""
    configure(admin, {"times": 1}, failCommands=["hello"], errorCode=11, appName="raw")
    with raw_socket(fault_uri) as sock:
        reply = command(
            sock, {"hello": 1, "client": {"application": {"name": "raw"}}, "$db": "admin"}
        )
    assert reply["code"] == 11


def _fail_point(client: MongoClient[Doc], name: str, mode: Any, **data: Any) -> None:
    client.admin.command("configureFailPoint", name, mode=mode, data=data)


def test_on_primary_transactional_write_commits_then_closes(admin: MongoClient[Doc]) -> None:
    """By default the statement commits and the connection closes; the retry replays it."""
    _fail_point(admin, "onPrimaryTransactionalWrite", {"times": 1})
    coll = admin.fp_optw.c
    coll.insert_one({"_id": 1, "n": 0})
    _fail_point(admin, "onPrimaryTransactionalWrite", {"times": 1})
    result = coll.update_one({"_id": 1}, {"$inc": {"n": 1}})  # retried once by PyMongo
    assert result.modified_count == 1
    assert coll.find_one({"_id": 1}) == {"_id": 1, "n": 1}  # applied exactly once
    admin.drop_database("fp_optw")


def test_on_primary_transactional_write_fail_before_commit(admin: MongoClient[Doc]) -> None:
    """failBeforeCommitExceptionCode: the statement is not applied; alwaysOn never succeeds."""
    coll = admin.fp_optw2.c
    coll.insert_one({"_id": 1})
    _fail_point(admin, "onPrimaryTransactionalWrite", "alwaysOn", failBeforeCommitExceptionCode=1)
    with pytest.raises(AutoReconnect):
        coll.insert_one({"_id": 2})
    admin.admin.command("configureFailPoint", "onPrimaryTransactionalWrite", mode="off")
    assert [d["_id"] for d in coll.find()] == [1]
    admin.drop_database("fp_optw2")


def test_retry_replays_committed_statements_of_a_batch(admin: MongoClient[Doc]) -> None:
    """A batch cut after its first statement: the retry replays it and runs only the rest."""
    coll = admin.fp_optw3.c
    coll.insert_many([{"_id": 1, "n": 0}, {"_id": 2, "n": 0}])
    # Statement 0 commits; statement 1 fails before commit and the connection closes.
    _fail_point(admin, "onPrimaryTransactionalWrite", {"skip": 1}, failBeforeCommitExceptionCode=1)
    with pytest.raises(AutoReconnect):  # both attempts cut at statement 1
        coll.bulk_write([UpdateOne({"_id": 1}, {"$inc": {"n": 1}}),
                         UpdateOne({"_id": 2}, {"$inc": {"n": 1}})])  # fmt: skip
    admin.admin.command("configureFailPoint", "onPrimaryTransactionalWrite", mode="off")
    assert {d["_id"]: d["n"] for d in coll.find()} == {1: 1, 2: 0}  # once, not twice
    admin.drop_database("fp_optw3")


def test_retryable_write_concern_error_gets_label(admin: MongoClient[Doc]) -> None:
    """A retryable write whose writeConcernError code is 91 is labelled and retried."""
    configure(
        admin,
        {"times": 1},
        failCommands=["insert"],
        writeConcernError={"code": 91, "errmsg": "Replication is being shut down"},
    )
    admin.fp_wce91.c.insert_one({"_id": 1})  # first reply carries the wce; the retry is clean
    assert admin.fp_wce91.c.count_documents({}) == 1
    admin.drop_database("fp_wce91")


def test_shutdown_error_carries_no_topology_version(
    admin: MongoClient[Doc], fault_uri: str
) -> None:
    """91 from failCommand has no topologyVersion (not shutting down); 10107 has one."""
    configure(admin, {"times": 2}, failCommands=["ping"], errorCode=91)
    with raw_socket(fault_uri) as sock:
        shutdown = command(sock, {"ping": 1, "$db": "admin"})
        configure(admin, {"times": 1}, failCommands=["ping"], errorCode=10107)
        not_primary = command(sock, {"ping": 1, "$db": "admin"}, request_id=2)
    assert shutdown["code"] == 91
    assert "topologyVersion" not in shutdown
    assert not_primary["code"] == 10107
    assert "topologyVersion" in not_primary


def test_max_time_always_time_out(admin: MongoClient[Doc]) -> None:
    """maxTimeAlwaysTimeOut: commands with maxTimeMS, and getMores of such a find, get 50."""
    coll = admin.fp_maxtime.c
    coll.insert_many([{"i": i} for i in range(5)])
    cursor = coll.find().max_time_ms(1000).batch_size(2)
    next(cursor)
    admin.admin.command("configureFailPoint", "maxTimeAlwaysTimeOut", mode="alwaysOn")
    with pytest.raises(ExecutionTimeout):
        coll.find_one({}, max_time_ms=1000)
    with pytest.raises(ExecutionTimeout):
        list(cursor)  # its getMore inherits the find's deadline
    assert coll.find_one({"i": 0}, {"_id": 0}) == {"i": 0}  # no maxTimeMS: unaffected
    admin.admin.command("configureFailPoint", "maxTimeAlwaysTimeOut", mode="off")
    admin.drop_database("fp_maxtime")
