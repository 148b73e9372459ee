"""Reload events: one structlog event per reload, failure, resume or resync, and a fan-out
to in-process subscribers (embedders, tests, metrics).

The event names and their fields are a public interface (documented in the README):
``host.started``, ``host.stopped``, ``watch.started``, ``watch.resumed``,
``watch.resynced``, ``watch.invalidated``, ``plugin.loaded``, ``plugin.reloaded``,
``plugin.reload_failed``, ``plugin.rejected``, ``plugin.unloaded``, ``plugin.retired``,
``call.failed``, ``call.timeout``; and ``watch.error``, ``watch.failed``,
``plugin.teardown_failed``, ``plugin.task_failed``, ``trust.disabled``, ``loop.blocked``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self, get_args

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ("EventBus", "HostEvent", "Level", "Subscription")

Level = Literal["debug", "info", "warning", "error"]
"""The log levels of host events."""
_LEVELS = frozenset(get_args(Level))


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

    def __init__(self, bus: EventBus, buffer: int) -> None:
        self._bus = bus
        send, receive = anyio.create_memory_object_stream[HostEvent](
            buffer if buffer > 0 else math.inf
        )
        self._send: MemoryObjectSendStream[HostEvent] = send
        self._receive: MemoryObjectReceiveStream[HostEvent] = receive
        self.dropped = 0
        bus._subscribers.add(self)

    def _offer(self, event: HostEvent) -> None:
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            self.dropped += 1
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._bus._subscribers.discard(self)

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
        getattr(self.log, level)(event, **fields)
        if self._subscribers:
            item = HostEvent(event, fields)
            for subscription in tuple(self._subscribers):
                subscription._offer(item)

    def subscribe(self, buffer: int = 10_000) -> Subscription:
        """A new subscription; ``buffer`` <= 0 means unbounded."""
        return Subscription(self, buffer)
