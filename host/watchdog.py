"""Loop-lag watchdog: detects code that blocks the event loop and names the plugin.

Design note — a heartbeat plus a sampling thread (the idea behind asyncio's debug-mode
``slow_callback_duration``, without debug mode's cost on every callback):

* A heartbeat task on the loop stamps ``time.monotonic()`` every ``interval`` seconds.
* A daemon thread wakes every ``interval``. Once the stamp is overdue (older than 1.5
  intervals) it samples the loop thread's stack (``sys._current_frames()``) at each wake,
  and if the stamp gets older than ``interval + threshold`` the loop has *stalled*. The
  dispatcher's hot path does nothing extra for this.
* A stall has two causes, told apart by the samples (issue 12: under wrk a saturated
  loop's iteration ran past 100 ms and was reported as a block naming no plugin):

  - **blocked**: one callback held the loop (a plugin's ``time.sleep`` in ``async def``).
    Consecutive samples land in the *same* callback.
  - **saturated**: many short ready callbacks queued in front of the heartbeat (plain
    overload). Consecutive samples land in *different* callbacks.

  A sample's callback is the frame the loop's callback runner called: the outermost frame
  of the stack that is not one of the loop's own *driver* frames (``run_forever``,
  ``_run_once``, ``Handle._run``, the runner...). The heartbeat learns the driver frames'
  code objects from its own stack once, when it starts (the non-coroutine frames around
  it; every later step of its task is run by the same runner), so this holds for asyncio
  and uvloop alike. Callbacks are compared by frame identity: the
  sampled frames are kept referenced until the stall ends, so a finished callback's frame
  cannot be reused by the next one. For a task step the callback frame is the task's
  outermost coroutine frame (the same across its steps).
* A callback seen in consecutive samples spanning at least ``threshold - 2 * interval``
  (half the threshold by default; never less than half an interval) ran at least that
  long: the stall is a block, reported as ``loop.blocked`` (plugin, version, blocked_ms)
  naming the innermost plugin frame of that callback. Otherwise it is ``loop.saturated``
  (lag_ms, the ready queue's depth where the loop exposes it, the callbacks the samples
  saw, the longest one seen, the tasks alive). A block of ``threshold`` is sampled for at
  least ``threshold - 2 * interval`` (a sample at most one interval after it starts and
  one before it ends), which is why that is the bound.
* When the heartbeat moves again, the thread hands the event to the loop with
  ``call_soon_threadsafe``: the event bus and its subscriptions belong to the loop thread.

A loop blocked for good (``while True: pass`` in an ``async def``) cannot be reported
through the bus, whose subscribers need the loop; the thread then logs ``loop.stuck``
once to structlog directly.

Limits: a callback blocked in C without a Python frame of its own (a C callback under
uvloop) has only driver frames on the stack, so all such callbacks look alike; a block
in C that keeps the GIL cannot be sampled at all (the thread gets the GIL only after it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import sys
import threading
import time
from dataclasses import dataclass
from types import CodeType, FrameType

import anyio
import structlog

from .events import EventBus
from .naming import identify, is_plugin_file

__all__ = ("LoopWatchdog",)

_log = structlog.get_logger("host.watchdog")

_COROUTINE_FLAGS = inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE | inspect.CO_ASYNC_GENERATOR

Culprit = tuple[str, str]
"""(plugin, version) of a plugin frame."""


@dataclass(slots=True)
class _Stall:
    """What the watchdog thread saw since the heartbeat ``beat`` became overdue.

    Only the watchdog thread touches it. ``key`` holds the frames of the callback seen at
    the last sample (kept alive so their identities stay unique until the window ends).
    """

    beat: float
    key: tuple[FrameType, ...] | None = None
    since: float = 0.0  # when the callback in ``key`` was first seen, in a row
    culprit: Culprit | None = None  # its innermost plugin frame, if any sample had one
    longest: float = 0.0  # the longest span one callback was seen running
    longest_culprit: Culprit | None = None
    callbacks: int = 0  # distinct callbacks seen (changes of ``key``)
    depth: int | None = None  # deepest ready queue seen (asyncio only)
    stalled: bool = False  # the heartbeat got later than interval + threshold
    stuck_logged: bool = False

    def add(self, now: float, key: tuple[FrameType, ...], culprit: Culprit | None) -> None:
        """Record one sample taken at ``now``."""
        if self.key is not None and _same(key, self.key):
            if self.culprit is None:
                self.culprit = culprit
        else:
            self.key, self.since, self.culprit = key, now, culprit
            self.callbacks += 1
        span = now - self.since
        if span > self.longest or (span == self.longest and self.longest_culprit is None):
            self.longest, self.longest_culprit = span, self.culprit


def _same(a: tuple[FrameType, ...], b: tuple[FrameType, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


class LoopWatchdog:
    """Reports ``loop.blocked`` when a callback stalls the event loop for more than
    ``threshold``, and ``loop.saturated`` when a queue of short ones does.

    Args:
        events: Where ``loop.blocked`` and ``loop.saturated`` go.
        threshold: Seconds the heartbeat may be late before the loop counts as stalled.
        interval: Heartbeat and sampling period (default: a quarter of ``threshold``).
        stuck_after: Seconds of one ongoing stall after which ``loop.stuck`` is logged
            from the watchdog thread (default: ``max(5, 20 * threshold)``).

    Raises:
        ValueError: ``threshold`` is not positive.
    """

    def __init__(
        self,
        events: EventBus,
        *,
        threshold: float = 0.1,
        interval: float | None = None,
        stuck_after: float | None = None,
    ) -> None:
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        self.threshold = threshold
        self.interval = interval if interval is not None else threshold / 4
        self.stuck_after = stuck_after if stuck_after is not None else max(5.0, 20 * threshold)
        self.block_span = max(self.threshold - 2 * self.interval, self.interval / 2)
        """Seconds one callback must be seen running for a stall to count as a block."""
        self.stalls = 0
        """Stalls detected so far (blocks and saturations)."""
        self.saturations = 0
        """Of those, the ones judged saturation (a queue of short callbacks)."""
        self._events = events
        self._beat = time.monotonic()
        self._drivers: frozenset[CodeType] = frozenset()

    async def run(self) -> None:
        """Beat on the loop and watch from a thread until cancelled."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        self._beat = time.monotonic()
        self._drivers = _driver_codes(sys._getframe())
        thread = threading.Thread(
            target=self._watch,
            args=(loop, threading.get_ident(), stop),
            name="plugin-host loop watchdog",
            daemon=True,
        )
        thread.start()
        try:
            while True:
                self._beat = time.monotonic()
                await anyio.sleep(self.interval)
        finally:
            stop.set()  # the thread exits within one interval; no join on the loop

    # -- the watchdog thread ------------------------------------------------------------

    def _watch(
        self, loop: asyncio.AbstractEventLoop, loop_thread: int, stop: threading.Event
    ) -> None:
        limit = self.interval + self.threshold
        overdue = 1.5 * self.interval
        ready = getattr(loop, "_ready", None)  # asyncio's ready queue; uvloop hides its own
        if not isinstance(ready, collections.deque):
            ready = None
        window: _Stall | None = None
        while not stop.wait(self.interval):
            beat = self._beat
            if window is not None and beat != window.beat:  # the heartbeat moved
                if window.stalled:
                    self._report(loop, window, max(beat - window.beat - self.interval, 0.0))
                window = None
            now = time.monotonic()
            if now - beat <= overdue:
                continue
            if window is None:
                window = _Stall(beat)
            sample = self._sample(loop_thread)
            if sample is not None:
                window.add(now, *sample)
            if ready is not None:
                depth = len(ready)  # a deque's length: one atomic read under the GIL
                window.depth = depth if window.depth is None else max(window.depth, depth)
            if not window.stalled and now - beat > limit:
                window.stalled = True
                self.stalls += 1
            if window.stalled and not window.stuck_logged and now - beat > self.stuck_after:
                window.stuck_logged = True
                culprit = window.culprit or window.longest_culprit
                _log.error(
                    "loop.stuck",
                    plugin=culprit[0] if culprit else None,
                    version=culprit[1] if culprit else None,
                    blocked_ms=round((now - beat) * 1000.0, 1),
                    callbacks_seen=window.callbacks,
                )

    def _sample(self, loop_thread: int) -> tuple[tuple[FrameType, ...], Culprit | None] | None:
        """The callback running on the loop thread (its frames) and its plugin frame."""
        frame: FrameType | None = sys._current_frames().get(loop_thread)
        if frame is None:
            return None
        chain: list[FrameType] = []
        culprit: Culprit | None = None
        while frame is not None:
            if culprit is None and is_plugin_file(frame.f_code.co_filename):
                module = frame.f_globals.get("__name__")
                culprit = identify(
                    frame.f_code.co_filename, module if isinstance(module, str) else ""
                )
            chain.append(frame)
            frame = frame.f_back
        drivers = self._drivers
        key: list[FrameType] = []
        for outer in reversed(chain):
            key.append(outer)
            if outer.f_code not in drivers:
                break  # the callback the loop's runner called
        return tuple(key), culprit

    def _report(self, loop: asyncio.AbstractEventLoop, window: _Stall, late: float) -> None:
        late_ms = round(late * 1000.0, 1)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            if window.longest >= self.block_span:
                culprit = window.longest_culprit
                plugin, version = culprit if culprit is not None else (None, None)
                loop.call_soon_threadsafe(self._emit_blocked, plugin, version, late_ms)
            else:
                self.saturations += 1
                loop.call_soon_threadsafe(
                    self._emit_saturated,
                    late_ms,
                    window.depth,
                    window.callbacks,
                    round(window.longest * 1000.0, 1),
                )

    def _emit_blocked(self, plugin: str | None, version: str | None, blocked_ms: float) -> None:
        self._events.emit(
            "loop.blocked",
            "warning",
            plugin=plugin,
            version=version,
            blocked_ms=blocked_ms,
            threshold_ms=round(self.threshold * 1000.0, 1),
        )

    def _emit_saturated(
        self, lag_ms: float, depth: int | None, callbacks: int, longest_ms: float
    ) -> None:
        self._events.emit(
            "loop.saturated",
            "warning",
            lag_ms=lag_ms,
            threshold_ms=round(self.threshold * 1000.0, 1),
            queue_depth=depth,
            callbacks_seen=callbacks,
            longest_callback_ms=longest_ms,
            tasks=len(asyncio.all_tasks()),
        )


def _driver_codes(frame: FrameType | None) -> frozenset[CodeType]:
    """The code of the loop's own frames around ``frame`` (the heartbeat's): the frames
    that are not coroutines (the heartbeat task's own chain is)."""
    codes: set[CodeType] = set()
    while frame is not None:
        if not frame.f_code.co_flags & _COROUTINE_FLAGS:
            codes.add(frame.f_code)
        frame = frame.f_back
    return frozenset(codes)
