"""The fleet as readers see it: who serves what, who refused it, and waiting for convergence.

Shared by ``plugin-host status``, the daemon's ``GET /fleet`` and ``push --wait`` (and
:func:`host.publish.wait_converged` for Python callers). The hosts write their documents
(:mod:`host.fleet`); this module only reads.

*Alive* is judged against the server's clock: a host is alive while its ``heartbeat``
(set by the server with ``$currentDate``) is younger than its own ``ttl_s``, measured
from the server's ``localTime`` (``hello``). Host clocks never enter into it. A host that
is draining is alive but no longer counted as serving: the fleet has converged when every
live host that is not draining serves the revision.

Waiting (:func:`wait_for_fleet`) reads the hosts collection once, then follows a change
stream on it (started at the ``operationTime`` of the same ``hello``, so no write between
the two is missed): no polling. Between events it re-judges liveness on the estimated
server clock, so a host killed with ``kill -9`` drops out when its TTL passes even though
no event says so.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from pymongo import ASCENDING

from .errors import PluginHostError
from .fleet import hosts_collection_name, served_map
from .rolloutview import held_reports, last_rollout_view, plugin_reports, rollout_view, sum_held

__all__ = (
    "Convergence",
    "FleetRefused",
    "FleetStatus",
    "FleetTimeout",
    "FleetWaitError",
    "HostStatus",
    "PluginFleet",
    "Progress",
    "Target",
    "fleet_status",
    "host_fleet_status",
    "summarize",
    "wait_for_fleet",
)

LATE_HEARTBEATS = 2.0
"""A heartbeat older than this many intervals is *late* (listed by ``status``)."""

_MAX_AWAIT_MS = 250  # a change stream getMore waits this long for events at most


def _utc(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class HostStatus:
    """One host, as its document and the server's clock describe it.

    Attributes:
        id: The host id.
        hostname: Where it runs.
        pid: Its process id.
        version: Its plugin-host version.
        ready: Initial load done and stream live (as of its last write).
        draining: Shutting down.
        alive: Its heartbeat is younger than its TTL (server clock).
        late: Its heartbeat is older than two heartbeat intervals.
        age_s: Seconds since its last heartbeat (server clock).
        heartbeat_s: Its heartbeat interval.
        ttl_s: Its TTL.
        seq: Its last write's sequence number.
        plugins: ``{name: {"version", "revision"}}`` it serves.
        refused: ``{name: {"revision", "version", "stage", "error", "at"}}``: the last
            version of each plugin it refused.
        refused_candidates: As ``refused``, for rollout candidates it refused.
        candidates: ``{name: {"version", "revision", "mode", "weight"}}``: the rollout
            candidates it holds beside the stable versions.
        stats: ``{name: {"stable": <Stats>, "candidate": <Stats>}}`` while a rollout runs.
        held: ``{name: (version, ...)}``: the replaced versions it holds for pinned calls
            (``held_versions``), newest first; names holding none are absent.
    """

    id: str
    hostname: str
    pid: int | None
    version: str | None
    ready: bool
    draining: bool
    alive: bool
    late: bool
    age_s: float
    heartbeat_s: float
    ttl_s: float
    seq: int
    plugins: Mapping[str, Mapping[str, Any]]
    refused: Mapping[str, Mapping[str, Any]]
    refused_candidates: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    candidates: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    stats: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    held: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def counted(self) -> bool:
        """Alive and not draining: a host the fleet waits for."""
        return self.alive and not self.draining

    def serving_revision(self, name: str) -> int | None:
        """The revision of ``name`` this host serves, or None."""
        revision = (self.plugins.get(name) or {}).get("revision")
        return revision if isinstance(revision, int) else None

    def refusal(self, name: str, at_least: int | None) -> Mapping[str, Any] | None:
        """Its refusal of ``name`` at revision ``at_least`` or newer, if it serves older."""
        refused = self.refused.get(name)
        if refused is None or at_least is None:
            return None
        revision = refused.get("revision")
        if not isinstance(revision, int) or revision < at_least:
            return None
        serving = self.serving_revision(name)
        if serving is not None and serving >= at_least:
            return None  # it refused once, then took a later one (or the same, retried)
        return refused

    def candidate_refusal(self, name: str, revision: Any) -> Mapping[str, Any] | None:
        """Its refusal of candidate ``revision`` (or newer) of ``name``, unless it holds it."""
        refused = self.refused_candidates.get(name)
        if refused is None or not isinstance(revision, int):
            return None
        refused_rev = refused.get("revision")
        if not isinstance(refused_rev, int) or refused_rev < revision:
            return None
        if (self.candidates.get(name) or {}).get("revision") == revision:
            return None
        return refused

    def _plugin_dict(self, name: str, served: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(served)
        if name in self.candidates:
            out["candidate"] = dict(self.candidates[name])
        if name in self.stats:
            out["stats"] = dict(self.stats[name])
        if name in self.held:
            out["held"] = list(self.held[name])
        return out

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of ``status --json`` / ``GET /fleet``."""
        return {
            "id": self.id,
            "hostname": self.hostname,
            "pid": self.pid,
            "version": self.version,
            "alive": self.alive,
            "late": self.late,
            "ready": self.ready,
            "draining": self.draining,
            "age_s": round(self.age_s, 3),
            "heartbeat_s": self.heartbeat_s,
            "ttl_s": self.ttl_s,
            "seq": self.seq,
            "plugins": {n: self._plugin_dict(n, p) for n, p in sorted(self.plugins.items())},
            "refused": _refusals(self.refused),
            "refused_candidates": _refusals(self.refused_candidates),
        }


