"""The loader: turns record changes into registry swaps, one name at a time.

The watcher submits changes (a document to load, or None to unload). Each name has at
most one worker; a change submitted while a worker is busy replaces any change still
waiting for that name (latest wins), so a burst of edits compiles only what is newest
and a version never goes live after a newer one. Different names load concurrently.

A change that fails validation, compilation or setup leaves the version that was
serving in place, and says so in its event (``serving``).

Design note — keeping reloads ahead of calls. On a loop saturated with callers, every
turn of the event loop runs one step of each runnable caller, so a reload costs the
number of turns on its path times the number of callers (measured: ~9 turns plus a GIL
hand-off per reload made 50 spinning callers add ~25 ms, 200 add ~50 ms). The path is
therefore kept to as few turns as possible. The fast path (:meth:`Loader.submit`,
:meth:`Loader._apply_now`): a change to a name with no worker, no verifier, no rollout
and no candidate is validated, compiled (``host.precompile.precompile_now``), loaded
(``host.compiler.load_now``: a declarative top level runs on the loop) and installed
(``Registry.install_now``: no ``setup``, the name's lock free, the swap in the same
step) inside ``submit`` itself, in the watcher's step: no task, no thread hop, no loop
turn. Wherever a step would have to await (a verifier, a rollout to settle, a disabled
record to unload, a source too large to compile on the loop, a top level that runs code,
a ``setup`` hook, the name's lock taken), the rest of that change goes to a worker task,
with what is already done (the validated record, the compiled code, the loaded
version), and the name's slot is busy from then on, so a newer change waits behind it
exactly as on the worker's path: the slot's invariant and the per-name order hold on
both paths. The worker's path keeps the same shape: a small source compiles on the loop
and a declarative top level runs there, and the registry's install takes its lock
without a checkpoint when uncontended. Only sources that could stall the loop (large,
or with many f-string placeholders) and top levels that run code pay for isolation: a
compiler process, then a worker thread under the CPU-time bound.

Candidates (issue 16). After the stable version of a change is settled, the same worker
settles the record's ``rollout`` (:meth:`Loader._sync_candidate`): it compiles and
installs a new candidate beside the stable (``rollout.started``), takes a new weight of
the same candidate (``rollout.weight_changed``), drops a candidate the record no longer
carries (``rollout.aborted``), or, when the new stable record is the candidate itself,
promotes the compiled candidate in place (``rollout.promoted``: no recompile, its state
kept). A refused candidate is reported like any refusal, with ``candidate: true``; the
stable version keeps serving everything.

What a reload costs the loop, and so a reload storm's bound (issue 19). A storm of R
reloads/s takes R x (cost of one reload) of each loop second, so the 10% throughput goal
at the bench's 200 updates/s needs about 0.5 ms per reload. Measured with
``bench.swap.reload_cost`` (loop thread's CPU time per reload, no callers, server in its
own process; medians of interleaved runs against main on the same 2 shared cores, whose
absolute figures move with the machine: an earlier full bench run on another CPU said
2.7 ms where these runs say 0.69): 0.69 ms before this fast path, 0.64 ms with it, 0.58
ms once the bench counts reloads with an ``accept`` callback instead of a reader task
(the reader's two loop turns per reload were the instrument's own cost). Cut earlier
for storms, still in place: the ``plugin.reloaded`` and ``plugin.retired`` log lines at
info at most once a second per plugin (``LogThrottle``), a replaced version with nothing
to drain retiring in a loop callback (``Registry._retire_soon``), the busy/idle event
made only when someone waits, the content hash's encoder built once. The loader's
own part (changes submitted straight to it, no stream) went from 134 to 82 us. What
is left, from a cProfile on the loop thread's CPU clock (shares of its samples): the
change stream's getMore in PyMongo, decode included, 43% -- a bare PyMongo
``try_next`` loop on the same storm costs the loop 310-400 us per event by itself, about
60-90 us of it PyMongo's receive path (two tasks and an ``asyncio.wait`` per reply),
which a lean receive removes in a bare consumer; compile and load 13% (``compile()``
4%, the declarative check 2%), validation and hash 5%, install and retirement 8%, the
two events 6%, the loop's own turns the rest. So the goal is missed at 200 updates/s
(at 20/s it was met on a quiet machine), and the bound is the stream read: with the
loader free, the getMore alone is ~0.35 ms a reload. Each change that waits while its
name loads is replaced by the newer one (the slot's invariant below) and counted in the
new version's ``superseded``. Not done, and why: delaying or rate-limiting reloads would
trade change-to-live (p99 goal 20 ms) for throughput; compiling small sources in the
compiler process would add a pipe round trip to every reload; PyMongo's receive path is
PyMongo's (replacing it would fork the driver's cancellation of in-use connections);
the rest would need the stream read outside this process.
"""

