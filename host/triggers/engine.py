"""The trigger engine: which of the declared triggers this host runs, and their runners.

The engine is a component of :class:`~host.PluginHost` with a narrow interface:
``run()`` in the host's task group, ``aclose(timeout)`` in its shutdown (after the
dispatcher stops taking calls and before the registry retires versions, so that events
in flight finish on their version), ``owned()`` and ``stats``.

Design note — spreading triggers over the fleet:

* Every ``poll`` seconds (and at once after a version of a plugin that has or had
  triggers goes live or is unloaded: see ``_concerns``) the engine lists the triggers the
  current versions declare, and the live hosts that serve each plugin (the hosts
  collection, :mod:`host.fleetview`; this host alone when it does not report its status).
* The *preferred* host of a trigger is the rendezvous-hash winner among those hosts
  (:func:`~host.triggers.lease.preferred_owner`). It takes a free lease at once; another
  host takes a released one (or creates a missing one) only after ``takeover_grace``,
  in case the preferred host cannot; an *expired* lease (its owner stopped renewing) is
  anyone's at once, so a dead owner's triggers move within about the TTL.
* A holder that is not the preferred host for two polls in a row hands the trigger over:
  it drains it (events in flight finish, final checkpoint, release), and the preferred
  host takes it at its next poll. So triggers spread as hosts join, and come back
  together as they leave.
* A trigger whose version's history policy ``fail`` stopped it keeps ``status: failed``
  in its state; no host starts it again until a new version of the plugin is current
  (``failed_version`` differs), so a failure is loud and stays visible.
* Disabling (or deleting) a plugin stops its runners with ``status: paused``: the
  checkpoint stays, and the trigger resumes from it when the plugin comes back.
"""

from __future__ import annotations

import os
import secrets
import socket
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus
from pymongo.errors import PyMongoError

from ..records import TriggerSpec
from .lease import (
    LeaseHolder,
    deadletters_collection_name,
    preferred_owner,
    server_now,
    state_collection_name,
    trigger_id,
)
from .options import TriggerOptions
from .runner import Runner, event_id_of, handle_event
from .stats import TriggerStats

if TYPE_CHECKING:
    from ..dispatch import Dispatcher
    from ..events import EventBus, HostEvent
    from ..registry import Registry

__all__ = ("TriggerEngine",)


def _format(exc: BaseException) -> str:
    # Reads source files (linecache): call it from a worker thread.
    return "".join(traceback.format_exception(exc))


_WAKE_EVENTS = frozenset({"plugin.loaded", "plugin.reloaded", "plugin.unloaded"})


@dataclass(slots=True)
class _Running:
    runner: Runner
    plugin: str
    spec: TriggerSpec
    done: anyio.Event
    not_preferred: int = 0


