"""Tests for host.eventstream: GET /events over a real daemon, and the hub's bounds and drops."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from structlog.testing import CapturingLogger, capture_logs

from host import eventstream
from host.daemon import bind_socket
from host.events import EventBus
from host.eventstream import EventHub, sse_message
from host.publish import publish

from .http_support import serving
from .support import Db, wait_until

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-token"


def parse_sse(data: bytes) -> list[dict[str, Any]]:
    """The messages of an event stream: ``{"id", "event", "data"}`` (comments skipped)."""
    out: list[dict[str, Any]] = []
    for block in data.decode().split("\n\n"):
        message: dict[str, Any] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            message[key] = json.loads(value) if key == "data" else value
        if message:
            out.append(message)
    return out


async def read_until(
    stream: httpx.Response, wanted: str, *, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Messages read from ``stream`` up to the first event named ``wanted``."""
    buffered = b""
    with anyio.fail_after(timeout):
        async for chunk in stream.aiter_bytes():
            buffered += chunk
            complete = buffered[: buffered.rfind(b"\n\n") + 2]
            messages = parse_sse(complete)
            if any(m.get("event") == wanted for m in messages):
                return messages
    raise AssertionError(f"the stream ended before a {wanted!r} event: {buffered!r}")


class Peer:
    """The ASGI server side of one stream: collects what the app sends, may hold it up."""

    def __init__(self, gate: anyio.Event | None = None, *, stall: bool = False) -> None:
        self.bodies: list[bytes] = []
        self.left = anyio.Event()
        self.gate = gate
        self.stall = stall
        self.started = anyio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.started.set()
            return
        if self.stall and self.bodies:
            await anyio.sleep_forever()
        if self.gate is not None and self.bodies:
            await self.gate.wait()
        self.bodies.append(message.get("body", b""))

    def messages(self) -> list[dict[str, Any]]:
        """Every complete message sent so far."""
        return parse_sse(b"".join(self.bodies))


@pytest.fixture
async def bus_hub() -> AsyncIterator[tuple[EventBus, EventHub, dict[str, bool]]]:
    """A real event bus, a hub following it, and the hub's draining flag."""
    bus = EventBus(CapturingLogger())  # the bus's own log lines are not under test
    flags = {"closing": False}
    hub = EventHub(bus.subscribe, lambda: flags["closing"], recent=10, client_buffer=8)
    async with anyio.create_task_group() as tg:
        tg.start_soon(hub.run)
        await wait_until(lambda: bus._subscribers, "the hub subscribes")
        yield bus, hub, flags
        tg.cancel_scope.cancel()


async def stream(hub: EventHub, peer: Peer, **options: Any) -> None:
    """Run one client's response against ``peer`` until it ends."""
    await hub.response(**options)({"type": "http"}, peer.receive, peer.send)  # type: ignore[arg-type]


async def test_events_route_streams_host_events_as_json() -> None:
    """GET /events sends each host event as `id:`/`event:`/one-line JSON `data:`."""
    message = sse_message("plugin.loaded", {"fields": {"error": "a\nb", "n": float("nan")}}, 7)
    assert message.startswith(b"id: 7\nevent: plugin.loaded\ndata: {")
    assert message.endswith(b"\n\n") and message.count(b"\n") == 4  # newlines stay escaped
    assert parse_sse(message)[0]["data"] == {"fields": {"error": "a\nb", "n": None}}


async def test_daemon_events_carry_a_reload_and_need_the_token(db: Db) -> None:
    """A real daemon streams plugin.loaded; the token is required, in a header or ?token=."""
    async with (
        serving(db, bind_socket("127.0.0.1", 0), auth_token=TOKEN) as (host, port),
        httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as client,
    ):
        assert (await client.get("/events")).status_code == 401
        assert (await client.get("/events", params={"token": "wrong"})).status_code == 401
        # The query-string token is for the event stream only.
        assert (await client.get("/functions", params={"token": TOKEN})).status_code == 401
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with client.stream("GET", "/events", headers=headers) as reply:
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/event-stream")
            assert "content-length" not in reply.headers
            await publish(db, "streamed", "async def main(ctx, args):\n    return 1\n")
            messages = await read_until(reply, "plugin.loaded")
        loaded = next(m for m in messages if m.get("event") == "plugin.loaded")
        assert loaded["data"]["event"] == "plugin.loaded"
        assert loaded["data"]["fields"]["plugin"] == "streamed"
        assert int(loaded["id"]) == loaded["data"]["id"]
        async with client.stream(
            "GET", "/events", params={"token": TOKEN, "backlog": "50", "event": "plugin."}
        ) as reply:
            assert reply.status_code == 200
            backlog = await read_until(reply, "plugin.loaded")
        assert {m["event"] for m in backlog} <= {"plugin.loaded"}  # the prefix filter
        bad = await client.get("/events", headers={**headers, "Last-Event-ID": "x"})
        assert bad.status_code == 422


