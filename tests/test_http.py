"""Tests for host.http: the HTTP API over a real PluginHost on the embedded server."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from host import PluginHost
from host.http import create_app
from host.publish import publish
from host.samples import seed
from tests.support import Doc

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
        reply = await client.post("/functions/echo/call", content=b"{not json")
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
