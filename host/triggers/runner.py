"""One trigger running on this host: its change stream, workers, checkpoint and lease.

A :class:`Runner` runs while this host holds the trigger's lease (see
:mod:`host.triggers.lease`) and stops for one of four reasons: the engine asks it to
(drain, hand-over, plugin disabled or changed), the lease is lost, the history policy
``fail`` stops it, or the host is cancelled.

Design note — delivery (https://www.mongodb.com/docs/manual/changeStreams/ and
https://www.mongodb.com/docs/manual/changeStreams/#resume-a-change-stream):

* The stream opens with ``startAfter`` the checkpoint (``startAfter`` also resumes past
  an ``invalidate``); a trigger without one opens "now" (or at ``start_at``, as
  ``startAtOperationTime``) and its first checkpoint is the stream's initial
  ``postBatchResumeToken``, written at once, beside the first events (not before them:
  :meth:`Runner._announce`), so "now" is fixed durably one write after the open.
* Events enter the :class:`~host.triggers.window.Window` in stream order. A key with
  pending events and no worker waits in the *ready* queue; a pool of at most
  ``max_concurrency`` worker tasks (1 for ``total``) takes keys from it and handles each
  key's events one at a time, in stream order, so ordering per key holds and at most
  ``max_concurrency`` handlers run at once. Workers are started only when a ready key
  would otherwise wait (every worker is busy with a key), and leave when the queue is
  empty: a burst of fast handlers runs on one or two workers, slow handlers fan out to
  the limit, and no event costs a task or a limiter round of its own.
* A transient error reopens the stream after a backoff from the *last read* token (not
  the checkpoint): events already in the window are not read twice. PyMongo has already
  retried once what the spec calls resumable.
* ``ChangeStreamHistoryLost`` (286) and the other "cannot resume" answers (260 invalid
  token, 280 fatal) follow the trigger's ``on_history_lost`` policy; never a silent stop.
* Stop with drain: reading stops, no new event starts, events in flight finish (each
  on the version it started on: the dispatcher counts it in that version's in-flight
  calls), the final watermark is written and the lease released in the same write. So a
  clean stop repeats nothing that finished; the events not started are the next
  owner's.
* Which version handles an event is decided when each attempt starts (the registry's
  current version then): a new version takes the next events, in-flight ones finish on
  theirs, and a refused version never becomes current, so the old one keeps handling.
  A canary takes its share of events, sticky per document (:meth:`Runner._version_for`),
  and each attempt counts in its per-version statistics, so a candidate failing events
  is aborted like one failing calls; the next attempts then run on the stable.
"""

from __future__ import annotations

import inspect
import json
import math
import time
import traceback as tb_module
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import bson
from bson import json_util
from bson.objectid import ObjectId
from bson.timestamp import Timestamp
from pymongo.errors import OperationFailure, PyMongoError

from ..context import EventContext
from ..errors import PluginError, PluginFailed, PluginTimeout
from ..records import TriggerSpec
from ..rollout import FAILED, OK, TIMEOUT
from .echo import DELIVERY, Delivery, EchoDetector, watching_caller
from .lease import LeaseHolder, server_now
from .window import Slot, Window

if TYPE_CHECKING:
    from ..dispatch import Dispatcher
    from ..events import EventBus
    from ..plugin import Plugin
    from ..registry import Registry
    from .options import TriggerOptions
    from .stats import TriggerStats

__all__ = (
    "HISTORY_LOST_CODES",
    "Runner",
    "document_key",
    "event_id_of",
    "handle_event",
    "routing_key",
)

HISTORY_LOST_CODES = frozenset({260, 280, 286})
"""InvalidResumeToken, ChangeStreamFatalError, ChangeStreamHistoryLost: cannot resume."""
_HISTORY_KEPT = 20
_TURN = 0.001
"""Seconds a worker handles events before it lets the event loop run others (timed by
the clock read each event takes anyway; a clock stepping back ends the turn too), once
it has handled at least _TURN_EVENTS: handlers that await (and so let others run anyway)
cost one extra loop round per _TURN_EVENTS events, not one per event."""
_TURN_EVENTS = 16
_READ_TURN = 2048
"""Events the reader takes from the batch in hand, not yet admitted, before it lets the
loop run others (a batch larger than this one is cut; one of ``batch_size``, 1,000 by
default, never is: see the design note above Runner._follow)."""
_ERROR_CHARS = 2_000
_EPOCH = datetime(1970, 1, 1)  # naive, as PyMongo decodes wallTime


def event_id_of(token: Any) -> str:
    """A resume token as the string handed to handlers as ``ctx.event_id``."""
    if type(token) is dict:  # as PyMongo decodes it (no ABC check on the hot path)
        data = token.get("_data")
        if type(data) is str:
            return data
    if isinstance(token, Mapping) and isinstance(token.get("_data"), str):
        return str(token["_data"])
    return json.dumps(token, default=str, sort_keys=True)


def _as_datetime(value: Any) -> datetime | None:
    if isinstance(value, Timestamp):
        return value.as_datetime()
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return None


def _lag_of(event: Mapping[str, Any], at: float) -> float | None:
    """Seconds from ``event``'s ``wallTime`` (else ``clusterTime``) to ``at`` (wall-clock
    seconds); None for an event with neither (a rescan's synthetic event)."""
    wall = event.get("wallTime")
    if type(wall) is datetime and wall.tzinfo is None:  # as PyMongo decodes it
        return at - (wall - _EPOCH).total_seconds()
    when = _as_datetime(wall) or _as_datetime(event.get("clusterTime"))
    return None if when is None else at - when.timestamp()


