"""The registry: plugin name -> current version, with atomic swaps and orderly retirement.

Design note — two versions, like Erlang/OTP code loading
(https://www.erlang.org/doc/system/code_loading.html):

* The swap is ONE dict assignment on the event loop thread (``self._current[name] =
  plugin``). ``setup`` completes *before* it, so a call sees either the old or the new
  version, never a half-built one, and never "not found" while a name is replaced.
* Calls in flight finish on the version they started on: they hold a reference to the
  ``Plugin`` and count themselves in ``plugin.in_flight``. New calls get the new version.
* The old version retires once it drains (``in_flight`` reaches 0; the dispatcher wakes
  the retirement as ``Plugin.end_call`` does, inline) or when the grace period ends, whichever
  comes first. Unlike Erlang's purge we do not kill calls still running after the grace
  period; they keep their own references and finish.
* Retirement, exactly once per version: run ``teardown``; cancel the version's tasks —
  those started with ``ctx.spawn`` (the version's supervised task group) and raw asyncio
  tasks created by its code (tracked through ``CALL_PATH`` and a loop task factory
  installed by ``__aenter__``); then ``Plugin.release()`` drops the module, so the old
  code can be garbage-collected.
* Rollback history keeps the last N *records* per name, not live modules: a module pins
  its globals, caches and connections, and recompiling a record takes milliseconds. It
  also keeps invariant (5) simple: nothing retired keeps code alive.

INVARIANTS (checked by the state machine in tests/test_registry.py):
  (1) at most one current version per name, and it is LIVE;
  (2) every installed version is retired exactly once: teardown runs at most once, and
      only for versions whose setup succeeded;
  (3) a version with in_flight > 0 is not torn down before its grace period (or the
      ``aclose`` drain timeout) ends;
  (4) len(history(name)) <= history_size;
  (5) a retired version holds no module, entrypoint, hooks or state.

Candidates (issue 16, progressive delivery). A name may hold a second live version, its
rollout's candidate, beside the current (stable) one; ``rollouts[name]`` is its routing
state (:class:`host.rollout.LiveRollout`), which the dispatcher reads on every call.
  (6) ``rollouts[name]`` exists iff ``_candidates[name]`` does, and holds that very
      version; it is LIVE, it is never the current version, and a name has a candidate
      only while it has a current version. The two dicts change together, in one step
      with no await between them;
  (7) a candidate's revision is above the current version's: installing a stable version
      whose revision is not below the candidate's drops the candidate in the same step
      as the swap, so no call is routed to a version older than the newest;
  (8) ``promote`` moves the candidate to current in one step (the old stable retires
      like any replaced version), so a call sees the old stable, the candidate, or the
      promoted version — never no version;
  (9) candidates retire exactly like replaced versions (invariants 2, 3 and 5 hold).

Held versions (issue 16: a pinned call may name "a recent version still held in
memory"). With ``held_versions=N > 0``, a version replaced by ``install`` or ``promote``
is not retired at once: it joins ``_held[name]`` (newest first) and stays LIVE, reachable
only by a pinned call (``X-Plugin-Version``, ``call(..., version=...)``); no unpinned call
is routed to it. When more than N are held, the oldest leaves and retires as a replaced
version does today (drain up to the grace period, teardown, tasks cancelled, module
released); ``remove`` and closing the registry retire the held versions too.
Memory: each held version keeps what a loaded one keeps (its module and globals, its
``setup`` state and connections, its ``ctx.spawn`` tasks, which keep running): about
N + 1 times a plugin's footprint per name, which is why N is 0 by default.
  (10) ``_held[name]`` holds at most ``held_versions`` versions of ``name``, each LIVE,
       never current and never a candidate, each in one name's deque once; a version
       leaves it exactly when it is scheduled for retirement (invariant 2 holds);
  (11) a held version is never chosen for an unpinned call (the dispatcher asks for
       held versions only in ``pick_version``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections import deque
from collections.abc import Callable, Iterator
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import anyio
import structlog
from anyio.abc import TaskGroup

from .context import Context
from .errors import CompileError, HostClosed
from .events import EventBus, LogThrottle
from .naming import format_plugin_traceback
from .plugin import Phase, Plugin, contain_task, is_plugin_failure
from .records import PluginRecord, Rollout
from .rollout import LiveRollout
from .threads import ThreadLimiter, ThreadTally, run_sync_interruptible
from .types import ContextFactory, Hook

if TYPE_CHECKING:
    from asyncio import _CoroutineLike
    from asyncio.events import _TaskFactory

__all__ = ("CALL_PATH", "NO_CALL_PATH", "Registry", "call_hook")

T = TypeVar("T")

_log = structlog.get_logger("host.registry")

NO_CALL_PATH: tuple[Plugin | None, tuple[str, ...]] = (None, ())
CALL_PATH: ContextVar[tuple[Plugin | None, tuple[str, ...]]] = ContextVar(
    "plugin_host_call_path", default=NO_CALL_PATH
)
"""What runs in this context: ``(version, names)``.

