"""The dispatcher: routes a call to the current version of a plugin.

This is the hot path. Its rules, on success:

* no I/O and no logging — events are emitted only on failure and timeout;
* no lock unless the version has a concurrency limit, and even then an uncontended
  ``acquire_nowait``;
* no cancel scope when the call has no timeout (an outermost call registers its task in
  a dict instead, so that shutdown can end it: see ``abort``), and no timer per call when
  it has one (a loop's calls share one timer for all their deadlines: see ``_Ticker``);
* no structlog ``bind`` (``ctx.log`` is built lazily) and no string building;
* a handful of allocations: the ``CALL_PATH`` tuples and the plugin's coroutine (the
  ``Context`` is the previous call's when nothing else holds it: see ``host.context``);
* one coroutine frame of its own (an async plugin's coroutine is awaited inline), one
  context-variable set, and no clock read unless the call has a timeout (one) or a
  rollout times it (a clock read or a ``getpid`` is a system call on some VMs: 0.1 to
  0.25 µs each).

Failures are slow on purpose: the traceback is formatted in a worker thread because
:mod:`linecache` may read library source files.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from functools import partial
from heapq import heappop, heappush
from types import MappingProxyType
from typing import Any

import anyio
import structlog

from .context import Context
from .errors import (
    HostClosed,
    PluginBusy,
    PluginError,
    PluginFailed,
    PluginNotFound,
    PluginTimeout,
    RequireDepthExceeded,
)
from .events import EventBus
from .naming import format_plugin_traceback
from .plugin import Plugin, is_plugin_failure
from .registry import CALL_PATH, Registry
from .rollout import FAILED, OK, TIMEOUT, LiveRollout, MirrorQueue, pick_version
from .threads import ThreadLimiter, ThreadsExhausted, run_sync_interruptible
from .types import Args, Entrypoint

__all__ = ("Dispatcher", "Required")

_log = structlog.get_logger("host.dispatch")

_clock = time.perf_counter  # a rollout's call timing (one global lookup, no attribute)
_refcount = sys.getrefcount
_UNSHARED = 2  # sys.getrefcount(ctx) when only the call's frame holds ctx (plus the argument)
_REUSE_CONTEXTS = (
    sys.implementation.name == "cpython"
    and sys.version_info < (3, 14)  # 3.14 borrows references on the stack: counts differ
    and not sysconfig.get_config_var("Py_GIL_DISABLED")
)
"""Whether a call's ``Context`` may be reused (exact reference counts: CPython, GIL)."""
_thread_id = threading.get_ident
_task_of: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None] = asyncio.current_task
# ``asyncio.current_task`` is a Python function before 3.12: there, read the dict it reads
# (asyncio's C tasks keep it) directly. Either takes the loop: see _LoopCache for why.
_running_tasks = getattr(asyncio.tasks, "_current_tasks", None)
if sys.version_info < (3, 12) and isinstance(_running_tasks, dict):
    _task_of = _running_tasks.get


class _LoopCache:
    """The running loop of the thread that last called, to find the current task cheaply.

    Design note: ``asyncio.get_running_loop()`` checks ``os.getpid()`` on every call
    before 3.12 (a system call: ~0.25 µs on the 2-core bench machine, a tenth of a whole
    call). An outermost call needs its task (``abort``), so the loop is read once per
    thread instead: ``task_of(cached loop)`` is the current task when that loop runs
    this thread's current task, and None when it does not (a loop runs on one thread at
    a time, and asyncio's map holds only running tasks), and then the loop is read
    again. The loop's ``_Ticker`` rides along, so a call with a timeout finds its loop's
    deadlines without asking its task for its loop.
    """

    # INVARIANT: ``cached`` is (thread id, loop, that loop's ticker) as last read on that
    # thread, or (0, None, None); one tuple, read in one load, so a call never pairs one
    # thread's loop with another's ticker. A loop keeps its ticker while it stays cached
    # (one that comes back gets a new one: an old one still expires its own calls).
    # Several threads each re-read on their turn.

    __slots__ = ("cached",)

    def __init__(self) -> None:
        self.cached: tuple[int, asyncio.AbstractEventLoop | None, _Ticker | None] = _NO_LOOP

    def refresh(self) -> tuple[int, asyncio.AbstractEventLoop | None, _Ticker | None]:
        """Read the running loop of this thread again; the new ``cached`` (_NO_LOOP: none)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return _NO_LOOP
        _thread, cached_loop, ticker = self.cached
        if cached_loop is not loop or ticker is None:
            ticker = _Ticker(loop)
        cached = self.cached = (_thread_id(), loop, ticker)
        return cached


_NO_LOOP: tuple[int, asyncio.AbstractEventLoop | None, _Ticker | None] = (0, None, None)


class _Lease:
    """One concurrency slot of one version, held by one call and everything it calls."""

    __slots__ = ("live", "plugin")

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        self.live = True


_HELD: ContextVar[tuple[_Lease, ...]] = ContextVar("plugin_host_held_slots", default=())
"""Concurrency slots held by the calls on the current call path (issue 13 item 6).