def document_key(event: Mapping[str, Any]) -> Any:
    """An event's ``documentKey`` as a hashable key.

    A lone ``_id`` that is an ``int``, ``str`` or ``ObjectId`` is its own key (no two
    distinct BSON values of those types compare equal in Python, and none equals a
    ``bytes``); anything else is its BSON bytes (1 and 1.0 differ, as in MongoDB).
    """
    key = event.get("documentKey")
    if type(key) is dict and len(key) == 1:
        value = key.get("_id")
        kind = type(value)
        if kind is int or kind is str or kind is ObjectId:
            return value
    return bson.encode(key) if isinstance(key, Mapping) else ("repr", repr(key))


def routing_key(event: Mapping[str, Any]) -> str | None:
    """The sticky key a rollout routes an event by: its ``documentKey`` as relaxed
    Extended JSON (``bson.json_util.dumps``), or None without one (then weighted)."""
    key = event.get("documentKey")
    return json_util.dumps(key) if isinstance(key, Mapping) else None


def _key_of(spec: TriggerSpec, window: Window) -> Callable[[Mapping[str, Any]], Any]:
    """How an event's ordering key is worked out: one key for ``total``, a key per event
    (its stream position in ``window``) for ``none``, its document's for ``per_key``."""
    if spec.ordered == "total":
        return lambda _event: None
    if spec.ordered == "none":
        return lambda _event: window.next_seq
    return document_key


def handler_of(plugin: Plugin, tid: str, spec: TriggerSpec) -> Any:
    """The function of ``plugin`` that handles trigger ``tid`` (its ``entrypoint``).

    Raises:
        PluginError: The version has no such callable (the compiler refuses such
            versions; a released one may have none).
    """
    handler = plugin.module.__dict__.get(spec.entrypoint)
    if not callable(handler):
        raise PluginError(f"trigger {tid}: {plugin.version} has no handler {spec.entrypoint!r}")
    return handler


async def handle_event(
    dispatcher: Dispatcher,
    plugin: Plugin,
    tid: str,
    spec: TriggerSpec,
    event: Mapping[str, Any],
    *,
    event_id: str,
    attempt: int,
) -> None:
    """Run one delivery of ``event`` through ``plugin``'s handler of trigger ``tid``.

    Raises:
        PluginError: The handler failed (``PluginFailed``), timed out, or is missing.
    """
    handler = handler_of(plugin, tid, spec)
    ctx = EventContext(plugin, dispatcher, trigger=tid, event_id=event_id, attempt=attempt)
    await dispatcher.run_handler(plugin, handler, ctx, event, timeout=plugin.record.timeout)


