"""Retryable writes: statement outcomes by (lsid, txnNumber, stmtId), and their failpoint.

As mongod (``source/retryable-writes/retryable-writes.md``; the server's
``TransactionParticipant``), each statement of a retryable insert, update or delete
is recorded when it commits, under its statement id (its index in the batch). A retry
of the same (lsid, txnNumber) replays the recorded statements and executes only the
ones that never committed, so a batch cut short by a network error completes exactly
once. A failed statement is not recorded: a retry runs it again. findAndModify has a
single statement, recorded with its whole reply.

``onPrimaryTransactionalWrite`` (mongod's ``write_ops_exec.cpp``) fires when a
retryable statement executes (never when it is replayed): by default it lets the
statement commit and then closes the connection, so the client never sees the reply;
with ``failBeforeCommitExceptionCode`` the statement fails with that code instead and
is not applied (and the connection still closes unless ``closeConnection: false``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bson.binary import Binary

from .errors import CloseConnection, CommandError
from .storage import WriteResult

HISTORY_SIZE = 100_000


@dataclass(frozen=True, slots=True)
class TxnKey:
    """A retryable write's identity: the session id and the transaction number."""

    lsid: bytes
    txn_number: int


def txn_key(body: Mapping[str, Any]) -> TxnKey | None:
    """The (lsid, txnNumber) of a retryable write command, or None for a plain write."""
    if "txnNumber" not in body:
        return None
    lsid = body.get("lsid")
    ident = lsid.get("id") if isinstance(lsid, Mapping) else None
    if not isinstance(ident, bytes | Binary):
        return None
    return TxnKey(bytes(ident), int(body["txnNumber"]))


class RetryHistory:
    """Durable statement outcomes, bounded (oldest forgotten first).

    Invariant: a retry replays only outcomes whose writes are journaled. ``put`` holds an
    outcome as *pending* until the storage's next commit settles it (:meth:`settle`, a
    ``Storage.on_commit`` hook): kept when the journal took the writes, dropped when
    they were rolled back (a full disk), so a retry can never acknowledge a write that is
    not on disk. Statements run on the server's event loop, so a retry never sees half a
    statement. Forgetting old entries only makes a very late retry execute again, as on
    mongod once its session record is reaped.
    """

    def __init__(self, size: int = HISTORY_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[TxnKey, int], Any] = OrderedDict()
        self._pending: list[tuple[tuple[TxnKey, int], Any]] = []

    def get(self, key: TxnKey, stmt_id: int) -> Any | None:
        """The recorded (durable) outcome of statement ``stmt_id``, or None."""
        return self._entries.get((key, stmt_id))

    def put(self, key: TxnKey, stmt_id: int, outcome: Any) -> None:
        """Record the outcome of an applied statement; it counts once it is durable."""
        self._pending.append(((key, stmt_id), outcome))

    def settle(self, durable: bool) -> None:
        """Keep the pending outcomes (their writes are journaled) or drop them (undone)."""
        pending, self._pending = self._pending, []
        if not durable:
            return
        for item, outcome in pending:
            self._entries[item] = outcome
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


@dataclass(slots=True)
class StatementFault:
    """What ``onPrimaryTransactionalWrite`` does to one executing statement."""

    close_connection: bool
    error: CommandError | None


def fault_from_data(data: Mapping[str, Any]) -> StatementFault:
    """The fault described by the failpoint's ``data``."""
    code = data.get("failBeforeCommitExceptionCode")
    error = None
    if code is not None:
        error = CommandError(
            int(code),
            "Failing write due to failpoint onPrimaryTransactionalWrite. "
            "The write must not be reflected.",
        )
    return StatementFault(bool(data.get("closeConnection", True)), error)


@dataclass(frozen=True, slots=True)
class _Outcome:
    n: int
    n_modified: int
    upserted: tuple[Any, ...]  # the upserted _id, or nothing


def run_statements(
    statements: list[Any],
    *,
    ordered: bool,
    key: TxnKey,
    history: RetryHistory,
    execute: Callable[[Any], WriteResult],
    fault: Callable[[], StatementFault | None],
    start: int = 0,
) -> tuple[WriteResult, bool]:
    """Run a retryable write's statements one by one, replaying the recorded ones.

    Args:
        statements: The command's documents, updates or deletes.
        ordered: Stop at the first write error.
        key: The write's (lsid, txnNumber).
        history: Where committed statements are recorded.
        execute: Runs one statement; its result's indexes are 0.
        fault: Enters ``onPrimaryTransactionalWrite`` for an executing statement.
        start: The statement id of ``statements[0]`` (a chunk of a longer batch); the
            result's indexes still count from 0.

    Returns:
        The combined result, and whether to close the connection instead of replying.

    Raises:
        CloseConnection: A statement failed before commit and the failpoint closes.
    """
    result = WriteResult()
    close_after = False
    for index, stmt in enumerate(statements):
        recorded = history.get(key, start + index)
        if recorded is None:
            injected = fault()
            if injected is not None and injected.error is not None:
                if injected.close_connection:
                    raise CloseConnection()
                error = injected.error
                result.write_errors.append(
                    {
                        "index": index,
                        "code": error.code,
                        "codeName": error.code_name,
                        "errmsg": error.message,
                    }
                )
                if ordered:
                    break
                continue
            one = execute(stmt)
            if one.write_errors:
                result.write_errors += [{**e, "index": index} for e in one.write_errors]
                if ordered:
                    break
                continue
            recorded = _Outcome(one.n, one.n_modified, tuple(u["_id"] for u in one.upserted))
            history.put(key, start + index, recorded)
            close_after = close_after or (injected is not None and injected.close_connection)
        assert isinstance(recorded, _Outcome)
        result.n += recorded.n
        result.n_modified += recorded.n_modified
        result.upserted += [{"index": index, "_id": u} for u in recorded.upserted]
    return result, close_after


__all__ = [
    "RetryHistory",
    "StatementFault",
    "TxnKey",
    "fault_from_data",
    "run_statements",
    "txn_key",
]
