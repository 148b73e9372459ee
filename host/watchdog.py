"""Loop-lag watchdog: detects code that blocks the event loop and names the plugin.

Design note — a heartbeat plus a sampling thread (the idea behind asyncio's debug-mode
``slow_callback_duration``, without debug mode's cost on every callback):

* A heartbeat task on the loop stamps ``time.monotonic()`` every ``interval`` seconds.
* A daemon thread wakes every ``interval``. If the stamp is older than
  ``interval + threshold``, something holds the loop. While it does, the thread samples
  the loop thread's stack (``sys._current_frames()``) and keeps the innermost frame whose
  file name is a plugin's (``<plugin greet@r7>``, see ``host.naming``). The dispatcher's
  hot path does nothing extra for this.
* When the heartbeat moves again, the thread hands one ``loop.blocked`` event (plugin,
  version, blocked_ms) to the loop with ``call_soon_threadsafe``: the event bus and its
  subscriptions belong to the loop thread.

A loop blocked for good (``while True: pass`` in an ``async def``) cannot be reported
through the bus, whose subscribers need the loop; the thread then logs ``loop.stuck``
once to structlog directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from types import FrameType

import anyio
import structlog

from .events import EventBus
from .naming import identify, is_plugin_file

__all__ = ("LoopWatchdog",)

_log = structlog.get_logger("host.watchdog")


class LoopWatchdog:
    """Reports ``loop.blocked`` when the event loop stalls for more than ``threshold``.

    Args:
        events: Where ``loop.blocked`` goes.
        threshold: Seconds the heartbeat may be late before the loop counts as blocked.
        interval: Heartbeat and sampling period (default: a quarter of ``threshold``).
        stuck_after: Seconds of one ongoing stall after which ``loop.stuck`` is logged
            from the watchdog thread (default: ``max(5, 20 * threshold)``).
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
        self.stalls = 0
        """Stalls detected so far."""
        self._events = events
        self._beat = time.monotonic()

    async def run(self) -> None:
        """Beat on the loop and watch from a thread until cancelled."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        self._beat = time.monotonic()
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
        stalled_at: float | None = None  # the last beat before the stall
        culprit: tuple[str, str] | None = None
        stuck_logged = False
        while not stop.wait(self.interval):
            beat = self._beat
            if stalled_at is not None:
                if beat == stalled_at:  # still blocked
                    if culprit is None:
                        culprit = _plugin_on_stack(loop_thread)
                    if not stuck_logged and time.monotonic() - beat > self.stuck_after:
                        stuck_logged = True
                        _log.error(
                            "loop.stuck",
                            plugin=culprit[0] if culprit else None,
                            version=culprit[1] if culprit else None,
                            blocked_ms=round((time.monotonic() - beat) * 1000.0, 1),
                        )
                    continue
                # The loop is back: the heartbeat was late by this much.
                late = max(beat - stalled_at - self.interval, 0.0)
                self._report(loop, culprit, late)
                stalled_at, culprit, stuck_logged = None, None, False
            if time.monotonic() - beat > limit:
                stalled_at = beat
                self.stalls += 1
                culprit = _plugin_on_stack(loop_thread)

    def _report(
        self, loop: asyncio.AbstractEventLoop, culprit: tuple[str, str] | None, late: float
    ) -> None:
        plugin, version = culprit if culprit is not None else (None, None)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._emit, plugin, version, round(late * 1000.0, 1))

    def _emit(self, plugin: str | None, version: str | None, blocked_ms: float) -> None:
        self._events.emit(
            "loop.blocked",
            "warning",
            plugin=plugin,
            version=version,
            blocked_ms=blocked_ms,
            threshold_ms=round(self.threshold * 1000.0, 1),
        )


def _plugin_on_stack(thread_id: int) -> tuple[str, str] | None:
    """The (plugin, version) of the innermost plugin frame running on ``thread_id``."""
    frame: FrameType | None = sys._current_frames().get(thread_id)
    while frame is not None:
        filename = frame.f_code.co_filename
        if is_plugin_file(filename):
            module = frame.f_globals.get("__name__")
            return identify(filename, module if isinstance(module, str) else "")
        frame = frame.f_back
    return None
