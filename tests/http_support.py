"""Helpers for tests of the daemon's HTTP server: an in-process daemon, raw HTTP exchanges."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import psutil

from host.config import DAEMON_TIMEOUTS
from host.daemon import run_daemon


@contextlib.asynccontextmanager
async def serving(db: Any, sock: socket.socket, **options: Any) -> AsyncIterator[tuple[str, int]]:
    """Run :func:`host.daemon.run_daemon` in this process on ``sock``; yield (host, port).

    It stops the way an operator stops it: SIGTERM to the process, caught by the daemon's
    own signal receiver (installed before ``on_ready`` runs).
    """
    ready = anyio.Event()
    host, port = sock.getsockname()[:2]
    options.setdefault("timeouts", dataclasses.replace(DAEMON_TIMEOUTS, drain=2.0, startup=30.0))
    daemon = functools.partial(run_daemon, db, sock, on_ready=lambda _: ready.set(), **options)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon)
        with anyio.fail_after(30):
            await ready.wait()
        try:
            yield host, port
        finally:
            os.kill(os.getpid(), signal.SIGTERM)


async def exchange(
    stream: anyio.abc.ByteStream, request: bytes, *, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` on ``stream``; read one response: (status, headers, body)."""
    await stream.send(request)
    data = b""
    with anyio.fail_after(timeout):
        while b"\r\n\r\n" not in data:
            data += await stream.receive()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            body += await stream.receive()
    return status, headers, body


def get(path: str, host: str = "localhost", **headers: str) -> bytes:
    """A keep-alive ``GET`` request's bytes."""
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return f"GET {path} HTTP/1.1\r\nhost: {host}\r\n{extra}\r\n".encode()


def post(path: str, body: bytes, host: str = "localhost", **headers: str) -> bytes:
    """A keep-alive ``POST`` request's bytes (``content-length`` set)."""
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


async def closed_by_peer(stream: anyio.abc.ByteStream, *, timeout: float = 10.0) -> bytes:
    """Read until the server closes the connection; return what it sent before closing."""
    data = b""
    with anyio.fail_after(timeout):
        while True:
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                return data


def accepted_socket_option(client: socket.socket, level: int, option: int) -> int:
    """The option ``level``/``option`` of the server-side socket accepted for ``client``.

    The server runs in this process, so its accepted socket is one of our descriptors:
    find it by its peer address (the client's own address) and read the option from a
    duplicate of the descriptor (options belong to the socket, not to the descriptor).
    Blocking (it reads /proc): call it from a worker thread.
    """
    wanted = client.getsockname()[:2]
    for conn in psutil.Process().net_connections("tcp"):
        if conn.fd == -1 or not conn.raddr:
            continue
        if (conn.raddr.ip, conn.raddr.port) == wanted:
            dup = socket.socket(fileno=os.dup(conn.fd))
            try:
                return dup.getsockopt(level, option)
            finally:
                dup.close()
    raise AssertionError(f"no accepted socket in this process has peer {wanted}")
