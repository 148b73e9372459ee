"""Reload events: one structlog event per reload, failure, resume or resync, and a fan-out
to in-process subscribers (embedders, tests, metrics).

The event names and their fields are a public interface (documented in the README):
``host.started``, ``host.stopped``, ``watch.started``, ``watch.resumed``,
``watch.resynced``, ``watch.invalidated``, ``plugin.loaded``, ``plugin.reloaded``,
``plugin.reload_failed``, ``plugin.rejected``, ``plugin.unloaded``, ``plugin.retired``,
``call.failed``, ``call.timeout``; and ``watch.error``, ``watch.failed``,
``plugin.teardown_failed``, ``plugin.task_failed``, ``plugin.thread_stuck``, ``trust.disabled``,
``loop.blocked``; and the triggers' ``trigger.*`` events (see :mod:`host.triggers`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self, get_args

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = (
    "MAX_EVENT_NAME_CHARS",
    "MAX_EVENT_VALUE_CHARS",
    "EventBus",
    "HostEvent",
    "Level",
    "LogThrottle",
    "Subscription",
    "clip_fields",
)

Level = Literal["debug", "info", "warning", "error"]
"""The log levels of host events."""
_LEVELS = frozenset(get_args(Level))


MAX_EVENT_NAME_CHARS = 200
"""Longest name-like field kept in an event (plugin, version, _id...); names are <= 128."""
MAX_EVENT_VALUE_CHARS = 16_384
"""Longest other string kept in an event (errors, tracebacks)."""
MAX_EVENT_ITEMS = 100
"""Most items of a list or tuple field kept in an event."""
_NAME_FIELDS = frozenset(
    {"plugin", "version", "old_version", "new_version", "serving", "name", "_id", "field"}
)


def _clip_str(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2  # keep both ends: a traceback's last frames say the most
    return f"{text[:half]}...({len(text) - 2 * half} chars cut)...{text[-half:]}"


def _clip(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return _clip_str(value, limit)
    if isinstance(value, list | tuple):
        items = [_clip(item, MAX_EVENT_NAME_CHARS) for item in value[:MAX_EVENT_ITEMS]]
        if len(value) > MAX_EVENT_ITEMS:
            items.append(f"...({len(value) - MAX_EVENT_ITEMS} more)")
        return items
    return value


def clip_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` with long strings and lists cut, so no input can flood the logs.

    A record's ``_id`` or a plugin's error can be as large as the input allows (a 1 MB
    ``_id`` once produced 40 MB of logs); every event goes through here first, before
    any handler, subscriber or check sees it.

    Args:
        fields: An event's fields.

    Returns:
        A new dict: names cut to :data:`MAX_EVENT_NAME_CHARS`, other strings to
        :data:`MAX_EVENT_VALUE_CHARS`, lists to :data:`MAX_EVENT_ITEMS` items.
    """
    # Every reload emits two events, so the common case (short strings, numbers) takes
    # no function call per field.
    clipped: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, str):
            limit = MAX_EVENT_NAME_CHARS if key in _NAME_FIELDS else MAX_EVENT_VALUE_CHARS
            clipped[key] = value if len(value) <= limit else _clip_str(value, limit)
        elif isinstance(value, list | tuple):
            clipped[key] = _clip(value, MAX_EVENT_VALUE_CHARS)
        else:
            clipped[key] = value
    return clipped


@dataclass(frozen=True, slots=True)
class HostEvent:
    """One event, as delivered to subscribers.

    Attributes:
        event: The stable event name, e.g. ``plugin.reloaded``.
        fields: The event's fields (the same ones the log line carries).
        at: When it was emitted (UTC).
    """

    event: str
    fields: Mapping[str, Any]
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        """A field, or ``default``."""
        return self.fields.get(key, default)


