"""HTTP connection faults: silent, slow and crowding clients are cut off; /healthz stays up.

The daemon runs in this process (``run_daemon`` on a real socket, stopped by SIGTERM) or, for
the descriptor-limit cases, as a real ``plugin-host run`` process with a low ``RLIMIT_NOFILE``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from structlog.testing import capture_logs

from host.daemon import bind_socket
from host.http import HttpSettings

from ..http_support import closed_by_peer, exchange, get, post, serving
from ..support import Db, wait_until

pytestmark = pytest.mark.anyio

FAST = HttpSettings(idle_timeout=0.3, header_timeout=0.3, body_timeout=0.3)
GATED = "async def main(ctx, args):\n    await ctx.gate.wait()\n    return 'opened'\n"
SLEEPY = (
    "import asyncio\n\nasync def main(ctx, args):\n    await asyncio.sleep(1.0)\n    return 1\n"
)
ECHO = "async def main(ctx, args):\n    return args\n"


@contextlib.asynccontextmanager
async def daemon(db: Db, settings: HttpSettings, **options: Any) -> AsyncIterator[int]:
    """An in-process daemon on a fresh loopback port; yields the port."""
    await db.functions.insert_many(
        [
            {"_id": "gated", "source": GATED},
            {"_id": "sleepy", "source": SLEEPY},
            {"_id": "echo", "source": ECHO},
        ]
    )
    async with serving(db, bind_socket("127.0.0.1", 0), http=settings, **options) as (_, port):
        yield port


async def healthz(port: int) -> int:
    """Status of ``GET /healthz`` on a new connection."""
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code


async def test_silent_connection_is_closed(db: Db) -> None:
    """A connection that never sends a byte is closed after the idle timeout."""
    async with daemon(db, FAST) as port, await anyio.connect_tcp("127.0.0.1", port) as stream:
        assert await closed_by_peer(stream) == b""
        assert await healthz(port) == 200


async def test_partial_headers_get_408(db: Db) -> None:
    """Headers that never finish get a JSON 408 and the connection is closed."""
    async with daemon(db, FAST) as port, await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nx-half: ")
        reply = await closed_by_peer(stream)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body)["error"]["type"] == "RequestTimeout"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_unfinished_body_is_cut_off(db: Db, framing: str) -> None:
    """A body that stops arriving (declared length or chunked) is cut off; the host serves on."""
    async with daemon(db, FAST) as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            head = "POST /functions/echo/call HTTP/1.1\r\nhost: localhost\r\n"
            head += "content-type: application/json\r\n"
            if framing == "chunked":
                await stream.send(f"{head}transfer-encoding: chunked\r\n\r\n4\r\n[1, \r\n".encode())
            else:
                await stream.send(f"{head}content-length: 100\r\n\r\n[1, ".encode())
            reply = await closed_by_peer(stream)
        assert b" 200 " not in reply.split(b"\r\n", 1)[0]
        assert await healthz(port) == 200


async def test_idle_keep_alive_connection_is_closed(db: Db) -> None:
    """After a response, a keep-alive connection that sends nothing more is closed."""
    async with daemon(db, FAST) as port, await anyio.connect_tcp("127.0.0.1", port) as stream:
        status, _, _ = await exchange(stream, get("/healthz"))
        assert status == 200
        assert await closed_by_peer(stream) == b""


async def test_a_long_call_is_not_cut_by_connection_timeouts(db: Db) -> None:
    """A call that runs past every connection timeout still gets its reply (the call's own
    timeout rules the busy phase)."""
    async with daemon(db, FAST) as port, await anyio.connect_tcp("127.0.0.1", port) as stream:
        status, _, body = await exchange(
            stream, post("/functions/sleepy/call", b"", content_type="application/json")
        )
    assert status == 200, body
    assert json.loads(body)["result"] == 1


async def test_cap_evicts_idle_connections_so_healthz_answers(db: Db) -> None:
    """At the cap, idle connections are evicted for new ones: /healthz answers; one event."""
    settings = HttpSettings(max_connections=8)
    with capture_logs() as logs:
        async with daemon(db, settings) as port, contextlib.AsyncExitStack() as stack:
            idle = [
                await stack.enter_async_context(await anyio.connect_tcp("127.0.0.1", port))
                for _ in range(30)
            ]
            for _ in range(3):
                assert await healthz(port) == 200
            # The oldest idle connections were closed to make room.
            assert await closed_by_peer(idle[0]) == b""
    cap_events = [e for e in logs if e["event"] == "http.connection_cap"]
    assert len(cap_events) == 1, cap_events  # once per interval, not once per eviction
    assert cap_events[0]["action"] == "evicted_idle"
    assert cap_events[0]["limit"] == 8


async def test_cap_refuses_with_503_when_every_connection_is_busy(db: Db) -> None:
    """When every connection under the cap is busy, a new one gets a JSON 503 and is closed."""
    gate = anyio.Event()
    settings = HttpSettings(max_connections=4)
    async with (
        daemon(db, settings, context={"gate": gate}) as port,
        contextlib.AsyncExitStack() as stack,
    ):
        busy = []
        for _ in range(4):
            stream = await stack.enter_async_context(await anyio.connect_tcp("127.0.0.1", port))
            await stream.send(post("/functions/gated/call", b"", content_type="application/json"))
            busy.append(stream)
        async with await anyio.connect_tcp("127.0.0.1", port) as extra:
            reply = await closed_by_peer(extra)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ")
        assert json.loads(body)["error"]["type"] == "TooManyConnections"
        gate.set()
        for stream in busy:  # the busy calls were never disturbed
            with anyio.fail_after(10):
                assert (await stream.receive()).startswith(b"HTTP/1.1 200 ")


# -- a real process under a low descriptor limit ---------------------------------------------


def _low_fd_limit(limit: int) -> Any:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply


@contextlib.contextmanager
def run_process(
    tmp: Path, mongo_uri: str, db_name: str, fd_limit: int, *args: str, **env_vars: str
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``plugin-host run`` with ``RLIMIT_NOFILE`` = ``fd_limit``; its stdout goes to a file."""
    out = tmp / "daemon.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env_vars}
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "host.cli",
                "run",
                "--mongodb-uri",
                mongo_uri,
                "--database",
                db_name,
                "--http",
                "127.0.0.1:0",
                "--log-format",
                "json",
                *args,
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_low_fd_limit(fd_limit),  # only setrlimit, before exec
        )
    try:
        yield proc, out
    finally:
        proc.kill()
        proc.wait()