async def test_backlog_and_last_event_id_replay(
    bus_hub: tuple[EventBus, EventHub, dict[str, bool]],
) -> None:
    """A new client gets the asked backlog; a reconnect gets what followed its id, or a gap note."""
    bus, hub, flags = bus_hub
    for n in range(15):
        bus.emit("test.tick", n=n)
    await wait_until(lambda: hub._last_id == 15, "the hub numbers 15 events")
    flags["closing"] = True  # each stream sends what it has, then ends
    fresh, back, late = Peer(), Peer(), Peer()
    await stream(hub, fresh, backlog=3)
    await stream(hub, back, last_id=12)
    await stream(hub, late, last_id=2)  # the ring (10) holds 6..15
    assert [m["data"]["fields"]["n"] for m in fresh.messages()[:-1]] == [12, 13, 14]
    assert [m["id"] for m in back.messages()[:-1]] == ["13", "14", "15"]
    gap = late.messages()[0]
    assert gap["event"] == "note" and gap["data"]["reason"] == "gap"
    assert gap["data"]["lost"] == 3  # ids 3, 4 and 5 are gone
    assert [m["id"] for m in late.messages()[1:-1]] == [str(i) for i in range(6, 16)]
    assert late.messages()[-1]["data"]["reason"] == "draining"


async def test_slow_client_is_dropped_with_a_note_and_a_log_line(
    bus_hub: tuple[EventBus, EventHub, dict[str, bool]],
) -> None:
    """A client more than its buffer behind ends with a `note` (slow) and `eventstream.dropped`."""
    bus, hub, _ = bus_hub
    gate = anyio.Event()
    peer = Peer(gate)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream, hub, peer)
            await wait_until(lambda: hub.clients == 1, "the client is registered")
            bus.emit("test.tick", n=0)
            await wait_until(lambda: peer.started.is_set(), "the stream starts")
            for n in range(1, 40):  # the peer takes nothing meanwhile; emit never waits
                bus.emit("test.tick", n=n)
            await wait_until(lambda: hub._last_id == 40, "the hub has every event")
            gate.set()
    assert hub.clients == 0
    messages = peer.messages()
    assert messages[-1]["event"] == "note"
    assert messages[-1]["data"]["reason"] == "slow"
    assert len([m for m in messages if m["event"] == "test.tick"]) < 40
    dropped = [e for e in logs if e["event"] == "eventstream.dropped"]
    assert dropped and dropped[0]["reason"] == "slow" and dropped[0]["buffer"] == 8


async def test_stalled_client_is_dropped(
    bus_hub: tuple[EventBus, EventHub, dict[str, bool]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client whose socket takes nothing for the write timeout is dropped and logged."""
    monkeypatch.setattr(eventstream, "WRITE_TIMEOUT_S", 0.2)
    bus, hub, _ = bus_hub
    peer = Peer(stall=True)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream, hub, peer)
            await wait_until(lambda: hub.clients == 1, "the client is registered")
            bus.emit("test.tick", n=1)
    assert hub.clients == 0
    assert [e["reason"] for e in logs if e["event"] == "eventstream.dropped"] == ["stalled"]


async def test_client_that_leaves_is_unregistered(
    bus_hub: tuple[EventBus, EventHub, dict[str, bool]],
) -> None:
    """The stream ends when the client disconnects, and the hub forgets it."""
    bus, hub, _ = bus_hub
    peer = Peer()
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream, hub, peer)
        await wait_until(lambda: hub.clients == 1, "the client is registered")
        bus.emit("test.tick", n=1)
        await wait_until(lambda: len(peer.messages()) == 1, "the event arrives")
        peer.left.set()
    assert hub.clients == 0


async def test_many_clients_under_load_get_every_event_in_order(
    bus_hub: tuple[EventBus, EventHub, dict[str, bool]],
) -> None:
    """Under a steady flow, 20 clients each get every event once, in id order."""
    bus, hub, flags = bus_hub
    hub._client_buffer = 4096  # 2,000 events can arrive within one flush interval
    peers = [Peer() for _ in range(20)]
    async with anyio.create_task_group() as tg:
        for peer in peers:
            tg.start_soon(stream, hub, peer)
        await wait_until(lambda: hub.clients == 20, "every client is registered")
        for burst in range(20):
            for n in range(100):
                bus.emit("test.tick", n=burst * 100 + n)
            await anyio.lowlevel.checkpoint()  # the writers get a turn between bursts
        await wait_until(
            lambda: all(b"".join(p.bodies).count(b"\nevent: test.tick\n") == 2000 for p in peers),
            "every client has 2000 events",
            interval=0.05,
        )
        flags["closing"] = True
    for peer in peers:
        ids = [int(m["id"]) for m in peer.messages() if m["event"] == "test.tick"]
        assert ids == list(range(1, 2001))
