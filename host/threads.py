"""Interruptible worker-thread calls.

Runs blocking functions (sync plugin entrypoints, sync hooks, top-level code) in worker
threads, as ``anyio.to_thread`` does, but a caller that gives up (a timeout, a
cancellation) returns at once and the thread is *interrupted*: :class:`ThreadInterrupted`
is injected into it with ``PyThreadState_SetAsyncExc``, which stops pure-Python code at its
next bytecode. Code blocked inside C (``time.sleep``, a lock, a socket) cannot be
interrupted that way; its thread is abandoned and exits whenever the C call returns.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio

__all__ = ("Stoppable", "ThreadInterrupted", "run_sync_interruptible")

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


class Stoppable:
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