``version`` is the version whose code is running (set around setup, calls, teardown; the
task factory gives tasks created meanwhile to it), or None; ``names`` are the plugins on
the call path, outermost first (the dispatcher's depth bound and abort registration).
One variable for both, set once per call: a ``ContextVar.set``/``reset`` pair copies the
context's mapping and cost a call about 0.5 µs (issue 19).
"""


def _with_plugin(plugin: Plugin | None) -> Token[tuple[Plugin | None, tuple[str, ...]]]:
    """Make ``plugin`` the version running in this context; the call path stays."""
    return CALL_PATH.set((plugin, CALL_PATH.get()[1]))


@contextlib.contextmanager
def _untracked() -> Iterator[None]:
    """Start host tasks with no current plugin, so the factory never claims them."""
    token = _with_plugin(None)
    try:
        yield
    finally:
        CALL_PATH.reset(token)


async def call_hook(
    hook: Hook,
    ctx: Context,
    *,
    limiter: ThreadLimiter | None = None,
    tally: ThreadTally | None = None,
    on_stuck: Callable[[], None] | None = None,
) -> Any:
    """Run a ``setup``/``teardown`` hook: async on the loop, sync in a worker thread.

    Args:
        hook: The hook.
        ctx: Its context.
        limiter: Where a sync hook takes its thread slot (a per-loop default if None).
        tally: Counts the hook's thread while it is abandoned (the version's).
        on_stuck: Called if the hook's thread is abandoned and would not stop.

    Returns:
        What the hook returned.
    """
    if inspect.iscoroutinefunction(hook):
        return await hook(ctx)
    result = await run_sync_interruptible(
        hook, ctx, limiter=limiter, tally=tally, on_stuck=on_stuck
    )
    if inspect.isawaitable(result):
        result = await result
    return result


class Registry:
    """Maps plugin names to their current version; swaps and retires versions.

    Use it as an async context manager: it owns the task group that supervises every
    version's background tasks and runs retirements.

    Install and remove for one name are serialized; the registry swaps in the order the
    calls are made. Ordering versions by revision is the watcher's job.
    """

    def __init__(
        self,
        *,
        grace_period: float = 30.0,
        history_size: int = 5,
        setup_timeout: float | None = 30.0,
        teardown_timeout: float = 10.0,
        events: EventBus | None = None,
        threads: ThreadLimiter | None = None,
        held_versions: int = 0,
    ) -> None:
        """Create an empty registry.

        Args:
            grace_period: Seconds an old version may drain before it is torn down anyway.
            history_size: Records kept per name for rollback (``history``).
            setup_timeout: Bound on a version's ``setup`` hook; ``None`` for none.
            teardown_timeout: Bound on ``teardown`` and on cancelling the version's tasks.
            events: Where ``plugin.retired``, ``plugin.teardown_failed`` and
                ``plugin.thread_stuck`` go.
            threads: Where sync hooks take their thread slot: the host shares one limiter
                between calls and hooks, so it bounds every abandoned plugin thread.
            held_versions: Replaced versions kept live per name for pinned calls (see
                the module docstring; 0: a replaced version retires at once).
        """
        if history_size < 1:
            raise ValueError(f"history_size must be >= 1, got {history_size}")
        if held_versions < 0:
            raise ValueError(f"held_versions must be >= 0, got {held_versions}")
        self._held_size = held_versions
        self._held: dict[str, deque[Plugin]] = {}  # invariants (10) and (11)
        self._grace = grace_period
        self._history_size = history_size
        self._setup_timeout = setup_timeout
        self._teardown_timeout = teardown_timeout
        self._events = events if events is not None else EventBus(_log)
        self._threads = threads
        self._current: dict[str, Plugin] = {}
        # INVARIANT: _current is never rebound (only assigned to, popped and cleared in
        # place), so its bound ``get`` stays the lookup of the current version for the
        # registry's whole life: the dispatcher calls it per call (no ``get`` frame).
        self.lookup: Callable[[str], Plugin | None] = self._current.get
        """The same as :meth:`get` (the dict's own method: the hot path's lookup)."""
        self._candidates: dict[str, Plugin] = {}
        # Read by the dispatcher on every call (an empty dict costs one truth test);
        # never rebound, so a reference taken once stays valid. Invariant (6).
        self.rollouts: dict[str, LiveRollout] = {}
        self._history: dict[str, deque[PluginRecord]] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._factories: dict[Plugin, ContextFactory] = {}
        self._supervisors: dict[Plugin, anyio.Event] = {}
        self._draining: dict[Plugin, anyio.CancelScope] = {}  # retirement scheduled
        self._retired_log = LogThrottle()  # plugin.retired at info once a second a name
        self._tg: TaskGroup | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prev_factory: _TaskFactory | None = None
        self._factory: _TaskFactory | None = None

    # ---------------------------------------------------------------- lookups (hot path)

    def get(self, name: str) -> Plugin | None:
        """Return the current version of ``name``, or ``None``."""
        return self._current.get(name)

    def names(self) -> tuple[str, ...]:
        """Return the names with a current version."""
        return tuple(self._current)

    def items(self) -> tuple[tuple[str, Plugin], ...]:
        """Return a snapshot of ``(name, current version)`` pairs."""
        return tuple(self._current.items())

    def candidate(self, name: str) -> Plugin | None:
        """Return the rollout candidate of ``name``, or ``None``."""
        return self._candidates.get(name)

    def held(self, name: str) -> tuple[Plugin, ...]:
        """Return the replaced versions of ``name`` still held for pinned calls, newest first."""
        return tuple(self._held.get(name, ()))

    def history(self, name: str) -> tuple[PluginRecord, ...]:
        """Return the records of the last versions that went live for ``name``, newest first.

        The current version, if any, is the first entry. Entries survive ``remove``.
        """
        return tuple(self._history.get(name, ()))

    def abandoned_threads(self, name: str) -> int:
        """Abandoned worker threads still running for the current and retiring ``name``."""
        current = self._current.get(name)
        count = current.threads.abandoned if current is not None else 0
        candidate = self._candidates.get(name)
        if candidate is not None:
            count += candidate.threads.abandoned
        for plugin in self._held.get(name, ()):
            count += plugin.threads.abandoned
        for plugin in self._draining:
            if plugin.name == name:
                count += plugin.threads.abandoned
        return count

    def retiring(self) -> tuple[Plugin, ...]:
        """Return the versions replaced or removed but not yet retired."""
        return tuple(self._draining)

    def __len__(self) -> int:
        return len(self._current)

    def __contains__(self, name: object) -> bool:
        return name in self._current

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._current))

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        if self._tg is not None or self._closed:
            raise RuntimeError("a Registry can be entered only once")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._install_task_factory()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg = self._tg
        assert tg is not None, "Registry.__aexit__ without __aenter__"
        try:
            if exc is None:
                try:
                    await self.aclose()
                except BaseException as close_exc:
                    if await tg.__aexit__(type(close_exc), close_exc, close_exc.__traceback__):
                        return None
                    raise
            else:
                # Failing or cancelled: no draining; the task group cancels the drains
                # and each retirement still tears down (shielded).
                self._begin_close(0.0)
            return await tg.__aexit__(exc_type, exc, tb)
        finally:
            try:
                # Defensive: a retirement task cancelled before its first step (e.g. by
                # asyncio cancelling every task at loop shutdown) did no teardown.
                with anyio.CancelScope(shield=True):
                    for plugin in tuple(self._draining):
                        await self._finish_retirement(plugin, run_teardown=True)
            finally:
                self._restore_task_factory()

    async def aclose(self, drain_timeout: float | None = None) -> None:
        """Retire every version and wait until all are torn down.

        Calls in flight may finish within ``drain_timeout``; versions already retiring
        get the same, possibly shorter, deadline. Teardown runs once per version.

        Args:
            drain_timeout: Seconds to wait for in-flight calls; the grace period if
                ``None``.
        """
        self._begin_close(self._grace if drain_timeout is None else drain_timeout)
        for plugin in tuple(self._draining):
            await plugin.wait_retired()

    def _begin_close(self, drain_timeout: float) -> None:
        self._closed = True
        deadline = anyio.current_time() + drain_timeout
        for scope in self._draining.values():
            scope.deadline = min(scope.deadline, deadline)
        held = [plugin for versions in self._held.values() for plugin in versions]
        current = (*self._current.values(), *self._candidates.values(), *held)
        self._current.clear()
        self._candidates.clear()
        self._held.clear()
        self.rollouts.clear()
        for plugin in current:
            self._schedule_retirement(plugin, drain_timeout)

    # ---------------------------------------------------------------- install / remove

    async def install(self, plugin: Plugin, ctx_factory: ContextFactory) -> Plugin | None:
        """Run the version's ``setup``, then make it current and retire the old version.

        Args:
            plugin: A freshly compiled version (never installed before).
            ctx_factory: Builds the ``ctx`` for its ``setup`` and ``teardown`` hooks.

        Returns:
            The version it replaced, now retiring (or held, see ``held_versions``), or
            ``None``.

        Raises:
            CompileError: ``stage="setup"`` if setup raised or timed out; the old
                version keeps serving and is not retired.
            HostClosed: If the registry is closed.
            ValueError: If ``plugin`` was installed before.
        """
        self._require_open()
        if plugin.phase is not Phase.LOADED:
            raise ValueError(f"{plugin!r} was already installed; compile a new version")
        name = plugin.name
        async with self._lock_for(name):
            await self._start(plugin, ctx_factory)
            if self._closed:  # closed while setup ran: it went up, so it must come down
                self._schedule_retirement(plugin, 0.0)
                raise HostClosed("the registry closed while the version was starting")
            return self._swap(plugin)

    def installs_now(self, plugin: Plugin) -> bool:
        """Whether :meth:`install_now` can install ``plugin``: it has no ``setup`` hook,
        and no install, removal or promotion of its name is under way (its lock is free).
        """
        lock = self._locks.get(plugin.name)
        return plugin.setup is None and (lock is None or not lock.locked())

    def install_now(self, plugin: Plugin, ctx_factory: ContextFactory) -> Plugin | None:
        """:meth:`install` without an await, for a version :meth:`installs_now` accepts.

        With no ``setup`` to run and the name's lock free, :meth:`install` would take the
        lock without a checkpoint and swap in the same step; this is that step, without
        a coroutine. Every invariant holds as for :meth:`install`: nothing can run
        between the check and the swap.

        Args:
            plugin: A freshly compiled version (never installed before), with no setup.
            ctx_factory: Builds the ``ctx`` for its ``teardown`` hook.

        Returns:
            The version it replaced, now retiring (or held), or ``None``.

        Raises:
            HostClosed: If the registry is closed.
            ValueError: If ``plugin`` was installed before, or :meth:`installs_now` is
                False for it.
        """
        self._require_open()
        if plugin.phase is not Phase.LOADED:
            raise ValueError(f"{plugin!r} was already installed; compile a new version")
        if not self.installs_now(plugin):
            raise ValueError(f"{plugin!r} has a setup hook or its name is busy: use install()")
        plugin.phase = Phase.STARTING
        plugin.supervise = self._start_supervisor
        self._went_live(plugin, ctx_factory)
        return self._swap(plugin)

    def _swap(self, plugin: Plugin) -> Plugin | None:
        """Make the started ``plugin`` current; the version it replaced (held or retiring)."""
        name = plugin.name
        old = self._current.get(name)
        self._current[name] = plugin  # THE SWAP: one assignment, no await around it
        candidate = self._candidates.get(name)
        if candidate is not None and (
            plugin.record.revision is None
            or candidate.record.revision is None
            or candidate.record.revision <= plugin.record.revision
        ):
            self._drop_candidate(name)  # invariant (7), same step as the swap
        self._remember(plugin)
        if old is not None:
            self._hold(old)
        return old

    async def remove(self, name: str) -> Plugin | None:
        """Unload ``name``: its current version stops receiving calls and retires.

        Args:
            name: The plugin name.

        Returns:
            The version removed, now retiring, or ``None`` if none was current.
        """
        self._require_open()
        async with self._lock_for(name):
            old = self._current.pop(name, None)
            self._drop_candidate(name)  # invariant (6): no candidate without a stable
            if old is not None:
                self._schedule_retirement(old, self._grace)
            for held in self._held.pop(name, ()):  # invariant (10): they leave retiring
                self._schedule_retirement(held, self._grace)
        return old

    # ---------------------------------------------------------------- candidates

    async def install_candidate(
        self, plugin: Plugin, ctx_factory: ContextFactory, spec: Rollout, now: float
    ) -> LiveRollout:
        """Run a candidate's ``setup``, then route to it per ``spec`` beside the stable.

        A candidate already held for the name is replaced (and retires).

        Args:
            plugin: The freshly compiled candidate (never installed before).
            ctx_factory: Builds the ``ctx`` of its hooks (a shadow's refuses writes).
            spec: The record's rollout.
            now: ``time.perf_counter()``, where its statistics start.

        Returns:
            The rollout's routing state.

        Raises:
            CompileError: ``stage="setup"``: setup failed; the stable serves everything.
            LookupError: The name has no current version, or one whose revision is not
                below the candidate's (invariants 6 and 7).
            HostClosed: If the registry is closed.
            ValueError: If ``plugin`` was installed before.
        """
        self._require_open()
        if plugin.phase is not Phase.LOADED:
            raise ValueError(f"{plugin!r} was already installed; compile a new version")
        name = plugin.name
        async with self._lock_for(name):
            await self._start(plugin, ctx_factory)
            stable = self._current.get(name)
            refusal = None
            if self._closed:
                refusal = "the registry closed while the candidate was starting"
            elif stable is None:
                refusal = f"plugin {name!r} has no stable version to run a candidate beside"
            elif (
                stable.record.revision is not None
                and plugin.record.revision is not None
                and plugin.record.revision <= stable.record.revision
            ):
                refusal = f"candidate {plugin.version} is not newer than {stable.version}"
            if refusal is not None:
                self._schedule_retirement(plugin, 0.0)
                if self._closed:
                    raise HostClosed(refusal)
                raise LookupError(refusal)
            self._drop_candidate(name)
            live = LiveRollout(spec, plugin, now)
            self._candidates[name] = plugin  # invariant (6): both in one step
            self.rollouts[name] = live
        return live

    async def remove_candidate(self, name: str) -> LiveRollout | None:
        """Stop routing to ``name``'s candidate and retire it.

        Returns:
            The rollout it ended, or None if there was no candidate.
        """
        self._require_open()
        async with self._lock_for(name):
            return self._drop_candidate(name)

    async def promote(self, name: str) -> tuple[Plugin, Plugin | None]:
        """Make ``name``'s candidate its current version (invariant 8).

        Returns:
            ``(promoted, old)``: the new current version and the one it replaced (now
            retiring or held, or None).

        Raises:
            LookupError: ``name`` has no candidate.
        """
        self._require_open()
        async with self._lock_for(name):
            candidate = self._candidates.pop(name, None)
            if candidate is None:
                raise LookupError(f"plugin {name!r} has no candidate to promote")
            del self.rollouts[name]
            candidate.caller = None  # a promoted shadow serves with the host's own ctx.db
            old = self._current.get(name)
            self._current[name] = candidate  # THE SWAP
            self._remember(candidate)
            if old is not None:
                self._hold(old)
        return candidate, old

    def _remember(self, plugin: Plugin) -> None:
        """Put a version that just went current into its name's history (invariant 4)."""
        records = self._history.get(plugin.name)
        if records is None:
            records = self._history[plugin.name] = deque(maxlen=self._history_size)
        records.appendleft(plugin.record)

    def _hold(self, old: Plugin) -> None:
        """A version just replaced: hold it for pinned calls, or retire it (invariant 10).

        Same step as the swap (no await), so a pinned call finds it current or held.
        """
        if not self._held_size:
            self._schedule_retirement(old, self._grace)
            return
        held = self._held.get(old.name)
        if held is None:
            held = self._held[old.name] = deque()
        held.appendleft(old)
        while len(held) > self._held_size:
            self._schedule_retirement(held.pop(), self._grace)

    def _drop_candidate(self, name: str) -> LiveRollout | None:
        candidate = self._candidates.pop(name, None)
        if candidate is None:
            return None
        live = self.rollouts.pop(name)
        live.abort("dropped")  # calls holding the routing state stop choosing it
        self._schedule_retirement(candidate, self._grace)
        return live

    # ---------------------------------------------------------------- internals

    def _require_open(self) -> TaskGroup:
        if self._closed:
            raise HostClosed("the registry is closed")
        if self._tg is None:
            raise RuntimeError("use the Registry as an async context manager first")
        return self._tg

    def _lock_for(self, name: str) -> anyio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            # fast_acquire: an uncontended install/remove skips the scheduling checkpoint
            # (a cold start installs thousands of names, each lock taken once).
            lock = self._locks[name] = anyio.Lock(fast_acquire=True)
        return lock

    async def _start(self, plugin: Plugin, ctx_factory: ContextFactory) -> None:
        """Run ``setup`` (under the name's lock); LIVE on success, released on failure."""
        plugin.phase = Phase.STARTING
        # The supervisor (the task group of ctx.spawn) starts on the first spawn:
        # a cold start of thousands of versions that never spawn starts none.
        plugin.supervise = self._start_supervisor
        try:
            await self._run_setup(plugin, ctx_factory)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._finish_retirement(plugin, run_teardown=False)
            raise
        self._went_live(plugin, ctx_factory)

    def _went_live(self, plugin: Plugin, ctx_factory: ContextFactory) -> None:
        self._factories[plugin] = ctx_factory
        plugin.phase = Phase.LIVE

    def _start_supervisor(self, plugin: Plugin) -> None:
        """Start the version's supervisor (its first ``ctx.spawn``); see ``Plugin.spawn``."""
        assert self._tg is not None
        done = self._supervisors[plugin] = anyio.Event()
        with _untracked():
            self._tg.start_soon(self._supervise, plugin, done, name=f"supervise {plugin.version}")

    async def _supervise(self, plugin: Plugin, done: anyio.Event) -> None:
        """Own the version's ``ctx.spawn`` tasks until retirement cancels them."""
        try:
            if plugin.supervise is None:  # retired before this task first ran
                return
            async with anyio.create_task_group() as tg:
                plugin.task_group = tg
                queued, plugin.spawn_queue = plugin.spawn_queue, []
                for context, start in queued:
                    context.run(start)
                await anyio.sleep_forever()
        finally:
            plugin.task_group = None
            done.set()

    async def _run_setup(self, plugin: Plugin, ctx_factory: ContextFactory) -> None:
        hook = plugin.setup
        if hook is None:
            return
        failure: BaseException | None = None
        state: Any = None
        token = _with_plugin(plugin)
        try:
            with anyio.move_on_after(self._setup_timeout) as scope:
                try:
                    state = await call_hook(
                        hook, ctx_factory(plugin), **self._hook_threads(plugin, "setup")
                    )
                except BaseException as exc:  # KeyboardInterrupt, SystemExit... included
                    if not is_plugin_failure(exc):
                        raise  # the host's cancellation (the setup timeout, shutdown)
                    failure = exc
        finally:
            CALL_PATH.reset(token)
        if scope.cancelled_caught:
            raise CompileError(
                plugin.name,
                plugin.version,
                "setup",
                f"setup did not finish within {self._setup_timeout:g} s",
            )
        if failure is not None:
            tb = await anyio.to_thread.run_sync(format_plugin_traceback, failure)
            raise CompileError(
                plugin.name,
                plugin.version,
                "setup",
                f"setup raised {type(failure).__qualname__}: {failure}",
                tb,
            ) from failure
        plugin.state = state

    def _hook_threads(self, plugin: Plugin, hook: str) -> dict[str, Any]:
        def stuck() -> None:
            self._events.emit(
                "plugin.thread_stuck",
                "error",
                plugin=plugin.name,
                version=plugin.version,
                where=hook,
                abandoned=plugin.threads.abandoned,
                host_abandoned=self._threads.abandoned if self._threads is not None else None,
            )

        return {"limiter": self._threads, "tally": plugin.threads, "on_stuck": stuck}

    def _schedule_retirement(self, plugin: Plugin, grace: float) -> None:
        if plugin.phase is not Phase.LIVE:  # invariant (2): at most one retirement
            return
        plugin.phase = Phase.RETIRING
        scope = self._draining[plugin] = anyio.CancelScope(deadline=anyio.current_time() + grace)
        if self._loop is not None and not self._closed:
            # A reload storm retires a version per reload: most have nothing to drain
            # or tear down, and a callback costs far less than a task (spawn, cancel
            # scope, its own loop turns). One loop step later, so ``plugin.retired``
            # still follows the ``plugin.reloaded`` the loader emits after the swap.
            self._loop.call_soon(self._retire_soon, plugin, scope)
            return
        self._start_retirement(plugin, scope)

    def _start_retirement(self, plugin: Plugin, scope: anyio.CancelScope) -> None:
        assert self._tg is not None
        with _untracked():
            self._tg.start_soon(self._retire, plugin, scope, name=f"retire {plugin.version}")

    def _retire_soon(self, plugin: Plugin, scope: anyio.CancelScope) -> None:
        """Retire ``plugin`` at once if it has nothing to wait for, else in a task.

        Nothing to wait for: no call in flight (so invariant (3) holds trivially), no
        ``teardown`` hook, no supervisor and no task of its own still running.
        """
        if self._draining.get(plugin) is not scope:
            return  # already retired (the registry closed in between)
        if (
            plugin.in_flight
            or plugin.teardown is not None
            or plugin.task_group is not None
            or plugin in self._supervisors
            or any(not task.done() for task in plugin.tasks)
            or self._closed
        ):
            # A task group that already ended raises: __aexit__ then retires the version.
            with contextlib.suppress(RuntimeError):
                self._start_retirement(plugin, scope)
            return
        self._factories.pop(plugin, None)
        plugin.supervise = None
        self._released(plugin, run_teardown=True)

    async def _retire(self, plugin: Plugin, scope: anyio.CancelScope) -> None:
        try:
            if plugin.in_flight:
                drained = plugin.drained = anyio.Event()
                with scope:  # invariant (3): only the deadline cuts the drain short
                    await drained.wait()
        finally:
            # Also when the registry is cancelled: teardown must still run, once.
            with anyio.CancelScope(shield=True):
                await self._finish_retirement(plugin, run_teardown=True)

    async def _finish_retirement(self, plugin: Plugin, *, run_teardown: bool) -> None:
        ctx_factory = self._factories.pop(plugin, None)
        teardown = plugin.teardown
        if run_teardown and teardown is not None and ctx_factory is not None:
            await self._run_teardown(plugin, teardown, ctx_factory)

        plugin.supervise = None  # no new supervisor; one not yet running exits at once
        done = self._supervisors.pop(plugin, None)
        tg = plugin.task_group  # set only while the supervisor runs, so `done` will fire
        if tg is not None:
            tg.cancel_scope.cancel()
            if done is not None:
                with anyio.move_on_after(self._teardown_timeout):
                    await done.wait()
        pending = [task for task in plugin.tasks if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=self._teardown_timeout)

        self._released(plugin, run_teardown=run_teardown)

    def _released(self, plugin: Plugin, *, run_teardown: bool) -> None:
        """The end of a retirement: drop the version's code and say so."""
        in_flight = plugin.in_flight
        self._draining.pop(plugin, None)
        plugin.release()  # invariant (5)
        if run_teardown:
            fields: dict[str, Any] = {
                "plugin": plugin.name,
                "version": plugin.version,
                "in_flight": in_flight,
                "forced": in_flight > 0,
            }
            level = self._retired_log.level(plugin.name, fields) if not in_flight else "info"
            self._events.emit("plugin.retired", level, **fields)

    async def _run_teardown(
        self, plugin: Plugin, teardown: Hook, ctx_factory: ContextFactory
    ) -> None:
        failure: BaseException | None = None
        token = _with_plugin(plugin)
        try:
            with anyio.move_on_after(self._teardown_timeout) as scope:
                try:
                    await call_hook(
                        teardown, ctx_factory(plugin), **self._hook_threads(plugin, "teardown")
                    )
                except BaseException as exc:  # KeyboardInterrupt, SystemExit... included
                    if not is_plugin_failure(exc):
                        raise  # the teardown timeout: reported below
                    failure = exc
        finally:
            CALL_PATH.reset(token)
        if failure is not None:
            tb = await anyio.to_thread.run_sync(format_plugin_traceback, failure)
            self._events.emit(
                "plugin.teardown_failed",
                "error",
                plugin=plugin.name,
                version=plugin.version,
                error_type=type(failure).__qualname__,
                error=str(failure),
                traceback=tb,
            )
        elif scope.cancelled_caught:
            self._events.emit(
                "plugin.teardown_failed",
                "error",
                plugin=plugin.name,
                version=plugin.version,
                error_type="TimeoutError",
                error=f"teardown did not finish within {self._teardown_timeout:g} s",
                traceback="",
            )

    # ---------------------------------------------------------------- task tracking

    def _install_task_factory(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio: raw tasks cannot be tracked, ctx.spawn still is
            return
        prev: _TaskFactory | None = loop.get_task_factory()

        def factory(
            loop: asyncio.AbstractEventLoop, coro: _CoroutineLike[T], /, **kwargs: Any
        ) -> asyncio.Future[T]:
            plugin = None
            if self._factory is factory:
                context = kwargs.get("context")
                path = CALL_PATH.get() if context is None else context.get(CALL_PATH)
                plugin = path[0] if path is not None else None
                if plugin is not None and inspect.iscoroutine(coro):
                    coro = contain_task(coro)  # its BaseExceptions must not stop the loop
            if prev is None:
                task: asyncio.Future[T] = asyncio.Task(coro, loop=loop, **kwargs)
            else:
                task = prev(loop, coro, **kwargs)
            if plugin is not None and isinstance(task, asyncio.Task):
                plugin.track(task)
            return task

        self._loop = loop
        self._prev_factory = prev
        self._factory = factory
        loop.set_task_factory(factory)

    def _restore_task_factory(self) -> None:
        loop, factory = self._loop, self._factory
        self._factory = None  # a factory left in someone else's chain becomes a pass-through
        if loop is not None and factory is not None and loop.get_task_factory() is factory:
            loop.set_task_factory(self._prev_factory)
        self._loop = None
        self._prev_factory = None