def _events(log: Path) -> list[dict[str, Any]]:
    events = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


async def _port(log: Path) -> int:
    async def ready() -> int | None:
        for event in _events(log):
            if event.get("event") == "daemon.ready":
                return int(event["http"].rsplit(":", 1)[1])
        return None

    port: int = await wait_until(ready, "the daemon logs daemon.ready", timeout=30)
    return port


async def _flood(port: int, count: int, stack: contextlib.AsyncExitStack) -> int:
    opened = 0
    for _ in range(count):
        try:
            stream = await stack.enter_async_context(await anyio.connect_tcp("127.0.0.1", port))
        except OSError:
            break
        del stream
        opened += 1
    return opened


async def test_idle_crowd_under_the_fd_limit_does_not_lock_out_healthz(
    tmp_path: Path, mongo_uri: str, db_name: str
) -> None:
    """300 idle sockets against a 256-descriptor daemon: the default cap holds, /healthz answers,
    and no accept error floods the log."""
    with run_process(tmp_path, mongo_uri, db_name, 256) as (_, log):
        port = await _port(log)
        started = time.monotonic()
        async with contextlib.AsyncExitStack() as stack:
            assert await _flood(port, 300, stack) == 300
            for _ in range(4):
                assert await healthz(port) == 200
        events = _events(log)
        elapsed = time.monotonic() - started
    assert not [e for e in events if e.get("event") == "http.accept_failed"]
    cap = [e for e in events if e.get("event") == "http.connection_cap"]
    # 108 or more evictions (300 - 192), logged once per 10 s interval, not once each.
    assert 1 <= len(cap) <= 1 + elapsed / 10, cap
    assert "Too many open files" not in log.read_text()