class Subscription:
    """An async iterator of :class:`HostEvent`, registered from the moment it is created.

    Use as ``async with host.events() as events: async for event in events: ...``.
    A subscriber that falls more than ``buffer`` events behind loses the newest ones
    (counted in :attr:`dropped`) rather than slowing the host down.
    """

    def __init__(
        self, bus: EventBus, buffer: int, accept: Callable[[HostEvent], bool] | None = None
    ) -> None:
        self._bus = bus
        self._accept = accept
        send, receive = anyio.create_memory_object_stream[HostEvent](
            buffer if buffer > 0 else math.inf
        )
        self._send: MemoryObjectSendStream[HostEvent] = send
        self._receive: MemoryObjectReceiveStream[HostEvent] = receive
        self.dropped = 0
        bus._subscribers.add(self)

    def _offer(self, event: HostEvent) -> None:
        if self._accept is not None and not self._accept(event):
            return  # not wanted: no buffer slot, no wake-up of the reader
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            self.dropped += 1
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._bus._subscribers.discard(self)

    def receive_nowait(self) -> HostEvent | None:
        """The next buffered event without waiting, or None when none is buffered."""
        try:
            return self._receive.receive_nowait()
        except (anyio.WouldBlock, anyio.EndOfStream):
            return None

    def close(self) -> None:
        """Stop receiving events; iteration ends after what is buffered."""
        self._bus._subscribers.discard(self)
        self._send.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> HostEvent:
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        self._receive.close()


class LogThrottle:
    """The log level of a frequent per-plugin event: ``info`` at most once per interval.

    A reload storm reloads a plugin many times a second, and rendering each line (the
    JSON renderer, the timestamp) cost about a tenth of a reload's event-loop time. So the
    first such event of a key in each ``interval`` logs at ``info`` and the rest at
    ``debug``; the next ``info`` line carries ``quieted``, how many went to ``debug`` in
    between. Subscribers still get every event: only the log line's level changes.

    Args:
        interval: Seconds between two ``info`` lines of one key.
    """

    __slots__ = ("_interval", "_last")

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._last: dict[str, tuple[float, int]] = {}  # key -> (last info line, quieted)

    def level(self, key: str, fields: dict[str, Any]) -> Level:
        """The level of the next event of ``key``; adds ``quieted`` to ``fields`` if due.

        Args:
            key: Whose event (the plugin name).
            fields: The event's fields, updated in place.

        Returns:
            ``info`` or ``debug``.
        """
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self._interval:
            self._last[key] = (last[0], last[1] + 1)
            return "debug"
        if last is not None and last[1]:
            fields["quieted"] = last[1]
        self._last[key] = (now, 0)
        return "info"

    def forget(self, key: str) -> None:
        """Drop what is kept for ``key`` (its plugin was unloaded)."""
        self._last.pop(key, None)


class EventBus:
    """Emits events to structlog and to subscribers.

    Args:
        logger: The structlog logger events are written to.
    """

    def __init__(self, logger: Any = None) -> None:
        self.log = logger if logger is not None else structlog.get_logger("host")
        self._subscribers: set[Subscription] = set()

    def emit(self, event: str, level: Level = "info", **fields: Any) -> None:
        """Log ``event`` with ``fields`` at ``level`` and hand it to every subscriber."""
        assert level in _LEVELS, level
        fields = clip_fields(fields)
        getattr(self.log, level)(event, **fields)
        if self._subscribers:
            item = HostEvent(event, fields)
            for subscription in tuple(self._subscribers):
                subscription._offer(item)

    def subscribe(
        self, buffer: int = 10_000, accept: Callable[[HostEvent], bool] | None = None
    ) -> Subscription:
        """A new subscription.

        Args:
            buffer: Events kept for a slow reader; <= 0 means unbounded.
            accept: If set, only the events it returns True for are delivered (it runs
                in ``emit``, on the emitter's stack: keep it cheap and never raise).

        Returns:
            The subscription.
        """
        return Subscription(self, buffer, accept)
