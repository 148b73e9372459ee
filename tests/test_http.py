"""Tests for host.http: the HTTP API over a real PluginHost on the embedded server."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase
from structlog.testing import capture_logs

from host import PluginHost
from host.daemon import as_tcp_listener, bind_socket
from host.http import HttpSettings, create_app
from host.publish import publish
from host.samples import seed
from tests.support import Doc

from .http_support import accepted_socket_option, exchange, post, serving
from .support import wait_until

pytestmark = pytest.mark.anyio

ClientFactory = Callable[..., contextlib.AbstractAsyncContextManager[httpx.AsyncClient]]

GREET = """
async def main(ctx, args):
    same = await ctx.db.users.count_documents({"lastName": args["lastName"]})
    return f"Hello there, {args['firstName']}!!! There are {same} with the same last name as you!"
"""
ECHO = "async def main(ctx, args):\n    return {'args': args}\n"
BOOM = "def main(ctx, args):\n    raise ValueError('no such thing: ' + str(args))\n"
SLOW = "import asyncio\n\nasync def main(ctx, args):\n    await asyncio.sleep(args)\n    return 1\n"
OBJECT = "async def main(ctx, args):\n    return object()\n"
DATES = (
    "import datetime\n\nasync def main(ctx, args):\n"
    "    return {'at': datetime.datetime(2026, 1, 2, 3, 4, 5)}\n"
)
GATED = "async def main(ctx, args):\n    await ctx.gate.wait()\n    return 'opened'\n"


@pytest.fixture
def gate() -> anyio.Event:
    """An event the ``gated`` plugin waits on."""
    return anyio.Event()


@pytest.fixture
async def host(db: AsyncDatabase[Doc], gate: anyio.Event) -> AsyncIterator[PluginHost]:
    """A ready host with sample data and a few test plugins published."""
    await seed(db)
    for name, source in {
        "greet": GREET,
        "echo": ECHO,
        "boom": BOOM,
        "slow": SLOW,
        "object": OBJECT,
        "dates": DATES,
    }.items():
        await publish(db, name, source)
    await db.functions.insert_one({"_id": "gated", "source": GATED, "max_concurrency": 1})
    async with PluginHost(db, context={"gate": gate}, max_waiting=0) as plugins:
        yield plugins


@pytest.fixture
def api(host: PluginHost) -> ClientFactory:
    """Build an HTTP client for ``create_app(host, **options)``, lifespan included."""

    @contextlib.asynccontextmanager
    async def make(**options: Any) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(host, **options)
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://plugin-host") as client,
        ):
            client.app = app  # type: ignore[attr-defined]
            yield client

    return make


async def test_call_returns_result_and_version(api: ClientFactory, host: PluginHost) -> None:
    """A call returns the plugin's result and the version that served it."""
    async with api() as client:
        reply = await client.post(
            "/functions/greet/call", json={"firstName": "Blain", "lastName": "Smith"}
        )
    assert reply.status_code == 200
    body = reply.json()
    assert body["result"] == ("Hello there, Blain!!! There are 13 with the same last name as you!")
    current = host.current("greet")
    assert current is not None
    assert body["version"] == current.version
    assert reply.headers["x-plugin-version"] == current.version


async def test_empty_body_means_none(api: ClientFactory) -> None:
    """An empty body calls the plugin with args None; any JSON value is accepted as args."""
    async with api() as client:
        empty = await client.post("/functions/echo/call")
        listed = await client.post("/functions/echo/call", json=[1, "two"])
    assert empty.json()["result"] == {"args": None}
    assert listed.json()["result"] == {"args": [1, "two"]}


async def test_unknown_function_is_404(api: ClientFactory) -> None:
    """Calling or reading an unknown plugin is a 404 with an error body."""
    async with api() as client:
        called = await client.post("/functions/nope/call", json={})
        read = await client.get("/functions/nope")
    assert called.status_code == 404
    assert called.json()["error"]["type"] == "PluginNotFound"
    assert read.status_code == 404


