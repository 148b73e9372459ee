"""Tests for host.tracing: OpenTelemetry spans, checked with the SDK's in-memory exporter."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from pymongo.asynchronous.database import AsyncDatabase

from host import PluginHost, tracing
from host.http import create_app
from host.publish import publish

from .support import wait_until

pytestmark = pytest.mark.anyio

Doc = dict[str, Any]
JSON = {"content-type": "application/json"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
ECHO = "async def main(ctx, args):\n    return args\n"
BOOM = "async def main(ctx, args):\n    raise ValueError('boom')\n"
OUTER = """
async def main(ctx, args):
    a = await ctx.call("echo", 1)
    b = await ctx.require("echo")(2)
    return [a, b]
"""


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into an in-memory exporter; off again afterwards."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield exporter
    finally:
        tracing.disable()
        provider.shutdown()


@contextlib.asynccontextmanager
async def api(db: AsyncDatabase[Doc]) -> AsyncIterator[tuple[PluginHost, httpx.AsyncClient]]:
    """A host with echo, boom and outer, and an HTTP client on its app (lifespan included)."""
    for name, source in (("echo", ECHO), ("boom", BOOM), ("outer", OUTER)):
        await publish(db, name, source)
    async with PluginHost(db) as host:
        app = create_app(host)
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://plugin-host") as client,
        ):
            yield host, client


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    """The finished spans called ``name``."""
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def test_call_span_joins_the_callers_trace(
    db: AsyncDatabase[Doc], spans: InMemorySpanExporter
) -> None:
    """A call's span continues the W3C traceparent it came with, with plugin attributes."""
    async with api(db) as (host, client):
        reply = await client.post(
            "/functions/echo/call",
            json={"a": 1},
            headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
        )
        assert reply.status_code == 200
        info = host.plugin("echo")
    assert info is not None
    (span,) = named(spans, "plugin.call")
    assert span.context is not None and span.parent is not None
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_ID
    assert span.attributes is not None
    assert span.attributes["plugin.name"] == "echo"
    assert span.attributes["plugin.version"] == info.version
    assert span.attributes["plugin.outcome"] == "ok"
    assert span.attributes["plugin.call_id"] == 1
    assert span.status.status_code is StatusCode.UNSET


async def test_failed_call_span_is_an_error(
    db: AsyncDatabase[Doc], spans: InMemorySpanExporter
) -> None:
    """A failing plugin's span says outcome failed with an ERROR status; no traceparent: a
    new trace."""
    async with api(db) as (_, client):
        assert (await client.post("/functions/boom/call", headers=JSON)).status_code == 500
    (span,) = named(spans, "plugin.call")
    assert span.parent is None
    assert span.attributes is not None and span.attributes["plugin.outcome"] == "failed"
    assert span.status.status_code is StatusCode.ERROR


async def test_ctx_call_and_require_are_child_spans(
    db: AsyncDatabase[Doc], spans: InMemorySpanExporter
) -> None:
    """ctx.call and ctx.require open child spans of the call that makes them."""
    async with api(db) as (_, client):
        reply = await client.post("/functions/outer/call", headers=JSON)
        assert reply.json()["result"] == [1, 2]
    (call,) = named(spans, "plugin.call")
    children = named(spans, "ctx.call") + named(spans, "ctx.require")
    assert [c.name for c in children] == ["ctx.call", "ctx.require"]
    for child in children:
        assert child.parent is not None and call.context is not None
        assert child.parent.span_id == call.context.span_id
        assert child.attributes is not None and child.attributes["plugin.target"] == "echo"


async def test_reload_span_has_compile_and_change_to_live(
    db: AsyncDatabase[Doc], spans: InMemorySpanExporter
) -> None:
    """Each version that goes live gets a plugin.reload span with its timings."""
    async with api(db) as (_, client):
        await publish(db, "echo", "async def main(ctx, args):\n    return 'v2'\n")

        async def served() -> bool:
            reply = await client.post("/functions/echo/call", headers=JSON)
            return bool(reply.json()["result"] == "v2")

        await wait_until(served, "the new version serves")

        def reloaded() -> list[ReadableSpan]:
            return [
                s
                for s in named(spans, "plugin.reload")
                if s.attributes and s.attributes.get("plugin.event") == "plugin.reloaded"
            ]

        (span,) = await wait_until(reloaded, "a plugin.reload span is recorded")
    assert span.attributes is not None
    assert span.attributes["plugin.name"] == "echo"
    assert isinstance(span.attributes["plugin.compile_ms"], float)
    assert isinstance(span.attributes["plugin.change_to_live_ms"], int | float)
    assert span.start_time is not None and span.end_time is not None
    assert span.end_time >= span.start_time


async def test_no_spans_while_tracing_is_off(db: AsyncDatabase[Doc]) -> None:
    """Tracing switched off again traces nothing: the hooks see tracer None."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    tracing.disable()
    assert tracing.tracer is None
    async with api(db) as (_, client):
        assert (await client.post("/functions/outer/call", headers=JSON)).status_code == 200
    assert exporter.get_finished_spans() == ()
    provider.shutdown()