def _refusals(refused: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {
        name: {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in r.items()}
        for name, r in sorted(refused.items())
    }


def host_status(doc: Mapping[str, Any], server_now: datetime) -> HostStatus:
    """Judge one hosts-collection document at ``server_now`` (the server's clock)."""
    heartbeat = _utc(doc.get("heartbeat"))
    age = (server_now - heartbeat).total_seconds() if heartbeat is not None else math.inf
    interval = float(doc.get("heartbeat_s") or 5.0)
    ttl = float(doc.get("ttl_s") or 3 * interval)
    refused: dict[str, Mapping[str, Any]] = {}
    refused_candidates: dict[str, Mapping[str, Any]] = {}
    for item in doc.get("refused") or ():
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            # A candidate's refusal and the stable version's are kept apart (issue 16).
            into = refused_candidates if item.get("candidate") else refused
            into[item["name"]] = {k: v for k, v in item.items() if k != "name"}
    pid = doc.get("pid")
    seq = doc.get("seq")
    return HostStatus(
        id=str(doc.get("_id")),
        hostname=str(doc.get("hostname") or ""),
        pid=pid if isinstance(pid, int) else None,
        version=doc.get("version") if isinstance(doc.get("version"), str) else None,
        ready=bool(doc.get("ready")),
        draining=bool(doc.get("draining")),
        alive=age <= ttl,
        late=age > LATE_HEARTBEATS * interval,
        age_s=max(age, 0.0),
        heartbeat_s=interval,
        ttl_s=ttl,
        seq=seq if isinstance(seq, int) else 0,
        plugins=served_map(doc),
        refused=refused,
        refused_candidates=refused_candidates,
        candidates=plugin_reports(doc, "candidate"),
        stats=plugin_reports(doc, "stats"),
        held=held_reports(doc),
    )


@dataclass(frozen=True, slots=True)
class PluginFleet:
    """One plugin across the fleet.

    Attributes:
        name: The plugin.
        revision: The latest revision in the functions collection (None: no record).
        enabled: The record is enabled (False: hosts should unload it; no record: False).
        hosts_alive: Live hosts that are not draining.
        hosts_serving: Those of them serving ``revision`` (for a disabled or deleted
            plugin: those serving nothing of it).
        behind: ``(host id, revision served or None)`` of the others.
        rejected: ``{"host", "revision", "stage", "error"}`` of live hosts that refused
            ``revision`` and serve an older one.
        converged: At least one live host, and every one of them serves ``revision``.
        rollout: The running rollout, summed over the live hosts (see
            :func:`host.rolloutview.rollout_view`); None when there is none.
        last_rollout: How the previous rollout ended (the record's ``last_rollout``).
        held: ``{"version", "revision", "hosts"}`` of each replaced version live hosts
            hold for pinned calls (``held_versions``), newest first (see
            :func:`host.rolloutview.sum_held`); empty when none is held.
    """

    name: str
    revision: int | None
    enabled: bool
    hosts_alive: int
    hosts_serving: int
    behind: tuple[tuple[str, int | None], ...]
    rejected: tuple[Mapping[str, Any], ...]
    converged: bool
    rollout: Mapping[str, Any] | None = None
    last_rollout: Mapping[str, Any] | None = None
    held: tuple[Mapping[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of ``status --json`` / ``GET /fleet``."""
        return {
            "revision": self.revision,
            "enabled": self.enabled,
            "hosts_alive": self.hosts_alive,
            "hosts_serving": self.hosts_serving,
            "converged": self.converged,
            "behind": [{"host": h, "revision": r} for h, r in self.behind],
            "rejected": [dict(r) for r in self.rejected],
            "rollout": dict(self.rollout) if self.rollout is not None else None,
            "last_rollout": dict(self.last_rollout) if self.last_rollout is not None else None,
            "held": [dict(h) for h in self.held],
        }


@dataclass(frozen=True, slots=True)
class Target:
    """What a plugin must become on every live host.

    Attributes:
        name: The plugin.
        revision: The revision every host must serve (or a newer one); None: the plugin
            must be unloaded everywhere (after ``disable`` or ``delete``).
        candidate: A rollout's candidate revision every host must hold beside it.
        weight: ... at this weight (percent).
        without: A candidate revision no host may hold any more (after an abort).
    """

    name: str
    revision: int | None
    candidate: int | None = None
    weight: float | None = None
    without: int | None = None

    @property
    def label(self) -> str:
        """``greet r12``, ``greet r12 + candidate r13 at 5%``, or ``greet off``."""
        if self.revision is None:
            return f"{self.name} off"
        label = f"{self.name} r{self.revision}"
        if self.candidate is not None:
            label += f" + candidate r{self.candidate}"
            if self.weight is not None:
                label += f" at {self.weight:g}%"
        if self.without is not None:
            label += f" without candidate r{self.without}"
        return label


def _judge(host: HostStatus, target: Target) -> tuple[bool, Mapping[str, Any] | None]:
    """(serves the target, its refusal of it)."""
    serving = host.serving_revision(target.name)
    if target.revision is None:
        return serving is None and target.name not in host.plugins, None
    if serving is None or serving < target.revision:
        return False, host.refusal(target.name, target.revision)
    held = host.candidates.get(target.name) or {}
    if target.without is not None and held.get("revision") == target.without:
        return False, None
    if target.candidate is None:
        return True, None
    if held.get("revision") != target.candidate:
        return False, host.candidate_refusal(target.name, target.candidate)
    weight = held.get("weight")
    if target.weight is not None and not (
        isinstance(weight, int | float) and abs(weight - target.weight) < 1e-9
    ):
        return False, None
    return True, None


def plugin_fleet(
    target: Target,
    enabled: bool,
    hosts: Sequence[HostStatus],
    record: Mapping[str, Any] | None = None,
) -> PluginFleet:
    """Summarize one plugin over ``hosts`` against what it should be (``target``).

    ``record`` (its ``rollout`` and ``last_rollout``) adds the rollout view.
    """
    counted = [h for h in hosts if h.counted]
    serving = 0
    behind: list[tuple[str, int | None]] = []
    rejected: list[Mapping[str, Any]] = []
    for host in counted:
        ok, refusal = _judge(host, target)
        if ok:
            serving += 1
            continue
        behind.append((host.id, host.serving_revision(target.name)))
        if refusal is not None:
            rejected.append(
                {
                    "host": host.id,
                    "revision": refusal.get("revision"),
                    "stage": refusal.get("stage"),
                    "error": refusal.get("error"),
                }
            )
    return PluginFleet(
        name=target.name,
        revision=target.revision if enabled else None,
        enabled=enabled,
        hosts_alive=len(counted),
        hosts_serving=serving,
        behind=tuple(behind),
        rejected=tuple(rejected),
        converged=bool(counted) and serving == len(counted),
        rollout=_rollout_of(target.name, record, counted),
        last_rollout=last_rollout_view((record or {}).get("last_rollout")),
        held=tuple(sum_held(h.held[target.name] for h in counted if target.name in h.held)),
    )


def _rollout_of(
    name: str, record: Mapping[str, Any] | None, counted: Sequence[HostStatus]
) -> dict[str, Any] | None:
    rollout = (record or {}).get("rollout")
    if not isinstance(rollout, Mapping) or not isinstance(rollout.get("revision"), int):
        return None
    return rollout_view(name, rollout, counted)


@dataclass(frozen=True, slots=True)
class FleetStatus:
    """The whole fleet of one functions collection.

    Attributes:
        namespace: ``db.collection`` of the functions.
        server_time: The server's clock when it was read.
        plugins: Per plugin (records, and names some host still serves).
        hosts: Every host document, alive or not (dead ones wait for the TTL index).
    """

    namespace: str
    server_time: datetime
    plugins: Mapping[str, PluginFleet]
    hosts: tuple[HostStatus, ...]

    @property
    def late(self) -> tuple[HostStatus, ...]:
        """Hosts whose heartbeat is late (dead ones included)."""
        return tuple(h for h in self.hosts if h.late)

    def as_dict(self) -> dict[str, Any]:
        """``{"plugins": {NAME: {...}}, "hosts": [...]}``: ``status --json`` and ``GET /fleet``."""
        return {
            "namespace": self.namespace,
            "server_time": self.server_time.isoformat(),
            "plugins": {name: p.as_dict() for name, p in sorted(self.plugins.items())},
            "hosts": [h.as_dict() for h in self.hosts],
            "late": [h.id for h in self.late],
        }


def summarize(
    namespace: str,
    records: Iterable[Mapping[str, Any]],
    host_docs: Iterable[Mapping[str, Any]],
    server_now: datetime,
    *,
    name: str | None = None,
) -> FleetStatus:
    """Build the fleet view from the functions records and the hosts documents.

    Args:
        namespace: ``db.collection`` of the functions.
        records: Function records (``_id``, ``revision``, ``enabled``; ``rollout`` and
            ``last_rollout`` for the rollout view).
        host_docs: Hosts-collection documents.
        server_now: The server's clock.
        name: Only this plugin (None: all).

    Returns:
        The fleet view.
    """
    hosts = tuple(
        sorted((host_status(d, server_now) for d in host_docs), key=lambda h: (h.hostname, h.id))
    )
    wanted: dict[str, tuple[Target, bool]] = {}
    by_name: dict[str, Mapping[str, Any]] = {}
    for rec in records:
        rec_name = str(rec.get("_id"))
        revision = rec.get("revision")
        enabled = rec.get("enabled", True) is not False
        rev = revision if isinstance(revision, int) else None
        wanted[rec_name] = (Target(rec_name, rev if enabled else None), enabled)
        by_name[rec_name] = rec
    for host in hosts:  # served but deleted from the collection: must unload everywhere
        for served in host.plugins:
            wanted.setdefault(served, (Target(served, None), False))
    plugins = {
        n: plugin_fleet(target, enabled, hosts, by_name.get(n))
        for n, (target, enabled) in wanted.items()
        if name is None or n == name
    }
    return FleetStatus(namespace, server_now, plugins, hosts)


async def _server_clock(db: Any) -> tuple[datetime, Any]:
    """The server's clock (``localTime``) and its ``operationTime``, from one ``hello``."""
    reply = await db.command("hello")
    local = _utc(reply.get("localTime"))
    if local is None:  # pragma: no cover - every server since 3.x sends localTime
        local = datetime.now(UTC)
    return local, reply.get("operationTime")


async def fleet_status(
    db: Any,
    *,
    collection: str = "functions",
    hosts_collection: str | None = None,
    name: str | None = None,
) -> FleetStatus:
    """Read the fleet of ``db[collection]`` now.

    Args:
        db: A PyMongo ``AsyncDatabase`` or Motor database.
        collection: The functions collection.
        hosts_collection: The hosts collection (default ``<collection>_hosts``).
        name: Only this plugin.

    Returns:
        The fleet view.
    """
    hosts_name = hosts_collection or hosts_collection_name(collection)
    query: dict[str, Any] = {} if name is None else {"_id": name}
    projection = {"revision": 1, "enabled": 1, "rollout": 1, "last_rollout": 1}
    records = [r async for r in db[collection].find(query, projection).sort("_id", ASCENDING)]
    docs = [d async for d in db[hosts_name].find({})]
    server_now, _ = await _server_clock(db)
    return summarize(f"{db.name}.{collection}", records, docs, server_now, name=name)


async def host_fleet_status(host: Any, name: str | None = None) -> FleetStatus:
    """The fleet of the collection a running ``PluginHost`` watches (``GET /fleet``).

    Args:
        host: The plugin host (its database, collection and hosts collection are used).
        name: Only this plugin.

    Returns:
        The fleet view.
    """
    reporter = host.status_reporter
    return await fleet_status(
        host.database,
        collection=host.collection_name,
        hosts_collection=reporter.collection_name if reporter is not None else None,
        name=name,
    )


# -- waiting -------------------------------------------------------------------------------


class FleetWaitError(PluginHostError):
    """The fleet did not converge (base of :class:`FleetRefused` and :class:`FleetTimeout`)."""


class FleetRefused(FleetWaitError):
    """A live host refused a target revision (it keeps serving the version it had).

    Attributes:
        refusals: ``{"host", "plugin", "revision", "stage", "error"}`` for each refusal.
    """

    def __init__(self, refusals: Sequence[Mapping[str, Any]]) -> None:
        self.refusals = tuple(dict(r) for r in refusals)
        lines = "; ".join(
            f"{r['host']} refused {r['plugin']} r{r['revision']} at stage {r['stage']}: "
            f"{r['error']}"
            for r in self.refusals
        )
        super().__init__(lines)


class FleetTimeout(FleetWaitError):
    """The timeout passed before every live host served the targets.

    Attributes:
        timeout: The seconds waited.
        behind: ``{"host", "plugin", "revision"}`` (revision served, None if none) of each
            live host still behind.
        hosts_alive: Live hosts (0: nothing reports to the hosts collection).
    """

    def __init__(self, timeout: float, behind: Sequence[Mapping[str, Any]], alive: int) -> None:
        self.timeout = timeout
        self.behind = tuple(dict(b) for b in behind)
        self.hosts_alive = alive
        if not alive:
            message = (
                f"no live host reported within {timeout:g} s "
                "(are the hosts running with status reporting on?)"
            )
        else:
            names = ", ".join(
                f"{b['host']} ({b['plugin']} at "
                f"{'r' + str(b['revision']) if b['revision'] is not None else 'nothing'})"
                for b in self.behind
            )
            message = f"not converged after {timeout:g} s; behind: {names}"
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a wait stands.

    Attributes:
        serving: Live hosts that serve every target.
        alive: Live hosts (not draining).
        targets: What they must serve.
        elapsed_s: Seconds since the wait began.
    """

    serving: int
    alive: int
    targets: tuple[Target, ...]
    elapsed_s: float

    @property
    def line(self) -> str:
        """``7/8 hosts serving greet r12`` (the progress line of ``push --wait``)."""
        if len(self.targets) == 1:
            target = self.targets[0]
            what = target.label if target.revision is not None else f"without {target.name}"
        else:
            what = f"all {len(self.targets)} plugins"
        return f"{self.serving}/{self.alive} hosts serving {what}"


@dataclass(frozen=True, slots=True)
class Convergence:
    """The fleet converged.

    Attributes:
        seconds: From the start of the wait to the write that completed it.
        hosts: The live hosts that serve the targets.
        targets: The targets.
    """

    seconds: float
    hosts: tuple[str, ...]
    targets: tuple[Target, ...]


@dataclass(slots=True)
class _Fleet:
    """The waiter's copy of the hosts collection, with the server clock's estimate."""

    docs: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    clock: datetime = field(default_factory=lambda: datetime.now(UTC))
    clock_at: float = field(default_factory=time.monotonic)

    def server_now(self) -> datetime:
        return self.clock + timedelta(seconds=time.monotonic() - self.clock_at)

    def apply(self, event: Mapping[str, Any]) -> None:
        op = event.get("operationType")
        key = (event.get("documentKey") or {}).get("_id")
        if op in ("insert", "update", "replace"):
            doc = event.get("fullDocument")
            if doc is None:
                return  # deleted since: the delete event follows
            self.put(doc)
        elif op == "delete":
            self.docs.pop(str(key), None)
        elif op in ("drop", "dropDatabase", "rename", "invalidate"):
            self.docs.clear()

    def put(self, doc: Mapping[str, Any]) -> None:
        key = str(doc.get("_id"))
        old = self.docs.get(key)
        if (
            old is not None
            and old.get("instance") == doc.get("instance")
            and isinstance(old.get("seq"), int)
            and isinstance(doc.get("seq"), int)
            and doc["seq"] < old["seq"]
        ):
            return  # an older write of the same host: the last write wins by seq
        self.docs[key] = doc


def _evaluate(
    fleet: _Fleet, targets: Sequence[Target]
) -> tuple[list[HostStatus], list[HostStatus], list[dict[str, Any]], list[dict[str, Any]]]:
    """(counted hosts, those serving every target, refusals, behind)."""
    now = fleet.server_now()
    hosts = [host_status(d, now) for d in fleet.docs.values()]
    counted = [h for h in hosts if h.counted]
    serving: list[HostStatus] = []
    refusals: list[dict[str, Any]] = []
    behind: list[dict[str, Any]] = []
    for host in counted:
        ok_all = True
        for target in targets:
            ok, refusal = _judge(host, target)
            if ok:
                continue
            ok_all = False
            behind.append(
                {
                    "host": host.id,
                    "plugin": target.name,
                    "revision": host.serving_revision(target.name),
                }
            )
            if refusal is not None:
                refusals.append(
                    {
                        "host": host.id,
                        "plugin": target.name,
                        "revision": refusal.get("revision"),
                        "stage": refusal.get("stage"),
                        "error": refusal.get("error"),
                    }
                )
        if ok_all:
            serving.append(host)
    return counted, serving, refusals, behind


async def wait_for_fleet(
    db: Any,
    targets: Iterable[Target],
    *,
    collection: str = "functions",
    hosts_collection: str | None = None,
    timeout: float = 60.0,  # noqa: ASYNC109 - the wait's bound is its contract
    on_progress: Callable[[Progress], None] | None = None,
    refusal_grace: float = 2.0,
) -> Convergence:
    """Wait until every live host serves ``targets``; fail as soon as one refuses them.

    Args:
        db: A PyMongo ``AsyncDatabase`` or Motor database.
        targets: What each plugin must become (revision served, or unloaded).
        collection: The functions collection.
        hosts_collection: The hosts collection (default ``<collection>_hosts``).
        timeout: Seconds to wait.
        on_progress: Called with the progress each time it changes.
        refusal_grace: After the first refusal, seconds to let the other live hosts
            decide (serve or refuse) so the error names every host that refused; it
            ends as soon as they all have.

    Returns:
        How long it took, and which hosts serve.

    Raises:
        FleetRefused: A live host refused a target revision.
        FleetTimeout: Not converged within ``timeout`` (or no live host reports at all).
        ValueError: No targets, or a timeout that is not a positive number.
    """
    wanted = tuple(targets)
    if not wanted:
        raise ValueError("wait_for_fleet needs at least one target")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    started = time.monotonic()
    deadline = started + timeout
    coll = db[hosts_collection or hosts_collection_name(collection)]
    fleet = _Fleet()
    fleet.clock, op_time = await _server_clock(db)
    fleet.clock_at = time.monotonic()
    options: dict[str, Any] = {"full_document": "updateLookup", "max_await_time_ms": _MAX_AWAIT_MS}
    if op_time is not None:
        options["start_at_operation_time"] = op_time
    stream = coll.watch(**options)
    if inspect.isawaitable(stream):  # PyMongo async: watch() is a coroutine; Motor: not
        stream = await stream
    try:
        async for doc in coll.find({}):
            fleet.put(doc)
        last: tuple[int, int] | None = None
        refused_at: float | None = None
        while True:
            counted, serving, refusals, behind = _evaluate(fleet, wanted)
            elapsed = time.monotonic() - started
            if refusals:
                # Fail fast, yet name every host: wait (briefly) for the undecided ones.
                refused_hosts = {r["host"] for r in refusals}
                undecided = {b["host"] for b in behind} - refused_hosts
                refused_at = time.monotonic() if refused_at is None else refused_at
                if not undecided or time.monotonic() >= min(refused_at + refusal_grace, deadline):
                    raise FleetRefused(refusals)
            if counted and len(serving) == len(counted):
                if on_progress is not None:
                    on_progress(Progress(len(serving), len(counted), wanted, elapsed))
                return Convergence(elapsed, tuple(sorted(h.id for h in serving)), wanted)
            if on_progress is not None and last != (len(serving), len(counted)):
                last = (len(serving), len(counted))
                on_progress(Progress(len(serving), len(counted), wanted, elapsed))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FleetTimeout(timeout, behind, len(counted))
            # try_next returns a buffered event at once, else one getMore waits up to
            # _MAX_AWAIT_MS on the server; after an empty one the loop re-judges liveness
            # (a dead host sends no event) and the deadline. The bound only guards against
            # a server that stops answering.
            with anyio.move_on_after(remaining + 2 * _MAX_AWAIT_MS / 1000):
                event = await stream.try_next()
                if event is not None:
                    fleet.apply(event)
    finally:
        with anyio.CancelScope(shield=True):
            await stream.close()
