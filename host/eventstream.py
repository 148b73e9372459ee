"""``GET /events``: the host's events as a server-sent event stream (``text/event-stream``).

Each host event (:mod:`host.events`) becomes one SSE message::

    id: 42
    event: plugin.reloaded
    data: {"id": 42, "event": "plugin.reloaded", "at": "2026-12-02T02:10:00+00:00", "fields": {}}

plus ``note`` messages of the stream itself (``{"note": ..., "reason": ...}``): events lost
while a client was away, or why the server is ending the stream.

Design (calls must not slow down, whatever the clients do):

* :class:`EventHub` follows the bus with ONE subscription, however many clients there are,
  so :meth:`host.events.EventBus.emit` pays one ``send_nowait`` for all of them: O(1), and
  it never waits for a client.
* The hub's task numbers each event, keeps the last :data:`RECENT` ones in a ring (the
  backlog a new client may ask for, and what a reconnecting ``Last-Event-ID`` replays),
  and offers the event to each client's bounded queue, again without waiting.
* Each client gets at most one write per :data:`FLUSH_S` (what arrived meanwhile goes
  out together), so a flood of events costs the loop a bounded number of writes.
* A client whose queue is full is *overflowed*: its writer sends a final ``note``
  (``reason: "slow"``), ends the response and logs ``eventstream.dropped``. A client whose
  socket takes no bytes for :data:`WRITE_TIMEOUT_S` is dropped the same way (no note: it
  would not get through). The browser's ``EventSource`` reconnects by itself and
  ``Last-Event-ID`` brings back what the ring still holds.
* Draining ends every stream with a ``note`` (``reason: "draining"``), so open streams do
  not hold a shutdown up.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .events import HostEvent, Subscription

__all__ = (
    "CLIENT_BUFFER",
    "RECENT",
    "EventHub",
    "EventStreamResponse",
    "sse_message",
)

RECENT = 200
"""Events the hub remembers, for a new client's backlog and a reconnect's replay."""
CLIENT_BUFFER = 512
"""Events a client may be behind before it is dropped as too slow."""
WRITE_TIMEOUT_S = 10.0
"""A client whose socket takes nothing for this long is dropped."""
KEEPALIVE_S = 15.0
"""A comment line is sent after this long without an event (proxies, dead peers)."""
FLUSH_S = 0.05
"""Shortest time between two writes to one client (events in between go out together)."""
TICK_S = 0.5
"""How often idle writers are woken to look at the draining flag and their keepalive."""
HUB_BUFFER = 10_000
"""Events the hub itself may be behind the bus (it never is, short of a stalled loop)."""

_log = structlog.get_logger("host.eventstream")


def _plain(value: Any) -> Any:
    # Host events carry JSON types, plus the odd datetime; anything else is named, never
    # repr()'d (a repr can be slow or huge).
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return f"<{type(value).__name__}>"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def sse_message(event: str, payload: dict[str, Any], event_id: int | None = None) -> bytes:
    """One server-sent event: ``id:``, ``event:`` and a single-line JSON ``data:``.

    Args:
        event: The SSE event name (the host event's name, or ``note``).
        payload: The JSON body; NaN and infinities become null (JSON has neither).
        event_id: The ``id:`` line (None: none).

    Returns:
        The message, ending with the blank line that terminates it.
    """
    try:
        data = json.dumps(payload, default=_plain, allow_nan=False, ensure_ascii=False)
    except ValueError:
        data = json.dumps(_finite(payload), default=_plain, ensure_ascii=False)
    # json.dumps escapes newlines inside strings, so ``data`` is one line; the name is
    # a stable event name, stripped of line breaks all the same.
    name = event.replace("\r", " ").replace("\n", " ")
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {data}\n\n".encode()


@dataclass(frozen=True, slots=True)
class _Numbered:
    id: int
    message: bytes  # encoded once by the hub, shared by every client
    event: str


@dataclass(eq=False, slots=True)
class _Client:
    """One connected stream."""

    prefixes: tuple[str, ...]
    buffer: int
    peer: str
    # Invariant: len(queue) <= buffer. Touched only on the event loop thread (the hub's
    # task appends, the client's writer pops), so no lock; ``wake`` is set after every
    # append and replaced by the writer only when it has found the queue empty.
    queue: deque[_Numbered] = field(default_factory=deque)
    wake: anyio.Event = field(default_factory=anyio.Event)
    overflowed: bool = False
    sent: int = 0

    def wants(self, event: str) -> bool:
        return not self.prefixes or event.startswith(self.prefixes)

    def offer(self, item: _Numbered) -> None:
        if self.overflowed or not self.wants(item.event):
            return
        if len(self.queue) >= self.buffer:
            self.overflowed = True  # the writer sends the note and ends the stream
        else:
            self.queue.append(item)
        self.wake.set()


class EventHub:
    """Follows a host's events and fans them out to server-sent event clients.

    Args:
        subscribe: Makes the hub's one bus subscription (``host.events``).
        closing: True once streams should end (the daemon is draining).
        recent: Events remembered for backlogs and reconnects.
        client_buffer: Events a client may lag before it is dropped.
    """

    def __init__(
        self,
        subscribe: Callable[[int], Subscription],
        closing: Callable[[], bool] = lambda: False,
        *,
        recent: int = RECENT,
        client_buffer: int = CLIENT_BUFFER,
    ) -> None:
        self._subscribe = subscribe
        self._closing = closing
        self._client_buffer = client_buffer
        # Invariant: ids are consecutive from 1; ``_recent`` holds the last ``recent``
        # numbered events in id order; ``_clients`` are the streams open now. All three
        # are changed only on the event loop thread.
        self._ids = itertools.count(1)
        self._last_id = 0
        self._recent: deque[_Numbered] = deque(maxlen=recent)
        self._clients: set[_Client] = set()
        self.dropped_by_hub = 0

    @property
    def clients(self) -> int:
        """Streams open now."""
        return len(self._clients)

    async def run(self) -> None:
        """Follow the bus until cancelled (run it as a background task)."""
        async with self._subscribe(HUB_BUFFER) as events, anyio.create_task_group() as tg:
            tg.start_soon(self._tick)
            seen_dropped = 0
            async for first in events:
                # Everything already buffered goes out as one batch: the writers wake
                # once per batch, not once per event.
                event: HostEvent | None = first
                while event is not None:
                    if events.dropped != seen_dropped:  # the hub itself fell behind the bus
                        self._publish_gap(events.dropped - seen_dropped)
                        seen_dropped = events.dropped
                    self.publish(event)
                    event = events.receive_nowait()

    async def _tick(self) -> None:
        # Idle writers wait on their wake event only (no timer each); this wakes them
        # every TICK_S to look at the draining flag and their keepalive.
        while True:
            await anyio.sleep(TICK_S)
            for client in tuple(self._clients):
                client.wake.set()

    def publish(self, event: HostEvent) -> None:
        """Number ``event``, remember it and offer it to every client (never waits)."""
        event_id = next(self._ids)
        self._last_id = event_id
        payload = {
            "id": event_id,
            "event": event.event,
            "at": event.at.isoformat(),
            "fields": dict(event.fields),
        }
        item = _Numbered(event_id, sse_message(event.event, payload, event_id), event.event)
        self._recent.append(item)
        for client in tuple(self._clients):
            client.offer(item)

    def _publish_gap(self, lost: int) -> None:
        _log.warning("eventstream.hub_behind", lost=lost)
        note = sse_message("note", {"note": f"{lost} host events were not streamed", "lost": lost})
        item = _Numbered(self._last_id, note, "note")
        for client in tuple(self._clients):
            client.offer(item)

    def _backlog(self, client: _Client, last_id: int | None, backlog: int) -> list[bytes]:
        if last_id is None:
            items = [item for item in self._recent if client.wants(item.event)]
            return [item.message for item in items[len(items) - backlog :]] if backlog else []
        out: list[bytes] = []
        oldest = self._recent[0].id if self._recent else self._last_id + 1
        if last_id > self._last_id:  # an id from before a restart: say so, replay nothing
            out.append(
                sse_message(
                    "note",
                    {"note": "the host restarted: earlier events are gone", "reason": "restart"},
                )
            )
        elif last_id + 1 < oldest:
            lost = oldest - last_id - 1
            out.append(
                sse_message(
                    "note",
                    {"note": f"{lost} events passed while away", "reason": "gap", "lost": lost},
                )
            )
        out.extend(
            item.message
            for item in self._recent
            if item.id > last_id and client.wants(item.event) and last_id <= self._last_id
        )
        return out

    def response(
        self,
        *,
        prefixes: Iterable[str] = (),
        backlog: int = 0,
        last_id: int | None = None,
        peer: str = "",
    ) -> EventStreamResponse:
        """A streaming response for one client.

        Args:
            prefixes: Only events whose name starts with one of these (none: all).
            backlog: Recent events sent first to a new client (0..:data:`RECENT`).
            last_id: The ``Last-Event-ID`` of a reconnecting client: replay what followed.
            peer: Who the client is, for the log.

        Returns:
            The response; it registers the client when it starts.
        """
        client = _Client(tuple(p for p in prefixes if p), self._client_buffer, peer)
        return EventStreamResponse(self, client, max(0, backlog), last_id)

    async def _stream(self, client: _Client, backlog: int, last_id: int | None, send: Send) -> None:
        first = self._backlog(client, last_id, backlog)
        self._clients.add(client)  # no await since the backlog: no event falls between
        try:
            await self._write(send, b": plugin-host events\n\n" + b"".join(first))
            last_write = time.monotonic()
            while True:
                if client.overflowed:
                    _log.warning(
                        "eventstream.dropped",
                        reason="slow",
                        peer=client.peer,
                        buffer=client.buffer,
                        sent=client.sent,
                    )
                    note = {
                        "note": f"dropped: more than {client.buffer} events behind; reconnect",
                        "reason": "slow",
                    }
                    await self._write(send, sse_message("note", note))
                    return
                if self._closing():
                    note = {"note": "the host is draining", "reason": "draining"}
                    await self._write(send, sse_message("note", note))
                    return
                if client.queue:
                    # At most one write per FLUSH_S per client: under a flood of events a
                    # client costs the loop FLUSH_S^-1 writes a second, not one per event.
                    early = FLUSH_S - (time.monotonic() - last_write)
                    if early > 0:
                        await anyio.sleep(early)
                        continue  # overflowed or draining meanwhile: looked at first
                    chunk = b"".join(item.message for item in client.queue)
                    client.sent += len(client.queue)
                    client.queue.clear()
                    await self._write(send, chunk)
                    last_write = time.monotonic()
                    continue
                if time.monotonic() - last_write >= KEEPALIVE_S:
                    await self._write(send, b": keepalive\n\n")
                    last_write = time.monotonic()
                    continue
                client.wake = anyio.Event()
                await client.wake.wait()  # an event, or the hub's tick
        finally:
            self._clients.discard(client)

    async def _write(self, send: Send, chunk: bytes) -> None:
        with anyio.move_on_after(WRITE_TIMEOUT_S) as scope:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if scope.cancelled_caught:
            raise _Stalled


class _Stalled(Exception):
    pass


class EventStreamResponse(Response):
    """The ``text/event-stream`` response of one client (see :class:`EventHub`)."""

    media_type = "text/event-stream"

    def __init__(self, hub: EventHub, client: _Client, backlog: int, last_id: int | None):
        super().__init__(
            None,
            200,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        # A stream has no length: drop the ``content-length: 0`` of the empty body.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._hub = hub
        self._client = client
        self._backlog_n = backlog
        self._last_id = last_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream until the client leaves, falls behind, stalls, or the host drains."""
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        async with anyio.create_task_group() as tg:

            async def disconnected() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(disconnected)
            stalled = False
            try:
                await self._hub._stream(self._client, self._backlog_n, self._last_id, send)
            except _Stalled:
                stalled = True
                _log.warning(
                    "eventstream.dropped",
                    reason="stalled",
                    peer=self._client.peer,
                    sent=self._client.sent,
                    write_timeout_s=WRITE_TIMEOUT_S,
                )
            tg.cancel_scope.cancel()
        if not stalled:
            with contextlib.suppress(OSError), anyio.move_on_after(1.0):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
