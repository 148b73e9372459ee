"""Compile a plugin record into a loaded, not yet live, plugin version.

Each version gets a fresh module object that is never put into ``sys.modules``, so two
versions of one plugin can never share globals and a retired version is garbage once
nothing references it. The source is registered with :mod:`linecache` under a synthetic
filename (``<plugin greet@r7>``, see :mod:`host.naming`) so that tracebacks show the
plugin's own lines.

Top-level code runs in a worker thread under a time bound, so a slow or hostile plugin
never blocks the event loop. One path does it: :func:`compile_plugin` is the batch
compile of one record. A pure-Python runaway (``while True: pass``) is stopped by
injecting :class:`~host.threads.ThreadInterrupted` into its thread; code blocked inside C
(``time.sleep(3600)``, a lock, a socket) cannot be interrupted that way, so its thread is
abandoned: the load fails on time and the thread exits whenever the C call returns.
"""

from __future__ import annotations

import inspect
import threading
import time
import traceback
import types
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
from anyio.lowlevel import RunVar

from .config import DEFAULT_TIMEOUTS
from .errors import CompileError
from .naming import format_plugin_traceback, module_name, plugin_filename
from .plugin import Plugin, released_entrypoint
from .records import PluginRecord
from .threads import (
    Stoppable,
    ThreadInterrupted,
    ThreadLimiter,
    ThreadsExhausted,
    per_loop,
    run_stoppable,
)

__all__ = ("compile_plugin", "compile_plugins")

T = TypeVar("T")

_LOAD_THREADS = 4
# A dedicated limiter per event loop: loads must not starve the shared worker-thread pool
# that sync plugin calls use, and a RunVar keeps limiters from leaking across loops.
# Its slots stay taken by abandoned top levels until they really end (see host.threads).
_load_limiter: RunVar[ThreadLimiter] = RunVar("plugin_host_load_limiter")
# Loads wait here for a slot before their time bounds and watchdog start: a cold start of
# thousands of records must not count time spent queueing against `exec_timeout`.
_load_gate: RunVar[anyio.Semaphore] = RunVar("plugin_host_load_gate")


class _Loader:
    """Compiles and executes a version's top level; runs in a worker thread.

    It records the thread's CPU clock so the loop can bound the *CPU time* the top level
    uses: a wall-clock bound would also count time spent waiting for the GIL, and a busy
    host (many sync plugins in threads) would then fail healthy loads.
    """

    __slots__ = ("_clock", "_cpu_start", "filename", "module", "record", "wall_s")

    def __init__(self, record: PluginRecord, module: types.ModuleType, filename: str) -> None:
        self.record = record
        self.module = module
        self.filename = filename
        self._clock: int | None = None
        self._cpu_start = 0.0
        self.wall_s = 0.0

    def cpu_seconds(self, wall: float) -> float:
        """CPU time the running top level has used so far (0 before it starts).

        Where per-thread CPU clocks do not exist, the CPU bound falls back to wall time.

        Args:
            wall: Wall time since the top level started, the fallback.

        Returns:
            Seconds of CPU time (or ``wall``).
        """
        clock = self._clock
        if clock is None:
            return wall if not hasattr(time, "pthread_getcpuclockid") else 0.0
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

    def _run(self) -> None:
        record = self.record
        if hasattr(time, "pthread_getcpuclockid"):
            clock = time.pthread_getcpuclockid(threading.get_ident())
            self._cpu_start = time.clock_gettime(clock)
            self._clock = clock
        try:
            code = compile(record.source, self.filename, "exec", dont_inherit=True)
        except SyntaxError as exc:
            where = f"line {exc.lineno}: " if exc.lineno is not None else ""
            raise CompileError(
                record.name,
                record.version,
                "syntax",
                f"{where}{exc.msg}",
                "".join(traceback.format_exception_only(exc)),
            ) from exc
        except (ValueError, RecursionError, MemoryError) as exc:
            raise CompileError(
                record.name, record.version, "syntax", f"{type(exc).__name__}: {exc}"
            ) from exc
        try:
            exec(code, self.module.__dict__)
        except ThreadInterrupted:
            raise
        except BaseException as exc:  # a worker thread: even SystemExit is the plugin's
            raise CompileError(
                record.name,
                record.version,
                "import",
                f"top-level code raised {type(exc).__qualname__}: {exc}",
                format_plugin_traceback(exc),
            ) from exc


class _BatchRunner(Stoppable):
    """Runs several versions' top levels one after another in ONE worker thread.

    A cold start of thousands of records would otherwise pay a thread hop and a watchdog
    per record. The bound stays per record: each record runs in its own :class:`_Loader`,
    which reads the thread's CPU clock from that record's start, and the runner exposes the
    one running now (``current``) to a single watchdog on the loop. ``interrupt`` stops the
    thread only while that same record still runs (checked under the lock the thread takes
    before starting each record), so a verdict never lands on the next record; the thread
    then runs nothing more, and the loop runs the remaining records in a new hop.
    """

    __slots__ = ("_next", "current", "current_started", "loaders", "outcomes")

    def __init__(self, loaders: list[_Loader]) -> None:
        super().__init__()
        self.loaders = loaders
        self.outcomes: dict[int, Exception | None] = {}  # index -> failure (None: ok)
        self.current: int | None = None
        self.current_started = 0.0
        self._next = 0

    def run(self) -> None:
        if not self._start():
            return
        try:
            while True:
                with self._lock:
                    if self._stopped or self._next >= len(self.loaders):
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

    def over_bound(self, exec_timeout: float, wall_limit: float) -> tuple[int, bool] | None:
        """The running record if it is past its bound: ``(index, over_cpu)``, else None."""
        index = self.current
        if index is None:
            return None
        loader = self.loaders[index]
        wall = time.monotonic() - self.current_started
        if loader.cpu_seconds(wall) > exec_timeout:
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