async def test_bad_json_is_422(api: ClientFactory) -> None:
    """A body that is not JSON is refused with 422 before the plugin runs."""
    async with api() as client:
        reply = await client.post(
            "/functions/echo/call",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        bad_timeout = await client.post("/functions/echo/call?timeout=soon")
    assert reply.status_code == 422
    assert "not valid JSON" in reply.json()["error"]["message"]
    assert bad_timeout.status_code == 422


async def test_body_over_limit_is_413(api: ClientFactory) -> None:
    """A body larger than max_body_bytes is refused with 413."""
    async with api(max_body_bytes=64) as client:
        reply = await client.post("/functions/echo/call", json={"x": "y" * 100})
    assert reply.status_code == 413
    assert reply.json()["error"]["type"] == "BodyTooLarge"


async def test_timeout_is_504(api: ClientFactory) -> None:
    """A call that outlives ?timeout= is cancelled and answered with 504."""
    async with api() as client:
        reply = await client.post("/functions/slow/call?timeout=0.05", json=30)
    assert reply.status_code == 504
    assert reply.json()["error"]["type"] == "PluginTimeout"


async def test_plugin_failure_is_500_with_traceback_only_in_debug(api: ClientFactory) -> None:
    """A plugin exception is a 500 naming it; the traceback is only sent in debug mode."""
    async with api() as client:
        plain = await client.post("/functions/boom/call", json="x")
    async with api(debug=True) as client:
        debug = await client.post("/functions/boom/call", json="x")
    assert plain.status_code == debug.status_code == 500
    error = plain.json()["error"]
    assert error["type"] == "ValueError"
    assert error["message"] == "no such thing: x"
    assert "traceback" not in error
    assert "raise ValueError" in debug.json()["error"]["traceback"]


async def test_result_not_serialisable_is_500(api: ClientFactory) -> None:
    """A result JSON cannot express is a 500 saying so; dates are sent as ISO strings."""
    async with api() as client:
        reply = await client.post("/functions/object/call")
        dates = await client.post("/functions/dates/call")
    assert reply.status_code == 500
    assert reply.json()["error"]["type"] == "ResultNotSerializable"
    assert "not JSON-serialisable" in reply.json()["error"]["message"]
    assert dates.json()["result"] == {"at": "2026-01-02T03:04:05"}


async def test_busy_plugin_is_503(api: ClientFactory, gate: anyio.Event) -> None:
    """A saturated plugin (no queue left) answers 503 with Retry-After; the first call ends."""
    async with api() as client, anyio.create_task_group() as tg:
        first: list[httpx.Response] = []

        async def occupy() -> None:
            first.append(await client.post("/functions/gated/call"))

        tg.start_soon(occupy)
        await wait_until(
            lambda: client.app.state.metrics.in_flight == 1,  # type: ignore[attr-defined]
            "the first call is running",
        )
        busy = await client.post("/functions/gated/call")
        gate.set()
    assert busy.status_code == 503
    assert busy.json()["error"]["type"] == "PluginBusy"
    assert busy.headers["retry-after"] == "1"
    assert first[0].json()["result"] == "opened"


async def test_draining_refuses_calls_and_readiness(api: ClientFactory) -> None:
    """While draining, calls get 503 and /readyz 503, but /healthz stays 200."""
    async with api() as client:
        assert (await client.get("/readyz")).status_code == 200
        client.app.state.draining = True  # type: ignore[attr-defined]
        call = await client.post("/functions/echo/call")
        ready = await client.get("/readyz")
        health = await client.get("/healthz")
    assert call.status_code == 503
    assert call.json()["error"]["type"] == "HostClosed"
    assert ready.status_code == 503
    assert ready.json()["draining"] is True
    assert health.status_code == 200


async def test_closed_host_is_503(db: AsyncDatabase[Doc]) -> None:
    """After the host shut down, calls are refused with 503 and /readyz is 503."""
    await publish(db, "echo", ECHO)
    async with PluginHost(db) as host:
        pass
    app = create_app(host)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://h") as client:
        call = await client.post("/functions/echo/call")
        ready = await client.get("/readyz")
    assert call.status_code == 503
    assert ready.status_code == 503


async def test_functions_lists_the_registry(api: ClientFactory, host: PluginHost) -> None:
    """GET /functions and /functions/{name} report version, revision and status."""
    async with api() as client:
        listing = (await client.get("/functions")).json()["functions"]
        one = (await client.get("/functions/greet")).json()
    names = [f["name"] for f in listing]
    assert names == sorted(names)
    assert {"greet", "echo", "gated"} <= set(names)
    assert one["revision"] == 1
    assert one["status"] == "serving"
    assert one["version"].startswith("greet@r1:")
    assert set(one) >= {"version", "revision", "status", "loaded_at", "last_error"}


async def test_new_version_serves_after_publish(api: ClientFactory, db: AsyncDatabase[Doc]) -> None:
    """Publishing a new revision makes the next calls report and run the new version."""
    async with api() as client:
        await publish(db, "echo", "async def main(ctx, args):\n    return 'v2'\n")

        async def served_v2() -> bool:
            reply = await client.post("/functions/echo/call")
            return bool(reply.json()["result"] == "v2")

        await wait_until(served_v2, "echo v2 serves")
        reply = await client.post("/functions/echo/call")
    assert reply.json()["version"].startswith("echo@r2:")


async def test_metrics_exposition(api: ClientFactory, db: AsyncDatabase[Doc]) -> None:
    """/metrics counts calls by outcome, reloads and change-to-live in Prometheus format."""
    async with api() as client:
        await client.post("/functions/echo/call")
        await client.post("/functions/nope/call")
        await client.post("/functions/boom/call")
        await publish(db, "echo", "async def main(ctx, args):\n    return 2\n")
        await publish(db, "broken", "async def main(ctx, args):\n    return 1\n")
        await db.functions.update_one({"_id": "broken"}, {"$set": {"entrypoint": "nothere"}})

        async def scrape() -> str | None:
            text = (await client.get("/metrics")).text
            done = (
                "plugin_host_reloads_total 2" in text
                and "plugin_host_reload_failures_total 1" in text
            )
            return text if done else None

        text = await wait_until(scrape, "the reloads and the failure are counted")
        reply = await client.get("/metrics")
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'plugin_host_calls_total{outcome="ok"} 1' in text
    assert 'plugin_host_calls_total{outcome="not_found"} 1' in text
    assert 'plugin_host_calls_total{outcome="failed"} 1' in text
    assert "# TYPE plugin_host_call_seconds histogram" in text
    assert 'plugin_host_call_seconds_bucket{le="+Inf"} 2' in text
    assert "plugin_host_change_to_live_seconds_count 2" in text
    assert "plugin_host_in_flight_calls 0" in text
    assert "plugin_host_ready 1" in text


# -- the daemon's listener: TCP_NODELAY on every accepted connection ------------------------


def _ipv6_socket() -> socket.socket:
    try:
        return bind_socket("::1", 0)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")


def _next_free_socket() -> socket.socket:
    # dev's path: the wanted port is taken, so bind_socket moves on to a following one.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sock = bind_socket("127.0.0.1", port, next_free=20)
    assert sock.getsockname()[1] != port
    return sock


def _protocol_zero_socket() -> socket.socket:
    # A listener made elsewhere with protocol 0 (socket.create_server, an inherited fd).
    sock = socket.create_server(("127.0.0.1", 0))
    assert sock.proto == 0
    return sock


LISTENERS: dict[str, Callable[[], socket.socket]] = {
    "ipv4": lambda: bind_socket("127.0.0.1", 0),
    "ipv6": _ipv6_socket,
    "next_free": _next_free_socket,
    "protocol_0": _protocol_zero_socket,
}


LOOPS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(
        ("asyncio", {"use_uvloop": True}),
        id="uvloop",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("uvloop") is None, reason="uvloop (the speed extra) absent"
        ),
    ),
]


