"""Tests for the raw ASGI call route (``POST /functions/{name}/call``) through a real server.

The route reads the ASGI scope and messages itself and sends its 200 reply without a
Starlette ``Response``; these tests pin what a client sees on the wire.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from typing import Any

import anyio
import anyio.abc
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from host.config import DAEMON_LIMITS
from host.daemon import bind_socket
from host.publish import publish
from tests.support import Doc

from .http_support import closed_by_peer, exchange, get, post, serving

pytestmark = pytest.mark.anyio

ECHO = "async def main(ctx, args):\n    return {'args': args}\n"
LIMIT = 64  # max_body_bytes of the daemon under test
JSON = "application/json"


async def _connect(port: int) -> anyio.abc.SocketStream:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each write its own segment
    return stream


def _chunked(path: str, *chunks: bytes) -> tuple[bytes, list[bytes]]:
    """A chunked-encoding POST: its head, and each chunk as its own write."""
    head = (
        f"POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
        "transfer-encoding: chunked\r\n\r\n"
    ).encode()
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks]
    return head, [*parts, b"0\r\n\r\n"]


async def _reply(stream: anyio.abc.SocketStream) -> tuple[int, dict[str, str], Any]:
    status, headers, body = await exchange(stream, b"")
    return status, headers, json.loads(body)


async def test_reply_on_the_wire(db: AsyncDatabase[Doc]) -> None:
    """A call's 200 reply carries JSON, its exact length and X-Plugin-Version, and errors on
    the same keep-alive connection keep the JSON error shape (404, 405, 415, 422)."""
    await publish(db, "echo", ECHO)
    async with (
        serving(db, bind_socket("127.0.0.1", 0)) as (_, port),
        await _connect(port) as stream,
    ):
        for n in range(3):
            status, headers, body = await exchange(
                stream,
                post("/functions/echo/call", b'{"n": %d}' % n, content_type="application/json"),
            )
            assert status == 200, body
            assert headers["content-type"] == "application/json"
            assert int(headers["content-length"]) == len(body)
            reply = json.loads(body)
            assert reply["result"] == {"args": {"n": n}}
            assert headers["x-plugin-version"] == reply["version"]
            assert reply["version"].startswith("echo@")
        errors = [
            (post("/functions/nope/call", b"1", content_type="application/json"), 404),
            (get("/functions/echo/call"), 405),
            (post("/functions/echo/call", b"1", content_type="text/plain"), 415),
            (post("/functions/echo/call", b"{", content_type="application/json"), 422),
            (
                post("/functions/echo/call?timeout=-1", b"1", content_type="application/json"),
                422,
            ),
        ]
        for request, expected in errors:
            status, headers, body = await exchange(stream, request)
            assert status == expected, body
            error = json.loads(body)["error"]
            assert set(error) >= {"type", "message"}
        # Still the same connection, still serving.
        status, _, body = await exchange(
            stream,
            post("/functions/echo/call?timeout=5", b"[]", content_type="application/json"),
        )
        assert (status, json.loads(body)["result"]) == (200, {"args": []})


async def test_body_in_several_messages_is_assembled_and_bounded(db: AsyncDatabase[Doc]) -> None:
    """A chunked body sent in several writes is read whole; one that passes the limit with
    no Content-Length to refuse it early gets 413 once it does."""
    await publish(db, "echo", ECHO)
    limits = dataclasses.replace(DAEMON_LIMITS, max_body_bytes=LIMIT)
    async with serving(db, bind_socket("127.0.0.1", 0), limits=limits) as (_, port):
        async with await _connect(port) as stream:
            head, parts = _chunked("/functions/echo/call", b'{"a": ', b'"xyz", ', b'"b": [1, 2]}')
            await stream.send(head)
            for part in parts:
                await stream.send(part)
            status, _, reply = await _reply(stream)
            assert (status, reply["result"]) == (200, {"args": {"a": "xyz", "b": [1, 2]}})

        async with await _connect(port) as stream:
            head, parts = _chunked("/functions/echo/call", b"[" + b"1," * 20, b"1," * 20, b"1]")
            await stream.send(head)
            for part in parts:
                await stream.send(part)
            status, _, reply = await _reply(stream)
            assert status == 413
            assert reply["error"]["type"] == "BodyTooLarge"


async def test_client_gone_mid_body_does_not_call_and_server_goes_on(
    db: AsyncDatabase[Doc],
) -> None:
    """A client that closes before its body is complete gets no reply and runs nothing; the
    next client is served."""
    calls = "async def main(ctx, args):\n    ctx.seen.append(args)\n    return len(ctx.seen)\n"
    await publish(db, "count", calls)
    seen: list[Any] = []
    async with serving(db, bind_socket("127.0.0.1", 0), context={"seen": seen}) as (_, port):
        async with await _connect(port) as stream:
            head = post("/functions/count/call", b"", content_type="application/json")
            await stream.send(head.replace(b"content-length: 0", b"content-length: 50") + b"[1,")
            await stream.send_eof()
            assert await closed_by_peer(stream) == b""
        async with await _connect(port) as stream:
            status, _, body = await exchange(
                stream, post("/functions/count/call", b"2", content_type="application/json")
            )
    assert (status, json.loads(body)["result"]) == (200, 1)
    assert seen == [2]
