"""Unit tests of the retryable-write history: an outcome counts only once it is durable."""

from __future__ import annotations

from host.embedded.retryable import RetryHistory, TxnKey

KEY = TxnKey(b"\x01" * 16, 7)


def test_outcomes_are_pending_until_the_commit_keeps_them() -> None:
    """put() is invisible to get() until settle(True); settle(False) drops it (rolled back)."""
    history = RetryHistory()
    history.put(KEY, 0, "first")
    assert history.get(KEY, 0) is None  # not journaled yet: a retry must run it again
    history.settle(True)
    assert history.get(KEY, 0) == "first"
    history.put(KEY, 1, "second")
    history.settle(False)  # the journal refused it and the write was undone
    assert history.get(KEY, 1) is None
    history.settle(True)  # a later commit does not bring back a dropped outcome
    assert history.get(KEY, 1) is None
    assert history.get(KEY, 0) == "first"


def test_history_forgets_the_oldest_beyond_its_size() -> None:
    """The bound holds across settles: the oldest outcomes go first."""
    history = RetryHistory(size=2)
    for stmt in range(3):
        history.put(KEY, stmt, stmt)
    history.settle(True)
    assert [history.get(KEY, stmt) for stmt in range(3)] == [None, 1, 2]