class TriggerEngine:
    """Runs the triggers of the current plugin versions that this host holds leases for.

    Args:
        database: The database of the functions collection.
        collection: The functions collection's name.
        registry: The host's registry (current versions).
        dispatcher: The host's dispatcher (runs the handlers).
        events: The host's event bus.
        options: Tuning.
        host_id: This host's owner id (the status reporter's, so the hosts collection
            names the same host); default ``hostname:pid:random``.
        hosts_collection: The hosts collection to spread over, or None to run alone.
        drain_timeout: How long a stopping runner lets its events in flight finish.
    """

    def __init__(
        self,
        database: Any,
        collection: str,
        *,
        registry: Registry,
        dispatcher: Dispatcher,
        events: EventBus,
        options: TriggerOptions,
        host_id: str | None = None,
        hosts_collection: str | None = None,
        drain_timeout: float = 10.0,
    ) -> None:
        self._db = database
        self._drain_timeout = drain_timeout
        self._registry = registry
        self._dispatcher = dispatcher
        self._events = events
        self.options = options
        self.host_id = (
            options.host_id
            or host_id
            or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        )
        self.state_collection = state_collection_name(collection)
        self.deadletters_collection = deadletters_collection_name(collection)
        self._state = database[self.state_collection]
        self._deadletters = database[self.deadletters_collection]
        self._functions = collection
        self._hosts = database[hosts_collection] if hosts_collection is not None else None
        self.stats = TriggerStats()
        # INVARIANT: _running holds exactly the triggers whose runner task is alive here
        # (added before the task starts, removed when it ends); a trigger id is in it at
        # most once, so this host never runs two runners of one trigger.
        self._running: dict[str, _Running] = {}
        self._first_seen: dict[str, float] = {}
        # INVARIANT (wakes): _with_triggers holds every plugin that declared a trigger at
        # the last _reconcile or runs one here, plus any whose version declared one when
        # its event came; a load/reload/unload of any other plugin cannot change what
        # _reconcile does, so its event is filtered out in emit (see _concerns).
        self._with_triggers: set[str] = set()
        self.wakeups = 0
        """Plugin events that woke the reconcile loop (a count, for tests and debugging)."""
        self._wake = anyio.Event()
        self._closing = False
        self._tg: Any = None
        self._stopped = anyio.Event()

    # -- public ----------------------------------------------------------------------

    def owned(self) -> dict[str, str]:
        """Triggers running on this host now: trigger id -> plugin."""
        return {tid: r.plugin for tid, r in self._running.items()}

    @property
    def in_flight(self) -> int:
        """Trigger handlers running now on this host."""
        return self.stats.in_flight

    async def handle(self, tid: str, event: Mapping[str, Any]) -> None:
        """Run one event through the current version's handler of trigger ``tid``, once.

        For re-running a dead letter (``deadletter retry``): ``ctx.event_id`` is the
        event's own (its ``_id``), ``ctx.attempt`` is 1. No lease is needed or taken, and
        the checkpoint does not move.

        Args:
            tid: The trigger id, ``"<plugin>/<name>"``.
            event: The change event (as stored in the dead letter).

        Raises:
            KeyError: No current version declares trigger ``tid``.
            PluginError: The handler failed (``PluginFailed`` carries its traceback) or
                timed out.
        """
        declared = self._declared().get(tid)
        plugin = self._registry.get(declared[0]) if declared is not None else None
        if declared is None or plugin is None:
            raise KeyError(f"no current plugin version declares trigger {tid!r}")
        await handle_event(
            self._dispatcher,
            plugin,
            tid,
            declared[1],
            event,
            event_id=event_id_of(event.get("_id")),
            attempt=1,
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Reconcile the triggers this host runs until :meth:`aclose`."""
        subscription = self._events.subscribe(0, accept=self._concerns)
        try:
            async with subscription, anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._follow, subscription)
                task_status.started()
                while not self._closing:
                    delay = self.options.poll_seconds
                    try:
                        if self.options.acquire:
                            delay = min(delay, await self._reconcile())
                    except PyMongoError as exc:
                        self._events.emit("trigger.poll_failed", "warning", error=str(exc))
                    except Exception as exc:  # a bug must not stop the host's calls
                        self._events.emit(
                            "trigger.poll_failed",
                            "error",
                            error=f"{type(exc).__qualname__}: {exc}",
                            traceback=await anyio.to_thread.run_sync(_format, exc),
                        )
                    with anyio.move_on_after(delay):
                        await self._wake.wait()
                    self._wake = anyio.Event()
                await self._wait_runners()
                tg.cancel_scope.cancel()
        finally:
            self._stopped.set()

    async def aclose(self, timeout: float) -> None:  # noqa: ASYNC109 - the drain bound
        """Drain: every runner stops reading, finishes its events in flight (up to
        ``timeout`` seconds), writes its final checkpoint and releases its lease."""
        self._closing = True
        for running in self._running.values():
            running.runner.stop("waiting")
        self._wake.set()
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout + 6.0):
            await self._wait_runners()
            if self._tg is not None:
                await self._stopped.wait()

    # -- internals ---------------------------------------------------------------------

    async def _follow(self, subscription: Any) -> None:
        async for _event in subscription:  # only what _concerns accepted
            self.wakeups += 1
            self._wake.set()

    def _concerns(self, event: HostEvent) -> bool:
        """Whether ``event`` can change what :meth:`_reconcile` does (runs in ``emit``).

        A version of a plugin with triggers went live or was unloaded, or one of a plugin
        that had some (its runners must stop). A reload storm of plugins without
        triggers wakes nothing: the subscription's reader task cost 5-9% of a storm's
        loop time when it woke for every host event.
        """
        if event.event not in _WAKE_EVENTS:
            return False
        name = event.fields.get("plugin")
        if not isinstance(name, str) or name in self._with_triggers:
            return True
        plugin = self._registry.get(name)
        if plugin is None or not plugin.record.triggers:
            return False
        self._with_triggers.add(name)
        return True

    async def _wait_runners(self) -> None:
        for running in tuple(self._running.values()):
            await running.done.wait()

    def _declared(self) -> dict[str, tuple[str, TriggerSpec, str]]:
        out: dict[str, tuple[str, TriggerSpec, str]] = {}
        for name, plugin in self._registry.items():
            for spec in plugin.record.triggers:
                out[trigger_id(name, spec.name)] = (name, spec, plugin.version)
        return out

    async def _live_hosts(self) -> dict[str, set[str]] | None:
        """Plugin -> ids of the live, not draining hosts serving it (None: unknown)."""
        if self._hosts is None:
            return None
        from ..fleetview import host_status  # only hosts that report read it

        docs = [d async for d in self._hosts.find({}, {"refused": 0})]
        now = await server_now(self._db)
        serving: dict[str, set[str]] = {}
        for doc in docs:
            status = host_status(doc, now)
            if not status.counted:
                continue
            for plugin in status.plugins:
                serving.setdefault(plugin, set()).add(status.id)
        return serving

    async def _reconcile(self) -> float:
        """Start, stop and hand over runners; return when to look again (seconds).

        The next look is at the poll interval, or just after the earliest expiry of a
        lease another host holds on a trigger declared here (so a dead owner's trigger
        moves within about the TTL, not the TTL plus a poll).
        """
        next_look = self.options.poll_seconds
        declared = self._declared()
        self._with_triggers = {d[0] for d in declared.values()} | {
            r.plugin for r in self._running.values()
        }
        # Stop what is no longer declared as it runs (plugin disabled, trigger changed).
        for tid, running in tuple(self._running.items()):
            wanted = declared.get(tid)
            if wanted is None:
                running.runner.stop("paused")
            elif wanted[1] != running.spec:
                running.runner.stop("waiting")  # restarts from its checkpoint, new spec
        now = anyio.current_time()
        for tid in tuple(self._first_seen):
            if tid not in declared:
                del self._first_seen[tid]
        if not declared or self._closing:
            return next_look
        hosts = await self._live_hosts()
        clock = await server_now(self._db)
        docs = {
            d["_id"]: d
            async for d in self._state.find(
                {"_id": {"$in": list(declared)}},
                {"owner": 1, "status": 1, "failed_version": 1, "lease_expires": 1},
            )
        }
        for tid, (plugin, spec, version) in declared.items():
            self._first_seen.setdefault(tid, now)
            serving = {self.host_id} | (hosts or {}).get(plugin, set())
            preferred = preferred_owner(tid, serving) == self.host_id
            current = self._running.get(tid)
            if current is not None:
                current.not_preferred = 0 if preferred else current.not_preferred + 1
                if current.not_preferred >= 2:
                    current.runner.stop("waiting")  # hand over to the preferred host
                continue
            doc = docs.get(tid)
            failed = doc is not None and doc.get("status") == "failed"
            if failed and doc is not None and doc.get("failed_version") == version:
                continue
            if doc is not None and doc.get("owner") not in (None, self.host_id):
                # Held by another host: only an expired lease is worth a try (the
                # acquisition re-checks it in its compare-and-set).
                left = self._lease_left(doc.get("lease_expires"), clock)
                if left > 0:
                    next_look = min(next_look, left + 0.05)
                    continue
            waited = now - self._first_seen[tid] >= self.options.grace_seconds
            if not preferred and doc is None and not waited:
                continue
            await self._try_start(tid, plugin, spec, preferred=preferred)
        return next_look

    @staticmethod
    def _lease_left(expires: Any, clock: datetime) -> float:
        """Seconds until a lease expires by the server's clock (<= 0: expired)."""
        if not isinstance(expires, datetime):
            return 0.0
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
        return float((expires - clock).total_seconds())

    async def _try_start(
        self, tid: str, plugin: str, spec: TriggerSpec, *, preferred: bool
    ) -> None:
        lease = LeaseHolder(self._state, self._db, tid, self.host_id, self.options.lease_ttl)
        fields: Mapping[str, Any] = {
            "plugin": plugin,
            "name": spec.name,
            "collection": spec.collection,
            "status": "starting",  # "running" once its change stream is open (Runner._read)
            "error": None,
        }
        grace = 0.0 if preferred else self.options.grace_seconds
        doc = await lease.acquire(fields, grace=grace, create=True)
        if doc is None or self._closing:
            if doc is not None:
                await lease.release({"status": "waiting"})
            return
        self._events.emit(
            "trigger.lease_acquired",
            trigger=tid,
            plugin=plugin,
            host=self.host_id,
            epoch=lease.epoch,
            preferred=preferred,
        )
        runner = Runner(
            tid,
            plugin,
            spec,
            db=self._db,
            state=self._state,
            deadletters=self._deadletters,
            registry=self._registry,
            dispatcher=self._dispatcher,
            events=self._events,
            stats=self.stats,
            options=self.options,
            lease=lease,
            doc=doc,
        )
        running = self._running[tid] = _Running(runner, plugin, spec, anyio.Event())
        self.stats.owned = len(self._running)
        assert self._tg is not None
        self._tg.start_soon(self._run_one, tid, running, name=f"trigger {tid}")

    async def _run_one(self, tid: str, running: _Running) -> None:
        try:
            await running.runner.run(drain_timeout=self._drain_timeout)
        except Exception as exc:  # a bug or an unexpected error: this trigger, not the host
            self._events.emit(
                "trigger.crashed",
                "error",
                trigger=tid,
                plugin=running.plugin,
                error_type=type(exc).__qualname__,
                error=str(exc),
                traceback=await anyio.to_thread.run_sync(_format, exc),
            )
        finally:
            if self._running.get(tid) is running:
                del self._running[tid]
            self.stats.owned = len(self._running)
            running.done.set()
            self._wake.set()  # a paused/handed-over/changed trigger may restart at once
