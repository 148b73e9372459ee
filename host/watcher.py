"""The watcher: initial load plus a change stream on the functions collection, stitched.

Design note — stitching the snapshot to the stream
(https://www.mongodb.com/docs/manual/changeStreams/#start-time and the change-streams
spec's resume rules):

1. Take a cluster time ``T0`` (the ``operationTime`` of a ``ping`` in a session).
2. Open the change stream with ``startAtOperationTime: T0`` (inclusive), with
   ``fullDocument: updateLookup``. The start point is fixed by the option, so this works
   even with Motor, whose ``watch()`` sends its aggregate lazily.
3. Read the whole collection with read concern ``majority`` in the same session; its
   ``operationTime`` ``Tsnap`` >= ``T0`` is the point the snapshot reflects. A majority
   snapshot has no oplog holes before it, so every write at or before ``Tsnap`` is in it.
4. Load the snapshot; unload names the snapshot no longer has (resync).
5. Follow the stream, skipping events at or before ``Tsnap`` (already in the snapshot).

Every write after ``T0`` reaches the stream and every write up to ``Tsnap`` is in the
snapshot, so nothing is lost; events at or before ``Tsnap`` are skipped, so nothing older
than the snapshot replaces it. ``updateLookup`` returns the current document, which only
moves forward in time, and the loader applies the newest change per name, so an older
version never replaces a newer one that was served.

Errors (PyMongo's ``_resumable()`` in ``asynchronous/change_stream.py`` already resumes
once on network errors, CursorNotFound and the ``ResumableChangeStreamError`` label):
* anything else transient (server down, selection timeout) — back off, reopen with
  ``resumeAfter`` the last token (``watch.resumed``); the registry keeps serving;
* ``ChangeStreamHistoryLost`` (286), ``ChangeStreamFatalError`` (280), an invalid token
  (260) — resync from a fresh snapshot (``watch.resynced``);
* ``invalidate`` (the collection was dropped or renamed) — resync, then follow the same
  namespace with ``startAfter`` the invalidate token (``watch.invalidated``); the registry
  mirrors the collection, so a dropped collection unloads its plugins;
* a deployment without change streams (standalone: 40573) or no permission — fatal.

Apart from the initial load and resyncs, the watcher sends no find or count: it never polls.

Wake-ups. The stream's getMore carries no ``maxTimeMS`` unless ``max_await_ms`` is set,
so the server waits up to its default 1 s. MongoDB documents that wait as a *maximum*:
an awaitData cursor "returns no data only if the timeout expires"; with data it returns
at once (https://www.mongodb.com/docs/manual/reference/method/cursor.tailable/, and
maxAwaitTimeMS is what drivers send as the getMore's ``maxTimeMS``:
https://www.mongodb.com/docs/manual/reference/command/getMore/). That is all the host
relies on, and mongod has it: the watcher never needs a getMore to come back empty, and a
write to another namespace that wakes nothing costs nothing. The embedded server follows
the rule in ``Commands._await_data``: a getMore issued after the write finds the event at
once, one waiting wakes on the append (``Oplog.wait``), with no await between its check
and its wait.

Issue 19's 1-second mode (p99 about 1,005 ms at 50 callers, the default await time) has
the signature of a *missed wake-up* in that shape: an event appended after a getMore
found nothing but before it waited rides only on the *next* getMore, sent after the
first one's timeout. A yield placed in that gap reproduces it (8-11% of updates at 1,000
to 1,080 ms). Its historical cause is NOT known: the mode did not reproduce on any
earlier commit (03954e2 to 719bf9d; server in a thread or a process, writer in or out of
the host process, quiet or with two CPU hogs; about 3,000 updates), and the server's
check-then-wait has had no await in between since ec1a49a. Two things could hide its
return: the bench counted only events *carried* by a getMore that had waited 1 s, but a
missed wake-up's getMore comes back *empty* at its timeout (``bench/latency.py``
``_StreamTimer.missed_wakeup`` now sees both shapes), and the late-getMore guard test
never made the write and the getMore arrive in the same server loop turn (tests/embedded
``test_a_write_arriving_with_the_get_more_wakes_it`` does, and fails with that yield; so
does the busy-host test in tests/test_watcher.py).

Re-checked for issue 19's storm work: on d0539ad, main when the issue was filed and
before any issue-19 change, the issue's shape (server in its own process, 0/50/200
callers spinning on the updated plugin, the writer in the host process, 100 sequential
updates each) gave p99 34/24/63 ms and no update over 900 ms; its p50 at 50 callers was
12 ms, not the issue's 77-102 ms, so the original harness differed in a way the report
does not record, and no change in the history can be named as the fix. The wake-up rule
relied on is the documented one: a change-stream getMore "will block for a maximum of
maxAwaitTimeMS ... If data is returned it will return sooner" (libmongoc's
``mongoc_change_stream_next``), and the PHP driver's ``tests/command/cursor-tailable-001``
expects a change-stream getMore after an insert to return at once and an empty one to
take the whole await time. mongod may also come back empty before the await time ends;
the loop below needs neither. Correctness never depends on the
wake-up: an event only ever waits for the next getMore, which the loop below issues as
soon as the previous one returns. What does cost time under load is the number of
event-loop turns between the reply and the swap, each turn one step of every runnable
caller; see ``host.loader``.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import random
import time
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import anyio
from bson.timestamp import Timestamp
from pymongo.errors import OperationFailure, PyMongoError
from pymongo.read_concern import ReadConcern

from .errors import PluginHostError
from .events import EventBus
from .loader import INITIAL, Change, Loader, change_from_event

__all__ = ("WatchFatal", "Watcher")


class Code(enum.IntEnum):
    """The MongoDB server error codes the change-stream policy names (error_codes.yml)."""

    UNAUTHORIZED = 13
    AUTHENTICATION_FAILED = 18
    CAPPED_POSITION_LOST = 136
    INVALID_RESUME_TOKEN = 260
    CHANGE_STREAM_FATAL_ERROR = 280
    CHANGE_STREAM_HISTORY_LOST = 286
    CHANGE_STREAM_NEEDS_REPLICA_SET = 40573  # "Location40573": $changeStream on a standalone


RESYNC_CODES = frozenset(
    {Code.INVALID_RESUME_TOKEN, Code.CHANGE_STREAM_FATAL_ERROR, Code.CHANGE_STREAM_HISTORY_LOST}
)
FATAL_CODES = {
    Code.CHANGE_STREAM_NEEDS_REPLICA_SET: "change streams need a replica set, and this "
    "MongoDB is a standalone server (start it with --replSet and run rs.initiate())",
    Code.UNAUTHORIZED: "the MongoDB user may not watch or read the functions collection "
    "(Unauthorized)",
    Code.AUTHENTICATION_FAILED: "MongoDB authentication failed",
    Code.CAPPED_POSITION_LOST: "change streams are disabled on this deployment",
}

Action = Literal["resume", "resync", "fatal"]
"""What the watcher does after a stream error: reopen from its token after a backoff,
reload a fresh snapshot, or stop with :class:`WatchFatal`."""


class Verdict(NamedTuple):
    """The policy's answer for one error.

    Attributes:
        action: What to do.
        detail: For ``resync``, the reason logged (``history_lost`` or ``stream_error``);
            for ``fatal``, the operator's explanation; empty for ``resume``.
    """

    action: Action
    detail: str = ""


def _classify(exc: PyMongoError) -> Verdict:
    """The change-stream error policy, in one place (like PyMongo's ``_resumable()``).

    PyMongo has already resumed once on what the spec calls resumable; what reaches the
    watcher is sorted here.

    Args:
        exc: The error the stream (or opening it, or the snapshot) raised.

    Returns:
        ``fatal`` for a deployment that cannot be watched at all; ``resync`` when the
        resume point is gone or the stream cannot continue; ``resume`` (a backoff, then
        ``resumeAfter``) for everything else, which is transient.
    """
    if isinstance(exc, OperationFailure):
        code = exc.code
        if code in FATAL_CODES:
            return Verdict("fatal", FATAL_CODES[Code(code)])
        if code in RESYNC_CODES or exc.has_error_label("NonResumableChangeStreamError"):
            history_lost = code == Code.CHANGE_STREAM_HISTORY_LOST
            return Verdict("resync", "history_lost" if history_lost else "stream_error")
    return Verdict("resume")


class WatchFatal(PluginHostError, RuntimeError):
    """The collection cannot be watched at all (configuration, not a transient fault)."""


def _ts_key(ts: Any) -> tuple[int, int] | None:
    return (ts.time, ts.inc) if isinstance(ts, Timestamp) else None


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class Watcher:
    """Keeps a :class:`Loader` in step with the functions collection.

    Args:
        collection: The functions collection (PyMongo ``AsyncCollection`` or Motor).
        loader: Where changes go.
        events: Where watch events go.
        backoff_initial: First retry delay after a transient error, in seconds.
        backoff_max: Longest retry delay.
        max_await_ms: ``maxAwaitTimeMS`` for the stream's getMores (server default if None).
    """

    def __init__(
        self,
        collection: Any,
        loader: Loader,
        events: EventBus,
        *,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        max_await_ms: int | None = None,
    ) -> None:
        self._coll = collection
        self._loader = loader
        self._events = events
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._max_await_ms = max_await_ms
        self._token: Mapping[str, Any] | None = None
        self._floor: tuple[int, int] | None = None
        self.ready = anyio.Event()
        """Set once the initial load is applied and the stream is open."""
        self.live = False
        """The stream is open right now (False while reconnecting)."""
        self.fatal: WatchFatal | None = None
        self.resyncs = 0
        self.resumes = 0
        self._resync_error: str | None = None

    @property
    def namespace(self) -> str:
        """``db.collection`` being watched."""
        return f"{self._coll.database.name}.{self._coll.name}"

    async def run(self) -> None:
        """Watch until cancelled. Raises :class:`WatchFatal` on configuration errors."""
        backoff = self._backoff_initial
        resync_reason: str | None = INITIAL
        start_after: Mapping[str, Any] | None = None
        attempt = 0
        while True:
            stream = None
            try:
                if resync_reason is not None:
                    stream = await self._resync(resync_reason, start_after)
                    resync_reason, start_after = None, None
                else:
                    stream = await self._open(resume_after=self._token)
                    self.resumes += 1
                    self._events.emit(
                        "watch.resumed",
                        "info",
                        namespace=self.namespace,
                        attempt=attempt,
                        token=_token_str(self._token),
                    )
                attempt = 0
                backoff = self._backoff_initial
                self.live = True
                invalidate = await self._follow(stream)
                self._events.emit(
                    "watch.invalidated",
                    "warning",
                    namespace=self.namespace,
                    token=_token_str(invalidate),
                )
                resync_reason, start_after = "invalidate", invalidate
            except PyMongoError as exc:
                verdict = _classify(exc)
                if verdict.action == "fatal":
                    self.fatal = WatchFatal(f"cannot watch {self.namespace}: {verdict.detail}")
                    self.ready.set()
                    raise self.fatal from exc
                if verdict.action == "resync":
                    self._resync_error = _describe(exc)
                    self._token = None
                    resync_reason = verdict.detail
                    continue
                attempt, backoff = await self._back_off(exc, attempt, backoff)
            finally:
                self.live = False
                if stream is not None:
                    with (
                        anyio.CancelScope(shield=True),
                        anyio.move_on_after(2),
                        contextlib.suppress(PyMongoError),
                    ):
                        await stream.close()

    async def _back_off(self, exc: Exception, attempt: int, backoff: float) -> tuple[int, float]:
        delay = backoff * (0.5 + random.random() / 2)
        self._events.emit(
            "watch.error",
            "warning",
            namespace=self.namespace,
            error=_describe(exc),
            attempt=attempt + 1,
            retry_in_s=round(delay, 3),
            initial_load_done=self.ready.is_set(),
        )
        await anyio.sleep(delay)
        return attempt + 1, min(backoff * 2, self._backoff_max)

    async def _open(self, **options: Any) -> Any:
        kwargs: dict[str, Any] = {"full_document": "updateLookup"}
        if self._max_await_ms is not None:
            kwargs["max_await_time_ms"] = self._max_await_ms
        kwargs.update({k: v for k, v in options.items() if v is not None})
        return await _maybe_await(self._coll.watch(**kwargs))

    async def _resync(self, reason: str, start_after: Mapping[str, Any] | None) -> Any:
        """Snapshot the collection, reconcile the loader with it, and open the stream."""
        client = self._coll.database.client
        session = await _maybe_await(client.start_session(causal_consistency=False))
        async with session:
            ping = await self._coll.database.command("ping", session=session)
            start_at = ping.get("operationTime") or session.operation_time
            if start_after is not None:
                stream = await self._open(start_after=start_after)
            else:
                stream = await self._open(start_at_operation_time=start_at)
            try:
                snapshot = self._coll.with_options(read_concern=ReadConcern("majority"))
                docs = [doc async for doc in snapshot.find({}, session=session)]
                floor = session.operation_time
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await stream.close()
                raise
        self._floor = _ts_key(floor)
        started = time.perf_counter()
        names = set()
        changes = []
        for doc in docs:
            name = doc.get("_id")
            if not isinstance(name, str):  # never a name: it would collide (issue 13 #7)
                self._loader.refuse_id(name, reason)
                continue
            names.add(name)
            changes.append(Change(name, doc, None, reason))
        self._loader.submit_many(changes)  # compiled in batches: few thread hops
        vanished = self._loader.known() - names
        for name in vanished:
            self._loader.submit(Change(name, None, None, "vanished"))
        await self._loader.wait_idle()
        self._token = _resume_token(stream)
        if reason == INITIAL:
            # The start-up summary: the initial load logs each plugin.loaded at debug.
            serving = failed = 0
            for name in names:
                info = self._loader.info(name)
                if info is not None and info.status == "serving":
                    serving += 1
                elif info is not None and info.status == "failed":
                    failed += 1
            self._events.emit(
                "watch.started",
                namespace=self.namespace,
                records=len(docs),
                loaded=len(names),
                serving=serving,
                failed=failed,
                load_ms=round((time.perf_counter() - started) * 1000.0, 3),
            )
        else:
            self.resyncs += 1
            self._events.emit(
                "watch.resynced",
                "warning",
                namespace=self.namespace,
                reason=reason,
                error=self._resync_error,
                records=len(docs),
                unloaded=sorted(vanished),
            )
            self._resync_error = None
        self.ready.set()
        return stream

    async def _follow(self, stream: Any) -> Mapping[str, Any]:
        """Apply events until the stream is invalidated; return the invalidate token.

        The resume token is read from the stream when the stream ends (an error, a
        cancellation) and after each empty batch, not after every event: PyMongo's
        ``resume_token`` is a deep copy (2-3% of the loop's time per reload in a storm),
        and the stream keeps the token of the last event it handed out, which is the
        one to resume after.
        """
        try:
            return await self._follow_events(stream)
        except BaseException:
            self._token = _resume_token(stream)
            raise

    async def _follow_events(self, stream: Any) -> Mapping[str, Any]:
        while True:
            event = await stream.try_next()
            if event is None:
                self._token = _resume_token(stream)
                if not stream.alive:
                    raise _StreamClosed()
                continue
            op = event.get("operationType")
            if op == "invalidate":
                token: Mapping[str, Any] = event["_id"]
                return token
            key = _ts_key(event.get("clusterTime"))
            if self._floor is not None and key is not None and key <= self._floor:
                continue  # already reflected by the snapshot
            if op in ("insert", "update", "replace", "delete"):
                raw_id = (event.get("documentKey") or {}).get("_id")
                if not isinstance(raw_id, str):
                    if op != "delete":  # a delete of a record that never loaded: nothing to do
                        self._loader.refuse_id(raw_id, op)
                    continue
            change = change_from_event(event)
            if change is not None:
                self._loader.submit(change)
            elif op in ("drop", "rename", "dropDatabase"):
                continue  # the invalidate that follows triggers the resync


class _StreamClosed(PyMongoError):
    """The server closed the stream without an invalidate: reopen it."""


def _resume_token(stream: Any) -> Mapping[str, Any] | None:
    """The stream's resume token; None before a lazy (Motor) stream has started."""
    try:
        token: Mapping[str, Any] | None = stream.resume_token
    except AttributeError:
        return None
    return token


def _describe(exc: Exception) -> str:
    """A one-line description of a driver error (without PyMongo's 'full error' dump)."""
    if isinstance(exc, OperationFailure):
        details = exc.details or {}
        return f"{type(exc).__name__} {exc.code}: {details.get('errmsg', str(exc))}"
    return f"{type(exc).__name__}: {exc}"


def _token_str(token: Mapping[str, Any] | None) -> str | None:
    if token is None:
        return None
    data = token.get("_data")
    return data if isinstance(data, str) else repr(token)