@pytest.mark.parametrize("anyio_backend", LOOPS)
@pytest.mark.parametrize("listener", sorted(LISTENERS))
async def test_accepted_connections_get_tcp_nodelay(db: AsyncDatabase[Doc], listener: str) -> None:
    """Every accepted connection has TCP_NODELAY, whatever the bind path and event loop (no
    40 ms wait for the delayed ACK)."""
    await publish(db, "echo", ECHO)
    sock = LISTENERS[listener]()
    async with serving(db, sock) as (address, port):
        host_header = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        async with await anyio.connect_tcp(address, port) as stream:
            raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            for _ in range(3):  # keep-alive: every reply comes back on the same connection
                status, headers, body = await exchange(
                    stream,
                    post(
                        "/functions/echo/call",
                        b'{"n": 1}',
                        host=host_header,
                        content_type="application/json",
                    ),
                )
                assert status == 200, body
                assert headers.get("connection") != "close"
            nodelay = await anyio.to_thread.run_sync(
                accepted_socket_option, raw, socket.IPPROTO_TCP, socket.TCP_NODELAY
            )
    assert nodelay != 0


def test_bind_socket_says_tcp() -> None:
    """bind_socket's listener reports IPPROTO_TCP (what asyncio checks before TCP_NODELAY)."""
    with bind_socket("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP
    with _protocol_zero_socket() as zero:
        fd = zero.fileno()
        fixed = as_tcp_listener(zero)
        assert fixed.fileno() == fd
        assert fixed.proto == socket.IPPROTO_TCP
        fixed.close()


# -- cross-site requests against the loopback daemon ----------------------------------------


@pytest.fixture
async def loopback_daemon(db: AsyncDatabase[Doc]) -> AsyncIterator[str]:
    """An in-process daemon on 127.0.0.1 (one extra host and origin allowed); yields its URL."""
    await publish(db, "echo", ECHO)
    settings = HttpSettings(
        allowed_hosts=("plugins.internal",), allowed_origins=("https://console.example",)
    )
    async with serving(db, bind_socket("127.0.0.1", 0), http=settings) as (address, port):
        yield f"http://{address}:{port}"


@pytest.mark.parametrize(
    ("headers", "status", "kind"),
    [
        ({}, 200, None),
        ({"host": "localhost:1234"}, 200, None),
        ({"host": "[::1]:8000"}, 200, None),
        ({"host": "plugins.internal"}, 200, None),
        ({"host": "evil.example"}, 403, "HostNotAllowed"),
        ({"host": "evil.example:8000"}, 403, "HostNotAllowed"),
        ({"host": "127.0.0.1.evil.example"}, 403, "HostNotAllowed"),
        ({"origin": "https://evil.example"}, 403, "OriginNotAllowed"),
        ({"origin": "null"}, 403, "OriginNotAllowed"),
        ({"origin": "https://console.example"}, 200, None),
    ],
)
async def test_host_and_origin_are_checked(
    loopback_daemon: str, headers: dict[str, str], status: int, kind: str | None
) -> None:
    """On a loopback bind, a foreign Host (DNS rebinding) or Origin gets a JSON 403; the
    plugin never runs."""
    async with httpx.AsyncClient(base_url=loopback_daemon) as client:
        reply = await client.post("/functions/echo/call", json={"n": 1}, headers=headers)
        assert reply.status_code == status, reply.text
        if kind is None:
            assert reply.json()["result"] == {"args": {"n": 1}}
        else:
            assert reply.json()["error"]["type"] == kind
        # The reads too: a rebinding page cannot list the plugins either.
        listed = await client.get("/functions", headers=headers)
        assert listed.status_code == status


async def test_remembered_hosts_never_let_a_foreign_host_in(loopback_daemon: str) -> None:
    """SiteGuard remembers allowed Host values (more of them than it keeps), and a foreign
    Host after them, alone or beside a foreign Origin, is still refused."""
    async with httpx.AsyncClient(base_url=loopback_daemon) as client:
        for port in range(100):  # more distinct allowed values than SiteGuard remembers
            reply = await client.post(
                "/functions/echo/call", json=port, headers={"host": f"localhost:{port}"}
            )
            assert reply.status_code == 200, reply.text
        for headers, kind in (
            ({"host": "evil.example"}, "HostNotAllowed"),
            ({"host": "localhost:1", "origin": "https://evil.example"}, "OriginNotAllowed"),
        ):
            for _ in range(2):  # a refused value is never remembered
                reply = await client.post("/functions/echo/call", json=1, headers=headers)
                assert reply.status_code == 403
                assert reply.json()["error"]["type"] == kind


async def test_same_origin_is_allowed(loopback_daemon: str) -> None:
    """A page served by the daemon's own origin may call (its Origin matches the Host)."""
    netloc = loopback_daemon.removeprefix("http://")
    async with httpx.AsyncClient(base_url=loopback_daemon) as client:
        reply = await client.post(
            "/functions/echo/call", json=1, headers={"origin": f"http://{netloc}"}
        )
    assert reply.status_code == 200


async def test_simple_cross_site_post_is_refused(loopback_daemon: str) -> None:
    """The request a foreign page can send without a preflight (text/plain POST) is refused."""
    async with httpx.AsyncClient(base_url=loopback_daemon) as client:
        reply = await client.post(
            "/functions/echo/call", content=b'{"n": 1}', headers={"content-type": "text/plain"}
        )
    assert reply.status_code == 415
    assert reply.json()["error"]["type"] == "UnsupportedMediaType"


async def test_non_loopback_app_checks_no_host(api: ClientFactory) -> None:
    """Without allowed_hosts (a non-loopback bind, no list) any Host is served."""
    async with api() as client:
        reply = await client.post("/functions/echo/call", json=2, headers={"host": "any.example"})
    assert reply.status_code == 200


@pytest.mark.parametrize("token", [None, "s3cret"])
async def test_call_route_answers_as_through_starlette(host: PluginHost, token: str | None) -> None:
    """The call route's fast way (straight to the endpoint) and Starlette's way (taken with a
    root_path) give the same statuses and bodies: replies, errors, near-miss paths, auth."""
    app = create_app(host, auth_token=token)
    auth = {"authorization": f"Bearer {token}"} if token else {}
    requests: list[tuple[str, str, Any, dict[str, str]]] = [
        ("POST", "/functions/echo/call", {"n": 1}, auth),
        ("POST", "/functions/nope/call", 1, auth),
        ("POST", "/functions/boom/call", 1, auth),
        ("POST", "/functions/echo/call", None, {**auth, "content-type": "text/plain"}),
        ("GET", "/functions/echo/call", None, auth),
        ("POST", "/functions//call", 1, auth),
        ("POST", "/functions/a/b/call", 1, auth),
        ("POST", "/functions/call", 1, auth),
        ("POST", "/functions/echo/call", 1, {}),
        ("POST", "/functions/echo/call", 1, {"authorization": "Bearer wrong"}),
    ]
    seen: dict[str, list[tuple[int, Any]]] = {}
    async with app.router.lifespan_context(app):
        for root in ("", "/api"):
            transport = httpx.ASGITransport(app=app, root_path=root)
            async with httpx.AsyncClient(transport=transport, base_url="http://h") as client:
                for method, path, body, headers in requests:
                    reply = await client.request(method, root + path, json=body, headers=headers)
                    # Starlette's own 404/405 messages name the full path, root included.
                    text = reply.text.replace(f"'{root}/", "'/") if root else reply.text
                    seen.setdefault(root, []).append((reply.status_code, json.loads(text)))
    assert seen[""] == seen["/api"]
    statuses = [status for status, _ in seen[""]]
    expected = [200, 404, 500, 415, 405, 404, 404, 405]  # /functions/call: GET /functions/{name}
    assert statuses == expected + ([401, 401] if token else [200, 200])


# -- the access log -------------------------------------------------------------------------


async def test_access_log_is_one_event_per_call(api: ClientFactory, host: PluginHost) -> None:
    """--access-log: one http.access event per call, with plugin, version, status, duration and
    call id; none without it."""
    async with api(access_log=True) as client:
        with capture_logs() as logs:
            await client.post("/functions/echo/call", json=1)
            await client.post("/functions/nope/call", json=1)
            await client.get("/healthz")
    access = [e for e in logs if e["event"] == "http.access"]
    current = host.current("echo")
    assert current is not None
    assert [(e["plugin"], e["version"], e["status"]) for e in access] == [
        ("echo", current.version, 200),
        ("nope", None, 404),
    ]
    assert [e["call_id"] for e in access] == [1, 2]
    assert all(isinstance(e["duration_ms"], float) and e["duration_ms"] >= 0 for e in access)
    async with api() as client:
        with capture_logs() as quiet:
            await client.post("/functions/echo/call", json=1)
    assert not [e for e in quiet if e["event"] == "http.access"]
