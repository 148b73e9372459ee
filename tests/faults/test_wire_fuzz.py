"""Wire garbage against a private embedded server: it never dies, and a real client keeps working.

``tests/embedded/test_garbage.py`` checks that the server answers after each bad frame;
here a separate PyMongo client works *throughout* (a background thread writes and reads
while the fuzzing runs), frames are truncated, lie about their length or their sections'
sizes, and half-open connections pile up.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import bson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo import MongoClient

from host.embedded import EmbeddedMongoThread
from tests.embedded.support import HEADER, OP_MSG, OP_QUERY, op_msg, raw_socket

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
PING = op_msg({"ping": 1, "$db": "admin"})


class BackgroundClient:
    """A PyMongo client writing and reading in a thread; records every failure."""

    def __init__(self, uri: str) -> None:
        self.client: MongoClient[dict[str, Any]] = MongoClient(
            uri, serverSelectionTimeoutMS=5000, socketTimeoutMS=5000
        )
        self.rounds = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fuzz-client", daemon=True)

    def _run(self) -> None:
        coll = self.client.fuzz.alive
        while not self._stop.is_set():
            try:
                coll.insert_one({"n": self.rounds})
                found = coll.find_one({"n": self.rounds})
                assert found is not None and found["n"] == self.rounds
                self.rounds += 1
            except BaseException as exc:
                self.errors.append(exc)
                return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()

    def check(self) -> None:
        """The client has made progress and never failed."""
        assert self.errors == [], f"the client failed: {self.errors[0]!r}"
        start = self.rounds
        # It completes more rounds from here on (waits at most the socket timeout).
        for _ in range(2):
            self.client.admin.command("ping")
        assert self._thread.is_alive()
        assert self.errors == []
        assert self.rounds >= start


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedMongoThread]:
    """A private embedded server in its own thread, for the whole module."""
    with EmbeddedMongoThread(port=0) as running:
        yield running


@pytest.fixture(scope="module")
def background(server: EmbeddedMongoThread) -> Iterator[BackgroundClient]:
    """A PyMongo client working against the server for as long as the fuzzing runs."""
    worker = BackgroundClient(server.uri)
    worker.start()
    yield worker
    worker.stop()
    assert worker.errors == [], f"the client failed: {worker.errors[0]!r}"
    assert worker.rounds > 0


def _send_and_close(uri: str, data: bytes) -> None:
    """Send ``data``, end the stream, and read until the server closes the connection."""
    with raw_socket(uri, timeout=10) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server hung up first: allowed


def _still_serving(server: EmbeddedMongoThread, background: BackgroundClient) -> None:
    with raw_socket(server.uri) as sock:  # a fresh connection is answered
        sock.sendall(PING)
        assert sock.recv(HEADER.size)
    background.check()


@FUZZ
@given(st.binary(min_size=1, max_size=512))
def test_random_bytes(
    server: EmbeddedMongoThread, background: BackgroundClient, data: bytes
) -> None:
    """Random bytes on a connection: the server survives; the other client keeps working."""
    _send_and_close(server.uri, data)
    _still_serving(server, background)


@FUZZ
@given(
    st.sampled_from([OP_MSG, OP_QUERY, 1, 2012, 2010, 0, -1, 2**31 - 1]),
    st.binary(max_size=256),
    st.integers(-(2**31), 2**31 - 1),
)
def test_valid_header_garbage_body(
    server: EmbeddedMongoThread, background: BackgroundClient, op: int, body: bytes, rid: int
) -> None:
    """A correctly framed message with a garbage body: answered or closed, server unharmed."""
    _send_and_close(server.uri, HEADER.pack(HEADER.size + len(body), rid, 0, op) + body)
    _still_serving(server, background)


@FUZZ
@given(st.integers(0, len(PING) - 1))
def test_truncated_frame(
    server: EmbeddedMongoThread, background: BackgroundClient, cut: int
) -> None:
    """A valid frame cut short and then end of stream: the connection closes, nothing else."""
    _send_and_close(server.uri, PING[:cut])
    _still_serving(server, background)


@FUZZ
@given(
    st.one_of(
        st.sampled_from([-1, 0, 1, 15, 16, 17, 2**31 - 1, 48_000_000, 48_000_001, 2**24 + 1]),
        st.integers(-(2**31), 2**31 - 1),
    ),
    st.sampled_from([OP_MSG, OP_QUERY]),
    st.binary(max_size=64),
)
def test_lying_message_length(
    server: EmbeddedMongoThread, background: BackgroundClient, length: int, op: int, tail: bytes
) -> None:
    """A header whose length is huge, negative or wrong: no allocation blow-up, server unharmed."""
    _send_and_close(server.uri, HEADER.pack(length, 1, 0, op) + tail)
    _still_serving(server, background)


@FUZZ
@given(
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([0, 1, 2, 0xFF]),
    st.binary(max_size=32),
)
def test_lying_section_sizes(
    server: EmbeddedMongoThread,
    background: BackgroundClient,
    doc_size: int,
    seq_size: int,
    kind: int,
    junk: bytes,
) -> None:
    """OP_MSG sections whose BSON or sequence sizes lie: rejected cleanly, server unharmed."""
    doc = bytearray(bson.encode({"insert": "x", "$db": "fuzz"}))
    doc[0:4] = struct.pack("<i", doc_size)
    section = bytes([kind]) + struct.pack("<i", seq_size) + b"documents\x00" + junk
    payload = struct.pack("<I", 0) + b"\x00" + bytes(doc) + section
    _send_and_close(server.uri, HEADER.pack(HEADER.size + len(payload), 3, 0, OP_MSG) + payload)
    _still_serving(server, background)


def test_half_open_connections_do_not_starve_the_server(
    server: EmbeddedMongoThread, background: BackgroundClient
) -> None:
    """Many connections stuck mid-header (slowloris) do not stop real clients; all are freed."""
    assert server.server is not None
    client: MongoClient[dict[str, Any]] = MongoClient(server.uri, serverSelectionTimeoutMS=5000)
    try:
        client.admin.command("ping")
        baseline = server.server.connection_count
        socks = []
        try:
            for i in range(64):
                sock = socket.create_connection(("127.0.0.1", server.server.port), timeout=10)
                sock.sendall(PING[: 1 + i % (HEADER.size + 4)])  # a partial header or body
                socks.append(sock)
            assert server.server is not None
            _still_serving(server, background)
            client.admin.command("ping")
        finally:
            for sock in socks:
                sock.close()
        for _ in range(500):  # each round trip gives the server's loop time to reap
            if server.server.connection_count <= baseline + 1:
                break
            client.admin.command("ping")
        assert server.server.connection_count <= baseline + 1, "half-open connections leaked"
    finally:
        client.close()