THE RULE: a plugin-to-plugin call never waits for a slot that one of its callers holds.
A call to a version whose slot is already held by a caller on its own path (a plugin
calling itself, directly, through others or through ``asyncio.gather``) runs under that
slot; every other call takes a slot of its own. So ``max_concurrency`` bounds the
independent call trees running in a version, fan-out inside one tree cannot deadlock on
its own slots, and fan-in from separate trees still queues. Tasks copy the context, so
``gather`` children inherit the leases; a lease dies with its call (``live``), so a
background task that outlives the call takes slots like any other caller.
"""


class _Ticker:
    """The deadlines of one loop's calls in flight, in buckets of one tick, and one timer.

    Design note: ``asyncio.timeout`` arms and cancels a loop timer per call, which cost
    about three times the rest of a call (issue 12). Here a call with a timeout, whatever
    its value, goes into the bucket of the tick its deadline falls in (deadline ``d``:
    bucket ``int(d * TICKS) + 1``, due at ``bucket / TICKS``, after ``d`` and at most one
    tick later), and one timer, set for the earliest bucket, cancels the calls of every
    bucket that is due and sets itself for the next. So a call pays a clock read, two
    float compares and a dict insert and pop (its entry is its call id and its task, no
    object of its own); it arms nothing unless it opens a bucket earlier than the timer.
    Calls in a row land in the same bucket (``open``: no lookup); a bucket that empties
    while calls may still join it stays until the next opens or it is due, any other goes
    when its last call ends, so empty buckets do not pile up under a long timeout. A
    timer that finds nothing left stops, and the next call that opens a bucket sets it.
    A bucket is due when the loop's clock reaches its time, so a deadline never fires
    early, and at most one tick late (plus the loop's own lateness). Expiry cancels the
    task and the call's frame turns that into ``PluginTimeout`` with ``asyncio.timeout``'s
    own cancel-counting protocol (``Task.uncancel``, against the ``cancelling()`` count
    the call noted when it started), so an enclosing cancel scope's cancellation stays one.
    One ticker per loop (a loop's timer handles are that loop's): see ``_LoopCache``.
    Each call reads the clock: stamping calls with the time of the last tick instead
    would need a timer every tick while calls arrive (a wake-up per call at low rates)
    and would add that timer's lateness to every deadline's.
    """

    # INVARIANT: ``buckets`` maps a tick to the calls in flight whose deadline falls in it
    # and that have not expired (call id -> task); a call whose id is no longer
    # in its bucket has expired (the timer took the bucket out, cancelled its tasks and
    # cleared it). Every bucket in ``buckets`` holds a call, except perhaps ``open`` (the
    # bucket of tick ``last``, the last one a call joined, for deadlines ``low <= at <
    # high`` in ticks; ``last`` is -1 and ``open`` an unlisted empty dict when there is
    # none, with an empty span). ``due`` is a heap of ticks holding every key
    # of ``buckets`` (and ticks of buckets since dropped, fewer than 2 * len(buckets) + 64).
    # A call with no finite deadline (``at >= _NEVER``) gets a dict of its own, unlisted.
    # While ``buckets`` is not empty, ``timer`` is set (for tick ``armed``) at or before the
    # time of its earliest bucket. Loop thread only.

    __slots__ = ("armed", "buckets", "due", "high", "last", "loop", "low", "open", "time", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buckets: dict[int, dict[object, asyncio.Task[Any]]] = {}
        self.due: list[int] = []
        self.last = -1
        self.open: dict[object, asyncio.Task[Any]] = {}
        # The deadlines (in ticks) of the open bucket: low <= at < high (floats, compared
        # inline by a call: no int() per call). Empty while there is no open bucket.
        self.low = self.high = -1.0
        self.timer: asyncio.TimerHandle | None = None
        self.armed = 0
        # asyncio's own loops read time.monotonic() in a Python method: read it directly.
        own_clock = getattr(type(loop), "time", None) is asyncio.BaseEventLoop.time
        self.time: Callable[[], float] = time.monotonic if own_clock else loop.time

    def enter(self, at: float) -> dict[object, asyncio.Task[Any]]:
        """The bucket of deadline ``at`` (in ticks), which becomes the open one."""
        if not at < _NEVER:  # an infinite (or NaN) timeout: a bucket no timer expires
            return {}
        tick = int(at) + 1
        buckets = self.buckets
        if not self.open and buckets.get(self.last) is self.open:
            del buckets[self.last]  # the open bucket emptied: no call will join it now
        bucket = buckets.get(tick)
        if bucket is None:
            bucket = buckets[tick] = {}
            due = self.due
            if len(due) > 2 * len(buckets) + 64:  # mostly dropped buckets: rebuild
                due[:] = sorted(buckets)  # (a sorted list is a heap)
            else:
                heappush(due, tick)
            if self.timer is None or tick < self.armed:
                self._arm(tick)
        self.last, self.open = tick, bucket
        self.high = float(tick)
        self.low = self.high - 1.0
        return bucket

    def drop(self, at: float) -> None:
        """A call of deadline ``at`` emptied its bucket, which is not the open one: drop it."""
        if at < _NEVER:
            del self.buckets[int(at) + 1]

    def _arm(self, tick: int) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(tick / TICKS, self._expire)
        self.armed = tick

    def _expire(self) -> None:
        self.timer = None
        now = self.time()
        due, buckets = self.due, self.buckets
        while due:
            tick = due[0]
            bucket = buckets.get(tick)
            if bucket is None:  # dropped when it emptied
                heappop(due)
                continue
            if tick / TICKS > now:  # not yet (a loop may run a timer a hair early)
                self._arm(tick)
                return
            heappop(due)
            del buckets[tick]
            if bucket is self.open:
                self.last, self.open = -1, {}
                self.low = self.high = -1.0
            for task in bucket.values():
                task.cancel()
            bucket.clear()  # its calls see they expired


TICKS = 1000.0  # ticks per second: a deadline fires at most 1 ms late (uvloop's clock tick)
_NEVER = 2.0**62  # a deadline (in ticks) at or past this is none: inf, NaN, ~146,000 years


class Required:
    """A late-bound handle on a plugin, as returned by ``require(name)``.

    Every invocation looks the plugin up again, so it always reaches the version that
    is current at that moment — like Node's hot-require.
    """

    __slots__ = ("_dispatcher", "name")

    def __init__(self, dispatcher: Dispatcher, name: str) -> None:
        """Bind a handle to ``name``; the plugin need not be loaded yet."""
        self._dispatcher = dispatcher
        self.name = name

    async def __call__(self, args: Args = None, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - per-call timeout is the public contract
        """Call the current version of the plugin.

        Args:
            args: The plugin's argument.
            timeout: Per-call timeout in seconds.

        Returns:
            The plugin's result.
        """
        return await self._dispatcher.call(self.name, args, timeout=timeout)

    def __repr__(self) -> str:
        return f"<Required {self.name!r}>"


class Dispatcher:
    """Runs calls on the current versions held by a :class:`Registry`."""

    def __init__(
        self,
        registry: Registry,
        *,
        db: Any,
        globals: Mapping[str, Any] | None = None,
        default_timeout: float | None = None,
        max_waiting: int = 1000,
        require_depth: int = 16,
        thread_limiter_size: int = 40,
        events: EventBus | None = None,
        threads: ThreadLimiter | None = None,
    ) -> None:
        """Create a dispatcher.

        Args:
            registry: Where current versions are looked up.
            db: The database handed to plugins as ``ctx.db``.
            globals: Host globals exposed as ``ctx`` attributes.
            default_timeout: Timeout for calls whose record sets none; ``None`` for none.
            max_waiting: Calls that may queue on a saturated version before
                ``PluginBusy``.
            require_depth: Deepest allowed chain of plugin-to-plugin calls.
            thread_limiter_size: Worker threads shared by sync plugins.
            events: Where ``call.failed``, ``call.timeout`` and ``plugin.thread_stuck`` go.
            threads: The limiter sync calls share (overrides ``thread_limiter_size``); the
                host passes the one its registry's hooks use.

        Raises:
            ValueError: ``require_depth`` is below 1.
        """
        self._registry = registry
        self._lookup = registry.lookup  # the hot path's Registry.get, without its frame
        self._db = db
        self._globals: Mapping[str, Any] = MappingProxyType(dict(globals or {}))
        self._default_timeout = default_timeout
        self._max_waiting = max_waiting
        if require_depth < 1:  # the hot path lets an outermost call (depth 0) through unchecked
            raise ValueError(f"require_depth must be at least 1, not {require_depth}")
        self._require_depth = require_depth
        self._threads = threads if threads is not None else ThreadLimiter(thread_limiter_size)
        # Versions with abandoned call threads, for the exit report (pruned as they end).
        self._stuck: dict[Plugin, None] = {}
        self._ids = itertools.count(1)
        # INVARIANT: _spare is None or a Context that nothing references but this
        # attribute (its call ended, and sys.getrefcount saw no other holder: not the
        # plugin's globals, result, tasks or closures). A call takes it (sets None)
        # and rebinds it with no await in between. Loop thread only.
        self._spare: Context | None = None
        self._loops = _LoopCache()
        self._closed = False
        # INVARIANT: _calls holds the task of every outermost call in flight, and only
        # those (added before the call runs, removed when it ends); _aborted holds the
        # ones abort() cancelled whose call frame has not yet turned that into
        # HostClosed. Loop thread only.
        self._calls: dict[asyncio.Task[Any], None] = {}
        self._aborted: set[asyncio.Task[Any]] = set()
        self._events = events if events is not None else EventBus(_log)
        # Progressive delivery: the registry's routing states (one per name with a
        # candidate; the same dict object for the registry's whole life).
        self._rollouts = registry.rollouts
        self.on_rollout_abort: Callable[[LiveRollout, str], None] | None = None
        """Called once when a candidate breaks its policy (routing already stopped)."""
        self.on_mirror: MirrorQueue | None = None
        """Takes the stable's answers a shadow mirrors (``LiveRollout.due``)."""

    @property
    def db(self) -> Any:
        """The database handed to plugins as ``ctx.db``."""
        return self._db

    @property
    def globals(self) -> Mapping[str, Any]:
        """Host globals exposed as ``ctx`` attributes (read-only)."""
        return self._globals

    @property
    def abandoned_threads(self) -> int:
        """Worker threads of timed-out sync calls that still run (and hold their slot)."""
        return self._threads.abandoned

    @property
    def draining(self) -> bool:
        """Whether :meth:`close` was called; new calls are refused."""
        return self._closed

    def close(self) -> None:
        """Refuse new calls with ``HostClosed``; calls in flight continue."""
        self._closed = True

    def abort(self) -> None:
        """End the calls still in flight with ``HostClosed`` (the drain timeout passed).

        Each outermost call's task is cancelled (asyncio's ``Task.cancel``: a cancel scope
        per call would cost the hot path ~15 µs). The cancellation travels through the
        whole call tree like any host cancellation (an async plugin at its next
        ``await``, a sync one by abandoning and interrupting its thread), and the call's
        own frame turns it back into ``HostClosed`` (``uncancel``), which the HTTP API
        answers with its JSON 503 (issue 13 item 4). Also closes the dispatcher.
        """
        self._closed = True
        for task in tuple(self._calls):
            self._aborted.add(task)
            task.cancel()

    def make_context(self, plugin: Plugin) -> Context:
        """Build the ``ctx`` for a version's ``setup``/``teardown`` (a ``ContextFactory``)."""
        return Context(plugin, self)

    def require(self, name: str) -> Required:
        """Return a late-bound handle on plugin ``name``."""
        return Required(self, name)

    async def call(
        self,
        name: str,
        args: Args = None,
        timeout: float | None = None,  # noqa: ASYNC109 - per-call timeout is the public contract
        version: str | None = None,
        key: object = None,
        served: list[str] | None = None,
    ) -> Any:
        """Call the current version of plugin ``name`` (or its rollout's candidate).

        The parameters after ``args`` may be passed by position too (the public
        ``PluginHost.call`` makes them keyword-only): defaults of positional parameters
        are copied from a tuple, keyword-only ones looked up in a dict, on every call.

        Args:
            name: The plugin name.
            args: The plugin's argument.
            timeout: Seconds before the call is cancelled; if ``None``, the record's
                ``timeout``, else the dispatcher default, else no timeout.
            version: Run this version (``7``, ``r7``, ``greet@r7`` or the full version):
                the stable one, the rollout's candidate, or a held replaced one.
            key: The sticky routing key (else ``args[sticky_key]`` of the rollout).
            served: If given, the version that serves the call is appended to it (as
                routed here, so it is the version that actually ran).

        Returns:
            What the plugin returned.

        Raises:
            HostClosed: The dispatcher is closed.
            PluginNotFound: No version of ``name`` is loaded.
            VersionNotLive: ``version`` names no version this host holds.
            PluginBusy: The version is saturated and ``max_waiting`` calls are queued.
            PluginTimeout: The call did not finish in time.
            PluginFailed: The plugin raised; carries the plugin traceback.
            RequireDepthExceeded: Plugin-to-plugin calls nested too deep (a cycle).
        """
        # HOT PATH (see the module docstring): no I/O, no lock, no logging, no string
        # building on success; a timer only when there is a timeout.
        if self._closed:
            raise HostClosed()
        plugin = self._lookup(name)
        if plugin is None:
            raise PluginNotFound(name)
        live = None
        if version is not None or self._rollouts:  # progressive delivery (host.rollout)
            live = self._rollouts.get(name)
            if version is not None:
                plugin = pick_version(name, version, plugin, live, self._registry)
            elif live is not None and live.routing:
                if key is None and live.skip and live.sticky_key is None:
                    live.skip -= 1  # the stable's turn (LiveRollout's inline protocol)
                else:
                    plugin = live.choose(plugin, args, key)
        if served is not None:
            served.append(plugin.version)
        chain = CALL_PATH.get()[1]  # the plugins on the call path, outermost first
        if chain and len(chain) >= self._require_depth:  # (an outermost call is depth 0)
            raise RequireDepthExceeded((*chain, name), self._require_depth)
        if timeout is None:
            timeout = plugin.record.timeout
            if timeout is None:
                timeout = self._default_timeout

        # From here until the in_flight decrement, the registry will not tear this version
        # down before the grace period ends, even if a newer version is swapped in
        # meanwhile (Plugin.begin_call/end_call, spelled out inline: no frame per call).
        plugin.in_flight += 1
        # chain + (name,): one tuple (two nested), where (*chain, name) builds a list first.
        path_token = CALL_PATH.set((plugin, chain + (name,)))  # noqa: RUF005
        # An outermost call registers its task, so that abort() can end it (nested calls
        # run in its task or in tasks it awaits, e.g. gather's, and end with it). A call
        # with a timeout needs its task too, and its loop's ticker (_LoopCache, inline).
        task = current = None
        if not chain or timeout is not None:
            thread, loop, ticker = self._loops.cached
            if thread == _thread_id():
                current = _task_of(loop)  # type: ignore[arg-type]  # set with the thread
            if current is None:
                thread, loop, ticker = self._loops.refresh()
                if loop is not None:
                    current = _task_of(loop)
            if not chain and current is not None:
                task = current
                self._calls[task] = None
        # Statistics only while a rollout runs: a rollout-free call pays for none of it,
        # and most calls under one only take a quiet slot (LiveRollout's inline protocol):
        # no clock, and nothing to count unless they fail, so they let go of the rollout
        # (`live`) and end like a call without one (a failure looks it up again).
        started = 0.0
        if live is not None:
            if live.quiet and plugin is not live.candidate:
                live.quiet -= 1
                live = None
            else:
                started = _clock()
        outcome = OK
        bucket = None  # the call's deadline bucket (_Ticker), which its call id keys
        call_id = cancelling = 0  # that id; the task's cancel count at the start
        at = 0.0  # the call's deadline, in ticks
        try:
            if timeout is not None:
                assert current is not None and ticker is not None, "a call runs in a task"
                clock = ticker.time  # (a slot read, then a call: no method lookup)
                at = (clock() + timeout) * TICKS  # the deadline, in ticks
                # The open bucket's span, else _Ticker.enter (float compares: no int()).
                bucket = ticker.open if ticker.low <= at < ticker.high else ticker.enter(at)
                call_id = next(self._ids)  # ctx.call_id too (an async call's, inline)
                bucket[call_id] = current
                cancelling = current.cancelling()
            if plugin.limiter is None and plugin.is_async:
                # The common case, inline: the plugin's coroutine is awaited from this
                # frame (no _run/_invoke coroutine per call). The same rules as _invoke.
                ctx = self._spare
                if ctx is None:
                    ctx = Context(plugin, plugin.caller or self, call_id or next(self._ids))
                else:  # Context's reuse protocol (see host.context): no one else holds it
                    self._spare = None
                    ctx._plugin = plugin
                    ctx._caller = plugin.caller or self
                    ctx.call_id = call_id or next(self._ids)
                    ctx._log = None
                try:
                    result = await plugin.entrypoint(ctx, args)
                except RequireDepthExceeded:
                    raise  # a cycle is a property of the whole chain: report it unwrapped
                except BaseException as exc:  # plugin code must never stop the host
                    if not is_plugin_failure(exc):
                        raise  # the host's cancellation: a timeout, shutdown
                    raise await self._failure(plugin, exc) from exc
                if _REUSE_CONTEXTS and _refcount(ctx) == _UNSHARED:
                    self._spare = ctx  # only this frame holds it: the next call may take it
            else:
                result = await self._run(plugin, args)
        except PluginFailed:
            outcome = FAILED
            raise
        except PluginTimeout:
            outcome = TIMEOUT
            raise
        except PluginError:  # busy, a require cycle...: not a judgement of the version
            outcome = -1
            raise
        except asyncio.CancelledError:
            outcome = -1
            # This call's deadline cancelled it, unless someone else did too
            # (asyncio.timeout's cancel-counting protocol, see _Ticker).
            if (
                bucket is not None
                and call_id not in bucket
                and current is not None
                and current.uncancel() <= cancelling
            ):
                outcome = TIMEOUT
                raise self._timed_out(plugin, timeout) from None  # type: ignore[arg-type]
            if task is None or task not in self._aborted:
                raise
            self._aborted.discard(task)
            task.uncancel()  # abort()'s cancel was for this frame only, and ends here
            raise HostClosed("the plugin host stopped before the call finished") from None
        else:
            if bucket is not None:  # leave the bucket here (one dict op), not in finally
                if bucket.pop(call_id, None) is None:  # expired, but the plugin swallowed
                    current.uncancel()  # type: ignore[union-attr]  # the cancellation
                elif not bucket and bucket is not ticker.open:  # type: ignore[union-attr]
                    ticker.drop(at)  # type: ignore[union-attr]  # cannot fill again: drop it
                bucket = None
            # A timed call under rollout (a quiet one let go of it): a stable one ends its
            # span (and may be a shadow's mirror) unless calls overlapped; a candidate's
            # success may break its policy (rarely).
            if live is not None:
                if plugin is not live.candidate:
                    if live.quiet:
                        live.quiet -= 1
                    else:
                        live.due(started, args, result, self.on_mirror)
                elif live.record(plugin, OK, started):
                    self.report_abort(live)
            return result
        finally:
            # Ended in time (but not a success: see else): leave the bucket; one that
            # cannot fill again goes when empty.
            if (
                bucket is not None
                and bucket.pop(call_id, None) is not None
                and not bucket
                and bucket is not ticker.open  # type: ignore[union-attr]  # set with bucket
            ):
                ticker.drop(at)  # type: ignore[union-attr]
            if task is not None:
                del self._calls[task]  # registered above, by this frame only
                if self._aborted:  # cancelled, but the call ended before it arrived
                    self._aborted.discard(task)
            CALL_PATH.reset(path_token)
            plugin.in_flight -= 1
            if not plugin.in_flight and plugin.drained is not None:
                plugin.drained.set()  # a retirement waits for the version to drain
            # A failure or timeout under rollout: count it; the candidate may break policy
            # (record returns True only then: a failure is never mirrored). An unjudged
            # end (outcome -1: busy, cancelled) gives its quiet slot back. (A success's
            # outcome is OK, i.e. False: this test is as cheap as `live is not None`.)
            if outcome:
                if live is None and not started and self._rollouts:
                    live = self._rollouts.get(name)  # a quiet call (or none: no rollout)
                if live is not None and live.record(plugin, outcome, started):
                    self.report_abort(live)

    def report_abort(self, live: LiveRollout) -> None:
        """Tell the host a candidate just broke its policy (``on_rollout_abort``).

        Args:
            live: The rollout; its routing has stopped and ``abort_reason`` says why.
        """
        if live.abort_reason is not None and self.on_rollout_abort is not None:
            self.on_rollout_abort(live, live.abort_reason)

    def _timed_out(self, plugin: Plugin, timeout: float) -> PluginTimeout:
        self._events.emit(
            "call.timeout", "warning", plugin=plugin.name, version=plugin.version, timeout=timeout
        )
        return PluginTimeout(plugin.name, plugin.version, timeout)

    async def _run(self, plugin: Plugin, args: Args) -> Any:
        # The compiler sets the version's limiter once (its record's max_concurrency, or
        # the host default); the dispatcher only reads it.
        limiter = plugin.limiter
        if limiter is None:
            return await self._invoke(plugin, args)
        held = _HELD.get()
        for lease in held:
            if lease.plugin is plugin and lease.live:  # re-entrant: the caller's slot covers it
                return await self._invoke(plugin, args)
        try:
            limiter.acquire_nowait()
        except anyio.WouldBlock:
            if plugin.waiting >= self._max_waiting:
                raise PluginBusy(plugin.name, plugin.version, self._max_waiting) from None
            plugin.waiting += 1
            try:
                await limiter.acquire()
            finally:
                plugin.waiting -= 1
        lease = _Lease(plugin)
        token = _HELD.set((*held, lease))
        try:
            return await self._invoke(plugin, args)
        finally:
            lease.live = False
            _HELD.reset(token)
            limiter.release()

    async def run_handler(
        self,
        plugin: Plugin,
        handler: Entrypoint,
        ctx: Context,
        payload: Any,
        *,
        timeout: float | None,  # noqa: ASYNC109 - the record's per-call bound
        is_async: bool | None = None,
    ) -> Any:
        """Run another module-level function of a version (a trigger's handler) as a call.

        Counted in the version's ``in_flight`` (so it finishes on the version it started
        on), on the version's call path (``ctx.call`` depth), sync code in a worker thread;
        not limited by the version's ``max_concurrency`` (the trigger has its own), and
        emits no ``call.*`` event (the trigger reports its own failures).

        Args:
            plugin: The version.
            handler: The function, from the version's module.
            ctx: Its context (an ``EventContext``).
            payload: Its second argument (the change event).
            timeout: Seconds before it is cancelled, or None.
            is_async: Whether ``handler`` is an ``async def`` (a caller running one
                handler per event works it out once per version); None: look here.

        Returns:
            What the handler returned.

        Raises:
            PluginTimeout: It ran out of time.
            PluginFailed: It raised; carries the plugin traceback.
            PluginBusy: Every worker thread for sync code is held by abandoned calls.
        """
        plugin.begin_call()
        path_token = CALL_PATH.set((plugin, (plugin.name,)))
        try:
            if timeout is None:
                return await self._invoke(plugin, payload, ctx, handler, is_async)
            deadline = asyncio.timeout(timeout)
            try:
                async with deadline:
                    return await self._invoke(plugin, payload, ctx, handler, is_async)
            except TimeoutError:
                if not deadline.expired():
                    raise
            raise PluginTimeout(plugin.name, plugin.version, timeout)
        finally:
            CALL_PATH.reset(path_token)
            plugin.end_call()

    async def _invoke(
        self,
        plugin: Plugin,
        args: Args,
        ctx: Context | None = None,
        handler: Entrypoint | None = None,
        is_async: bool | None = None,
    ) -> Any:
        # ``handler`` set: a trigger's handler (run_handler), else the entrypoint (a call).
        # ``is_async``: the handler's kind if the caller knows it (None: look it up here).
        if ctx is None:
            ctx = Context(plugin, plugin.caller or self, next(self._ids))
        try:
            if handler is None:
                if plugin.is_async:
                    return await plugin.entrypoint(ctx, args)
                func = plugin.entrypoint
            elif is_async or (is_async is None and inspect.iscoroutinefunction(handler)):
                return await handler(ctx, args)
            else:
                func = handler
            # Cancelling the caller (timeout, shutdown) abandons and interrupts the thread.
            # Its slot stays taken until the thread really ends (see host.threads).
            result = await run_sync_interruptible(
                func,
                ctx,
                args,
                limiter=self._threads,
                tally=plugin.threads,
                on_stuck=partial(self._thread_stuck, plugin),
            )
            if inspect.iscoroutine(result):  # a callable object with an async __call__
                result = await result
            return result
        except ThreadsExhausted as exc:
            raise PluginBusy(
                plugin.name, plugin.version, self._max_waiting, abandoned_threads=exc.total
            ) from None
        except RequireDepthExceeded:
            raise  # a cycle is a property of the whole chain: report it unwrapped
        except BaseException as exc:  # plugin code must never stop the host
            if not is_plugin_failure(exc):
                raise  # the host's cancellation: a timeout, shutdown
            raise await self._failure(plugin, exc, report=handler is None) from exc

    def _thread_stuck(self, plugin: Plugin) -> None:
        """A call's abandoned thread would not stop: say whose it is (issue 13 item 4)."""
        self._stuck[plugin] = None
        self._events.emit(
            "plugin.thread_stuck",
            "error",
            plugin=plugin.name,
            version=plugin.version,
            where="call",
            abandoned=plugin.threads.abandoned,
            host_abandoned=self._threads.abandoned,
            host_threads=self._threads.total,
        )

    def stuck_threads(self) -> dict[str, int]:
        """Versions whose abandoned call threads still run: version -> thread count."""
        for plugin in [p for p in self._stuck if p.threads.abandoned == 0]:
            del self._stuck[plugin]
        return {plugin.version: plugin.threads.abandoned for plugin in self._stuck}

    async def _failure(
        self, plugin: Plugin, exc: BaseException, *, report: bool = True
    ) -> PluginFailed:
        tb = await anyio.to_thread.run_sync(format_plugin_traceback, exc)
        error_type = type(exc).__qualname__
        error = str(exc)
        if report:
            self._events.emit(
                "call.failed",
                "error",
                plugin=plugin.name,
                version=plugin.version,
                error_type=error_type,
                error=error,
                traceback=tb,  # the plugin's own frames: the console shows the last one
            )
        return PluginFailed(plugin.name, plugin.version, error_type, error, tb)