from __future__ import annotations

import functools
import math
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup

from .compiler import compile_plugin, compile_plugins, load_now
from .config import DEFAULT_LIMITS, DEFAULT_TIMEOUTS
from .errors import CompileError, HostClosed, RecordError
from .events import EventBus, Level, LogThrottle
from .plugin import Plugin
from .precompile import CompilerProcesses, Precompiled
from .records import PluginRecord, describe_id, parse_record
from .registry import Registry
from .rollout import LiveRollout
from .types import ContextFactory, Document

__all__ = ("BATCH_SIZE", "INITIAL", "Change", "Loader", "PluginInfo", "RecordVerifier")

BATCH_SIZE = 64
"""Records per batch in :meth:`Loader.submit_many` (one worker-thread hop each)."""

INITIAL = "initial"
"""The ``reason`` of the changes of the initial load."""

RecordVerifier = Callable[[PluginRecord, PluginRecord | None], Awaitable[None] | None]
"""Checks a record before it compiles (signatures); raises ``RecordError`` to refuse it."""


@dataclass(frozen=True, slots=True)
class Change:
    """One change to apply.

    Attributes:
        name: The plugin name (the record's ``_id``).
        document: The record, or None to unload.
        wall_time: When the change was made (the change event's ``wallTime``), for
            ``change_to_live_ms``; None for the initial load.
        reason: Why: ``initial``, ``insert``, ``update``, ``replace``, ``delete``,
            ``resync``...
    """

    name: str
    document: Document | None
    wall_time: datetime | None = None
    reason: str = "change"


PluginStatus = Literal["serving", "degraded", "failed", "disabled"]
"""What ``PluginInfo.status`` can be."""


@dataclass(slots=True)
class PluginInfo:
    """What ``PluginHost.plugins()`` reports for one name.

    Attributes:
        name: The plugin name.
        version: The serving version (e.g. ``greet@r7:3f9a1c2e``), None if none serves.
        revision: The serving version's revision.
        loaded_at: When the serving version went live.
        status: ``serving``, ``degraded`` (a newer record failed; the old version
            serves), ``failed`` (nothing serves) or ``disabled``.
        last_error: The latest failure for this name, if any.
        abandoned_threads: Worker threads of this name's versions whose calls timed out
            while blocked in C and that still run (each holds a sync-call thread slot).
    """

    name: str
    version: str | None = None
    revision: int | None = None
    loaded_at: datetime | None = None
    status: PluginStatus = "serving"
    last_error: str | None = None
    abandoned_threads: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "name": self.name,
            "version": self.version,
            "revision": self.revision,
            "loaded_at": self.loaded_at.isoformat() if self.loaded_at else None,
            "status": self.status,
            "last_error": self.last_error,
            "abandoned_threads": self.abandoned_threads,
        }


_Rest = Callable[[], Awaitable[None]]
"""What the fast path (``Loader._apply_now``) leaves of a change for a worker task."""


@dataclass(slots=True)
class _Job:
    """A validated change waiting for its version to compile and install."""

    change: Change
    slot: _Slot
    record: PluginRecord
    serving: str | None
    had_current: bool
    started: float
    superseded: int = 0


@dataclass(slots=True)
class _Slot:
    """One name's coalescing queue: at most one change waits, the newest.

    INVARIANT (all on the loop, no await between a read and its write): ``pending`` is
    the newest change submitted and not yet taken; ``superseded`` counts the changes it
    replaced since the last :meth:`take` (each of those is never compiled, and the
    version that does go live reports them as ``superseded``); ``busy`` is True exactly
    while one worker (or one batch) owns the name, and only the owner takes; the one
    exception is the fast path in :meth:`Loader.submit`, which takes from an idle slot
    and either finishes within that same synchronous step or sets ``busy`` before it
    returns, handing the rest to the name's worker. So every
    submitted change is either taken once or counted once as superseded, and a name's
    versions go live in submission order (tests/test_loader.py checks this under a
    storm of submissions).
    """

    pending: Change | None = None
    busy: bool = False
    info: PluginInfo | None = field(default=None)
    superseded: int = 0

    def put(self, change: Change) -> None:
        """Queue ``change``; a change still waiting is superseded by it."""
        if self.pending is not None:
            self.superseded += 1
        self.pending = change

    def take(self) -> tuple[Change | None, int]:
        """The waiting change and how many it superseded; the queue is empty after."""
        change, superseded = self.pending, self.superseded
        self.pending, self.superseded = None, 0
        return change, superseded


