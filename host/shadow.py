"""Shadow runs (issue 16 item 5): mirror a sample of calls to a candidate that serves no one.

Design note — off the caller's path, bounded, side-effect free:

* The dispatcher's :meth:`LiveRollout.due <host.rollout.LiveRollout.due>` appends a
  sampled call to :attr:`ShadowRunner.mirrors` (a :class:`~host.rollout.MirrorQueue`)
  *after* the stable version answered (the caller's result is already computed). The
  sampling is a countdown (one decrement per call that is not mirrored, no random draw,
  no Python call); a mirrored call pays an append of ``(rollout, args, result,
  elapsed, weight)``, and the stable's statistics sample it carries is recorded by the
  worker. A ticker (a ``_TICK`` timer that re-arms itself while mirrors keep coming)
  wakes the idle workers, so mirrors start in batches and the caller schedules nothing.
  The ticker stops after ``_IDLE_TICKS`` ticks without work (a host with no shadow
  traffic has no timer), and the first mirror after that restarts it with a
  ``call_soon`` (no timer heap push on the caller's path). When the queue is full the
  mirror is dropped and counted (``dropped``), so a slow candidate can never slow
  callers down or grow memory.
* A fixed pool of worker tasks (the concurrency bound), started in the host's task group
  with no plugin in their context, runs each mirror as a pinned call of the candidate
  under its own timeout, then compares the two results as canonical JSON. Counters per
  plugin: ``match``, ``mismatch``, ``candidate_error``, ``dropped``, ``refused_writes``.
* A ``shadow.mismatch`` event is sampled (at most one per plugin per
  ``mismatch_interval`` seconds) and size-bounded (both results cut to
  ``max_event_chars``).
* A shadow's ``ctx.db`` is a :class:`ReadOnlyDatabase`: reads pass through, any write
  raises :class:`ShadowWriteRefused` and is counted as a refused side effect. While a
  mirror runs, :data:`host.context.SHADOW_DB` is set in its context, so every plugin the
  shadow reaches through ``ctx.call`` (at any depth, in worker threads and in tasks
  started from it) gets a read-only ``ctx.db`` too: a nested write fails in the callee,
  the failure travels back to the shadow like any error, and the caller, who already has
  the stable's answer, never sees it. It guards against writes through the handles the
  host gives; it is not a sandbox (plugin code runs in-process and could open its own
  client, or use a handle it kept from ``setup``).
* Each rollout has its comparison report (:attr:`LiveRollout.report
  <host.rollout.LiveRollout.report>`, reported to the fleet with the candidate): the same
  counters for this candidate only, the last refused writes (which plugin, which
  operation) and the last candidate error.

INVARIANT: at most ``workers`` mirrors run at once and at most ``queue_size`` wait; the
counters only grow, and are touched on the loop thread only.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from .context import SHADOW_DB
from .errors import PluginHostError
from .events import EventBus
from .rollout import OK, SHADOW_OUTCOMES, LiveRollout, MirrorQueue
from .types import Args, CallTarget

if TYPE_CHECKING:
    from .dispatch import Dispatcher
    from .plugin import Plugin

_Mirror = tuple[LiveRollout, Any, Any, float, int]
"""``(rollout, args, stable's result, stable's elapsed, its sample's weight)``."""
_TICK = 0.002
"""Seconds between two ticks of the workers' ticker: a queued mirror waits at most this."""
_IDLE_TICKS = 16
"""Ticks in a row that find no queued mirror before the ticker stops (until a mirror)."""

__all__ = (
    "SHADOW_OUTCOMES",
    "ReadOnlyDatabase",
    "ShadowCaller",
    "ShadowRunner",
    "ShadowWriteRefused",
)

_REPORT_BLOCKED = 5
"""Refused writes a rollout's report names (the most recent distinct ones)."""
_REPORT_ERROR_CHARS = 300
"""The report's ``last_error`` is cut to this many characters."""

_READ_METHODS = frozenset(
    {
        "find",
        "find_one",
        "find_raw_batches",
        "count_documents",
        "estimated_document_count",
        "distinct",
        "list_indexes",
        "index_information",
        "options",
        "watch",
        "name",
        "full_name",
        "codec_options",
        "read_preference",
        "read_concern",
        "write_concern",
    }
)
_READ_COMMANDS = frozenset(
    {"ping", "buildinfo", "listcollections", "dbstats", "collstats", "count", "distinct", "find"}
)


class ShadowWriteRefused(PluginHostError, PermissionError):
    """A shadow candidate tried to write through ``ctx.db``; shadows must not change data.

    Attributes:
        operation: What it tried, e.g. ``users.insert_one``.
    """

    def __init__(self, operation: str) -> None:
        super().__init__(
            f"{operation} refused: this version runs as a shadow (a mirror of real calls), "
            "and a shadow's ctx.db is read-only"
        )
        self.operation = operation


class _ReadOnlyCollection:
    """A collection whose read methods pass through; every other method refuses."""

    __slots__ = ("_coll", "_refused")

    def __init__(self, coll: Any, refused: Callable[[str], None]) -> None:
        self._coll = coll
        self._refused = refused

    def aggregate(self, pipeline: Any, *args: Any, **kwargs: Any) -> Any:
        """``aggregate`` without ``$out``/``$merge`` stages (those write)."""
        for stage in pipeline or ():
            if isinstance(stage, Mapping) and ({"$out", "$merge"} & set(stage)):
                self._refuse(f"{self._coll.name}.aggregate with $out/$merge")
        return self._coll.aggregate(pipeline, *args, **kwargs)

    def _refuse(self, operation: str) -> None:
        self._refused(operation)
        raise ShadowWriteRefused(operation)

    def __getattr__(self, attr: str) -> Any:
        if attr in _READ_METHODS:
            return getattr(self._coll, attr)
        if attr.startswith("_"):
            raise AttributeError(attr)
        value = getattr(self._coll, attr)
        if callable(value) and not hasattr(value, "find"):  # a method, not a sub-collection
            operation = f"{self._coll.name}.{attr}"

            def refuse(*_args: Any, **_kwargs: Any) -> Any:
                self._refuse(operation)

            return refuse
        return _ReadOnlyCollection(value, self._refused)  # db.a.b: a sub-collection

    def __getitem__(self, name: str) -> _ReadOnlyCollection:
        return _ReadOnlyCollection(self._coll[name], self._refused)


class ReadOnlyDatabase:
    """The ``ctx.db`` of a shadow: reads pass through, writes raise ``ShadowWriteRefused``.

    Args:
        db: The host's database.
        refused: Called with the operation's name for each refused write.
    """

    __slots__ = ("_db", "_refused")

    def __init__(self, db: Any, refused: Callable[[str], None]) -> None:
        self._db = db
        self._refused = refused

    @property
    def name(self) -> str:
        """The database name."""
        return str(self._db.name)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        if attr in ("list_collection_names", "list_collections", "get_collection"):
            if attr == "get_collection":
                return lambda name, *a, **k: _ReadOnlyCollection(
                    self._db.get_collection(name, *a, **k), self._refused
                )
            return getattr(self._db, attr)
        if attr == "command":
            return self._command
        if attr in ("client", "drop_collection", "create_collection", "dereference"):
            return self._refusing(f"db.{attr}")
        return _ReadOnlyCollection(self._db[attr], self._refused)

    def __getitem__(self, name: str) -> _ReadOnlyCollection:
        return _ReadOnlyCollection(self._db[name], self._refused)

    def _refusing(self, operation: str) -> Callable[..., Any]:
        def refuse(*_args: Any, **_kwargs: Any) -> Any:
            self._refused(operation)
            raise ShadowWriteRefused(operation)

        return refuse

    async def _command(self, command: Any, *args: Any, **kwargs: Any) -> Any:
        name = command if isinstance(command, str) else next(iter(command), "")
        if str(name).lower() not in _READ_COMMANDS:
            self._refused(f"db.command({name!r})")
            raise ShadowWriteRefused(f"db.command({name!r})")
        return await self._db.command(command, *args, **kwargs)


class ShadowCaller:
    """The ``Caller`` of a shadow's contexts: the dispatcher, with a read-only ``db``.

    Plugin-to-plugin calls from a shadow go to the other plugins as usual (their own
    ``ctx.db`` is theirs): only the shadow's own handle is read-only. (Triggers use it
    too, with the database that notes a handler's writes: ``host.triggers.echo``.)

    Args:
        dispatcher: The host's dispatcher.
        db: The shadow's read-only database (or another handle to give as ``ctx.db``).
    """

    __slots__ = ("_dispatcher", "db")

    def __init__(self, dispatcher: Dispatcher, db: ReadOnlyDatabase | Any) -> None:
        self._dispatcher = dispatcher
        self.db = db

    @property
    def globals(self) -> Mapping[str, Any]:
        """Host globals exposed as attributes of ``ctx``."""
        return self._dispatcher.globals

    async def call(self, name: str, args: Args, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - per-call timeout is the public contract
        """Call the current version of plugin ``name``."""
        return await self._dispatcher.call(name, args, timeout=timeout)

    def require(self, name: str) -> CallTarget:
        """Return a late-bound handle on plugin ``name``."""
        return self._dispatcher.require(name)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr, separators=(",", ":"))


class ShadowRunner:
    """Runs sampled mirror calls of shadow candidates (see the module docstring).

    Args:
        dispatcher: Runs the mirrored (pinned) calls.
        events: Where ``shadow.mismatch`` goes.
        workers: Mirrors running at once at most.
        queue_size: Mirrors waiting at most (more are dropped, counted).
        timeout: Each mirror's own timeout, in seconds.
        mismatch_interval: At most one ``shadow.mismatch`` event per plugin this often.
        max_event_chars: Each result in the event is cut to this many characters.
        rollouts: The registry's rollouts by name, so that a write refused outside a
            mirror (the shadow's ``setup`` or its tasks) reaches the rollout's report.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        events: EventBus,
        *,
        workers: int = 4,
        queue_size: int = 256,
        timeout: float = 10.0,
        mismatch_interval: float = 1.0,
        max_event_chars: int = 2000,
        rollouts: Mapping[str, LiveRollout] | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._rollouts = rollouts if rollouts is not None else {}
        self._events = events
        self._workers = workers
        self._timeout = timeout
        self._interval = mismatch_interval
        self._max_chars = max_event_chars
        self._queue_size = queue_size
        # INVARIANT: a worker is in _idle only while it waits for work, and it went
        # there with the queue empty; while the queue is not empty, mirrors.ticking is
        # True: a tick is scheduled (a timer, or a call_soon from _kick), and each tick
        # wakes one idle worker per queued mirror. ticking goes False only in a tick
        # that finds the queue empty (the _IDLE_TICKS-th in a row), and only _kick sets
        # it again. mirrors.room is queue_size while the workers run, else 0.
        self.mirrors = MirrorQueue(0, self._kick, self._dropped)
        """The dispatcher's ``on_mirror``: where ``LiveRollout.due`` queues mirrors."""
        self._queue: deque[_Mirror] = self.mirrors.entries
        self._idle: list[anyio.Event] = []
        self._idle_ticks = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_event: dict[str, float] = {}
        self.counts: dict[str, dict[str, int]] = {}
        """``{plugin: {match, mismatch, candidate_error, dropped, refused_writes}}``."""
        self._started = False

    @property
    def ticking(self) -> bool:
        """Whether the workers' ticker runs (it stops after idle ticks, see the module)."""
        return self.mirrors.ticking

    def start(self, task_group: TaskGroup) -> None:
        """Start the worker pool in ``task_group`` (the host's; no plugin in context)."""
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        self.mirrors.room = self._queue_size
        for i in range(self._workers):
            task_group.start_soon(self._work, name=f"shadow worker {i}")

    def _count(self, name: str, outcome: str) -> None:
        counts = self.counts.get(name)
        if counts is None:
            counts = self.counts[name] = dict.fromkeys(SHADOW_OUTCOMES, 0)
        counts[outcome] += 1

    def _tally(self, live: LiveRollout, outcome: str) -> None:
        """Count an outcome for the plugin (``counts``) and in the rollout's report."""
        self._count(live.name, outcome)
        report = live.report
        report[outcome] = report.get(outcome, 0) + 1

    def refused_write(self, name: str) -> Callable[[str], None]:
        """The ``refused`` callback of plugin ``name``'s :class:`ReadOnlyDatabase`."""

        def refused(operation: str) -> None:
            live = self._rollouts.get(name)
            if live is None:
                self._count(name, "refused_writes")
            else:
                self._blocked(live, name, operation)

        return refused

    def _blocked(self, live: LiveRollout, plugin: str, operation: str) -> None:
        """A write refused while ``live``'s shadow ran: count it, name it in the report."""
        self._tally(live, "refused_writes")
        where = "" if plugin == live.name else " (nested ctx.call)"
        entry = f"{plugin}: {operation}{where}"
        blocked: list[str] = live.report.setdefault("blocked", [])
        if entry in blocked:
            blocked.remove(entry)
        blocked.append(entry)
        del blocked[:-_REPORT_BLOCKED]

    def _readonly(self, live: LiveRollout) -> Callable[[Plugin], ReadOnlyDatabase]:
        """``SHADOW_DB``'s value for the mirrors of ``live``: each version's read-only db."""
        db = self._dispatcher.db
        handles: dict[str, ReadOnlyDatabase] = {}

        def readonly(plugin: Plugin) -> ReadOnlyDatabase:
            name = plugin.name
            handle = handles.get(name)
            if handle is None:
                handle = handles[name] = ReadOnlyDatabase(
                    db, lambda operation: self._blocked(live, name, operation)
                )
            return handle

        return readonly

    def _dropped(self, live: LiveRollout) -> None:
        """The queue is full (or the workers stopped): count the mirror as dropped."""
        self._tally(live, "dropped")

    def _kick(self) -> None:
        """Restart the ticker for the first mirror after a quiet spell (tick now)."""
        if self._loop is not None:
            self.mirrors.ticking = True
            self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        """Wake one idle worker per queued mirror; re-arm, or stop after idle ticks."""
        queue = self._queue
        if queue:
            self._idle_ticks = 0
            idle = self._idle
            for _ in range(min(len(idle), len(queue))):
                idle.pop().set()
        else:
            self._idle_ticks += 1
            if self._idle_ticks >= _IDLE_TICKS or not self.mirrors.room:
                self.mirrors.ticking = False
                self._idle_ticks = 0
                return
        assert self._loop is not None  # set by start(), before any mirror is queued
        self._loop.call_later(_TICK, self._tick)

    async def _work(self) -> None:
        # A plain deque and one event per idle worker: a memory object stream's hand-off
        # costs tens of µs per item under asyncio, a loop-time cost every mirror pays.
        queue = self._queue
        try:
            while True:
                while queue:
                    await self._mirror(*queue.popleft())
                wake = anyio.Event()
                self._idle.append(wake)
                await wake.wait()
        finally:
            self.mirrors.room = 0  # no more mirrors: due() drops (and counts) them
            self._queue.clear()

    async def _mirror(
        self, live: LiveRollout, args: Any, expected: Any, elapsed: float, weight: int
    ) -> None:
        live.stable_stats.record(OK, elapsed, time.perf_counter(), weight)
        name = live.name
        if not live.mirror:  # aborted or promoted while queued
            return
        live.prepare()  # the next mirrors' gaps, drawn here rather than on the path
        readonly = live.mirror_db
        if readonly is None:
            readonly = live.mirror_db = self._readonly(live)
        token = SHADOW_DB.set(readonly)  # nested ctx.call writes: refused too
        try:
            got = await self._dispatcher.call(
                name, args, version=live.candidate.version, timeout=self._timeout
            )
        except Exception as exc:  # PluginFailed, PluginTimeout, VersionNotLive...
            self._tally(live, "candidate_error")
            error = f"{type(exc).__name__}: {exc}"
            live.report["last_error"] = error[:_REPORT_ERROR_CHARS]
            del exc
            return
        finally:
            SHADOW_DB.reset(token)
        try:
            same = _canonical(got) == _canonical(expected)
        except (TypeError, ValueError, RecursionError):
            same = False
        if same:
            self._tally(live, "match")
            return
        self._tally(live, "mismatch")
        now = time.monotonic()
        if now - self._last_event.get(name, -math.inf) >= self._interval:
            self._last_event[name] = now
            self._events.emit(
                "shadow.mismatch",
                "warning",
                plugin=name,
                stable=self._cut(expected),
                candidate=self._cut(got),
                candidate_version=live.candidate.version,
                args=self._cut(args),
                mismatches=self.counts[name]["mismatch"],
            )

    def _cut(self, value: Any) -> str:
        try:
            text = _canonical(value)
        except (TypeError, ValueError, RecursionError) as exc:
            text = f"<not JSON: {type(exc).__name__}>"
        if len(text) > self._max_chars:
            text = f"{text[: self._max_chars]}...(+{len(text) - self._max_chars} chars)"
        return text
