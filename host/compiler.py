"""Compile a plugin record into a loaded, not yet live, plugin version.

Each version gets a fresh module object that is never put into ``sys.modules``, so two
versions of one plugin can never share globals and a retired version is garbage once
nothing references it. The source is registered with :mod:`linecache` under a synthetic
filename (``<plugin greet@r7>``) so that tracebacks show the plugin's own lines.

Top-level code runs in a worker thread under a time bound, so a slow or hostile plugin
never blocks the event loop. A pure-Python runaway (``while True: pass``) is stopped by
injecting :class:`ThreadInterrupted` into its thread with
``PyThreadState_SetAsyncExc``; code blocked inside C (``time.sleep(3600)``, a lock, a
socket) cannot be interrupted that way, so its thread is abandoned: the load fails on
time and the thread exits whenever the C call returns.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import enum
import inspect
import linecache
import threading
import time
import traceback
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
import structlog
from anyio.abc import TaskGroup
from anyio.lowlevel import RunVar

from .errors import CompileError, PluginError
from .precompile import (
    CompilerProcesses,
    Precompiled,
    compiles_inline,
    precompile,
    syntax_error,
)
from .records import PluginRecord
from .types import Entrypoint, Hook

__all__ = (
    "Phase",
    "Plugin",
    "ThreadInterrupted",
    "compile_plugin",
    "compile_plugins",
    "format_plugin_traceback",
    "module_name",
    "plugin_filename",
    "run_sync_interruptible",
)

T = TypeVar("T")

_log = structlog.get_logger("host.compiler")

_PLUGIN_FILE_PREFIX = "<plugin "
_LOAD_THREADS = 4
_SLOW_LOADS = 16  # records past _SLOW_MARK_S that may hold a load thread at once
_SLOW_MARK_S = 0.1  # a record running this long leaves its batch (see _run_batch)
_INLINE_SLICE_S = 0.002  # a batch compiling on the loop yields at least this often
# A dedicated limiter per event loop: loads must not starve the shared worker-thread pool
# that sync plugin calls use, and a RunVar keeps limiters from leaking across loops.
_load_limiter: RunVar[anyio.CapacityLimiter] = RunVar("plugin_host_load_limiter")
# Loads wait here for a slot before their time bounds and watchdog start: a cold start of
# thousands of records must not count time spent queueing against `exec_timeout`.
_load_gate: RunVar[anyio.Semaphore] = RunVar("plugin_host_load_gate")


# --------------------------------------------------------------------------------------
# Interruptible worker-thread calls
# --------------------------------------------------------------------------------------


class ThreadInterrupted(BaseException):
    """Injected into a worker thread whose caller gave up (timeout or cancellation).

    It derives from ``BaseException`` so that plugin code's ``except Exception`` does not
    swallow it.
    """


def _set_async_exc(ident: int, exc: type[BaseException] | None) -> int:
    # No argtypes: ctypes.pythonapi is process-global and other code may use it. ``None``
    # passes NULL, which clears a pending, not yet delivered, exception.
    target = ctypes.py_object(exc) if exc is not None else None
    return int(ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), target))


class _Stoppable:
    """Worker-thread work that the loop thread can stop by injecting ThreadInterrupted.

    The lock guarantees the injected exception is raised inside ``run`` and never leaks
    into the thread pool after ``run`` returned: injection happens only while the work
    runs, and ``_finish`` clears a still-pending injection under the same lock.
    """

    __slots__ = ("_ident", "_injected", "_lock", "_running", "_stopped")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ident = 0
        self._running = False
        self._stopped = False
        self._injected = False

    def _start(self) -> bool:
        """Mark the work as running in this thread; False if it was stopped already."""
        with self._lock:
            if self._stopped:
                return False
            self._ident = threading.get_ident()
            self._running = True
            return True

    def _inject_locked(self) -> bool:
        """Inject ThreadInterrupted if the work runs (the caller holds the lock)."""
        if not self._running or self._injected:
            return False
        self._injected = True
        if _set_async_exc(self._ident, ThreadInterrupted) != 1:  # pragma: no cover
            _set_async_exc(self._ident, None)
            return False
        return True

    def _finish(self) -> None:
        while True:
            try:
                with self._lock:
                    self._running = False
                    self._stopped = True
                    if self._injected:
                        _set_async_exc(self._ident, None)
                return
            except ThreadInterrupted:
                continue  # delivered just now: the work is over anyway


class _InterruptibleCall(_Stoppable, Generic[T]):
    """Runs one function in a worker thread and can interrupt it from the loop thread."""

    __slots__ = ("_args", "_func")

    def __init__(self, func: Callable[..., T], args: tuple[Any, ...]) -> None:
        super().__init__()
        self._func = func
        self._args = args

    def run(self) -> T:
        if not self._start():
            raise ThreadInterrupted("the caller gave up before the thread started")
        try:
            return self._func(*self._args)
        finally:
            self._finish()

    def abandon(self) -> bool:
        """Stop the function if it is running; return whether an exception was injected."""
        with self._lock:
            self._stopped = True
            return self._inject_locked()


async def run_sync_interruptible(
    func: Callable[..., T],
    *args: Any,
    limiter: anyio.CapacityLimiter | None = None,
) -> T:
    """Run ``func(*args)`` in a worker thread; on cancellation, interrupt and abandon it.

    Unlike ``anyio.to_thread.run_sync``, cancelling the awaiting task (e.g. a timeout)
    returns at once: the thread is abandoned and :class:`ThreadInterrupted` is injected
    into it, which stops pure-Python code at its next bytecode. Code blocked in C keeps its
    thread until the C call returns.

    Args:
        func: The blocking callable.
        *args: Positional arguments for ``func``.
        limiter: Capacity limiter for the thread; the default anyio limiter if ``None``.

    Returns:
        What ``func`` returned.
    """
    call = _InterruptibleCall(func, args)
    try:
        return await anyio.to_thread.run_sync(call.run, limiter=limiter, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        call.abandon()
        raise


# --------------------------------------------------------------------------------------
# Naming and tracebacks
# --------------------------------------------------------------------------------------


def plugin_filename(record: PluginRecord) -> str:
    """Return the synthetic filename of a version, e.g. ``<plugin greet@r7>``."""
    if record.revision is None:
        return f"{_PLUGIN_FILE_PREFIX}{record.name}:{record.content_hash}>"
    return f"{_PLUGIN_FILE_PREFIX}{record.name}@r{record.revision}>"


def module_name(record: PluginRecord) -> str:
    """Return the module ``__name__`` of a version, e.g. ``plugin_host.plugins.greet.r7_3f9a1c2e``.

    ``.`` and ``-`` in plugin names become ``_`` so the name reads as one dotted path; the
    module is never registered in ``sys.modules``, so such collisions are harmless.
    """
    safe = record.name.replace(".", "_").replace("-", "_")
    if record.revision is None:
        tag = record.content_hash
    else:
        tag = f"r{record.revision}_{record.content_hash}"
    return f"plugin_host.plugins.{safe}.{tag}"


def _is_plugin_file(filename: str) -> bool:
    return filename.startswith(_PLUGIN_FILE_PREFIX)


def format_plugin_traceback(exc: BaseException) -> str:
    """Format ``exc`` starting at the first plugin frame.

    Host frames above the plugin (dispatcher, worker thread) are noise to a plugin author
    and are dropped; frames below (libraries the plugin called) are kept. May read source
    files through :mod:`linecache`, so call it off the event loop.

    Args:
        exc: The exception raised by plugin code.

    Returns:
        The formatted traceback, including chained exceptions.
    """
    tb: TracebackType | None = exc.__traceback__
    start = tb
    while start is not None and not _is_plugin_file(start.tb_frame.f_code.co_filename):
        start = start.tb_next
    return "".join(traceback.format_exception(type(exc), exc, start or tb))


# --------------------------------------------------------------------------------------
# Plugin versions
# --------------------------------------------------------------------------------------


class Phase(enum.Enum):
    """Lifecycle of one plugin version; it only ever moves forward."""

    LOADED = "loaded"  # compiled, never installed
    STARTING = "starting"  # setup running
    LIVE = "live"  # current version of its name
    RETIRING = "retiring"  # replaced or removed; draining in-flight calls
    RETIRED = "retired"  # torn down and released (also: setup failed)


def _released_entrypoint(*_args: Any, **_kwargs: Any) -> Any:
    raise PluginError("this plugin version was retired and its code released")


_RELEASED_MODULE = types.ModuleType("plugin_host.released")


@dataclass(slots=True, eq=False, repr=False)
class Plugin:
    """One loaded version of a plugin.

    Attributes:
        record: The record it was compiled from.
        module: The version's private module (a shared empty placeholder once released).
        entrypoint: The function called for each call.
        is_async: Whether ``entrypoint`` is an ``async def`` (awaited on the event loop)
            rather than a plain function (run in a worker thread).
        setup: The optional ``setup(ctx)`` hook.
        teardown: The optional ``teardown(ctx)`` hook.
        compile_ms: Wall time spent compiling and executing the top level.
        loaded_at: When compilation finished (UTC).
        state: What ``setup`` returned; exposed to calls as ``ctx.state``.
        limiter: Per-version concurrency limit, ``None`` for unlimited.
        in_flight: Calls currently running on this version.
        waiting: Calls queued on ``limiter``.
        phase: Lifecycle phase, driven by the registry.
        task_group: Where ``ctx.spawn`` starts tasks; set while the version is supervised.
        tasks: asyncio tasks created by this version's code, cancelled at retirement.
    """

    record: PluginRecord
    module: types.ModuleType
    entrypoint: Entrypoint
    is_async: bool
    setup: Hook | None = None
    teardown: Hook | None = None
    compile_ms: float = 0.0
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    state: Any = None
    limiter: anyio.Semaphore | None = None
    in_flight: int = field(default=0, init=False)
    waiting: int = field(default=0, init=False)
    phase: Phase = field(default=Phase.LOADED, init=False)
    task_group: TaskGroup | None = field(default=None, init=False)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set, init=False)
    drained: anyio.Event | None = field(default=None, init=False)
    # Set by the registry while the version is installed: starts its supervisor on the
    # first ``spawn`` (most versions never spawn, so none is started for them).
    supervise: Callable[[Plugin], None] | None = field(default=None, init=False)
    spawn_queue: list[tuple[contextvars.Context, Callable[[], None]]] = field(
        default_factory=list, init=False
    )
    _retired: anyio.Event = field(default_factory=anyio.Event, init=False)
    _lines: tuple[int, None, list[str], str] | None = field(default=None, init=False)

    @property
    def name(self) -> str:
        """The plugin name."""
        return self.record.name

    @property
    def version(self) -> str:
        """The version string, e.g. ``greet@r7:3f9a1c2e``."""
        return self.record.version

    @property
    def filename(self) -> str:
        """The synthetic filename shown in tracebacks, e.g. ``<plugin greet@r7>``."""
        return plugin_filename(self.record)

    @property
    def released(self) -> bool:
        """Whether :meth:`release` dropped this version's code and state."""
        return self.module is _RELEASED_MODULE

    def __repr__(self) -> str:
        return f"<Plugin {self.version} {self.phase.value} in_flight={self.in_flight}>"

    # Hot path: called by the dispatcher around every call.
    def begin_call(self) -> None:
        """Count a call starting on this version."""
        self.in_flight += 1

    def end_call(self) -> None:
        """Count a call ending; wakes a retirement waiting for the version to drain."""
        self.in_flight -= 1
        if self.in_flight == 0 and self.drained is not None:
            self.drained.set()

    def track(self, task: asyncio.Task[Any]) -> None:
        """Make ``task`` owned by this version: it is cancelled when the version retires."""
        if task.done():
            return
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def spawn(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start ``func(*args)`` as a background task owned by this version.

        An exception in the task is logged as ``plugin.task_failed``; it never affects
        other tasks or the host.

        Raises:
            RuntimeError: If the version is not installed or already retired.
        """
        tg = self.task_group
        name = f"{self.version}:{func!r}"
        if tg is not None:
            tg.start_soon(self._run_spawned, func, args, name=name)
            return
        supervise = self.supervise
        if supervise is None:
            raise RuntimeError(f"plugin {self.version} is not running; cannot spawn tasks")
        # The supervisor starts on the next loop turn and then starts the queued tasks,
        # each in the context of its ``spawn`` call (as ``tg.start_soon`` here would).
        if not self.spawn_queue:
            supervise(self)
        self.spawn_queue.append(
            (contextvars.copy_context(), partial(self._start_queued, func, args, name))
        )

    def _start_queued(
        self, func: Callable[..., Awaitable[Any]], args: tuple[Any, ...], name: str
    ) -> None:
        tg = self.task_group
        assert tg is not None
        tg.start_soon(self._run_spawned, func, args, name=name)

    async def _run_spawned(
        self, func: Callable[..., Awaitable[Any]], args: tuple[Any, ...]
    ) -> None:
        try:
            await func(*args)
        except Exception as exc:
            # Formatting may read library source files: keep that I/O off the loop.
            tb = await anyio.to_thread.run_sync(format_plugin_traceback, exc)
            _log.error(
                "plugin.task_failed",
                plugin=self.name,
                version=self.version,
                error_type=type(exc).__qualname__,
                error=str(exc),
                traceback=tb,
            )

    async def wait_retired(self) -> None:
        """Wait until the version is torn down and released (or failed to start)."""
        await self._retired.wait()

    def _register_lines(self) -> None:
        source = self.record.source
        lines = source.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        filename = self.filename
        entry = (len(source), None, lines, filename)
        linecache.cache[filename] = entry
        self._lines = entry

    def release(self) -> None:
        """Drop the version's code, state and tasks so its module can be collected.

        The :mod:`linecache` entry is removed unless a newer version with the same
        filename has replaced it. Idempotent.
        """
        if self._lines is not None:
            filename = self._lines[3]
            if linecache.cache.get(filename) is self._lines:
                del linecache.cache[filename]
            self._lines = None
        self.module = _RELEASED_MODULE
        self.entrypoint = _released_entrypoint
        self.setup = None
        self.teardown = None
        self.state = None
        self.task_group = None
        self.supervise = None
        self.spawn_queue.clear()
        self.tasks.clear()
        self.phase = Phase.RETIRED
        self._retired.set()


# --------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------


class _Loader:
    """Compiles and executes a version's top level; runs in a worker thread.

    It records the thread's CPU clock so the loop can bound the *CPU time* the top level
    uses: a wall-clock bound would also count time spent waiting for the GIL, and a busy
    host (many sync plugins in threads) would then fail healthy loads.
    """

    __slots__ = ("_clock", "_cpu_start", "code", "filename", "module", "record", "wall_s")

    def __init__(
        self,
        record: PluginRecord,
        module: types.ModuleType,
        filename: str,
        code: types.CodeType | None = None,
    ) -> None:
        self.record = record
        self.module = module
        self.filename = filename
        self.code = code  # compiled already (host.precompile): only the top level runs
        self._clock: int | None = None
        self._cpu_start = 0.0
        self.wall_s = 0.0

    def cpu_seconds(self) -> float:
        """CPU time the running top level has used so far (0 before it starts)."""
        clock = self._clock
        if clock is None:
            return 0.0
        try:
            return time.clock_gettime(clock) - self._cpu_start
        except OSError:  # the thread has finished
            return 0.0

    def run(self) -> None:
        started = time.perf_counter()
        try:
            self._run()
        finally:
            self.wall_s = time.perf_counter() - started

    def run_inline(self) -> None:
        """Run a declarative top level (see ``host.precompile``) on the calling thread.

        Only ``Exception`` is the plugin's here: this is the loop thread, so a
        ``KeyboardInterrupt`` or a cancellation is the host's own and propagates.
        """
        assert self.code is not None
        started = time.perf_counter()
        try:
            exec(self.code, self.module.__dict__)
        except Exception as exc:
            raise _import_error(self.record, exc) from exc
        finally:
            self.wall_s = time.perf_counter() - started

    def _run(self) -> None:
        record = self.record
        if hasattr(time, "pthread_getcpuclockid"):
            clock = time.pthread_getcpuclockid(threading.get_ident())
            self._cpu_start = time.clock_gettime(clock)
            self._clock = clock
        try:
            code = self.code or compile(record.source, self.filename, "exec", dont_inherit=True)
        except SyntaxError as exc:
            raise syntax_error(record.name, record.version, exc) from exc
        except (ValueError, RecursionError, MemoryError) as exc:
            raise CompileError(
                record.name, record.version, "syntax", f"{type(exc).__name__}: {exc}"
            ) from exc
        try:
            exec(code, self.module.__dict__)
        except ThreadInterrupted:
            raise
        except BaseException as exc:  # a worker thread: even SystemExit is the plugin's
            raise _import_error(record, exc) from exc


def _import_error(record: PluginRecord, exc: BaseException) -> CompileError:
    return CompileError(
        record.name,
        record.version,
        "import",
        f"top-level code raised {type(exc).__qualname__}: {exc}",
        format_plugin_traceback(exc),
    )


async def _run_top_level(
    loader: _Loader, exec_timeout: float, limiter: anyio.CapacityLimiter
) -> None:
    """Run the top level in a thread, bounded by ``exec_timeout`` seconds of CPU time.

    A watchdog on the loop reads the thread's CPU clock; past the bound it cancels the
    call, which interrupts a pure-Python loop. Code that blocks without using CPU (a
    sleep, a socket) is bounded by wall time instead: ``10 * exec_timeout``, at least
    1 s. Where per-thread CPU clocks do not exist, the CPU bound
    falls back to wall time.
    """
    record = loader.record
    wall_limit = _wall_limit(exec_timeout)
    interval = min(0.05, exec_timeout / 10)
    over_cpu = False

    async def watchdog(scope: anyio.CancelScope) -> None:
        nonlocal over_cpu
        started = anyio.current_time()
        while True:
            await anyio.sleep(interval)
            if loader._clock is None and not hasattr(time, "pthread_getcpuclockid"):
                used = anyio.current_time() - started
            else:
                used = loader.cpu_seconds()
            if used > exec_timeout:
                over_cpu = True
                scope.cancel()
                return

    failure: Exception | None = None
    async with _gate():
        with anyio.move_on_after(wall_limit) as wall:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watchdog, tg.cancel_scope)
                try:
                    await run_sync_interruptible(loader.run, limiter=limiter)
                except Exception as exc:  # raised below, not wrapped in an ExceptionGroup
                    failure = exc
                tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if over_cpu or wall.cancelled_caught:
        raise _timeout_error(record, exec_timeout, over_cpu)


class _BatchRunner(_Stoppable):
    """Runs several versions' top levels one after another in ONE worker thread.

    A cold start of thousands of records would otherwise pay a thread hop and a watchdog
    per record. The bound stays per record: each record runs in its own :class:`_Loader`,
    which reads the thread's CPU clock from that record's start, and the runner exposes the
    one running now (``current``) to a single watchdog on the loop. ``interrupt`` stops the
    thread only while that same record still runs (checked under the lock the thread takes
    before starting each record), so a verdict never lands on the next record; the thread
    then runs nothing more, and the loop runs the remaining records in a new hop.

    ``split`` hands the records not yet started to another hop: a record that is slow
    (a top-level ``time.sleep``, a slow import) then keeps this thread alone, under its
    own bound, instead of holding up the records queued behind it.
    """

    __slots__ = ("_next", "current", "current_started", "end", "loaders", "outcomes")

    def __init__(self, loaders: list[_Loader]) -> None:
        super().__init__()
        self.loaders = loaders
        self.outcomes: dict[int, Exception | None] = {}  # index -> failure (None: ok)
        self.current: int | None = None
        self.current_started = 0.0
        self._next = 0
        self.end = len(loaders)  # the thread runs records [0, end); split() lowers it

    def run(self) -> None:
        if not self._start():
            return
        try:
            while True:
                with self._lock:
                    if self._stopped or self._next >= self.end:
                        self.current = None
                        return
                    index = self.current = self._next
                    self._next += 1
                    self.current_started = time.monotonic()
                try:
                    self.loaders[index].run()
                except ThreadInterrupted:
                    raise
                except Exception as exc:  # CompileError (syntax, import), kept per record
                    self.outcomes[index] = exc
                else:
                    self.outcomes[index] = None
        finally:
            self._finish()

    def running_for(self) -> float:
        """Wall seconds the current record has run (0 when none runs)."""
        return time.monotonic() - self.current_started if self.current is not None else 0.0

    def split(self) -> int | None:
        """Stop after the current record; the index of the first record left, or None."""
        with self._lock:
            if self._stopped or self._next >= self.end:
                return None
            rest, self.end = self._next, self._next
            return rest

    def over_bound(self, exec_timeout: float, wall_limit: float) -> tuple[int, bool] | None:
        """The running record if it is past its bound: ``(index, over_cpu)``, else None."""
        index = self.current
        if index is None:
            return None
        loader = self.loaders[index]
        wall = time.monotonic() - self.current_started
        if loader._clock is None and not hasattr(time, "pthread_getcpuclockid"):
            cpu = wall
        else:
            cpu = loader.cpu_seconds()
        if cpu > exec_timeout:
            return index, True
        if wall > wall_limit:
            return index, False
        return None

    def interrupt(self, index: int) -> bool:
        """Stop the thread if record ``index`` is still the one running; return whether."""
        with self._lock:
            if self.current != index or not self._running or self._stopped:
                return False
            self._stopped = True
            self._inject_locked()
            return True

    def abandon(self) -> None:
        """The loop gave up on the hop (cancelled): run nothing more, stop what runs."""
        with self._lock:
            self._stopped = True
            self._inject_locked()


def _wall_limit(exec_timeout: float) -> float:
    """Wall-time bound for top-level code that blocks without using CPU."""
    return max(10 * exec_timeout, 1.0)


def _timeout_error(record: PluginRecord, exec_timeout: float, over_cpu: bool) -> CompileError:
    wall_limit = _wall_limit(exec_timeout)
    bound = (
        f"used more than {exec_timeout:g} s of CPU time"
        if over_cpu
        else f"did not finish within {wall_limit:g} s"
    )
    return CompileError(
        record.name,
        record.version,
        "timeout",
        f"top-level code {bound} (a pure-Python loop is interrupted; a blocking C "
        "call keeps its thread until it returns)",
    )


def _per_loop(var: RunVar[T], create: Callable[[], T]) -> T:
    """The event loop's value of ``var``, created on first use."""
    try:
        return var.get()
    except LookupError:
        value = create()
        var.set(value)
        return value


def _gate() -> anyio.Semaphore:
    return _per_loop(_load_gate, lambda: anyio.Semaphore(_LOAD_THREADS))


def _limiter() -> anyio.CapacityLimiter:
    return _per_loop(_load_limiter, lambda: anyio.CapacityLimiter(_LOAD_THREADS + _SLOW_LOADS))


async def _run_batch(
    loaders: list[_Loader],
    exec_timeout: float,
    limiter: anyio.CapacityLimiter,
    done: Callable[[int, Exception | None], None] | None = None,
) -> list[Exception | None]:
    """Run top levels in as few thread hops as possible, each bounded like one load.

    Returns one outcome per loader: None, or the :class:`CompileError` it failed with
    (``stage="timeout"`` for the record the watchdog stopped; the records after it run
    in a fresh hop). A record still running after :data:`_SLOW_MARK_S` gives up its load
    slot and the records behind it move to a new hop, so slow records load side by side
    (at most :data:`_SLOW_LOADS` of them) and each fails alone at its own bound.
    ``done(index, outcome)`` is called as each record's outcome becomes final.
    """
    outcomes: list[Exception | None] = [None] * len(loaders)
    failures: list[Exception] = []
    if loaders:
        async with anyio.create_task_group() as tg:
            segment = _Segment(loaders, outcomes, failures, exec_timeout, limiter, tg, done)
            tg.start_soon(segment.run, 0, len(loaders))
    if failures:
        raise failures[0]
    return outcomes


@dataclass(slots=True, eq=False)
class _Segment:
    """What the hops of one batch share; ``run(start, end)`` loads records [start, end)."""

    loaders: list[_Loader]
    outcomes: list[Exception | None]
    failures: list[Exception]
    exec_timeout: float
    limiter: anyio.CapacityLimiter
    tg: TaskGroup
    done: Callable[[int, Exception | None], None] | None

    def _settle(self, index: int, outcome: Exception | None) -> None:
        self.outcomes[index] = outcome
        if self.done is not None:
            self.done(index, outcome)

    async def run(self, start: int, end: int) -> None:
        wall_limit = _wall_limit(self.exec_timeout)
        interval = min(0.05, self.exec_timeout / 10, _SLOW_MARK_S / 2)
        while start < end:
            runner = _BatchRunner(self.loaders[start:end])
            verdict: tuple[int, bool] | None = None
            gate = _gate()
            await gate.acquire()
            holding = True
            settled: set[int] = set()  # runner indexes already reported

            async def watchdog(
                scope: anyio.CancelScope,
                runner: _BatchRunner,
                at: int,
                gate: anyio.Semaphore,
                settled: set[int],
            ) -> None:
                nonlocal verdict, holding
                while True:
                    await anyio.sleep(interval)
                    over = runner.over_bound(self.exec_timeout, wall_limit)
                    if over is not None and runner.interrupt(over[0]):
                        verdict = over
                        scope.cancel()
                        return
                    if holding and runner.running_for() > _SLOW_MARK_S:
                        holding = False  # slow: keep the thread, free the slot
                        gate.release()
                        # The records before the slow one are final: report them now.
                        for index, outcome in dict(runner.outcomes).items():
                            settled.add(index)
                            self._settle(at + index, outcome)
                        rest = runner.split()
                        if rest is not None:
                            self.tg.start_soon(self.run, at + rest, at + len(runner.loaders))

            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(watchdog, tg.cancel_scope, runner, start, gate, settled)
                    try:
                        await anyio.to_thread.run_sync(
                            runner.run, limiter=self.limiter, abandon_on_cancel=True
                        )
                    except anyio.get_cancelled_exc_class():
                        runner.abandon()  # the watchdog's verdict, or cancelled from outside
                        raise
                    except ThreadInterrupted:
                        pass  # the watchdog stopped the thread; `verdict` says where
                    except Exception as exc:  # a host bug: raised by _run_batch
                        self.failures.append(exc)
                    tg.cancel_scope.cancel()
            finally:
                if holding:
                    gate.release()
            if self.failures:
                return
            for index, outcome in runner.outcomes.items():
                if index not in settled:
                    self._settle(start + index, outcome)
            if verdict is None:
                return
            index, over_cpu = verdict
            record = self.loaders[start + index].record
            self._settle(start + index, _timeout_error(record, self.exec_timeout, over_cpu))
            end = start + runner.end
            start += index + 1


def _resolve_callable(record: PluginRecord, namespace: dict[str, Any], attr: str) -> Any:
    value = namespace.get(attr)
    if value is not None and not callable(value):
        role = "entrypoint" if attr == record.entrypoint else "hook"
        raise CompileError(
            record.name,
            record.version,
            "entrypoint",
            f"{role} {attr!r} is not callable (it is a {type(value).__name__})",
        )
    return value


async def compile_plugin(
    record: PluginRecord,
    *,
    exec_timeout: float = 1.0,
    default_max_concurrency: int | None = None,
    processes: CompilerProcesses | None = None,
) -> Plugin:
    """Compile ``record`` into a fresh, not yet installed, :class:`Plugin`.

    Does not run ``setup``: the registry runs it when installing the version.

    Args:
        record: The validated record.
        exec_timeout: Bound in seconds on compiling and running the top-level code.
        default_max_concurrency: Concurrency limit for records that set none.
        processes: Compiler processes: the source is compiled by ``host.precompile``
            (on the loop if small, else in a process) and a declarative top level runs
            on the loop, with no thread hop. None compiles in the worker thread.

    Returns:
        The loaded version.

    Raises:
        CompileError: With ``stage`` ``"syntax"``, ``"compile"``, ``"import"``,
            ``"timeout"`` or ``"entrypoint"``.
    """
    limiter = _limiter()
    started = time.perf_counter()
    pre = await _precompile(record, processes)
    plugin, loader = _prepare(record, pre.code if pre is not None else None)
    try:
        if pre is not None and pre.declarative:
            loader.run_inline()
        else:
            await _run_top_level(loader, exec_timeout, limiter)
        _resolve(plugin)
    except BaseException:
        plugin.release()
        raise
    return _finish(plugin, default_max_concurrency, time.perf_counter() - started)


async def compile_plugins(
    records: list[PluginRecord],
    *,
    exec_timeout: float = 1.0,
    default_max_concurrency: int | None = None,
    processes: CompilerProcesses | None = None,
    on_result: Callable[[int, Plugin | CompileError], None] | None = None,
) -> list[Plugin | CompileError]:
    """Compile many records with few thread hops (a cold start or a resync).

    Each record is bounded exactly as by :func:`compile_plugin`: ``exec_timeout`` seconds
    of its own CPU time (``10 x`` of wall time), measured from its own start; one that
    overruns fails with ``stage="timeout"`` and the others still load.

    Args:
        records: The validated records.
        exec_timeout: Bound in seconds on each record's top-level code.
        default_max_concurrency: Concurrency limit for records that set none.
        processes: As for :func:`compile_plugin`: precompiled sources, declarative top
            levels on the loop, the others in batches in worker threads.
        on_result: Called with ``(index, result)`` as soon as each record is loaded or
            has failed, so a slow record does not hold up installing the others.

    Returns:
        One entry per record, in order: the loaded version or the :class:`CompileError`.
    """
    compiled = await _precompile_many(records, processes)
    results: list[Plugin | CompileError | None] = [None] * len(records)

    def settle(i: int, entry: tuple[Plugin, _Loader], outcome: Exception | None) -> None:
        plugin, loader = entry
        try:
            if outcome is not None:
                raise outcome
            _resolve(plugin)
        except CompileError as exc:
            plugin.release()
            results[i] = exc
        except BaseException:
            plugin.release()
            raise
        else:
            results[i] = _finish(plugin, default_max_concurrency, loader.wall_s)
        result = results[i]
        if on_result is not None and result is not None:
            on_result(i, result)

    threaded: list[tuple[int, tuple[Plugin, _Loader]]] = []
    for i, (record, pre) in enumerate(zip(records, compiled, strict=True)):
        if isinstance(pre, CompileError):
            results[i] = pre
            if on_result is not None:
                on_result(i, pre)
            continue
        entry = _prepare(record, pre.code if pre is not None else None)
        if pre is not None and pre.declarative:
            try:
                entry[1].run_inline()
            except CompileError as exc:
                settle(i, entry, exc)
            else:
                settle(i, entry, None)
        else:
            threaded.append((i, entry))
    await _run_batch(
        [entry[1] for _, entry in threaded],
        exec_timeout,
        _limiter(),
        lambda k, outcome: settle(threaded[k][0], threaded[k][1], outcome),
    )
    done: list[Plugin | CompileError] = []
    for result in results:
        assert result is not None
        done.append(result)
    return done


async def _precompile(
    record: PluginRecord, processes: CompilerProcesses | None
) -> Precompiled | None:
    if processes is None:
        return None
    return await precompile(
        record.name, record.version, plugin_filename(record), record.source, processes
    )


async def _precompile_many(
    records: list[PluginRecord], processes: CompilerProcesses | None
) -> list[Precompiled | CompileError | None]:
    """Precompile a batch: small sources on the loop, yielding every few milliseconds
    so a cold start of thousands of records never holds the loop for long; the others
    in the compiler processes, concurrently."""
    out: list[Precompiled | CompileError | None] = [None] * len(records)
    if processes is None:
        return out

    async def one(i: int, record: PluginRecord) -> None:
        try:
            out[i] = await _precompile(record, processes)
        except CompileError as exc:
            out[i] = exc

    async with anyio.create_task_group() as tg:
        budget = time.perf_counter() + _INLINE_SLICE_S
        for i, record in enumerate(records):
            if not compiles_inline(record.source):
                tg.start_soon(one, i, record)
                continue
            await one(i, record)  # no await inside: runs at once
            if time.perf_counter() > budget:
                await anyio.lowlevel.checkpoint()
                budget = time.perf_counter() + _INLINE_SLICE_S
    return out


def _prepare(record: PluginRecord, code: types.CodeType | None = None) -> tuple[Plugin, _Loader]:
    filename = plugin_filename(record)
    module = types.ModuleType(module_name(record))
    module.__file__ = filename
    # The placeholder entrypoint is replaced by _resolve; the Plugin exists first so that
    # its linecache entry is registered before the top level runs (import tracebacks).
    plugin = Plugin(record, module, _released_entrypoint, is_async=False)
    plugin._register_lines()
    return plugin, _Loader(record, module, filename, code)


def _resolve(plugin: Plugin) -> None:
    record = plugin.record
    namespace = plugin.module.__dict__
    entrypoint = _resolve_callable(record, namespace, record.entrypoint)
    if entrypoint is None:
        raise CompileError(
            record.name,
            record.version,
            "entrypoint",
            f"entrypoint {record.entrypoint!r} is not defined at the top level",
        )
    if inspect.isasyncgenfunction(entrypoint) or inspect.isgeneratorfunction(entrypoint):
        raise CompileError(
            record.name,
            record.version,
            "entrypoint",
            f"entrypoint {record.entrypoint!r} is a generator function; it must return its result",
        )
    plugin.entrypoint = entrypoint
    plugin.is_async = inspect.iscoroutinefunction(entrypoint)
    plugin.setup = _resolve_callable(record, namespace, "setup")
    plugin.teardown = _resolve_callable(record, namespace, "teardown")


def _finish(plugin: Plugin, default_max_concurrency: int | None, seconds: float) -> Plugin:
    max_concurrency = plugin.record.max_concurrency or default_max_concurrency
    if max_concurrency is not None:
        plugin.limiter = anyio.Semaphore(max_concurrency)
    plugin.compile_ms = seconds * 1000.0
    plugin.loaded_at = datetime.now(UTC)
    return plugin