class Loader:
    """Applies :class:`Change` objects to a :class:`Registry`.

    Args:
        registry: Where versions are installed.
        ctx_factory: Builds ``ctx`` for setup/teardown hooks.
        events: Where reload events go.
        exec_timeout: Bound on a version's top-level code, in seconds.
        max_source_bytes: Largest accepted ``source``.
        default_max_concurrency: ``max_concurrency`` for records that set none.
        verifier: Optional check run on each record before compiling (signatures).
        candidate_verifier: The check of a rollout's candidate (its signature is checked
            over its own fields, and nothing is remembered as accepted); ``verifier`` if
            None.
        prepare_candidate: Readies a compiled candidate for its mode (a shadow's
            ``ctx.db`` refuses writes) and returns the ``ctx`` factory of its hooks;
            ``ctx_factory`` is used if None.
        compile_timeout: Bound on compiling one source in a compiler process, in seconds
            (``host.precompile``; small sources compile on the loop and need none).
    """

    def __init__(
        self,
        registry: Registry,
        ctx_factory: ContextFactory,
        events: EventBus,
        *,
        exec_timeout: float = DEFAULT_TIMEOUTS.top_level,
        max_source_bytes: int = DEFAULT_LIMITS.max_source_bytes,
        default_max_concurrency: int | None = None,
        verifier: RecordVerifier | None = None,
        compile_timeout: float = DEFAULT_TIMEOUTS.compile,
        candidate_verifier: RecordVerifier | None = None,
        prepare_candidate: Callable[[Plugin, str], ContextFactory] | None = None,
    ) -> None:
        self._registry = registry
        self._candidate_verifier = candidate_verifier if candidate_verifier else verifier
        self._prepare_candidate = prepare_candidate
        self._processes = CompilerProcesses(compile_timeout=compile_timeout)
        self._ctx_factory = ctx_factory
        self._events = events
        self._exec_timeout = exec_timeout
        self._max_source_bytes = max_source_bytes
        self._default_max_concurrency = default_max_concurrency
        self._verifier = verifier
        self._slots: dict[str, _Slot] = {}
        self._log_throttle = LogThrottle()
        self._busy = 0
        # Made only when someone waits: a storm goes busy and idle once per reload, and
        # an anyio Event costs a backend lookup.
        self._idle: anyio.Event | None = None
        self._tg: TaskGroup | None = None

    def bind(self, task_group: TaskGroup) -> None:
        """Run workers in ``task_group`` (the host's)."""
        self._tg = task_group

    async def aclose(self) -> None:
        """Stop the compiler processes (call once the workers are done)."""
        await self._processes.aclose()

    # -- submission --------------------------------------------------------------------

    def submit(self, change: Change) -> None:
        """Queue a change; the newest change per name wins. Never blocks.

        A change to an idle name that is cheap to apply is applied here and now (the
        fast path, see the module docstring); any other goes to a worker task.
        """
        assert self._tg is not None, "Loader.bind() was not called"
        name = change.name
        slot = self._slots.get(name)
        if slot is None:
            slot = self._slots[name] = _Slot()
        slot.put(change)
        if slot.busy:
            return
        rest: _Rest | None = None
        if self._applies_now(change):
            slot.take()  # `change` itself: an idle slot holds nothing else (see _Slot)
            rest = self._apply_now(change, slot)
            if rest is None:  # done: applied, refused, or nothing to do
                if slot.info is None and slot.pending is None:
                    self._slots.pop(name, None)
                return
        slot.busy = True
        self._busy += 1
        self._tg.start_soon(self._work, name, slot, rest, name=f"load {name}")

    def _applies_now(self, change: Change) -> bool:
        """Whether :meth:`_apply_now` may take ``change`` (cheap checks, before parsing).

        Not: an unload (the registry's removal awaits its lock), a record checked by a
        verifier (it may await: signatures), a record with a ``rollout`` or a name that
        holds a candidate (settling the candidate awaits).
        """
        doc = change.document
        return (
            doc is not None
            and self._verifier is None
            and doc.get("rollout") is None
            and change.name not in self._registry.rollouts
        )

    async def wait_idle(self) -> None:
        """Return once every submitted change has been applied."""
        while self._busy:
            if self._idle is None or self._idle.is_set():
                self._idle = anyio.Event()
            await self._idle.wait()

    def known(self) -> set[str]:
        """Names that are loaded or have a pending change."""
        return {name for name, slot in self._slots.items() if slot.info or slot.pending}

    def loading(self) -> list[str]:
        """Names whose change is being applied right now, sorted."""
        return sorted(name for name, slot in self._slots.items() if slot.busy)

    def infos(self) -> list[PluginInfo]:
        """Status of every name the loader has seen, sorted by name."""
        return [
            self._with_threads(slot.info)
            for _, slot in sorted(self._slots.items())
            if slot.info is not None
        ]

    def info(self, name: str) -> PluginInfo | None:
        """Status of one name."""
        slot = self._slots.get(name)
        return self._with_threads(slot.info) if slot and slot.info else None

    def _with_threads(self, info: PluginInfo) -> PluginInfo:
        abandoned = self._registry.abandoned_threads(info.name)
        return replace(info, abandoned_threads=abandoned) if abandoned else info

    def refuse_id(self, raw_id: object, reason: str) -> None:
        """Refuse a record whose ``_id`` is not a string, naming that exact ``_id``.

        Such a record is never given a name: stringifying ``5``, ``None`` or ``True`` would
        make it collide with the plugins named "5", "None" or "True" (unload them, mark
        them degraded, hide them at start-up). Nothing in the loader or the registry is
        touched; the refusal is only an event (a delete of such a record is ignored: it
        never loaded).

        Args:
            raw_id: The document's ``_id``.
            reason: The change that brought it (``insert``, ``update``, ``initial``...).
        """
        described = describe_id(raw_id)
        self._events.emit(
            "plugin.rejected",
            "warning",
            plugin=None,
            _id=described,
            field="_id",
            reason=reason,
            error=f"record _id {described}: must be a string (it is the plugin name)",
            serving=None,
        )

    # -- work --------------------------------------------------------------------------

    async def _work(self, name: str, slot: _Slot, rest: _Rest | None = None) -> None:
        try:
            if rest is not None:  # what the fast path left of a change it took
                try:
                    await rest()
                except HostClosed:
                    return
            while slot.pending is not None:
                change, superseded = slot.take()
                assert change is not None
                try:
                    await self._apply(change, slot, superseded)
                except HostClosed:
                    return
        finally:
            self._release(name, slot)

    def _release(self, name: str, slot: _Slot) -> None:
        slot.busy = False
        self._busy -= 1
        if self._busy == 0 and self._idle is not None:
            self._idle.set()
        if slot.info is None and slot.pending is None:
            self._slots.pop(name, None)

    async def _apply(self, change: Change, slot: _Slot, superseded: int = 0) -> None:
        job = await self._prepare(change, slot, superseded)
        if job is not None:
            await self._compile_install(job)

    async def _compile_install(self, job: _Job, precompiled: Precompiled | None = None) -> None:
        try:
            plugin: Plugin | CompileError = await compile_plugin(
                job.record,
                exec_timeout=self._exec_timeout,
                default_max_concurrency=self._default_max_concurrency,
                processes=self._processes,
                precompiled=precompiled,
            )
        except CompileError as exc:
            plugin = exc
        await self._install(job, plugin)

    def _apply_now(self, change: Change, slot: _Slot) -> _Rest | None:
        """Apply ``change`` (taken from its idle slot) without an await, as far as it goes.

        Validates as :meth:`_prepare` does, compiles and loads with
        :func:`~host.compiler.load_now` and installs with ``Registry.install_now``;
        refusals and failures are reported as on the worker's path. Where a step would
        need an await (a source too large to compile on the loop, a top level that runs
        code, a ``setup`` hook, the name's registry lock taken, a disabled record to
        unload), it stops there.

        Returns:
            None when the change is fully applied (or refused); else the rest of it, to
            run in a worker task before any newer change of the name.
        """
        name = change.name
        doc = change.document
        assert doc is not None  # see _applies_now
        current = self._registry.get(name)
        serving = current.version if current else None
        try:
            record = parse_record(doc, max_source_bytes=self._max_source_bytes)
        except Exception as exc:  # a refusal, or a validation bug
            self._refused(change, slot, current, exc)  # reported: the watcher goes on
            return None
        if not record.enabled:
            return functools.partial(self._unload, name, slot, "disabled", record)
        if current is not None and current.record == record:
            return None  # nothing that matters changed; no rollout to settle (checked)
        job = _Job(change, slot, record, serving, current is not None, time.perf_counter())
        try:
            loaded = load_now(record, default_max_concurrency=self._default_max_concurrency)
        except Exception as exc:  # CompileError; or a host bug, which must not stop the watcher
            self._install_failed(job, exc)
            return None
        if not isinstance(loaded, Plugin):  # None (large source) or compiled, not run
            return functools.partial(self._compile_install, job, loaded)
        if not self._registry.installs_now(loaded):  # a setup hook, or the name is busy
            return functools.partial(self._install, job, loaded)
        try:
            old = self._registry.install_now(loaded, self._ctx_factory)
        except HostClosed:
            loaded.release()
            return None
        except Exception as exc:  # a host bug must not stop the watcher
            loaded.release()
            self._install_failed(job, exc)
            return None
        self._announce(job, loaded, old, self._live_fields(job, loaded))
        return None

    async def _prepare(self, change: Change, slot: _Slot, superseded: int = 0) -> _Job | None:
        """Validate, verify or unload; the job to compile, or None if nothing is left."""
        name = change.name
        current = self._registry.get(name)
        serving = current.version if current else None
        if change.document is None:
            await self._unload(name, slot, change.reason)
            return None
        try:
            record = parse_record(change.document, max_source_bytes=self._max_source_bytes)
            if not record.enabled:
                await self._unload(name, slot, "disabled", record=record)
                return None
            if current is not None and current.record == record:
                # Nothing that matters changed for the stable version (e.g. only
                # updatedAt was touched, or only the rollout's weight).
                await self._sync_candidate(change, record)
                return None
            if self._verifier is not None:
                checked = self._verifier(record, current.record if current else None)
                if checked is not None:
                    await checked
            candidate = self._registry.candidate(name)
            if candidate is not None and candidate.record == record:
                await self._promote(change, slot, record)
                return None
        except Exception as exc:  # a refusal, or a verifier (or validation) bug
            self._refused(change, slot, current, exc)  # reported: the host goes on
            return None
        return _Job(
            change, slot, record, serving, current is not None, time.perf_counter(), superseded
        )

    def _refused(self, change: Change, slot: _Slot, current: Plugin | None, exc: Exception) -> None:
        """Report a record that did not pass validation or verification (a
        ``RecordError``: refused) or whose check failed (a bug: ``verify`` failed)."""
        name = change.name
        serving = current.version if current else None
        if isinstance(exc, RecordError):
            doc = change.document
            self._rejected(name, exc, serving, doc.get("revision") if doc is not None else None)
            self._fail(slot, name, str(exc), current is not None)
        else:
            self._reload_failed(
                slot, name, "verify", exc, serving=serving, still_serving=current is not None
            )

    def _rejected(
        self,
        name: str,
        exc: RecordError,
        serving: str | None,
        revision: object,
        *,
        field: str | None = None,
        **extra: Any,
    ) -> None:
        """Emit ``plugin.rejected`` for a record (or a candidate) that failed its checks."""
        details = dict(exc.details)
        if "revision" not in details and isinstance(revision, int):
            details["revision"] = revision  # which revision was refused (fleet status)
        self._events.emit(
            "plugin.rejected",
            "warning",
            plugin=name,
            field=exc.field if field is None else field,
            reason=exc.reason,
            error=str(exc),
            serving=serving,
            **extra,
            **details,
        )

    async def _install(self, job: _Job, compiled: Plugin | CompileError) -> None:
        """Install a compiled version (or report its failure) and emit the event."""
        try:
            if isinstance(compiled, CompileError):
                raise compiled
            plugin = compiled
            old = await self._registry.install(plugin, self._ctx_factory)
        except HostClosed:
            raise
        except Exception as exc:  # a bug in the host must not kill the loader
            self._install_failed(job, exc)
            return
        fields = self._live_fields(job, plugin)
        await self._sync_candidate(job.change, job.record)
        self._announce(job, plugin, old, fields)

    def _install_failed(self, job: _Job, exc: Exception) -> None:
        """Report a version that failed to compile, load or install; the old one serves."""
        record = job.record
        stage: str = "internal"
        last_error: str | None = str(exc)
        if isinstance(exc, CompileError):
            stage, last_error = exc.stage, None
        self._reload_failed(
            job.slot,
            job.change.name,
            stage,
            exc,
            serving=job.serving,
            still_serving=job.had_current,
            version=record.version,
            revision=record.revision,
            last_error=last_error,
        )

    def _live_fields(self, job: _Job, plugin: Plugin) -> dict[str, Any]:
        """Record ``plugin`` as the name's serving version; its event's fields."""
        change, record = job.change, job.record
        name = change.name
        live_ms = (time.perf_counter() - job.started) * 1000.0
        fields: dict[str, Any] = {
            "plugin": name,
            "version": plugin.version,
            "revision": record.revision,
            "compile_ms": round(plugin.compile_ms, 3),
            "load_ms": round(live_ms, 3),
            "reason": change.reason,
        }
        if job.superseded:
            fields["superseded"] = job.superseded  # newer revisions replaced them unbuilt
        if change.wall_time is not None:
            wall = change.wall_time
            if wall.tzinfo is None:
                wall = wall.replace(tzinfo=UTC)
            fields["change_to_live_ms"] = round(
                (datetime.now(UTC) - wall).total_seconds() * 1000.0, 3
            )
        job.slot.info = PluginInfo(
            name=name,
            version=plugin.version,
            revision=record.revision,
            loaded_at=plugin.loaded_at,
            status="serving",
        )
        return fields

    def _announce(
        self, job: _Job, plugin: Plugin, old: Plugin | None, fields: dict[str, Any]
    ) -> None:
        """Emit ``plugin.loaded`` or ``plugin.reloaded`` for a version that went live."""
        name, change = job.change.name, job.change
        if old is None:
            # The initial load logs one summary line (`watch.started`); each version's
            # `plugin.loaded` still reaches subscribers, and the log at debug level.
            level: Level = "debug" if change.reason == INITIAL else "info"
            self._events.emit("plugin.loaded", level, **fields)
        else:
            fields["old_version"] = old.version
            fields["new_version"] = plugin.version
            # A storm reloads a name many times a second: its log line at info at most
            # once a second (subscribers still get every event; see LogThrottle).
            level = self._log_throttle.level(name, fields)
            self._events.emit("plugin.reloaded", level, **fields)

    def _reload_failed(
        self,
        slot: _Slot,
        name: str,
        stage: str,
        exc: Exception,
        *,
        serving: str | None,
        still_serving: bool,
        version: str | None = None,
        revision: int | None = None,
        last_error: str | None = None,
    ) -> None:
        """Emit ``plugin.reload_failed`` for ``exc`` and record it in the name's status.

        A CompileError says itself what went wrong and carries the plugin's traceback;
        anything else is a host-side bug, described with its type and full traceback.
        """
        if isinstance(exc, CompileError):
            error, tb = str(exc), exc.traceback
        else:
            error = f"{type(exc).__name__}: {exc}"
            tb = "".join(traceback.format_exception(exc))
        fields: dict[str, Any] = {"plugin": name}
        if version is not None:
            fields["version"] = version
        if revision is not None:
            fields["revision"] = revision
        self._events.emit(
            "plugin.reload_failed",
            "error",
            **fields,
            stage=stage,
            error=error,
            traceback=tb,
            serving=serving,
        )
        self._fail(slot, name, error if last_error is None else last_error, still_serving)

    # -- candidates (issue 16) --------------------------------------------------------------

    async def _sync_candidate(self, change: Change, record: PluginRecord) -> None:
        """Make the held candidate match ``record.rollout`` (see the module docstring)."""
        name = record.name
        live = self._registry.rollouts.get(name)
        spec = record.rollout
        try:
            if record.rollout_error is not None:
                raw = (change.document or {}).get("rollout")
                revision = raw.get("revision") if isinstance(raw, Mapping) else None
                self._rejected(
                    name, record.rollout_error, self._serving(name), revision, candidate=True
                )
                if live is not None:
                    await self._end_candidate(change, "refused: the rollout is invalid")
                return
            if spec is None:
                if live is not None:
                    await self._end_candidate(change, None)
                return
            if live is not None and live.candidate.record == spec.candidate:
                before = live.spec
                if before.mode != spec.mode and self._prepare_candidate is not None:
                    self._prepare_candidate(live.candidate, spec.mode)  # shadow <-> canary
                live.update(spec)
                if before.weight != spec.weight or before.mode != spec.mode:
                    self._events.emit(
                        "rollout.weight_changed",
                        plugin=name,
                        candidate=live.candidate.version,
                        mode=spec.mode,
                        weight=spec.weight,
                        previous_weight=before.weight,
                        previous_mode=before.mode,
                    )
                return
            if live is not None:  # a new candidate replaces the one held
                await self._end_candidate(change, "superseded by a new candidate")
            await self._start_candidate(change, record)
        except HostClosed:
            raise
        except Exception as exc:  # a host bug must not stop the loader
            self._events.emit(
                "plugin.reload_failed",
                "error",
                plugin=name,
                stage="internal",
                error=f"{type(exc).__name__}: {exc}",
                traceback="".join(traceback.format_exception(exc)),
                serving=self._serving(name),
                candidate=True,
            )

    def _serving(self, name: str) -> str | None:
        current = self._registry.get(name)
        return current.version if current is not None else None

    async def _start_candidate(self, change: Change, record: PluginRecord) -> None:
        spec = record.rollout
        assert spec is not None
        name = record.name
        candidate = spec.candidate
        serving = self._serving(name)
        try:
            if self._candidate_verifier is not None:
                checked = self._candidate_verifier(candidate, record)
                if checked is not None:
                    await checked
        except RecordError as exc:
            self._rejected(
                name,
                exc,
                serving,
                candidate.revision,
                field=f"rollout.{exc.field}",
                candidate=True,
                version=candidate.version,
            )
            await self._end_candidate(change, "refused")
            return
        try:
            plugin = await compile_plugin(
                candidate,
                exec_timeout=self._exec_timeout,
                default_max_concurrency=self._default_max_concurrency,
                processes=self._processes,
            )
            ctx_factory = (
                self._prepare_candidate(plugin, spec.mode)
                if self._prepare_candidate is not None
                else self._ctx_factory
            )
            live = await self._registry.install_candidate(
                plugin, ctx_factory, spec, time.perf_counter()
            )
        except (CompileError, LookupError) as exc:
            stage = exc.stage if isinstance(exc, CompileError) else "install"
            self._events.emit(
                "plugin.reload_failed",
                "error",
                plugin=name,
                version=candidate.version,
                revision=candidate.revision,
                stage=stage,
                error=str(exc),
                traceback=exc.traceback if isinstance(exc, CompileError) else "",
                serving=serving,
                candidate=True,
            )
            await self._end_candidate(change, "refused")
            return
        self._events.emit(
            "rollout.started",
            plugin=name,
            candidate=live.candidate.version,
            stable=serving,
            mode=spec.mode,
            weight=spec.weight,
            sticky_key=spec.sticky_key,
            policy=spec.policy.as_document(),
        )

    async def _end_candidate(self, change: Change, why: str | None) -> None:
        """Drop the held candidate; say how the rollout ended (from ``last_rollout``)."""
        live = await self._registry.remove_candidate(change.name)
        if live is not None:
            self._rollout_ended(change, live, why)

    def _rollout_ended(self, change: Change, live: LiveRollout, why: str | None) -> None:
        last = (change.document or {}).get("last_rollout")
        if not isinstance(last, Mapping) or last.get("revision") != live.revision:
            last = {}
        outcome = str(last.get("outcome") or ("promoted" if why == "promoted" else "aborted"))
        reason = last.get("reason") or why or live.abort_reason or "the record dropped it"
        self._events.emit(
            "rollout.promoted" if outcome == "promoted" else "rollout.aborted",
            plugin=change.name,
            candidate=live.candidate.version,
            revision=live.revision,
            outcome=outcome,
            reason=str(reason),
            by=last.get("by"),
            stats=last.get("stats") or live.stats(time.perf_counter()),
        )

    async def _promote(self, change: Change, slot: _Slot, record: PluginRecord) -> None:
        """The new stable record is the held candidate: promote it without recompiling."""
        name = record.name
        live = self._registry.rollouts.get(name)
        promoted, old = await self._registry.promote(name)
        slot.info = PluginInfo(
            name=name,
            version=promoted.version,
            revision=record.revision,
            loaded_at=promoted.loaded_at,
            status="serving",
        )
        self._events.emit(
            "plugin.reloaded",
            plugin=name,
            version=promoted.version,
            revision=record.revision,
            old_version=old.version if old is not None else None,
            new_version=promoted.version,
            reason=change.reason,
            promoted=True,
        )
        if live is not None:
            self._rollout_ended(change, live, "promoted")
        await self._sync_candidate(change, record)

    # -- batches (initial load, resync) ---------------------------------------------------

    def submit_many(self, changes: Iterable[Change]) -> None:
        """Queue many changes at once (a snapshot); the newest change per name wins.

        Names with no worker load in batches of up to :data:`BATCH_SIZE` records: one
        worker-thread hop compiles a whole batch, each record still under its own
        ``exec_timeout``. Names already loading get the change as :meth:`submit` gives it.
        Never blocks.
        """
        assert self._tg is not None, "Loader.bind() was not called"
        batch: list[tuple[str, _Slot]] = []
        for change in changes:
            slot = self._slots.get(change.name)
            if slot is None:
                slot = self._slots[change.name] = _Slot()
            slot.put(change)
            if slot.busy:
                continue  # its worker (or the batch holding it) takes the newest change
            slot.busy = True
            self._busy += 1
            batch.append((change.name, slot))
            if len(batch) >= BATCH_SIZE:
                self._tg.start_soon(self._work_batch, batch, name="load batch")
                batch = []
        if batch:
            self._tg.start_soon(self._work_batch, batch, name="load batch")

    async def _work_batch(self, items: list[tuple[str, _Slot]]) -> None:
        closed = False
        try:
            jobs: list[_Job] = []
            for _, slot in items:
                change, superseded = slot.take()
                if change is None:  # pragma: no cover - a batch member always has one
                    continue
                job = await self._prepare(change, slot, superseded)
                if job is not None:
                    jobs.append(job)
            if jobs:
                # Each version installs as soon as it is loaded (a slow record in the
                # batch holds up no other): those without a setup hook at once, in the
                # order they finish; those with one concurrently, so one slow setup does
                # not hold up the rest.
                send, receive = anyio.create_memory_object_stream[
                    tuple[int, Plugin | CompileError]
                ](math.inf)

                async def install_as_loaded() -> None:
                    async with receive, anyio.create_task_group() as installs:
                        async for index, plugin in receive:
                            if isinstance(plugin, Plugin) and plugin.setup is not None:
                                installs.start_soon(self._install, jobs[index], plugin)
                            else:
                                await self._install(jobs[index], plugin)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(install_as_loaded)
                    with send:
                        await compile_plugins(
                            [job.record for job in jobs],
                            exec_timeout=self._exec_timeout,
                            default_max_concurrency=self._default_max_concurrency,
                            processes=self._processes,
                            on_result=lambda index, plugin: send.send_nowait((index, plugin)),
                        )
        except HostClosed:
            closed = True
        except BaseExceptionGroup as group:
            matched, rest = group.split(HostClosed)
            closed = matched is not None
            if rest is not None:
                raise rest from None
        finally:
            assert self._tg is not None
            for name, slot in items:
                if slot.pending is not None and not closed:
                    # A newer change arrived while the batch ran: a worker of its own.
                    self._tg.start_soon(self._work, name, slot, name=f"load {name}")
                else:
                    self._release(name, slot)

    async def _unload(
        self, name: str, slot: _Slot, reason: str, record: PluginRecord | None = None
    ) -> None:
        old = await self._registry.remove(name)
        self._log_throttle.forget(name)
        if reason == "disabled":
            slot.info = PluginInfo(
                name=name, status="disabled", revision=record.revision if record else None
            )
        else:
            slot.info = None
        if old is not None:
            self._events.emit("plugin.unloaded", plugin=name, version=old.version, reason=reason)

    @staticmethod
    def _fail(slot: _Slot, name: str, error: str, still_serving: bool) -> None:
        info = slot.info or PluginInfo(name=name)
        info.last_error = error
        info.status = "degraded" if still_serving else "failed"
        slot.info = info


def change_from_event(event: Mapping[str, Any]) -> Change | None:
    """The :class:`Change` a document change event asks for (None if it asks for none)."""
    op = event.get("operationType")
    key = event.get("documentKey") or {}
    name = key.get("_id")
    if not isinstance(name, str):
        return None  # never a plugin name: see Loader.refuse_id (issue 13 item 7)
    wall = event.get("wallTime")
    if op in ("insert", "update", "replace"):
        doc = event.get("fullDocument")
        if doc is None:  # updateLookup found the document already deleted: a delete follows
            return None
        return Change(name, doc, wall, op)
    if op == "delete":
        return Change(name, None, wall, "deleted")
    return None
