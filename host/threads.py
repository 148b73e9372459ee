"""Interruptible worker-thread calls.

Runs blocking functions (sync plugin entrypoints, sync hooks, top-level code) in worker
threads, as ``anyio.to_thread`` does, but a caller that gives up (a timeout, a
cancellation) returns at once and the thread is *interrupted*: :class:`ThreadInterrupted`
is injected into it with ``PyThreadState_SetAsyncExc``, which stops pure-Python code at its
next bytecode. Code blocked inside C (``time.sleep``, a lock, a socket) cannot be
interrupted that way; its thread is abandoned and exits whenever the C call returns.

Unlike ``anyio.to_thread`` (which gives its limiter token back as soon as the caller is
cancelled), a :class:`ThreadLimiter` counts an abandoned thread until it really ends, as
trio's ``_threads.py`` does: a sync plugin that blocks in C and keeps timing out cannot
create threads without bound. When every slot is held by an abandoned thread, a new call
fails at once with :class:`ThreadsExhausted` instead of queueing behind threads that may
never end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
from anyio.lowlevel import RunVar

__all__ = (
    "DEFAULT_THREADS",
    "STUCK_AFTER",
    "Stoppable",
    "ThreadInterrupted",
    "ThreadLimiter",
    "ThreadTally",
    "ThreadsExhausted",
    "per_loop",
    "run_stoppable",
    "run_sync_interruptible",
)

T = TypeVar("T")


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


class ThreadsExhausted(Exception):
    """A :class:`ThreadLimiter` reached its bound on abandoned, still running threads.

    Attributes:
        total: How many abandoned threads hold slots (the limiter's bound).
    """

    def __init__(self, total: int) -> None:
        super().__init__(
            f"all {total} worker threads are held by abandoned calls that are still "
            "blocked (e.g. in C code that cannot be interrupted)"
        )
        self.total = total


class ThreadTally:
    """How many abandoned threads of one owner (e.g. a plugin version) still run.

    Only the event loop thread reads or writes ``abandoned``.
    """

    __slots__ = ("abandoned",)

    def __init__(self) -> None:
        self.abandoned = 0


class ThreadLimiter:
    """At most ``total`` worker threads run work of one kind, abandoned threads included.

    INVARIANT: ``in_use`` counts every thread whose work was admitted and has not returned
    (running, or abandoned and still running), so ``abandoned <= in_use <= total``. A slot
    is returned on the event loop thread only: by the caller when the work returned (or
    never started), else by the abandoned thread itself, through
    ``loop.call_soon_threadsafe``, when its work finally returns. Waiters re-check on
    every release and every abandonment, so a waiter never sleeps behind slots that only
    abandoned threads hold: it gets :class:`ThreadsExhausted` as soon as they hold all.
    Only the event loop thread touches the counts.

    HARD BOUND: ``abandoned <= in_use <= total``, so one limiter shared by every kind of
    plugin thread (the host's: calls and hooks) bounds the abandoned threads of the
    whole host.

    Args:
        total: The number of slots.
    """

    __slots__ = ("_waiters", "abandoned", "in_use", "total")

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"a thread limiter needs at least 1 slot, got {total}")
        self.total = total
        self.in_use = 0
        """Slots held now: running threads plus abandoned threads that still run."""
        self.abandoned = 0
        """Slots held by abandoned threads that still run."""
        self._waiters: list[anyio.Event] = []

    async def acquire(self) -> None:
        """Take a slot, waiting while all are taken.

        Raises:
            ThreadsExhausted: Every slot is (or becomes) held by an abandoned thread.
        """
        while True:
            if self.abandoned >= self.total:
                raise ThreadsExhausted(self.total)
            if self.in_use < self.total:
                self.in_use += 1
                return
            woken = anyio.Event()
            self._waiters.append(woken)
            try:
                await woken.wait()
            finally:
                if not woken.is_set():
                    self._waiters.remove(woken)

    def release(self) -> None:
        """Give a slot back (its thread's work returned, or never started)."""
        self.in_use -= 1
        self._wake()

    def abandoned_one(self) -> None:
        """Count a running thread as abandoned (it keeps its slot)."""
        self.abandoned += 1
        self._wake()

    def abandoned_ended(self) -> None:
        """An abandoned thread returned: it is no longer counted and frees its slot."""
        self.abandoned -= 1
        self.release()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for woken in waiters:
            woken.set()


DEFAULT_THREADS = 40
"""Slots of the per-loop default limiter (anyio's default thread limit)."""

_default_limiter: RunVar[ThreadLimiter] = RunVar("plugin_host_default_threads")
# The slots are counted by ThreadLimiter; anyio's own limiter must not bound twice (and it
# would give tokens back on cancellation anyway).
_carrier: RunVar[anyio.CapacityLimiter] = RunVar("plugin_host_thread_carrier")


def per_loop(var: RunVar[T], create: Callable[[], T]) -> T:
    """The event loop's value of ``var``, created on first use.

    Args:
        var: The run variable.
        create: Makes the value on first use in this loop.

    Returns:
        The value.
    """
    try:
        return var.get()
    except LookupError:
        value = create()
        var.set(value)
        return value


class Stoppable:
    """Worker-thread work that the loop thread can stop by injecting ThreadInterrupted.

    The lock guarantees the injected exception is raised inside ``run`` and never leaks
    into the thread pool after ``run`` returned: injection happens only while the work
    runs, and ``_finish`` clears a still-pending injection under the same lock.
    """

    __slots__ = ("_ident", "_injected", "_lock", "_on_exit", "_running", "_stopped")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._on_exit: Callable[[], None] | None = None
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
        on_exit = None
        while True:
            try:
                with self._lock:
                    self._running = False
                    self._stopped = True
                    if self._injected:
                        _set_async_exc(self._ident, None)
                    on_exit, self._on_exit = self._on_exit, None
                break
            except ThreadInterrupted:
                continue  # delivered just now: the work is over anyway
        if on_exit is not None:
            on_exit()

    def abandon(self, on_exit: Callable[[], None] | None = None) -> bool:
        """Run nothing more and interrupt what runs; the caller gave up on the work.

        Args:
            on_exit: Called in the worker thread when the running work returns.

        Returns:
            Whether the work still runs (then ``on_exit`` will be called), False if it
            never started or already returned.
        """
        with self._lock:
            self._stopped = True
            self._inject_locked()
            if not self._running:
                return False
            self._on_exit = on_exit
            return True


class _Raised(Exception):
    """Carries a non-``Exception`` ``BaseException`` out of a worker thread.

    asyncio hands a worker's exception to the awaiting task with ``coro.throw()``, and
    throwing ``GeneratorExit`` into a coroutine chain *closes* it instead (CPython's
    ``gen_throw``): the host code awaiting the thread could not even catch it. So the
    thread boxes such exceptions and :func:`run_stoppable` re-raises the original with a
    plain ``raise``, which propagates like any other exception.
    """

    def __init__(self, exc: BaseException) -> None:
        super().__init__(repr(exc))
        self.exc = exc


class _InterruptibleCall(Stoppable, Generic[T]):
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
        except (Exception, ThreadInterrupted):
            raise
        except BaseException as exc:  # KeyboardInterrupt, SystemExit, GeneratorExit...
            raise _Raised(exc) from None
        finally:
            self._finish()


STUCK_AFTER = 1.0
"""Seconds an abandoned thread may take to stop before it is reported as stuck."""


async def run_stoppable(
    work: Stoppable,
    run: Callable[[], T],
    limiter: ThreadLimiter,
    tally: ThreadTally | None = None,
    on_stuck: Callable[[], None] | None = None,
) -> T:
    """Run ``run()`` (``work``'s body) in a worker thread holding one slot of ``limiter``.

    Cancelling the awaiting task returns at once: ``work`` is abandoned (interrupted), and
    its slot stays held until the thread really returns.

    Args:
        work: What ``run`` executes; abandoned on cancellation.
        run: The callable executed in the thread (``work.run``).
        limiter: Where the slot is taken.
        tally: Also counts the thread while it is abandoned (e.g. per plugin version).
        on_stuck: Called on the loop if the abandoned thread still runs
            :data:`STUCK_AFTER` seconds after it was interrupted (it would not stop).

    Returns:
        What ``run`` returned.

    Raises:
        ThreadsExhausted: The limiter's bound on abandoned threads is reached.
    """
    await limiter.acquire()
    carrier = per_loop(_carrier, lambda: anyio.CapacityLimiter(math.inf))
    raised: BaseException | None = None
    try:
        result = await anyio.to_thread.run_sync(run, limiter=carrier, abandon_on_cancel=True)
    except _Raised as boxed:
        limiter.release()
        raised = boxed.exc
    except anyio.get_cancelled_exc_class():
        loop = asyncio.get_running_loop()

        running = [True]

        def ended() -> None:  # on the loop: the abandoned thread returned
            running[0] = False
            if tally is not None:
                tally.abandoned -= 1
            limiter.abandoned_ended()

        def check_stuck() -> None:
            if running[0] and on_stuck is not None:
                on_stuck()

        def thread_exit() -> None:  # in the worker thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to count
                loop.call_soon_threadsafe(ended)

        if work.abandon(thread_exit):
            if tally is not None:
                tally.abandoned += 1
            limiter.abandoned_one()
            if on_stuck is not None:
                loop.call_later(STUCK_AFTER, check_stuck)
        else:
            limiter.release()
        raise
    except BaseException:
        limiter.release()
        raise
    else:
        limiter.release()
        return result
    raise raised  # outside the handler: no _Raised in its context


async def run_sync_interruptible(
    func: Callable[..., T],
    *args: Any,
    limiter: ThreadLimiter | None = None,
    tally: ThreadTally | None = None,
    on_stuck: Callable[[], None] | None = None,
) -> T:
    """Run ``func(*args)`` in a worker thread; on cancellation, interrupt and abandon it.

    Unlike ``anyio.to_thread.run_sync``, cancelling the awaiting task (e.g. a timeout)
    returns at once: the thread is abandoned and :class:`ThreadInterrupted` is injected
    into it, which stops pure-Python code at its next bytecode. Code blocked in C keeps its
    thread, and its slot of ``limiter``, until the C call returns.

    Args:
        func: The blocking callable.
        *args: Positional arguments for ``func``.
        limiter: Where the thread takes its slot; a per-loop limiter of
            :data:`DEFAULT_THREADS` if ``None``.
        tally: Also counts the thread while it is abandoned.
        on_stuck: Called if the abandoned thread would not stop (see
            :func:`run_stoppable`).

    Returns:
        What ``func`` returned.

    Raises:
        ThreadsExhausted: ``limiter``'s bound on abandoned threads is reached.
    """
    if limiter is None:
        limiter = per_loop(_default_limiter, lambda: ThreadLimiter(DEFAULT_THREADS))
    call = _InterruptibleCall(func, args)
    return await run_stoppable(call, call.run, limiter, tally, on_stuck)
