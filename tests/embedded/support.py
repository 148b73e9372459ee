"""Helpers shared by the embedded-server tests: raw wire messages and polling with a deadline."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import bson
from pymongo import MongoClient

from host.embedded.wire import crc32c

OP_REPLY = 1
OP_QUERY = 2004
OP_COMPRESSED = 2012
OP_MSG = 2013
HEADER = struct.Struct("<iiii")

Doc = dict[str, Any]


def address(uri: str) -> tuple[str, int]:
    """The (host, port) of the first seed in a ``mongodb://`` URI."""
    parsed = urlparse(uri)
    seed = parsed.netloc.split("@")[-1].split(",")[0]
    host, _, port = seed.rpartition(":")
    return host.strip("[]"), int(port)


@contextmanager
def raw_socket(uri: str, timeout: float = 10.0) -> Iterator[socket.socket]:
    """A plain TCP connection to the server behind ``uri``."""
    sock = socket.create_connection(address(uri), timeout=timeout)
    try:
        yield sock
    finally:
        sock.close()


def op_msg(
    body: Doc,
    *,
    sequences: dict[str, list[Doc]] | None = None,
    request_id: int = 1,
    flags: int = 0,
    checksum: bool = False,
    corrupt_checksum: bool = False,
) -> bytes:
    """Encode an OP_MSG with one kind-0 body and optional kind-1 document sequences."""
    payload = b"\x00" + bson.encode(body)
    for ident, docs in (sequences or {}).items():
        packed = ident.encode() + b"\x00" + b"".join(bson.encode(d) for d in docs)
        payload += b"\x01" + struct.pack("<i", 4 + len(packed)) + packed
    if checksum:
        flags |= 1
    total = HEADER.size + 4 + len(payload) + (4 if checksum else 0)
    message = HEADER.pack(total, request_id, 0, OP_MSG) + struct.pack("<I", flags) + payload
    if checksum:
        crc = crc32c(message)
        if corrupt_checksum:
            crc ^= 0xFFFF
        message += struct.pack("<I", crc)
    return message


def op_query(query: Doc, *, namespace: str = "admin.$cmd", request_id: int = 1) -> bytes:
    """Encode a legacy OP_QUERY command, as drivers send their first handshake."""
    payload = (
        struct.pack("<i", 0)
        + namespace.encode()
        + b"\x00"
        + struct.pack("<ii", 0, -1)
        + bson.encode(query)
    )
    return HEADER.pack(HEADER.size + len(payload), request_id, 0, OP_QUERY) + payload


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes, or raise ConnectionError when the peer closes first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_reply(sock: socket.socket) -> tuple[tuple[int, int, int, int], Doc]:
    """Read one OP_MSG or OP_REPLY; return its header and its document."""
    header = HEADER.unpack(recv_exactly(sock, HEADER.size))
    payload = recv_exactly(sock, header[0] - HEADER.size)
    if header[3] == OP_MSG:
        flags = struct.unpack_from("<I", payload)[0]
        assert flags == 0, "replies carry no flags (and no checksum)"
        assert payload[4] == 0, "a reply is one kind-0 section"
        return header, bson.decode(payload[5:])
    assert header[3] == OP_REPLY, header
    flags, cursor_id, starting_from, number = struct.unpack_from("<iqii", payload)
    assert (flags, cursor_id, starting_from, number) == (0, 0, 0, 1)
    return header, bson.decode(payload[20:])


def command(sock: socket.socket, body: Doc, request_id: int = 1, **kwargs: Any) -> Doc:
    """Send one OP_MSG command and return the reply document."""
    sock.sendall(op_msg(body, request_id=request_id, **kwargs))
    header, reply = read_reply(sock)
    assert header[2] == request_id, "responseTo echoes the requestID"
    return reply


def is_closed(sock: socket.socket) -> bool:
    """True when the server closed the connection (EOF or reset), waiting up to the timeout."""
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``predicate`` until it is true, failing with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (``"2m"``) on ``path`` for the block; skips unless root.

    A real small filesystem is the only faithful way to hit ENOSPC (a mock of
    ``os.write`` would not tear a record the way a full disk does).
    """
    import pytest

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tiny tmpfs (a real full disk)")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, size: str) -> None:
    """Grow (or shrink) a tmpfs mounted by :func:`tmpfs`."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def cli() -> list[str]:
    """The ``plugin-host`` command of this environment (its script, else ``python -m host.cli``)."""
    script = Path(sys.executable).with_name("plugin-host")
    return [str(script)] if script.exists() else [sys.executable, "-m", "host.cli"]


class Server:
    """One ``plugin-host embedded-mongo`` subprocess."""

    def __init__(self, data_dir: Path | None) -> None:
        args = [*cli(), "embedded-mongo", "--port", "0", "--log-format", "json"]
        if data_dir is not None:
            args += ["--data-dir", str(data_dir)]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.events: list[Doc] = []
        self.uri = self._wait_for("embedded.started")["uri"]

    def _wait_for(self, event: str) -> Doc:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            record: Doc = json.loads(line)
            self.events.append(record)
            if record.get("event") == event:
                return record
        raise AssertionError(f"server exited before logging {event}: {self.proc.wait()}")

    def client(self) -> MongoClient[Doc]:
        return MongoClient(self.uri, serverSelectionTimeoutMS=5000)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._close_pipes()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        self._wait_for("embedded.stopped")
        code = self.proc.wait(timeout=30)
        self._close_pipes()
        return code

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
