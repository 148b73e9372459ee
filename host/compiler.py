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

import functools
import inspect
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from anyio.lowlevel import RunVar

from .config import DEFAULT_TIMEOUTS
from .errors import CompileError, PluginError
from .naming import format_plugin_traceback, module_name, plugin_filename
from .plugin import Plugin, released_entrypoint
from .precompile import (
    CompilerProcesses,
    Precompiled,
    compiles_inline,
    precompile,
    precompile_now,
    syntax_error,
)
from .records import PluginRecord
from .threads import (
    Stoppable,
    ThreadInterrupted,
    ThreadLimiter,
    ThreadsExhausted,
    per_loop,
    run_stoppable,
)

__all__ = ("compile_plugin", "compile_plugins", "load_now")

T = TypeVar("T")

_LOAD_THREADS = 4
_SLOW_LOADS = 16  # records past _SLOW_MARK_S that may hold a load thread at once
_SLOW_MARK_S = 0.1  # a record running this long leaves its batch (see _run_batch)
_INLINE_SLICE_S = 0.002  # a batch compiling on the loop yields at least this often
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


class _BatchRunner(Stoppable):
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
    return per_loop(_load_limiter, lambda: ThreadLimiter(_LOAD_THREADS + _SLOW_LOADS))


async def _run_batch(
    loaders: list[_Loader],
    exec_timeout: float,
    limiter: ThreadLimiter,
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
    limiter: ThreadLimiter
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
            exhausted: ThreadsExhausted | None = None
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
                        # Cancelled (the watchdog's verdict, or from outside): abandoned.
                        await run_stoppable(runner, runner.run, self.limiter)
                    except ThreadsExhausted as exc:
                        exhausted = exc
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
            if exhausted is not None:  # nothing ran: abandoned code holds every load thread
                for index in range(start, end):
                    record = self.loaders[index].record
                    error = CompileError(record.name, record.version, "busy", str(exhausted))
                    self._settle(index, error)
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
    exec_timeout: float = DEFAULT_TIMEOUTS.top_level,
    default_max_concurrency: int | None = None,
    processes: CompilerProcesses | None = None,
    precompiled: Precompiled | None = None,
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
        precompiled: ``record``'s source already compiled (by :func:`load_now`): only
            its top level is left to run.

    Returns:
        The loaded version.

    Raises:
        CompileError: With ``stage`` ``"syntax"``, ``"compile"``, ``"import"``,
            ``"timeout"``, ``"entrypoint"`` or ``"busy"``.
    """
    (outcome,) = await compile_plugins(
        [record],
        exec_timeout=exec_timeout,
        default_max_concurrency=default_max_concurrency,
        processes=processes,
        precompiled=[precompiled] if precompiled is not None else None,
    )
    if isinstance(outcome, CompileError):
        raise outcome
    return outcome


def load_now(
    record: PluginRecord, *, default_max_concurrency: int | None = None
) -> Plugin | Precompiled | None:
    """Compile and load ``record`` on the calling thread (the loop), if it is cheap.

    The synchronous form of :func:`compile_plugin` for the loader's fast path: a source
    that :func:`~host.precompile.compiles_inline` compiles here, and a declarative top
    level (see ``host.precompile``) runs here, as :func:`compile_plugins` would do them.
    No await, so no loop turn and no thread hop.

    Args:
        record: The validated record.
        default_max_concurrency: Concurrency limit for records that set none.

    Returns:
        The loaded version; or, when its top level is not declarative, its compiled code,
        to finish with ``compile_plugin(record, precompiled=...)`` (in a worker thread,
        under the CPU-time bound); or None when the source is too large to compile here.

    Raises:
        CompileError: As :func:`compile_plugin` (``"syntax"``, ``"import"``,
            ``"entrypoint"``).
    """
    if not compiles_inline(record.source):
        return None
    pre = precompile_now(record.name, record.version, plugin_filename(record), record.source)
    if not pre.declarative:
        return pre
    plugin, loader = _prepare(record, pre.code)
    try:
        loader.run_inline()
        _resolve(plugin)
    except BaseException:
        plugin.release()
        raise
    return _finish(plugin, default_max_concurrency, loader.wall_s)


async def compile_plugins(
    records: list[PluginRecord],
    *,
    exec_timeout: float = DEFAULT_TIMEOUTS.top_level,
    default_max_concurrency: int | None = None,
    processes: CompilerProcesses | None = None,
    on_result: Callable[[int, Plugin | CompileError], None] | None = None,
    precompiled: list[Precompiled] | None = None,
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
        precompiled: The records' sources already compiled, one per record (then
            nothing is compiled again).

    Returns:
        One entry per record, in order: the loaded version or the :class:`CompileError`.
    """
    compiled: list[Precompiled | CompileError | None] = (
        list(precompiled) if precompiled is not None else await _precompile_many(records, processes)
    )
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
    if threaded:  # a reload of a declarative record looks up no thread limiter
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
    in the compiler processes, concurrently. A batch of small sources takes no task group
    and no loop turn (a single reload stays one step)."""
    out: list[Precompiled | CompileError | None] = [None] * len(records)
    if processes is None:
        return out

    async def one(i: int, record: PluginRecord) -> None:
        try:
            out[i] = await _precompile(record, processes)
        except CompileError as exc:
            out[i] = exc

    large: list[int] = []
    budget = time.perf_counter() + _INLINE_SLICE_S
    for i, record in enumerate(records):
        if not compiles_inline(record.source):
            large.append(i)
            continue
        await one(i, record)  # no await inside: runs at once
        if time.perf_counter() > budget:
            await anyio.lowlevel.checkpoint()
            budget = time.perf_counter() + _INLINE_SLICE_S
    if large:
        async with anyio.create_task_group() as tg:
            for i in large:
                tg.start_soon(one, i, records[i])
    return out


def _prepare(record: PluginRecord, code: types.CodeType | None = None) -> tuple[Plugin, _Loader]:
    filename = plugin_filename(record)
    module = types.ModuleType(module_name(record))
    module.__file__ = filename
    # The placeholder entrypoint is replaced by _resolve; the Plugin exists first so that
    # its linecache entry is registered before the top level runs (import tracebacks).
    plugin = Plugin(record, module, released_entrypoint, is_async=False)
    plugin._register_lines()
    return plugin, _Loader(record, module, filename, code)


def _trigger_only(name: str, entrypoint: str, *_args: Any) -> Any:
    """Stands in for the call entrypoint of a plugin that only declares triggers."""
    raise PluginError(f"plugin {name!r} has no {entrypoint!r} to call: it only handles triggers")


def _resolve(plugin: Plugin) -> None:
    record = plugin.record
    namespace = plugin.module.__dict__
    entrypoint = _resolve_callable(record, namespace, record.entrypoint)
    if entrypoint is None and record.triggers:
        entrypoint = functools.partial(_trigger_only, record.name, record.entrypoint)
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
    for spec in record.triggers:  # a trigger's handler must exist before the version serves
        handler = _resolve_callable(record, namespace, spec.entrypoint)
        if (
            handler is None
            or inspect.isgeneratorfunction(handler)
            or inspect.isasyncgenfunction(handler)
        ):
            raise CompileError(
                record.name,
                record.version,
                "entrypoint",
                f"trigger {spec.name!r}: handler {spec.entrypoint!r} is "
                + ("not defined at the top level" if handler is None else "a generator function"),
            )


def _finish(plugin: Plugin, default_max_concurrency: int | None, seconds: float) -> Plugin:
    max_concurrency = plugin.record.max_concurrency or default_max_concurrency
    if max_concurrency is not None:
        plugin.limiter = anyio.Semaphore(max_concurrency)
    plugin.compile_ms = seconds * 1000.0
    plugin.loaded_at = datetime.now(UTC)
    return plugin
