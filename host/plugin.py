"""One loaded version of a plugin and its lifecycle phase.

A :class:`Plugin` is built by :mod:`host.compiler`, installed and retired by
:mod:`host.registry`, and called by :mod:`host.dispatch`.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import linecache
import types
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import anyio
import structlog
from anyio.abc import TaskGroup

from .errors import PluginError
from .naming import format_plugin_traceback, plugin_filename
from .records import PluginRecord
from .threads import ThreadTally
from .types import Caller, Entrypoint, Hook

__all__ = (
    "Phase",
    "Plugin",
    "TaskExit",
    "contain_task",
    "is_plugin_failure",
    "released_entrypoint",
)

_log = structlog.get_logger("host.plugin")

T = TypeVar("T")


def is_plugin_failure(exc: BaseException) -> bool:
    """Tell whether ``exc``, raised out of plugin code, is the plugin's failure.

    Everything plugin code raises is its own failure, ``BaseException`` subclasses
    included (``KeyboardInterrupt``, ``SystemExit`` from a library's ``sys.exit()``,
    ``GeneratorExit``, a custom subclass): none of them may stop, hang or wedge the host.
    The one exception is the host's own cancellation (a timeout, a retirement, shutdown),
    which must travel on as cancellation so that anyio's cancel scopes see it.

    Design note: under asyncio an anyio cancel scope cancels its task with
    ``Task.cancel()``, so while the host's cancellation propagates the task's
    ``cancelling()`` count is above zero; a ``CancelledError`` that plugin code raised by
    itself leaves it at zero (https://docs.python.org/3/library/asyncio-task.html#asyncio.Task.cancelling).

    Args:
        exc: What plugin code raised (as seen by the awaiting host code).

    Returns:
        ``False`` only for the host's own cancellation in flight.
    """
    if not isinstance(exc, anyio.get_cancelled_exc_class()):
        return True
    try:
        task = asyncio.current_task()
    except RuntimeError:  # not asyncio: cancellation cannot be told apart, keep it
        return False
    return task is not None and task.cancelling() == 0


class TaskExit(Exception):
    """A raw asyncio task of plugin code raised ``KeyboardInterrupt``, ``SystemExit`` or
    ``GeneratorExit``; the task fails with this instead (its ``__cause__``).

    asyncio re-raises the first two out of the event loop (the whole host would stop),
    and hands the third to an awaiting coroutine with ``coro.throw()``, which closes it.
    """


_ESCAPING = (KeyboardInterrupt, SystemExit, GeneratorExit)


async def contain_task(coro: Coroutine[Any, Any, T]) -> T:
    """Run a plugin's raw task coroutine; turn the exceptions asyncio mishandles into
    :class:`TaskExit` (see there).

    Args:
        coro: The coroutine the plugin gave ``create_task``.

    Returns:
        What ``coro`` returned.

    Raises:
        TaskExit: ``coro`` raised ``KeyboardInterrupt``, ``SystemExit`` or ``GeneratorExit``.
    """
    try:
        return await coro
    except _ESCAPING as exc:
        raise TaskExit(f"a plugin task raised {type(exc).__qualname__}: {exc}") from exc


class Phase(enum.Enum):
    """Lifecycle of one plugin version; it only ever moves forward."""

    LOADED = "loaded"  # compiled, never installed
    STARTING = "starting"  # setup running
    LIVE = "live"  # current version of its name
    RETIRING = "retiring"  # replaced or removed; draining in-flight calls
    RETIRED = "retired"  # torn down and released (also: setup failed)


def released_entrypoint(*_args: Any, **_kwargs: Any) -> Any:
    """Stands in for a released version's entrypoint and hooks.

    Raises:
        PluginError: Always.
    """
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
        threads: Counts this version's abandoned worker threads that still run (sync calls
            that timed out while blocked in C).
        caller: What its calls' ``ctx`` is built on when not the dispatcher itself: a
            shadow candidate's read-only caller (``host.shadow``); None otherwise.
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
    threads: ThreadTally = field(default_factory=ThreadTally, init=False)
    caller: Caller | None = field(default=None, init=False)
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
        except BaseException as exc:
            if not is_plugin_failure(exc):
                raise  # the version retires: its supervisor cancels the task
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
        self.entrypoint = released_entrypoint
        self.setup = None
        self.teardown = None
        self.state = None
        self.task_group = None
        self.caller = None
        self.supervise = None
        self.spawn_queue.clear()
        self.tasks.clear()
        self.phase = Phase.RETIRED
        self._retired.set()