def _gate() -> anyio.Semaphore:
    return per_loop(_load_gate, lambda: anyio.Semaphore(_LOAD_THREADS))


def _limiter() -> ThreadLimiter:
    return per_loop(_load_limiter, lambda: ThreadLimiter(_LOAD_THREADS))


async def _run_batch(
    loaders: list[_Loader], exec_timeout: float, limiter: ThreadLimiter
) -> list[Exception | None]:
    """Run top levels in as few thread hops as possible, each bounded like one load.

    Returns one outcome per loader: None, or the :class:`CompileError` it failed with
    (``stage="timeout"`` for the record the watchdog stopped; the records after it run
    in a fresh hop).
    """
    wall_limit = _wall_limit(exec_timeout)
    interval = min(0.05, exec_timeout / 10)
    outcomes: list[Exception | None] = [None] * len(loaders)
    start = 0
    while start < len(loaders):
        runner = _BatchRunner(loaders[start:])
        verdict: tuple[int, bool] | None = None
        failure: Exception | None = None
        exhausted: ThreadsExhausted | None = None

        async def watchdog(scope: anyio.CancelScope, runner: _BatchRunner) -> None:
            nonlocal verdict
            while True:
                await anyio.sleep(interval)
                over = runner.over_bound(exec_timeout, wall_limit)
                if over is not None and runner.interrupt(over[0]):
                    verdict = over
                    scope.cancel()
                    return

        async with _gate(), anyio.create_task_group() as tg:
            tg.start_soon(watchdog, tg.cancel_scope, runner)
            try:
                # Cancelled (the watchdog's verdict, or from outside): the runner is abandoned.
                await run_stoppable(runner, runner.run, limiter)
            except ThreadsExhausted as exc:
                exhausted = exc
            except ThreadInterrupted:
                pass  # the watchdog stopped the thread; `verdict` says where
            except Exception as exc:  # raised below, not wrapped in an ExceptionGroup
                failure = exc
            tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if exhausted is not None:  # nothing ran: every load thread is held by abandoned code
            for index in range(start, len(loaders)):
                record = loaders[index].record
                outcomes[index] = CompileError(record.name, record.version, "busy", str(exhausted))
            break
        for index, outcome in runner.outcomes.items():
            outcomes[start + index] = outcome
        if verdict is None:
            break
        index, over_cpu = verdict
        record = loaders[start + index].record
        outcomes[start + index] = _timeout_error(record, exec_timeout, over_cpu)
        start += index + 1
    return outcomes


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
    exec_timeout: float = DEFAULT_TIMEOUTS.top_level,
    default_max_concurrency: int | None = None,
) -> Plugin:
    """Compile ``record`` into a fresh, not yet installed, :class:`Plugin`.

    Does not run ``setup``: the registry runs it when installing the version.

    Args:
        record: The validated record.
        exec_timeout: Bound in seconds on compiling and running the top-level code.
        default_max_concurrency: Concurrency limit for records that set none.

    Returns:
        The loaded version.

    Raises:
        CompileError: With ``stage`` ``"syntax"``, ``"import"``, ``"timeout"`` or
            ``"entrypoint"``.
    """
    (outcome,) = await compile_plugins(
        [record], exec_timeout=exec_timeout, default_max_concurrency=default_max_concurrency
    )
    if isinstance(outcome, CompileError):
        raise outcome
    return outcome


async def compile_plugins(
    records: list[PluginRecord],
    *,
    exec_timeout: float = DEFAULT_TIMEOUTS.top_level,
    default_max_concurrency: int | None = None,
) -> list[Plugin | CompileError]:
    """Compile many records with few thread hops (a cold start or a resync).

    Each record is bounded exactly as by :func:`compile_plugin`: ``exec_timeout`` seconds
    of its own CPU time (``10 x`` of wall time), measured from its own start; one that
    overruns fails with ``stage="timeout"`` and the others still load.

    Args:
        records: The validated records.
        exec_timeout: Bound in seconds on each record's top-level code.
        default_max_concurrency: Concurrency limit for records that set none.

    Returns:
        One entry per record, in order: the loaded version or the :class:`CompileError`.
    """
    prepared = [_prepare(record) for record in records]
    outcomes = await _run_batch([loader for _, loader in prepared], exec_timeout, _limiter())
    results: list[Plugin | CompileError] = []
    for (plugin, loader), outcome in zip(prepared, outcomes, strict=True):
        try:
            if outcome is not None:
                raise outcome
            _resolve(plugin)
        except CompileError as exc:
            plugin.release()
            results.append(exc)
            continue
        except BaseException:
            plugin.release()
            raise
        results.append(_finish(plugin, default_max_concurrency, loader.wall_s))
    return results


def _prepare(record: PluginRecord) -> tuple[Plugin, _Loader]:
    filename = plugin_filename(record)
    module = types.ModuleType(module_name(record))
    module.__file__ = filename
    # The placeholder entrypoint is replaced by _resolve; the Plugin exists first so that
    # its linecache entry is registered before the top level runs (import tracebacks).
    plugin = Plugin(record, module, released_entrypoint, is_async=False)
    plugin._register_lines()
    return plugin, _Loader(record, module, filename)


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
