"""Status write-back: each host keeps one document in the hosts collection saying what it serves.

The hosts collection sits beside the functions collection (``functions`` →
``functions_hosts``). One document per running host::

    {_id: "web-1:4242:9f3a", instance: "9f3a…", hostname, pid, version: "0.1.0",
     namespace: "app.functions", started_at, ready, draining,
     heartbeat: <server time>, heartbeat_s: 5.0, ttl_s: 15.0, seq: 17,
     plugins: [{name, version: "greet@r7:3f9a1c2e", revision: 7,
                candidate: {version, revision, mode, weight} | null,
                stats: {stable: <Stats>, candidate: <Stats>} | null,
                held?: ["greet@r6:0b1c2d3e", ...]}],
     refused: [{name, revision, version, stage, error, at, candidate?: true}]}

``candidate`` and ``stats`` are the plugin's running rollout as this host sees it
(issue 16; ``<Stats>`` is ``{calls, failures, timeouts, error_rate, p50_ms, p99_ms}`` over
the policy's window). While a rollout runs, every heartbeat is a full write, so the
statistics are at most one heartbeat old.

``held`` lists, newest first, the replaced versions the host still holds for pinned
calls (``held_versions``, issue 16): a call pinned to one of them (``X-Plugin-Version``)
is served there. The key is absent when the host holds none (the default,
``held_versions=0``), so the document does not grow for hosts that do not hold. The held
set changes only when a version is installed, promoted or removed, each of which emits an
event below, so it is current as of the last write.

``heartbeat`` is set by the server (``$currentDate``), so readers judge a host's age
against the server's clock and the hosts' clocks do not matter. A TTL index on
``heartbeat`` is the garbage collector of hosts that died; whether a host is *alive* is
decided by readers (:mod:`host.fleetview`) from the heartbeat's age and the host's own
``ttl_s``, never from the document's mere presence.

Design note — one writer, coalesced, off the call path:

* The reporter follows the host's event bus (``plugin.loaded``/``reloaded``/``unloaded``,
  ``plugin.reload_failed``/``rejected``, ``watch.started``...). An event only records a
  refusal and marks the state dirty; it never writes. Calls never touch the reporter.
* INVARIANT: at most one write is in flight. A single writer task owns the document; it
  snapshots the whole state (what ``host.plugins()`` serves now, plus the refusals) at
  the start of each write, so the changes made while a write is in flight are coalesced
  into the next one, and each write carries everything older than its snapshot.
* INVARIANT: ``seq`` increases by one per write attempt of this instance, and writes are
  applied in ``seq`` order (they are sequential), so the last write wins and a reader
  that sees ``seq`` N has every change this host made before write N started.
* A heartbeat with nothing new touches only ``heartbeat``/``seq``/``ready``/``draining``
  (a host with 10,000 plugins does not rewrite them every 5 s); it falls back to a full
  write when its document is gone (expired by the TTL index during a partition, or
  deleted by hand).
* Shutdown: the writer finishes the write in flight (never cancelled mid-write, or the
  server could apply it after the delete and resurrect the document), then the host
  deletes its own document, matching its ``instance`` so a successor that reuses the
  same ``host_id`` keeps its own.
* A host that cannot write (a read-only MongoDB user, a failpoint, a partition) keeps
  serving: ``fleet.report_failed`` is logged once, ``fleet.report_recovered`` when a
  write succeeds again, and the writer retries on every heartbeat.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from typing import Any, Protocol

import anyio
from anyio.abc import TaskStatus
from pymongo import ASCENDING
from pymongo.errors import OperationFailure, PyMongoError

from .events import EventBus, HostEvent, Subscription
from .loader import PluginInfo
from .plugin import Plugin
from .rollout import LiveRollout

__all__ = (
    "HOSTS_SUFFIX",
    "TTL_INDEX",
    "Refusal",
    "StatusReporter",
    "StatusReporting",
    "hosts_collection_name",
    "plugin_host_version",
    "revision_in_version",
)

HOSTS_SUFFIX = "_hosts"
TTL_INDEX = "heartbeat_ttl"
"""Name of the TTL index on ``heartbeat`` that removes the documents of dead hosts."""

# Events after which the document may be out of date.
_STATE_EVENTS = frozenset(
    {
        "plugin.loaded",
        "plugin.reloaded",
        "plugin.unloaded",
        "plugin.reload_failed",
        "plugin.rejected",
        "rollout.started",
        "rollout.weight_changed",
        "rollout.promoted",
        "rollout.aborted",
        "rollout.auto_abort",
        "watch.started",
        "watch.resynced",
        "watch.invalidated",
    }
)
_ERROR_LIMIT = 2_000  # characters of a refusal's error kept in the document


def hosts_collection_name(collection: str) -> str:
    """The hosts collection paired with ``collection`` (``functions`` → ``functions_hosts``)."""
    return f"{collection}{HOSTS_SUFFIX}"


@functools.cache
def plugin_host_version() -> str:
    """The installed plugin-host version (``unknown`` when run from a bare checkout).

    It reads package metadata from disk: call it from a worker thread in async code.
    """
    try:
        return metadata.version("plugin-host")
    except metadata.PackageNotFoundError:  # pragma: no cover - always installed here
        return "unknown"


@dataclass(frozen=True, slots=True)
class StatusReporting:
    """How a host reports its status (``PluginHost(report_status=StatusReporting(...))``).

    Attributes:
        heartbeat: Seconds between heartbeats.
        ttl: Seconds after its last heartbeat a host stops counting as alive, and the
            ``expireAfterSeconds`` of the TTL index that removes dead hosts (default
            three heartbeats).
        collection: The hosts collection (default ``<functions collection>_hosts``).
        host_id: This host's id (default ``hostname:pid:random``). Give each process its
            own; a restarted process may reuse its predecessor's (a pod name, say).
    """

    heartbeat: float = 5.0
    ttl: float | None = None
    collection: str | None = None
    host_id: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.heartbeat) and self.heartbeat > 0):
            raise ValueError(f"heartbeat must be a positive number of seconds: {self.heartbeat}")
        if self.ttl is not None and not (math.isfinite(self.ttl) and self.ttl > self.heartbeat):
            raise ValueError(
                f"ttl ({self.ttl} s) must be longer than the heartbeat ({self.heartbeat} s)"
            )
        if self.host_id is not None and not self.host_id.strip():
            raise ValueError("host_id must not be empty")

    @property
    def ttl_seconds(self) -> float:
        """The effective TTL: ``ttl``, or three heartbeats."""
        return self.ttl if self.ttl is not None else 3 * self.heartbeat


@dataclass(frozen=True, slots=True)
class Refusal:
    """A version this host refused to serve.

    Attributes:
        name: The plugin.
        revision: The refused record's revision (None if it had none).
        version: The refused version, when it got far enough to have one.
        stage: Where it failed: ``import``, ``syntax``, ``setup``, ``timeout``,
            ``signature``, ``validate``...
        error: What went wrong (one line, truncated).
        at: When (this host's clock).
        candidate: It was a rollout's candidate (the stable version kept serving).
    """

    name: str
    revision: int | None
    version: str | None
    stage: str
    error: str
    at: datetime
    candidate: bool = False

    def as_document(self) -> dict[str, Any]:
        """The form stored in the hosts collection."""
        doc = {
            "name": self.name,
            "revision": self.revision,
            "version": self.version,
            "stage": self.stage,
            "error": self.error,
            "at": self.at,
        }
        if self.candidate:
            doc["candidate"] = True
        return doc


class ReportedHost(Protocol):
    """What the reporter reads from a host (``PluginHost`` has all of it)."""

    @property
    def is_ready(self) -> bool:
        """Initial load done and the stream live."""

    @property
    def draining(self) -> bool:
        """Shutdown has begun."""

    def plugins(self) -> list[PluginInfo]:
        """What the host knows of each plugin."""

    def rollouts(self) -> Mapping[str, LiveRollout]:
        """The rollouts running on the host, by plugin name."""

    def held(self, name: str) -> tuple[Plugin, ...]:
        """The replaced versions of ``name`` held for pinned calls, newest first."""


def revision_in_version(version: object) -> int | None:
    """The revision a version string names (``greet@r7:3f9a1c2e`` → 7), else None."""
    if isinstance(version, str) and "@r" in version:
        digits = version.rpartition("@r")[2].partition(":")[0]
        if digits.isdigit():
            return int(digits)
    return None


def _revision_of(event: HostEvent) -> int | None:
    revision = event.get("revision")
    if isinstance(revision, int) and not isinstance(revision, bool):
        return revision
    return revision_in_version(event.get("version"))


def refusal_from_event(event: HostEvent) -> Refusal | None:
    """The refusal a ``plugin.reload_failed`` / ``plugin.rejected`` event reports, else None."""
    if event.event not in ("plugin.reload_failed", "plugin.rejected"):
        return None
    if event.event == "plugin.rejected":
        field_name = str(event.get("field") or "record")
        stage = "signature" if field_name.endswith("signature") else "validate"
    else:
        stage = str(event.get("stage") or "unknown")
    version = event.get("version")
    error = str(event.get("error") or "")
    return Refusal(
        name=str(event.get("plugin")),
        revision=_revision_of(event),
        version=version if isinstance(version, str) else None,
        stage=stage,
        error=error[:_ERROR_LIMIT],
        at=event.at,
        candidate=bool(event.get("candidate")),
    )


@dataclass(slots=True)
class _State:
    dirty_since: float | None = None  # monotonic time of the oldest unreported change
    refused: dict[str, Refusal] = field(default_factory=dict)


class StatusReporter:
    """Keeps this host's document in the hosts collection up to date.

    Run :meth:`run` in the host's task group (``await tg.start(reporter.run)``), and call
    :meth:`aclose` at shutdown, after the host has drained.

    Args:
        host: The host whose state is reported.
        database: The database holding the functions collection.
        functions: The functions collection's name.
        events: The host's event bus (the reporter both follows and emits on it).
        options: Heartbeat, TTL, collection and host id.
    """

    def __init__(
        self,
        host: ReportedHost,
        database: Any,
        functions: str,
        events: EventBus,
        options: StatusReporting,
    ) -> None:
        self._host = host
        self._events = events
        self.options = options
        self.collection_name = options.collection or hosts_collection_name(functions)
        self._coll = database[self.collection_name]
        self.instance = secrets.token_hex(8)
        hostname = socket.gethostname()
        self.host_id = options.host_id or f"{hostname}:{os.getpid()}:{self.instance[:6]}"
        self._identity: dict[str, Any] = {
            "instance": self.instance,
            "hostname": hostname,
            "pid": os.getpid(),
            "version": None,  # filled in by run() (reading it touches the disk)
            "namespace": f"{database.name}.{functions}",
            "started_at": datetime.now(UTC),
            "heartbeat_s": options.heartbeat,
            "ttl_s": options.ttl_seconds,
        }
        self.seq = 0
        self.writes = 0
        self.failures = 0
        self._state = _State()
        self._wake = anyio.Event()
        self._closing = False
        self._started = False
        self._stopped = anyio.Event()
        self._failing = False
        self._indexed = False
        self._need_full = True

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the host's events and write the document until :meth:`aclose`."""
        # Subscribed before started(): no refusal emitted after this point is missed.
        subscription = self._events.subscribe(0)
        self._started = True
        try:
            async with subscription:
                self._identity["version"] = await anyio.to_thread.run_sync(plugin_host_version)
                self._mark_dirty()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._follow, subscription)
                    task_status.started()
                    await self._write_loop()
                    tg.cancel_scope.cancel()
        finally:
            self._stopped.set()

    async def aclose(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - shutdown bound
        """Stop writing and delete this host's document (bounded by ``timeout`` seconds).

        The write in flight, if any, finishes first (see the module's design note).
        """
        self._closing = True
        self._wake.set()
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
            if self._started:
                await self._stopped.wait()
            try:
                await self._coll.delete_one({"_id": self.host_id, "instance": self.instance})
            except PyMongoError as exc:
                self._events.emit(
                    "fleet.unregister_failed", "warning", host=self.host_id, error=str(exc)
                )

    def notify(self) -> None:
        """Something the document shows changed (draining, say): write it soon."""
        self._mark_dirty()

    # -- events --------------------------------------------------------------------------

    def _mark_dirty(self) -> None:
        if self._state.dirty_since is None:
            self._state.dirty_since = time.monotonic()
        self._wake.set()

    async def _follow(self, subscription: Subscription) -> None:
        async for event in subscription:
            if event.event not in _STATE_EVENTS:
                continue
            refusal = refusal_from_event(event)
            if refusal is not None:
                # A candidate's refusal does not hide the stable version's, nor the reverse.
                key = f"{refusal.name}\x00candidate" if refusal.candidate else refusal.name
                self._state.refused[key] = refusal
            self._mark_dirty()

    # -- writes --------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        interval = self.options.heartbeat
        next_beat = time.monotonic()
        while True:
            with anyio.move_on_after(max(0.0, next_beat - time.monotonic())):
                await self._wake.wait()
            if self._closing:  # set by aclose() (it wakes this loop)
                return
            # A change from here on sets the new event: the next round writes it.
            self._wake = anyio.Event()
            await self._write()
            next_beat = time.monotonic() + interval

    def _document(self) -> dict[str, Any]:
        served = []
        rollouts = self._host.rollouts()
        now = time.perf_counter()
        for info in sorted(self._host.plugins(), key=lambda i: i.name):
            if info.version is not None and info.status in ("serving", "degraded"):
                live = rollouts.get(info.name)
                entry: dict[str, Any] = {
                    "name": info.name,
                    "version": info.version,
                    "revision": info.revision,
                    "candidate": live.describe() if live is not None else None,
                    "stats": live.stats(now) if live is not None else None,
                }
                held = self._host.held(info.name)
                if held:  # absent when none: the default hosts document stays as small
                    entry["held"] = [plugin.version for plugin in held]
                served.append(entry)
        return {
            **self._identity,
            "ready": self._host.is_ready,
            "draining": self._host.draining,
            "seq": self.seq,
            "plugins": served,
            "refused": [r.as_document() for _, r in sorted(self._state.refused.items())],
        }

    async def _ensure_index(self) -> None:
        if self._indexed:
            return
        try:
            await self._coll.create_index(
                [("heartbeat", ASCENDING)],
                name=TTL_INDEX,
                expireAfterSeconds=math.ceil(self.options.ttl_seconds),
            )
        except OperationFailure as exc:
            if exc.code not in (85, 86):  # IndexOptionsConflict / IndexKeySpecsConflict
                raise
            # Another host made it with another TTL: it still collects dead hosts.
        self._indexed = True

    async def _write(self) -> None:
        dirty_since = self._state.dirty_since
        # While a rollout runs, every heartbeat carries fresh statistics (a full write).
        full = dirty_since is not None or self._need_full or bool(self._host.rollouts())
        self._state.dirty_since = None
        self.seq += 1
        started = time.monotonic()
        try:
            await self._ensure_index()
            if full:
                await self._write_full()
            else:
                result = await self._coll.update_one(
                    {"_id": self.host_id, "instance": self.instance},
                    {
                        "$set": {
                            "seq": self.seq,
                            "ready": self._host.is_ready,
                            "draining": self._host.draining,
                        },
                        "$currentDate": {"heartbeat": True},
                    },
                )
                if result.matched_count == 0:  # expired or deleted: write it whole again
                    full = True
                    await self._write_full()
        except PyMongoError as exc:
            self.failures += 1
            # Not reported: keep the oldest change time, so the lag counts the outage.
            if dirty_since is not None:
                self._state.dirty_since = (
                    dirty_since
                    if self._state.dirty_since is None
                    else min(dirty_since, self._state.dirty_since)
                )
            self._need_full = True
            if not self._failing:
                self._failing = True
                self._events.emit(
                    "fleet.report_failed",
                    "warning",
                    host=self.host_id,
                    collection=self.collection_name,
                    error=str(exc),
                    hint="the host keeps serving; `plugin-host status` will not show it "
                    "(its MongoDB user needs insert/update/remove/createIndex on this "
                    "collection)",
                )
            return
        now = time.monotonic()
        self.writes += 1
        self._need_full = False
        if self._failing:
            self._failing = False
            self._events.emit("fleet.report_recovered", host=self.host_id, seq=self.seq)
        fields: dict[str, Any] = {
            "host": self.host_id,
            "seq": self.seq,
            "kind": "full" if full else "heartbeat",
            "write_ms": round((now - started) * 1000.0, 3),
        }
        if dirty_since is not None:
            fields["lag_ms"] = round((now - dirty_since) * 1000.0, 3)
        self._events.emit("fleet.reported", "debug", **fields)

    async def _write_full(self) -> None:
        doc = self._document()
        await self._coll.update_one(
            {"_id": self.host_id},
            {"$set": doc, "$currentDate": {"heartbeat": True}},
            upsert=True,
        )


def served_map(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: {"version", "revision"}}`` of a hosts-collection document's ``plugins``."""
    out: dict[str, dict[str, Any]] = {}
    for item in doc.get("plugins") or ():
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            out[item["name"]] = {"version": item.get("version"), "revision": item.get("revision")}
    return out
