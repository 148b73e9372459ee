"""Make PyMongo's async server selection safe to cancel from an anyio cancel scope.

The bug (PyMongo 4.x on Python 3.11): ``pymongo.lock._async_cond_wait`` waits on the
topology's condition with ``asyncio.wait_for(condition.wait(), timeout)``. Before Python
3.12, ``wait_for`` runs the wait in an inner task. When the caller is cancelled, it cancels
the inner task and waits for it; anyio's cancel scope delivers the cancellation again on the
next loop iteration, so the caller leaves ``wait_for`` before the inner task has re-acquired
the lock. The caller's ``async with topology._lock`` then releases a lock it does not hold,
and the inner task re-acquires the lock once and ends, cancelled, holding it: nobody ever
releases it. Every later server selection, the monitor's ``on_change`` and
``client.close()`` wait for it forever. A daemon that could not reach MongoDB and stopped
its watcher/trigger/status tasks mid-selection hung at ``client.close()`` instead of exiting
(the flaky ``test_unreachable_mongodb_fails_after_startup_timeout``).

The fix: wait on the condition in the caller's own task, bounded by ``asyncio.timeout``
(Python 3.11+). The vendored ``Condition.wait`` re-acquires the lock even when cancelled,
so the lock is held again when the caller's ``async with`` releases it. Python 3.12's
``wait_for`` already works this way, so nothing is replaced there.
``tests/test_pymongo_cancel.py`` cancels server selections the way the daemon does and
checks that ``close()`` still returns.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

__all__ = ("install",)

_MODULES = ("pymongo.lock", "pymongo.asynchronous.topology", "pymongo.asynchronous.pool")
"""The modules that hold a reference to ``_async_cond_wait`` (imported by name)."""


async def _cond_wait(condition: Any, timeout: float | None) -> bool:  # noqa: ASYNC109 - PyMongo's signature
    """Wait on ``condition`` (lock held) for up to ``timeout`` seconds, in this task.

    Args:
        condition: A PyMongo async ``Condition`` whose lock the caller holds.
        timeout: Seconds to wait; None waits until notified.

    Returns:
        True when notified, False when the timeout passed first.
    """
    try:
        async with asyncio.timeout(timeout):
            result: bool = await condition.wait()
            return result
    except TimeoutError:
        return False


def install() -> bool:
    """Replace PyMongo's condition wait where it is not cancel-safe; idempotent.

    Returns:
        True when the replacement is in place (Python 3.11), False when not needed.
    """
    if sys.version_info >= (3, 12):
        return False
    import importlib

    for name in _MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "_async_cond_wait"):
            setattr(module, "_async_cond_wait", _cond_wait)  # noqa: B010 - private name
    return True