@pytest.mark.parametrize(
    "loop",
    [
        "asyncio",
        pytest.param(
            "uvloop",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("uvloop") is None, reason="uvloop (speed extra) absent"
            ),
        ),
    ],
)
async def test_accept_errors_are_logged_once_per_interval(
    tmp_path: Path, mongo_uri: str, db_name: str, loop: str
) -> None:
    """With a cap above the descriptor limit, accept() runs out of descriptors: asyncio's
    failures make one event per interval (with a count), never a traceback per attempt
    (uvloop drops such connections itself, silently); the daemon serves again afterwards."""
    with run_process(
        tmp_path, mongo_uri, db_name, 128, "--max-connections", "1000", PLUGIN_HOST_LOOP=loop
    ) as (_, log):
        port = await _port(log)
        started = time.monotonic()
        async with contextlib.AsyncExitStack() as stack:
            await _flood(port, 200, stack)
            if loop == "asyncio":
                await wait_until(
                    lambda: any(e.get("event") == "http.accept_failed" for e in _events(log)),
                    "the daemon reports accept failures",
                )
        await wait_until(lambda: _healthy(port), "/healthz answers again", timeout=20)
        text = log.read_text()
        elapsed = time.monotonic() - started
    ready = next(e for e in _events(log) if e.get("event") == "daemon.ready")
    assert ready["loop"] == loop
    assert "Traceback" not in text
    failures = [e for e in _events(log) if e.get("event") == "http.accept_failed"]
    # asyncio retries accept() every second: one event per 10 s, not one per attempt.
    assert len(failures) <= 1 + elapsed / 10, failures
    if loop == "asyncio":
        assert failures
        assert "Too many open files" in failures[0]["error"]


async def _healthy(port: int) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return await healthz(port) == 200
    return False


def _at_least(lines: Callable[[], list[dict[str, Any]]], n: int) -> bool:
    return len(lines()) >= n


def test_settings_are_checked() -> None:
    """Nonsense timeouts or caps are refused with a message naming the setting."""
    from host.connections import ConnectionGuard

    with pytest.raises(ValueError, match="idle_timeout"):
        ConnectionGuard(idle_timeout=0)
    with pytest.raises(ValueError, match="max_connections"):
        ConnectionGuard(max_connections=0)


@pytest.mark.parametrize(
    "stack",
    [
        pytest.param({"PLUGIN_HOST_LOOP": "asyncio", "PLUGIN_HOST_HTTP": "h11"}, id="asyncio-h11"),
        pytest.param(
            {},
            marks=pytest.mark.skipif(
                importlib.util.find_spec("uvloop") is None
                or importlib.util.find_spec("httptools") is None,
                reason="uvloop/httptools (speed extra) absent",
            ),
            id="uvloop-httptools",
        ),
    ],
)
async def test_a_client_gone_mid_body_is_one_log_line_not_a_traceback(
    tmp_path: Path, mongo_uri: str, db: Db, stack: dict[str, str]
) -> None:
    """A client that closes its socket mid-body on a body route (the call route, the rollout
    route) makes one ``http.client_disconnected`` line naming the path, no traceback, and the
    daemon serves on."""
    await db.functions.insert_one({"_id": "echo", "source": ECHO})
    paths = ["/functions/echo/call", "/functions/echo/rollout"]
    with run_process(tmp_path, mongo_uri, db.name, 1024, **stack) as (_, log):
        port = await _port(log)

        def gone() -> list[dict[str, Any]]:
            return [e for e in _events(log) if e.get("event") == "http.client_disconnected"]

        for n, path in enumerate(paths, 1):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                head = (
                    f"POST {path} HTTP/1.1\r\nhost: localhost\r\n"
                    "content-type: application/json\r\ncontent-length: 100\r\n\r\n"
                ).encode()
                await stream.send(head + b'{"half": ')  # 9 of the 100 bytes announced
            await wait_until(
                functools.partial(_at_least, gone, n), f"the daemon logs {path}'s disconnect"
            )
        async with httpx.AsyncClient(timeout=10) as client:
            reply = await client.post(f"http://127.0.0.1:{port}/functions/echo/call", json=[1])
        assert reply.status_code == 200 and reply.json()["result"] == [1]
        text = log.read_text()
    lines = gone()
    assert [line["path"] for line in lines] == paths
    assert all(line["level"] == "info" for line in lines)
    assert "Traceback" not in text and "Exception in ASGI application" not in text
