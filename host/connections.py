"""Connection hygiene for the daemon's HTTP server: timeouts, a connection cap, quiet logs.

Uvicorn closes a keep-alive connection that stays idle after a response, but nothing bounds
a connection that never sends a byte, sends half its headers, or never finishes its body,
and nothing caps how many connections it keeps open: a crowd of idle sockets can take every
file descriptor, and then ``accept()`` fails (and asyncio logs a traceback per attempt).

:func:`guarded_protocol` wraps Uvicorn's HTTP protocol class (h11 or httptools, whichever
runs) so that every connection reports where it is in its request cycle to one
:class:`ConnectionGuard`:

* *idle* — waiting for the first byte of a request (after connect, or after a response):
  closed silently after ``idle_timeout``;
* *headers* — the first byte came, the headers are not complete: answered 408 and closed
  after ``header_timeout`` (counted from the first byte);
* *body* — headers complete, body not yet: closed after ``body_timeout`` (the application
  sees a disconnect);
* *busy* — the application is working on the request: no timeout here (the call's own
  timeout applies).

A single sweeper task (:meth:`ConnectionGuard.sweep`) enforces the timeouts, so the per-
request cost is a few attribute writes. At the cap, a new connection evicts the connection
that has been idle longest; when none is idle, the new one gets a 503 and is closed. So a
crowd of idle sockets cannot lock out ``/healthz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import anyio
import structlog

__all__ = (
    "ConnectionGuard",
    "Throttled",
    "accept_errors_logged",
    "default_max_connections",
    "guarded_protocol",
)

_log = structlog.get_logger("host.http")

_CLOSE_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)
_CLOSE_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"connection: close\r\nretry-after: 1\r\ncontent-length: %d\r\n\r\n%s"
)


def _raw_reply(template: bytes, kind: str, message: str) -> bytes:
    body = b'{"error": {"type": "%s", "message": "%s"}}' % (kind.encode(), message.encode())
    return template % (len(body), body)


def default_max_connections() -> int:
    """The default cap: three quarters of the soft descriptor limit (headroom for MongoDB
    connections, plugin files and the rest), at least 16."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 65_536
    return max(16, soft * 3 // 4)


class Throttled:
    """A log event emitted at most once per ``interval``, with the count it stands for.

    Args:
        event: The event name.
        interval: Seconds between two emissions.
        level: The structlog method to use.
    """

    def __init__(self, event: str, interval: float = 10.0, level: str = "warning") -> None:
        self.event = event
        self.interval = interval
        self.level = level
        self.total = 0
        self._pending = 0
        self._last = -float("inf")

    def hit(self, **fields: Any) -> None:
        """Count one occurrence; log it when the interval since the last emission passed."""
        self.total += 1
        self._pending += 1
        now = time.monotonic()
        if now - self._last >= self.interval:
            getattr(_log, self.level)(
                self.event, count=self._pending, interval_s=self.interval, **fields
            )
            self._pending = 0
            self._last = now


class ConnectionGuard:
    """Timeouts and a cap over the connections of one HTTP server.

    Args:
        idle_timeout: Seconds a connection may wait before the first byte of a request.
        header_timeout: Seconds from a request's first byte to its complete headers.
        body_timeout: Seconds from complete headers to the complete body.
        max_connections: Most open connections (None: :func:`default_max_connections`).
    """

    # Invariant: ``connections`` is exactly the set of guarded connections that were made
    # and not yet lost. Everything here runs on the event loop thread (protocol callbacks
    # and the sweeper task), so no lock is needed.

    def __init__(
        self,
        *,
        idle_timeout: float = 5.0,
        header_timeout: float = 10.0,
        body_timeout: float = 30.0,
        max_connections: int | None = None,
    ) -> None:
        for name, value in (
            ("idle_timeout", idle_timeout),
            ("header_timeout", header_timeout),
            ("body_timeout", body_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections or default_max_connections()
        self.connections: set[_GuardedProtocol] = set()
        self.closed_for: dict[str, int] = {"idle": 0, "headers": 0, "body": 0, "evicted": 0}
        self.refused = 0
        self._cap_log = Throttled("http.connection_cap")

    def opened(self, conn: _GuardedProtocol) -> bool:
        """Admit a new connection (evicting the longest-idle one at the cap); False: refused."""
        if len(self.connections) >= self.max_connections:
            idle = [c for c in self.connections if c.g_state() == "idle"]
            if not idle:
                self.refused += 1
                self._cap_log.hit(limit=self.max_connections, action="refused")
                conn.g_close(_raw_reply(_CLOSE_503, "TooManyConnections", "try again later"))
                return False
            oldest = min(idle, key=lambda c: c.g_since)
            self.closed_for["evicted"] += 1
            self._cap_log.hit(limit=self.max_connections, action="evicted_idle")
            oldest.g_close(b"")
        self.connections.add(conn)
        return True

    def lost(self, conn: _GuardedProtocol) -> None:
        """Forget a connection that closed."""
        self.connections.discard(conn)

    def expire(self, now: float | None = None) -> int:
        """Close every connection past its phase's timeout; return how many were closed."""
        now = time.monotonic() if now is None else now
        closed = 0
        for conn in list(self.connections):
            state = conn.g_state()
            if state == "idle" and now - conn.g_since > self.idle_timeout:
                conn.g_close(b"")
            elif state == "headers" and now - conn.g_since > self.header_timeout:
                message = f"the request headers did not arrive within {self.header_timeout:g} s"
                conn.g_close(_raw_reply(_CLOSE_408, "RequestTimeout", message))
            elif state == "body" and now - conn.g_since > self.body_timeout:
                conn.g_close(b"")
            else:
                continue
            self.closed_for[state] += 1
            closed += 1
        return closed

    async def sweep(self) -> None:
        """Enforce the timeouts until cancelled (run it as a background task)."""
        period = min(self.idle_timeout, self.header_timeout, self.body_timeout) / 4
        period = min(1.0, max(0.02, period))
        while True:
            await anyio.sleep(period)
            self.expire()


class _GuardedProtocol(asyncio.Protocol):
    """The part of a guarded connection the guard sees (mixed into Uvicorn's protocol)."""

    guard: ClassVar[ConnectionGuard]
    # Set by Uvicorn's protocol classes.
    cycle: Any
    transport: Any

    # Where the connection is: ``g_since`` is when the current phase began; ``g_seen`` the
    # request cycle whose headers completed last; ``g_phase`` one of idle/headers/body/busy.
    g_phase: str
    g_since: float
    g_seen: Any

    def g_state(self) -> str:
        return self.g_phase

    def g_close(self, reply: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if reply:
            transport.write(reply)
        transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.g_phase, self.g_since, self.g_seen = "idle", time.monotonic(), None
        super().connection_made(transport)
        self.guard.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.lost(self)
        super().connection_lost(exc)

    # The base protocol's own methods, set by guarded_protocol: called directly, without
    # building a super() proxy twice per request.
    g_base_data_received: ClassVar[Callable[[Any, bytes], None]]
    g_base_response_complete: ClassVar[Callable[[Any], None]]

    def data_received(self, data: bytes) -> None:
        if self.g_phase == "idle":
            self.g_phase, self.g_since = "headers", time.monotonic()
        self.g_base_data_received(data)
        cycle = self.cycle
        if cycle is not self.g_seen or self.g_phase == "body":
            self._g_sync()

    def on_response_complete(self) -> None:
        before = self.cycle
        self.g_base_response_complete()
        if self.cycle is before:  # no pipelined request started: wait for the next one
            self.g_phase, self.g_since = "idle", time.monotonic()
        else:
            self._g_sync()

    def _g_sync(self) -> None:
        cycle = self.cycle
        if cycle is None:
            return
        if cycle is not self.g_seen:  # a new request's headers are complete
            self.g_seen = cycle
            self.g_phase = "body" if cycle.more_body else "busy"
            self.g_since = time.monotonic()
        elif self.g_phase == "body" and not cycle.more_body:
            self.g_phase = "busy"


def guarded_protocol(base: type[asyncio.Protocol], guard: ConnectionGuard) -> type[Any]:
    """Uvicorn's HTTP protocol class ``base`` with every connection reporting to ``guard``.

    Args:
        base: ``H11Protocol`` or ``HttpToolsProtocol`` (what ``http="auto"`` picks).
        guard: Where connections report.

    Returns:
        A subclass of ``base`` to give ``uvicorn.Config(http=...)``.
    """
    return type(
        f"Guarded{base.__name__}",
        (_GuardedProtocol, base),
        {
            "guard": guard,
            "g_base_data_received": base.data_received,
            "g_base_response_complete": base.on_response_complete,  # type: ignore[attr-defined]
        },
    )


_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@contextlib.contextmanager
def accept_errors_logged(
    loop: asyncio.AbstractEventLoop, interval: float = 10.0
) -> Iterator[Throttled]:
    """Log the loop's ``accept()`` resource errors once per ``interval``, not once per attempt.

    asyncio reports each failed ``accept()`` (``EMFILE``: out of descriptors) through the
    loop's exception handler, with a traceback, and retries a second later; under a flood
    of connections that fills the log. Other errors go to the previous handler, which is
    put back on exit.

    Args:
        loop: The running loop.
        interval: Seconds between two ``http.accept_failed`` events.

    Yields:
        The throttled event (its ``total`` counts every failure).
    """
    throttled = Throttled("http.accept_failed", interval, level="error")
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
            throttled.hit(error=str(exc))
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        yield throttled
    finally:
        loop.set_exception_handler(previous)