class Runner:
    """Runs one trigger while this host holds its lease.

    Args:
        tid: The trigger id.
        plugin: The plugin declaring it.
        spec: Its declaration (as of the version that started the runner).
        db: The database of the functions collection (and of the watched collection).
        state: The state collection.
        deadletters: The dead-letter collection.
        registry: Where the current version is looked up per attempt.
        dispatcher: Runs the handlers.
        events: The host's event bus.
        stats: The engine's counters (metrics).
        options: The engine's options.
        lease: This host's lease (already acquired).
        doc: The state document as the acquisition returned it.
    """

    def __init__(
        self,
        tid: str,
        plugin: str,
        spec: TriggerSpec,
        *,
        db: Any,
        state: Any,
        deadletters: Any,
        registry: Registry,
        dispatcher: Dispatcher,
        events: EventBus,
        stats: TriggerStats,
        options: TriggerOptions,
        lease: LeaseHolder,
        doc: Mapping[str, Any],
    ) -> None:
        self.tid = tid
        self.plugin = plugin
        self.spec = spec
        self._db = db
        self._coll = db[spec.collection]
        self._state = state
        self._deadletters = deadletters
        self._registry = registry
        self._dispatcher = dispatcher
        self._events = events
        self._stats = stats
        self._options = options
        self.lease = lease
        self._window = Window(options.window)
        # A token resumes only the collection it came from: a trigger moved to another
        # collection starts afresh there (from now, or start_at).
        same = doc.get("checkpoint_collection") in (None, spec.collection)
        self._window.checkpoint = doc.get("checkpoint") if same else None
        self._window.checkpoint_time = doc.get("checkpoint_time") if same else None
        self._written = self._window.checkpoint
        self._read_token: Mapping[str, Any] | None = self._window.checkpoint
        self._processed = int(doc.get("processed") or 0)
        self._processed_before = self._processed  # by the owners before this run
        self._failed_attempts = int(doc.get("failed_attempts") or 0)
        self._dead_letters = int(doc.get("dead_letters") or 0)
        self._history: list[Any] = list(doc.get("history_lost") or [])[-_HISTORY_KEPT:]
        # Events the previous owner finished beyond its final checkpoint (a clean hand-over).
        self._skip: set[str] = {str(e) for e in doc.get("done_ahead") or ()} if same else set()
        self._key = _key_of(spec, self._window)
        self._echo = EchoDetector() if spec.ordered != "none" else None
        # ctx's caller: the dispatcher, with ctx.db noting writes to the watched collection.
        self._caller = watching_caller(dispatcher, spec.collection) if self._echo else dispatcher
        self._echo_warned = False
        # version -> (its handler, whether it is an ``async def``): see _handler
        self._handlers: dict[Plugin, tuple[Any, bool]] = {}
        self._rescanning = False  # see INVARIANT (rescan)
        self._rescan_scope: anyio.CancelScope | None = None
        self._write_lock = anyio.Lock()
        self._concurrency = 1 if spec.ordered == "total" else spec.max_concurrency
        # INVARIANT (workers): a key with pending events in the window is either in
        # _ready (exactly once, as its head slot: the oldest of its pending events) or
        # held by exactly one worker, never both; a worker handles its key's events one
        # at a time, in stream order. At most _concurrency workers are alive (so at most
        # that many handlers run). Whenever _ready is not empty, a free worker (alive,
        # holding no key) exists or all _concurrency workers hold keys: _ensure_worker()
        # restores this each time _ready grows or a worker takes a key. (A key whose
        # worker stopped, runner stopping or plugin gone, is in neither: its events stay
        # pending, for the next start.)
        self._ready: deque[Slot] = deque()
        self._staged: list[Mapping[str, Any]] = []  # see INVARIANT (staged)
        self._staged_wake = anyio.Event()
        self._workers = 0  # workers alive
        self._holding = 0  # workers holding a key (handling or retrying its events)
        self._running = 0  # handlers running now (this trigger)
        self._idle = anyio.Event()
        self._idle.set()
        self._stopping = False
        self._read_scope = anyio.CancelScope()
        # "starting" (as the acquisition wrote it) until the change stream is open and the
        # state says so: a trigger reports "running" only once it can see events.
        self._status = "starting"
        self._announcing = False  # an _announce task is writing the state
        self._error: str | None = None
        self._lag_ms: float | None = None
        # The last event whose handler started, and when: its lag is worked out when the
        # state is written (_fields), not per event.
        self._lag_event: Mapping[str, Any] | None = None
        self._lag_at = 0.0
        self._rate: float | None = None
        self.lost = False
        """The lease was lost (another host may run the trigger now)."""
        self.failed = False
        """The history policy ``fail`` stopped the trigger."""
        self.stop_status = "waiting"
        """The status written when the runner releases the lease."""

    # -- control ---------------------------------------------------------------------

    def stop(self, status: str = "waiting", error: str | None = None) -> None:
        """Stop reading; finish the events in flight, checkpoint and release (see run)."""
        self._stopping = True
        self.stop_status = status
        if error is not None:
            self._error = error
        self._read_scope.cancel()

    @property
    def stopping(self) -> bool:
        """Stop requested (or the lease lost): no new event starts."""
        return self._stopping

    @property
    def in_flight(self) -> int:
        """Handlers of this trigger running now."""
        return self._running

    @property
    def handled(self) -> int:
        """Events this run has handled (or dead-lettered)."""
        return self._processed - self._processed_before

    async def run(self, drain_timeout: float) -> None:
        """Run until stopped, the lease is lost or the history policy fails the trigger.

        Args:
            drain_timeout: How long events in flight may run once stopped.
        """
        self._events.emit(
            "trigger.started",
            trigger=self.tid,
            plugin=self.plugin,
            collection=self.spec.collection,
            ordered=self.spec.ordered,
            resumed=self._window.checkpoint is not None,
        )
        self._stats.follow(self)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_lease, tg.cancel_scope)
                tg.start_soon(self._admitting, tg)
                with self._read_scope:
                    await self._read(tg)
                self._stopping = True
                with anyio.move_on_after(drain_timeout):
                    await self._idle.wait()
                tg.cancel_scope.cancel()
        finally:
            self._stats.unfollow(self)  # no handler of this run is left running
            with anyio.CancelScope(shield=True):
                await self._finish()

    async def _finish(self) -> None:
        if not self.lost:
            try:
                with anyio.move_on_after(5.0):
                    released = await self.lease.release(
                        self._fields(self.stop_status if not self.failed else "failed")
                    )
                    if not released:
                        self._lease_lost("release")
            except PyMongoError as exc:
                self._events.emit(
                    "trigger.release_failed", "warning", trigger=self.tid, error=str(exc)
                )
        self._events.emit(
            "trigger.stopped",
            "error" if self.failed else "info",
            trigger=self.tid,
            plugin=self.plugin,
            status="failed" if self.failed else self.stop_status,
            lease_lost=self.lost,
            processed=self._processed,
            error=self._error,
        )

    # -- the stream ------------------------------------------------------------------

    def _pipeline(self) -> list[dict[str, Any]]:
        spec = self.spec
        pipeline: list[dict[str, Any]] = []
        if len(spec.operations) < 4:
            pipeline.append({"$match": {"operationType": {"$in": list(spec.operations)}}})
        if spec.match is not None:
            pipeline.append({"$match": dict(spec.match)})
        if spec.project is not None:
            pipeline.append({"$project": dict(spec.project)})
        return pipeline

    async def _open(self) -> Any:
        kwargs: dict[str, Any] = {"full_document": self.spec.full_document}
        if self.spec.full_document == "default":
            kwargs["full_document"] = None
        if self._options.max_await_ms is not None:
            kwargs["max_await_time_ms"] = self._options.max_await_ms
        if self._options.batch_size is not None:
            kwargs["batch_size"] = self._options.batch_size
        if self._read_token is not None:
            kwargs["start_after"] = self._read_token
        elif self.spec.start_at is not None and self._window.checkpoint is None:
            at = self.spec.start_at
            at = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
            kwargs["start_at_operation_time"] = Timestamp(int(at.timestamp()), 0)
        return await self._coll.watch(self._pipeline(), **kwargs)

    async def _read(self, tg: Any) -> None:
        backoff = 0.05
        rescan = False
        while not self.stopping:
            try:
                stream = await self._open()
                async with stream:
                    backoff = 0.05
                    announce = self._status == "starting"
                    self._status = "running"
                    if self._read_token is None:
                        # "Now" (or start_at) is fixed by the stream's first token.
                        start = stream.resume_token
                        self._read_token = start
                        if rescan:
                            rescan = False
                            self._start_rescan(start, tg)  # marks the stream's point when done
                        else:
                            self._window.mark(start)
                            announce = True
                    # The first write after the (first) open says "running", with the
                    # checkpoint: beside the reading (see _announce), not before it.
                    if announce and not self._announcing:
                        self._announcing = True
                        tg.start_soon(self._announce)
                    await self._follow(stream, tg)
            except OperationFailure as exc:
                if exc.code not in HISTORY_LOST_CODES or self._read_token is None:
                    if not await self._transient(exc, backoff):
                        return
                    backoff = min(backoff * 2, 5.0)
                    continue
                policy = self.spec.on_history_lost
                try:
                    await self._history_lost(exc, policy)
                except PyMongoError as write_error:  # recording it failed: try it all again
                    if not await self._transient(write_error, backoff):
                        return
                    continue
                if policy == "fail":
                    return
                rescan = policy == "rescan"
                self._read_token = None
            except PyMongoError as exc:
                if not await self._transient(exc, backoff):
                    return
                backoff = min(backoff * 2, 5.0)

    async def _announce(self) -> None:
        """Write the state (checkpoint, ``running``) now, beside the reading; again until
        it is stored. A lost lease stops the reading (the events in flight finish).

        Design note: the stream's first events are handled while this write is on its
        way (it used to go before them: a round trip or two of every start). What a
        crash repeats or loses is the same as before: a new trigger's "now" is fixed
        durably once this write lands, and a crash before that starts it from a later
        "now" either way; the checkpoint it stores is the watermark when it is sent (the
        stream's start, or past the first events if they are done by then), and the
        write lock keeps a later batch from being overtaken by it.
        """
        backoff = 0.05
        try:
            while not self._stopping:
                try:
                    if not await self._checkpoint():
                        self._read_scope.cancel()  # the lease is lost
                    return
                except PyMongoError as exc:
                    self._events.emit(
                        "trigger.checkpoint_failed", "warning", trigger=self.tid, error=str(exc)
                    )
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            self._announcing = False

    async def _transient(self, exc: PyMongoError, backoff: float) -> bool:
        self._events.emit(
            "trigger.stream_error", "warning", trigger=self.tid, error=str(exc)[:_ERROR_CHARS]
        )
        await anyio.sleep(backoff)
        return not self._stopping

    # Design note — reading ahead of the admission. The server builds the next batch only
    # once its getMore arrives, and PyMongo sends that only when the batch in hand is
    # empty: whatever the reader does per event before then is time the server waits.
    # So the reader only takes events off the batch (``try_next``) into _staged; putting
    # them in the window (key, slot, ready queue, workers) is the admitter's work, done
    # while the reader waits for the getMore's reply, beside the server building it.
    # INVARIANT (staged): _staged holds events read and not yet in the window, in stream
    # order, all after every event in the window, none read during a rescan (those, and
    # events to skip, are admitted at once, after a flush). Whatever puts an event or a
    # mark in the window, or moves the watermark over an idle stream, flushes _staged
    # first (_flush); so does the reader whenever it stops following a stream. The
    # window's capacity counts the staged events. The reader lets the loop run others
    # once _READ_TURN events are staged (the admitter did not run: no getMore came in
    # between), so a batch of up to _READ_TURN events is read whole, its getMore sent at
    # once, and a larger one is cut. An event read while the window is empty and nothing
    # is staged is admitted at once: alone (light load), it reaches its worker a loop
    # round sooner; the first of a burst, it costs one admission in the gap.

    async def _follow(self, stream: Any, tg: Any) -> None:
        window = self._window
        capacity = window.capacity
        staged = self._staged
        admitted = 0  # admitted at once (the rare path) since the reader last let others run
        # Room left in the window, staged events counted, looked at again at each batch
        # (nothing staged: the reader waited, so others may have added: a rescan), when
        # it runs out, and after the rare path; in between it is a lower bound (only the
        # reader adds, the workers only shrink the window, the admitter only moves staged
        # events into it), so the window never holds more than its capacity.
        room = 0
        try:
            while True:
                if room <= 0 or not staged:
                    room = capacity - len(window) - len(staged)
                    if room <= 0:
                        self._flush(tg)
                        await window.wait_room()
                        room = capacity - len(window)
                event = await stream.try_next()  # from the batch in hand, or one getMore
                if event is None:
                    self._flush(tg)
                    if not self._rescanning and window.advance_idle(stream.resume_token):
                        self._read_token = stream.resume_token
                    continue
                token = event.get("_id")
                self._read_token = token
                if event.get("operationType") == "invalidate":
                    return  # reopen with startAfter the invalidate token
                if self._skip or self._rescanning:
                    self._admit(event, token, tg)
                    room = 0  # look again: the rescan's documents share the window
                    admitted += 1
                    if admitted >= _READ_TURN:
                        admitted = 0
                        await anyio.lowlevel.checkpoint()
                    continue
                room -= 1
                if not staged and window.idle:
                    # Nothing pending: an event after a quiet spell, most likely alone (light
                    # load). Admitted at once, its worker starts as soon as this task waits,
                    # not a loop round later, after the admitter (the lag at light load).
                    self._admit(event, token, tg)
                    continue
                staged.append(event)
                if len(staged) == 1:
                    self._staged_wake.set()  # the admitter runs once this task waits
                elif len(staged) >= _READ_TURN:  # a long batch: cut it
                    self._flush(tg)
                    await anyio.lowlevel.checkpoint()
        finally:
            self._flush(tg)

    async def _admitting(self, tg: Any) -> None:
        """The admitter: flush the staged events each time the reader waits (see above)."""
        while True:
            await self._staged_wake.wait()
            self._staged_wake = anyio.Event()
            self._flush(tg)

    def _flush(self, tg: Any) -> None:
        """Put the staged events in the window, in order; a worker for them if none is free."""
        staged = self._staged
        if not staged:
            return
        self._window.add_read(staged, self._key, self._ready)  # outside a rescan: tokens
        staged.clear()
        if self._holding == self._workers:  # no free worker (_ensure_worker starts one)
            self._ensure_worker(tg)

    def _admit(self, event: Mapping[str, Any], token: Any, tg: Any) -> None:
        self._flush(tg)  # INVARIANT (staged): the events read before this one go first
        window = self._window
        key = self._key(event)
        # During a rescan no event carries its token into the window (INVARIANT (rescan)).
        covers = None if self._rescanning else token
        if self._skip and token is not None:
            event_id = event_id_of(token)
            if event_id in self._skip:
                self._skip.discard(event_id)
                if window.skip(key, event, covers):
                    return
        head = window.add(key, event, covers)
        if head is not None:
            self._ready.append(head)
            if self._holding == self._workers:  # no free worker (the common test inline)
                self._ensure_worker(tg)

    def _ensure_worker(self, tg: Any) -> None:
        """Start a worker if a ready key would otherwise wait (see the INVARIANT)."""
        workers = self._workers
        if workers == self._holding and workers < self._concurrency and self._ready:
            if workers == 0:
                self._idle = anyio.Event()
            self._workers = workers + 1
            tg.start_soon(self._work, tg)

    # -- history lost ------------------------------------------------------------------

    async def _history_lost(self, exc: OperationFailure, policy: str) -> None:
        now = await server_now(self._db)
        gap_from = _as_datetime(self._window.checkpoint_time)
        self._history = [
            *self._history,
            {"from": gap_from, "to": now, "at": now, "policy": policy},
        ][-_HISTORY_KEPT:]
        self._stats.history_lost(self.tid)
        self._events.emit(
            "trigger.history_lost",
            "error" if policy == "fail" else "warning",
            trigger=self.tid,
            plugin=self.plugin,
            policy=policy,
            # The contract's names: the gap runs from the checkpoint's time to now.
            **{"from": gap_from.isoformat() if gap_from is not None else None},
            to=now.isoformat(),
            code=exc.code,
            error=str(exc)[:_ERROR_CHARS],
        )
        if policy == "fail":
            self.failed = True
            self._error = f"change stream history lost (code {exc.code}): {exc}"[:_ERROR_CHARS]
            self._stopping = True
        else:
            # The old checkpoint is gone from the oplog: from here on the stream's new
            # start is the point to resume from (written once the window passes it).
            await self._checkpoint()

    # Design note — a rescan that converges. The rescan reads the collection *while* the
    # new stream is followed (a task beside the reader), so the stream's position keeps
    # moving however long the rescan takes: the rescan's own writes (or anyone's) cannot
    # push the new start out of the oplog, as they did when the stream waited for the
    # rescan to finish. INVARIANT (rescan): while ``_rescanning``, every event enters
    # the window without a resume token (rescan documents and stream events alike), so
    # the watermark cannot pass any of them; when the rescan has admitted its last
    # document, a mark with the last read token goes in after them all, and the
    # checkpoint reaches it once every one of them is done. So a crash during the rescan
    # resumes from the old (lost) checkpoint: the loss is reported and the rescan runs
    # again, and no stream event read meanwhile is skipped. The rescan uses at most half
    # the window, so the stream reader always has room for its own events: the rescan
    # converges whenever the trigger keeps up with the stream (its backlog stays inside
    # the oplog window), as it must outside a rescan too.

    def _start_rescan(self, start: Any, tg: Any) -> None:
        """Start the rescan for the stream that starts at ``start`` (one at a time)."""
        if self._rescan_scope is not None:
            self._rescan_scope.cancel()  # lost again mid-rescan: this one starts over
        self._rescanning = True
        tg.start_soon(self._rescan_task, start, tg)

    async def _rescan_task(self, start: Any, tg: Any) -> None:
        scope = self._rescan_scope = anyio.CancelScope()
        backoff = 0.05
        with scope:
            while True:
                try:
                    await self._rescan(start, tg)
                    break
                except PyMongoError as exc:  # again from the start (at least once)
                    if not await self._transient(exc, backoff):
                        return
                    backoff = min(backoff * 2, 5.0)
        if self._rescan_scope is scope and not scope.cancel_called and not self._stopping:
            self._rescan_scope = None
            self._rescanning = False
            self._flush(tg)  # none staged during a rescan; the mark must follow all read
            self._window.mark(self._read_token)
            self._events.emit("trigger.rescanned", trigger=self.tid, plugin=self.plugin)

    async def _rescan(self, start: Any, tg: Any) -> None:
        """Feed the current documents that match to the handler (policy ``rescan``).

        They enter the window with no resume token (see the design note above): the
        checkpoint cannot pass them, so a crash during the rescan starts it again.
        """
        spec = self.spec
        ns = {"db": self._db.name, "coll": spec.collection}
        pipeline: list[dict[str, Any]] = [
            {
                "$replaceWith": {
                    "_id": None,
                    "operationType": {"$literal": "rescan"},
                    "fullDocument": "$$ROOT",
                    "documentKey": {"_id": "$_id"},
                    "ns": {"$literal": ns},
                }
            }
        ]
        if spec.match is not None:
            pipeline.append({"$match": dict(spec.match)})
        if spec.project is not None:
            pipeline.append({"$project": dict(spec.project)})
        prefix = f"rescan:{event_id_of(start)}:"
        share = max(1, self._window.capacity // 2)
        cursor = await self._coll.aggregate(pipeline)
        async for event in cursor:
            await self._window.wait_room(share)
            if self._stopping:
                return
            key = event.get("documentKey", {}).get("_id")
            event["_id"] = {"_data": prefix + event_id_of({"k": repr(key)})}
            self._admit(event, None, tg)

    # -- workers -----------------------------------------------------------------------

    # Design note — the hot path. An event's first attempt runs in the worker's own
    # frame: the version lookup, one clock read (the lag's and the echo check's start),
    # the context and ``run_handler``; no coroutine of its own, and no bookkeeping beyond
    # the window's slot, the echo mark and ``_processed`` (the metrics read the runner's
    # counts: see TriggerStats). The rare paths stay out of line: a failed attempt goes through
    # :meth:`_failed` (trigger.failed, the backoff, the version for the next attempt,
    # or the dead letter), and the next attempt runs in the same loop as the first.

    async def _work(self, tg: Any) -> None:
        """Take ready keys and handle their events until none is ready (or stopping)."""
        window = self._window
        ready = self._ready
        registry = self._registry
        run_handler = self._dispatcher.run_handler
        caller = self._caller
        name = self.plugin
        tid = self.tid
        stats = self._stats
        by_document = self._key is document_key  # per_key: a slot's key is its document's
        delivery = Delivery(self._echo) if self._echo is not None else None
        DELIVERY.set(delivery)  # this worker task's own context: its handlers' writes
        known: Plugin | None = None  # the version whose handler is at hand
        handler: Any = None
        is_async = True
        turn = 0  # events handled in this turn
        turn_began = started = time.time()
        try:
            while ready and not self._stopping:
                slot: Slot | None = ready.popleft()  # a key's head: the key is ours now
                self._holding += 1
                if ready and self._holding == self._workers:
                    self._ensure_worker(tg)  # other keys still ready: a free worker for them
                try:
                    while slot is not None:
                        # The current version (or the rollout's pick: _version_for).
                        if registry.rollouts:
                            plugin = self._version_for(slot)
                        else:
                            plugin = registry.get(name)
                        if plugin is None or self._stopping:
                            # Stopping, or disabled or unloaded (paused): the key's events
                            # stay pending, uncovered.
                            return
                        event = slot.event
                        token = event.get("_id")  # event_id_of, its common case inline:
                        data = token.get("_data") if type(token) is dict else None
                        event_id = data if type(data) is str else event_id_of(token)
                        # The one clock read of the event: its lag, its echo mark, the turn.
                        started = self._lag_at = time.time()
                        self._lag_event = event
                        if stats.lag_observer is not None:
                            self._observe_lag(event, started)
                        mark: Any = None
                        chain = 0
                        if delivery is not None:  # the echo check (see host.triggers.echo)
                            mark = slot.key if by_document else document_key(event)
                            chain = delivery.chain = delivery.echo.check(mark, event)
                        attempt = 1
                        first_failed: datetime | None = None
                        while True:  # the attempts: one, unless the handler fails
                            # Timed and counted only while some rollout runs (as calls
                            # are): a plugin without one pays no clock read.
                            timed = bool(registry.rollouts)
                            began = time.perf_counter() if timed else 0.0
                            self._running += 1
                            try:
                                if plugin is not known:
                                    handler, is_async = self._handler(plugin)
                                    known = plugin
                                await run_handler(
                                    plugin,
                                    handler,
                                    EventContext(
                                        plugin,
                                        caller,
                                        trigger=tid,
                                        event_id=event_id,
                                        attempt=attempt,
                                    ),
                                    event,
                                    timeout=plugin.record.timeout,
                                    is_async=is_async,
                                )
                                failure = None
                            except PluginError as exc:
                                failure = exc
                            finally:
                                self._running -= 1
                            if timed:
                                self._count(plugin, failure, began)
                            if failure is None:
                                if delivery is not None:
                                    delivery.echo.handled(mark, started, time.time(), chain)
                                    if chain >= delivery.echo.threshold:
                                        self._recursion_suspected(chain)
                                break
                            if first_failed is None:
                                first_failed = datetime.now(UTC)
                            outcome = await self._failed(
                                slot, event_id, failure, plugin.version, attempt, first_failed
                            )
                            if outcome is True:
                                break  # dead-lettered: done
                            if outcome is False:
                                return  # stopped or paused: the event stays pending
                            plugin = outcome
                            attempt += 1
                        slot = window.finish(slot)
                        self._processed += 1
                        turn += 1
                        if (
                            slot is not None
                            and turn >= _TURN_EVENTS
                            and not 0.0 <= started - turn_began < _TURN
                        ):
                            # Handlers that never await must not hold the loop: let the
                            # others run (still holding the key: the head stays ours).
                            await anyio.lowlevel.checkpoint()
                            turn, turn_began = 0, time.time()
                finally:
                    self._holding -= 1
                if turn >= _TURN_EVENTS and not 0.0 <= started - turn_began < _TURN:
                    # The same, between keys (free: counted as such).
                    await anyio.lowlevel.checkpoint()
                    turn, turn_began = 0, time.time()
        finally:
            self._workers -= 1
            if self._workers == 0:
                self._idle.set()

    def _version_for(self, slot: Slot) -> Plugin | None:
        """The version that handles the next attempt of ``slot``.

        The current one, or while a canary routes, the version the rollout picks for the
        event's document: sticky by the JSON of its ``documentKey`` (the calls' stable
        hash, so one document's events go to one version; weighted if it has none). A
        shadow takes no events (its ``ctx.db`` is read-only: a handler must write), and
        an aborted candidate none: they go to the stable.
        """
        stable = self._registry.get(self.plugin)
        rollouts = self._registry.rollouts
        live = rollouts.get(self.plugin) if rollouts else None
        if stable is None or live is None or not live.routing:
            return stable
        return live.choose(stable, None, routing_key(slot.event))

    def _count(self, plugin: Plugin, failure: PluginError | None, started: float) -> None:
        """Count an attempt in its canary's per-version statistics (the abort rules apply)."""
        rollouts = self._registry.rollouts
        live = rollouts.get(self.plugin) if rollouts else None
        if live is None or live.mode != "canary":
            return
        if plugin is not live.candidate and plugin is not self._registry.get(self.plugin):
            return  # a version no longer under this rollout
        if failure is None:
            outcome = OK
        elif isinstance(failure, PluginFailed | PluginTimeout):
            outcome = FAILED if isinstance(failure, PluginFailed) else TIMEOUT
        else:
            return  # busy or no handler: not a judgement of the version (as for calls)
        if live.record(plugin, outcome, started) and plugin is live.candidate:
            self._dispatcher.report_abort(live)

    def _handler(self, plugin: Plugin) -> tuple[Any, bool]:
        """``plugin``'s handler of this trigger and whether it is an ``async def``.

        Looked up once per version (``inspect.iscoroutinefunction`` per event was ~5% of
        a no-op trigger's CPU).
        """
        known = self._handlers.get(plugin)
        if known is None:
            if len(self._handlers) >= 8:  # retired versions: forget them all, rarely
                self._handlers.clear()
            handler = handler_of(plugin, self.tid, self.spec)
            known = self._handlers[plugin] = (handler, inspect.iscoroutinefunction(handler))
        return known

    async def _failed(
        self,
        slot: Slot,
        event_id: str,
        failure: PluginError,
        version: str,
        attempt: int,
        first_failed: datetime,
    ) -> Plugin | bool:
        """After a failed attempt: report it, then back off, or dead-letter the event.

        Args:
            slot: The event.
            event_id: Its ``ctx.event_id``.
            failure: How the attempt failed.
            version: The version it failed on.
            attempt: The attempt's number, from 1.
            first_failed: When its first attempt failed.

        Returns:
            The version for the next attempt (chosen once the backoff is over); True
            once the event is done (its dead letter stored); False if the runner stopped
            or the plugin is gone first (the event is left for the next start, uncovered).
        """
        spec = self.spec
        self._failed_attempts += 1
        self._events.emit(
            "trigger.failed",
            "warning",
            trigger=self.tid,
            plugin=self.plugin,
            version=version,
            event_id=event_id,
            attempt=attempt,
            max_attempts=spec.max_attempts,
            error=str(failure)[:_ERROR_CHARS],
        )
        if attempt >= spec.max_attempts:
            return await self._dead_letter(slot.event, event_id, failure, version, first_failed)
        delay = self._options.retry_backoff * 2 ** (attempt - 1)
        await anyio.sleep(min(delay, self._options.retry_backoff_max))
        plugin = self._version_for(slot)
        if plugin is None or self._stopping:
            return False  # disabled or unloaded: paused, the event stays pending
        return plugin

    def _recursion_suspected(self, chain: int) -> None:
        """A handled event had a chain of ``threshold`` or more: warn, once per run."""
        if self._echo_warned:
            return
        self._echo_warned = True
        self._events.emit(
            "trigger.recursion_suspected",
            "warning",
            trigger=self.tid,
            plugin=self.plugin,
            collection=self.spec.collection,
            chain=chain,
            message="events of one document keep arriving while its handler runs: "
            "does the handler write the document that triggers it?",
        )

    def _observe_lag(self, event: Mapping[str, Any], at: float) -> None:
        """Give the lag histogram (the metrics, when installed) ``event``'s lag at ``at``.

        The state's ``lag_ms`` is worked out from the last event when the state is
        written (:meth:`_fields`), not per event.
        """
        lag = _lag_of(event, at)
        if lag is not None:
            self._stats.observe_lag(lag)

    async def _dead_letter(
        self,
        event: Mapping[str, Any],
        event_id: str,
        failure: PluginError,
        version: str,
        first_failed: datetime | None,
    ) -> bool:
        if isinstance(failure, PluginFailed):
            lines = failure.traceback.splitlines()
        else:
            lines = tb_module.format_exception_only(failure)
        now = datetime.now(UTC)
        letter = {
            "trigger": self.tid,
            "plugin": self.plugin,
            "event_id": event.get("_id"),
            "event": dict(event),
            "error": str(failure)[:_ERROR_CHARS],
            "traceback": lines[-200:],
            "attempts": self.spec.max_attempts,
            "version": version,
            "first_failed_at": first_failed or now,
            "last_failed_at": now,
        }
        delay = self._options.retry_backoff
        while True:  # the event is done only once its dead letter is stored
            try:
                await self._deadletters.insert_one(letter)
                break
            except PyMongoError as exc:
                self._events.emit(
                    "trigger.dead_letter_failed", "error", trigger=self.tid, error=str(exc)
                )
                if self._stopping:
                    return False
                await anyio.sleep(delay)
                delay = min(delay * 2, self._options.retry_backoff_max)
        self._dead_letters += 1
        self._stats.dead_lettered(self.tid)
        self._events.emit(
            "trigger.dead_lettered",
            "error",
            trigger=self.tid,
            plugin=self.plugin,
            version=version,
            event_id=event_id,
            attempts=self.spec.max_attempts,
            error=str(failure)[:_ERROR_CHARS],
        )
        return True

    # -- checkpoint and lease ------------------------------------------------------------

    def _fields(self, status: str) -> dict[str, Any]:
        window = self._window
        if self._lag_event is not None:
            lag = _lag_of(self._lag_event, self._lag_at)
            if lag is not None:  # else (a rescan's event) the last lag known stays
                self._lag_ms = max(lag, 0.0) * 1000.0
        return {
            "checkpoint": window.checkpoint,
            "checkpoint_collection": self.spec.collection,
            "checkpoint_time": window.checkpoint_time,
            "status": status,
            "error": self._error,
            "processed": self._processed,
            "failed_attempts": self._failed_attempts,
            "dead_letters": self._dead_letters,
            "lag_ms": self._lag_ms,
            "events_per_s": self._rate,
            "history_lost": self._history,
            "failed_version": self._failed_version() if self.failed else None,
            "done_ahead": [event_id_of(t) for t in window.done_ahead()] + sorted(self._skip),
        }

    def _failed_version(self) -> str | None:
        plugin = self._registry.get(self.plugin)
        return plugin.version if plugin is not None else None

    async def _checkpoint(self) -> bool:
        # One write at a time (the reader's first checkpoint and the batches): a stored
        # checkpoint never goes back. trigger.checkpoint is debug only (the contract).
        async with self._write_lock:
            fields = self._fields(self._status)
            written = await self.lease.write(fields)
        if not written:
            self._lease_lost("checkpoint")
            return False
        self._written = fields["checkpoint"]  # not the watermark now: it moved meanwhile
        self._last_renewal = time.monotonic()
        self._events.emit("trigger.checkpoint", "debug", trigger=self.tid)
        return True

    def _lease_lost(self, where: str) -> None:
        if self.lost:
            return
        self.lost = True
        self._stopping = True
        self._events.emit(
            "trigger.lease_lost", "warning", trigger=self.tid, plugin=self.plugin, where=where
        )

    async def _keep_lease(self, scope: anyio.CancelScope) -> None:
        """Write the checkpoint in batches and renew the lease; stop all at a lost lease.

        A batch is written when ``checkpoint_every`` events were covered since the last
        write, or ``checkpoint_interval`` seconds passed with the watermark moved; the
        lease is renewed with it, or alone every third of the TTL.
        """
        options = self._options
        window = self._window
        renew_every = options.lease_ttl / 3
        self._last_renewal = time.monotonic()
        covered_at_write = window.covered
        rate_at = time.monotonic()
        while True:
            deadline = min(options.checkpoint_interval, renew_every)
            with anyio.move_on_after(deadline):
                batch_end = window.notify_at = covered_at_write + options.checkpoint_every
                while window.covered < batch_end:
                    window.moved = anyio.Event()
                    await window.moved.wait()
            now = time.monotonic()
            # Events covered: write now. Only the idle stream's token moved (it moves with
            # every write to the cluster, ours included): wait for the renewal.
            dirty = window.covered != covered_at_write and window.checkpoint != self._written
            if not dirty and now - self._last_renewal < renew_every:
                continue
            elapsed = now - rate_at
            if elapsed > 0:
                self._rate = (window.covered - covered_at_write) / elapsed
            try:
                if not await self._checkpoint():
                    scope.cancel()
                    return
            except PyMongoError as exc:
                self._events.emit(
                    "trigger.checkpoint_failed", "warning", trigger=self.tid, error=str(exc)
                )
                if time.monotonic() - self._last_renewal > options.lease_ttl:
                    self._lease_lost("renewal")  # another host may hold it by now
                    scope.cancel()
                    return
                await anyio.sleep(min(renew_every, 1.0))
                continue
            covered_at_write = window.covered
            rate_at = now
            if not math.isfinite(self._rate or 0.0):
                self._rate = None
