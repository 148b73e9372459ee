"""``PluginHost``: wires watcher → loader → registry → dispatcher, and owns their lifetime.

Shutdown is ordered: stop intake (new calls raise ``HostClosed``, the stream stops
feeding changes) → drain in-flight calls (up to ``drain_timeout``) → teardown each
version once → close the stream. The caller owns the MongoDB client and closes it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
import structlog
from anyio.abc import TaskGroup

from .config import DEFAULT_LIMITS, DEFAULT_TIMEOUTS, UNSET, Limits, Timeouts, Unset, with_overrides
from .context import Context
from .dispatch import Dispatcher
from .errors import RecordError
from .events import EventBus, HostEvent, Subscription
from .fleet import StatusReporter, StatusReporting
from .gctune import tune_gc
from .loader import Loader, PluginInfo, RecordVerifier
from .plugin import Plugin
from .pymongo_cancel import install as _cancel_safe_pymongo
from .records import PluginRecord
from .registry import Registry
from .rollout import LiveRollout, write_abort
from .shadow import ReadOnlyDatabase, ShadowCaller, ShadowRunner
from .threads import DEFAULT_THREADS, ThreadLimiter
from .triggers import TriggerEngine, TriggerOptions
from .trust import SignatureVerifier, TrustedKeys, TrustError, load_public_keys
from .types import Args, CallTarget, ContextFactory
from .watchdog import LoopWatchdog
from .watcher import Watcher, WatchFatal

_cancel_safe_pymongo()  # before any client selects a server: see host.pymongo_cancel

__all__ = ("PluginHost",)


class PluginHost:
    """A live-reloading plugin runtime over one MongoDB collection.

    ::

        async with PluginHost(client.app, context={"foo": "bar"}) as plugins:
            await plugins.call("greet", {"firstName": "Ada"})

    Args:
        database: A PyMongo ``AsyncDatabase`` or a Motor database; plugins get it as ``ctx.db``.
        collection: The functions collection's name.
        context: Globals for plugins: ``context={"foo": 1}`` makes ``ctx.foo == 1``.
        limits: Sizes and counts (see :class:`~host.config.Limits`); the keyword
            arguments below override single fields.
        timeouts: Time bounds (see :class:`~host.config.Timeouts`); likewise.
        exec_timeout: Bound on a version's top-level code, in seconds.
        compile_timeout: Bound on compiling one large source in a compiler process.
        default_timeout: Per-call timeout for records that set none (None: no timeout).
        default_max_concurrency: Per-version concurrency for records that set none.
        max_waiting: Calls that may queue on a saturated version before ``PluginBusy``.
        grace_period: Seconds an old version may drain before it is torn down anyway.
        history_size: Records kept per name for rollback.
        held_versions: Replaced versions kept live per name for pinned calls (see
            :class:`~host.config.Limits`; 0: none).
        max_source_bytes: Largest accepted plugin source.
        require_depth: Deepest chain of plugin-to-plugin calls (stops ``require`` cycles).
        drain_timeout: On exit, how long in-flight calls may run before teardown.
        wait_ready: ``__aenter__`` waits for the initial load (``ready()``) when True.
        verifier: Checks each record before it compiles (after the signature check, if any).
        max_await_ms: ``maxAwaitTimeMS`` of the change stream's getMores.
        logger: structlog logger for events (default ``structlog.get_logger("host")``).
        loop_block_threshold: Seconds the event loop may stall before ``loop.blocked`` is
            emitted naming the plugin that held it (None: no watchdog).
        trusted_keys: Run only records signed by one of these keys: a ``TrustedKeys``, or
            key files/folders loaded (in a worker thread) on ``__aenter__``. None: signatures
            are ignored, and ``__aenter__`` emits a ``trust.disabled`` warning.
        report_status: Keep a document in the hosts collection (``<collection>_hosts``)
            saying what this host serves and refused (see :mod:`host.fleet`): True for the
            defaults, a ``StatusReporting`` to tune them, False (default) for none.
        triggers: Run the change-stream triggers the plugins declare (see
            :mod:`host.triggers`): True (default) with the defaults, a ``TriggerOptions``
            to tune them, False for none. With ``report_status`` on, triggers spread over
            the hosts that report to the same hosts collection.
    """

    def __init__(
        self,
        database: Any,
        collection: str = "functions",
        *,
        context: Mapping[str, Any] | None = None,
        limits: Limits = DEFAULT_LIMITS,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        exec_timeout: float | Unset = UNSET,
        compile_timeout: float | Unset = UNSET,
        default_timeout: float | Unset | None = UNSET,
        default_max_concurrency: int | Unset | None = UNSET,
        max_waiting: int | Unset = UNSET,
        grace_period: float | Unset = UNSET,
        history_size: int | Unset = UNSET,
        held_versions: int | Unset = UNSET,
        max_source_bytes: int | Unset = UNSET,
        require_depth: int | Unset = UNSET,
        drain_timeout: float | Unset = UNSET,
        wait_ready: bool = True,
        verifier: RecordVerifier | None = None,
        max_await_ms: int | None = None,
        logger: Any = None,
        loop_block_threshold: float | None = 0.1,
        trusted_keys: TrustedKeys | Iterable[str | Path] | str | Path | None = None,
        report_status: bool | StatusReporting = False,
        triggers: bool | TriggerOptions = True,
    ) -> None:
        self.limits = limits = with_overrides(
            limits,
            max_concurrency=default_max_concurrency,
            max_waiting=max_waiting,
            history_size=history_size,
            held_versions=held_versions,
            max_source_bytes=max_source_bytes,
            require_depth=require_depth,
        )
        self.timeouts = timeouts = with_overrides(
            timeouts,
            top_level=exec_timeout,
            compile=compile_timeout,
            call=default_timeout,
            grace=grace_period,
            drain=drain_timeout,
        )
        self.database = database
        self.collection_name = collection
        self.drain_timeout = timeouts.drain
        self._wait_ready = wait_ready
        self._events_bus = EventBus(logger)
        # Trust: keys given as paths load in __aenter__ (file reads must not block the loop).
        self._verifier = verifier
        self._signatures: SignatureVerifier | None = None
        self._trusted_key_paths: tuple[str | Path, ...] | None = None
        if isinstance(trusted_keys, TrustedKeys):
            self._signatures = SignatureVerifier(trusted_keys)
        elif isinstance(trusted_keys, str | Path):
            self._trusted_key_paths = (trusted_keys,)
        elif trusted_keys is not None:
            self._trusted_key_paths = tuple(trusted_keys)
            if not self._trusted_key_paths:
                raise TrustError("trusted_keys is empty: give key files or folders, or None")
        # One thread limiter for calls and hooks: it bounds the host's abandoned threads.
        threads = ThreadLimiter(DEFAULT_THREADS)
        self._registry = Registry(
            grace_period=timeouts.grace,
            history_size=limits.history_size,
            held_versions=limits.held_versions,
            events=self._events_bus,
            threads=threads,
        )
        self._dispatcher = Dispatcher(
            self._registry,
            db=database,
            globals=context,
            default_timeout=timeouts.call,
            max_waiting=limits.max_waiting,
            require_depth=limits.require_depth,
            events=self._events_bus,
            threads=threads,
        )
        # Hot path (issue 19): this host's ``call`` is the dispatcher's own bound method
        # (same parameters), so a call runs no frame of PluginHost.call (the bench counts
        # 2 Python frames per call, not 3). The method below is the documented signature.
        self.call = self._dispatcher.call  # type: ignore[method-assign]
        self._loader = Loader(
            self._registry,
            self._dispatcher.make_context,
            self._events_bus,
            exec_timeout=timeouts.top_level,
            max_source_bytes=limits.max_source_bytes,
            default_max_concurrency=limits.max_concurrency,
            verifier=verifier if trusted_keys is None else self._verify_record,
            compile_timeout=timeouts.compile,
            candidate_verifier=verifier if trusted_keys is None else self._verify_candidate,
            prepare_candidate=self._prepare_candidate,
        )
        self._dispatcher.on_rollout_abort = self._rollout_abort
        self._shadow = ShadowRunner(
            self._dispatcher, self._events_bus, rollouts=self._registry.rollouts
        )
        self._dispatcher.on_mirror = self._shadow.mirrors
        self._watcher = Watcher(
            database[collection], self._loader, self._events_bus, max_await_ms=max_await_ms
        )
        self.watchdog = (
            LoopWatchdog(self._events_bus, threshold=loop_block_threshold)
            if loop_block_threshold is not None
            else None
        )
        options = StatusReporting() if report_status is True else report_status
        self._reporter = (
            StatusReporter(self, database, collection, self._events_bus, options)
            if isinstance(options, StatusReporting)
            else None
        )
        self.host_id = (
            self._reporter.host_id
            if self._reporter is not None
            else f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        )
        """Who this host is in the hosts collection and in ``last_rollout.by``."""
        trigger_options = TriggerOptions() if triggers is True else triggers
        self._triggers = (
            TriggerEngine(
                database,
                collection,
                registry=self._registry,
                dispatcher=self._dispatcher,
                events=self._events_bus,
                options=trigger_options,
                host_id=self.host_id,
                hosts_collection=(
                    self._reporter.collection_name if self._reporter is not None else None
                ),
                drain_timeout=timeouts.drain,
            )
            if isinstance(trigger_options, TriggerOptions)
            else None
        )
        self._stack: contextlib.AsyncExitStack | None = None
        self._tg: TaskGroup | None = None
        self._watch_scope: anyio.CancelScope | None = None
        self._log = structlog.get_logger("host")

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        tune_gc()  # a larger young generation: see host.gctune (measured there)
        await self._setup_trust()
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            stack.push_async_callback(self._loader.aclose)  # after the task group ends
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            await stack.enter_async_context(self._registry)
            self._loader.bind(self._tg)
            self._shadow.start(self._tg)
            if self.watchdog is not None:  # cancelled with the task group at shutdown
                self._tg.start_soon(self.watchdog.run, name="loop watchdog")
            if self._reporter is not None:
                await self._tg.start(self._reporter.run)
            if self._triggers is not None:
                await self._tg.start(self._triggers.run)
            self._watch_scope = anyio.CancelScope()
            self._tg.start_soon(self._watch, name=f"watch {self._watcher.namespace}")
            self._stack = stack
            self._events_bus.emit("host.started", namespace=self._watcher.namespace)
            if self._wait_ready:
                await self.ready()
        except BaseException:
            self._stack = None
            await self._shutdown(stack)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await self._shutdown(stack)

    async def _setup_trust(self) -> None:
        if self._trusted_key_paths is not None and self._signatures is None:
            keys = await anyio.to_thread.run_sync(load_public_keys, self._trusted_key_paths)
            self._signatures = SignatureVerifier(keys)
        if self._signatures is None and not isinstance(self._verifier, SignatureVerifier):
            self._events_bus.emit(
                "trust.disabled",
                "warning",
                namespace=self._watcher.namespace,
                message="plugin signatures are not checked: any writer to the collection "
                "can run code in this host (pass trusted_keys to require signatures)",
            )

    async def _verify_record(self, record: PluginRecord, current: PluginRecord | None) -> None:
        # Signature first: a custom verifier only ever sees authenticated records.
        if self._signatures is None:  # fail closed (keys load before the watcher starts)
            raise RecordError(record.name, "signature", "the trusted keys are not loaded yet")
        self._signatures(record, current)
        if self._verifier is not None:
            checked = self._verifier(record, current)
            if checked is not None:
                await checked

    async def _verify_candidate(self, candidate: PluginRecord, stable: PluginRecord | None) -> None:
        # As _verify_record, for a rollout's candidate: its own signature, not remembered.
        if self._signatures is None:
            raise RecordError(candidate.name, "signature", "the trusted keys are not loaded yet")
        assert stable is not None  # a candidate always runs beside a stable version
        self._signatures.check_candidate(candidate, stable)
        if self._verifier is not None:
            checked = self._verifier(candidate, stable)
            if checked is not None:
                await checked

    def _prepare_candidate(self, plugin: Plugin, mode: str) -> ContextFactory:
        """A shadow's contexts get a read-only ``ctx.db``; a canary's are the usual ones."""
        if mode != "shadow":
            plugin.caller = None
            return self._dispatcher.make_context
        readonly = ReadOnlyDatabase(self.database, self._shadow.refused_write(plugin.name))
        caller = ShadowCaller(self._dispatcher, readonly)
        plugin.caller = caller
        return lambda version: Context(version, caller)

    def shadow_counts(self) -> dict[str, dict[str, int]]:
        """Shadow comparisons per plugin: ``{match, mismatch, candidate_error, dropped,
        refused_writes}`` (counters since the host started)."""
        return {name: dict(counts) for name, counts in self._shadow.counts.items()}

    def _rollout_abort(self, live: LiveRollout, reason: str) -> None:
        """A candidate broke its policy here: routing has stopped; record the abort.

        Runs on the call's path, so it only logs and starts the write: the write is a
        compare-and-set on the candidate's revision (``host.rollout.write_abort``), so
        when several hosts detect the same candidate, one abort is recorded.
        """
        stats = live.stats(time.perf_counter())
        self._events_bus.emit(
            "rollout.auto_abort",
            "warning",
            plugin=live.name,
            candidate=live.candidate.version,
            revision=live.revision,
            reason=reason,
            stats=stats,
            by=self.host_id,
        )
        if self._tg is not None:
            self._tg.start_soon(self._write_abort, live, reason, stats, name="rollout abort")

    async def _write_abort(self, live: LiveRollout, reason: str, stats: dict[str, Any]) -> None:
        try:
            recorded = await write_abort(
                self.database[self.collection_name],
                live.name,
                live.revision,
                reason=reason,
                by=self.host_id,
                stats=stats,
            )
        except Exception as exc:  # the host keeps not routing to it; say the write failed
            self._events_bus.emit(
                "rollout.abort_write_failed",
                "error",
                plugin=live.name,
                candidate=live.candidate.version,
                error=f"{type(exc).__name__}: {exc}",
            )
            return
        self._events_bus.emit(
            "rollout.abort_written",
            "debug",
            plugin=live.name,
            candidate=live.candidate.version,
            recorded=recorded,
        )

    @property
    def trusted_keys(self) -> TrustedKeys | None:
        """The keys records must be signed by (None: not checked, or not loaded yet)."""
        trusted = self._signatures.trusted if self._signatures is not None else None
        return trusted if isinstance(trusted, TrustedKeys) else None

    async def _shutdown(self, stack: contextlib.AsyncExitStack) -> None:
        try:
            with anyio.CancelScope(shield=True):
                self._dispatcher.close()
                if self._reporter is not None:
                    self._reporter.notify()  # draining: waiters stop counting this host
                if self._watch_scope is not None:
                    self._watch_scope.cancel()
                if self._triggers is not None:  # events in flight finish on their version
                    await self._triggers.aclose(self.drain_timeout)
                await self._registry.aclose(self.drain_timeout)
                # Calls still running after the drain get HostClosed (their threads are
                # abandoned and interrupted): nothing in flight outlives the host.
                self._dispatcher.abort()
                if self._reporter is not None:
                    await self._reporter.aclose()
        finally:
            # The task group (and the registry's) must be exited outside any scope
            # entered here, in the order they were entered.
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
            await stack.aclose()
            self._events_bus.emit("host.stopped", namespace=self._watcher.namespace)

    async def _watch(self) -> None:
        assert self._watch_scope is not None
        with self._watch_scope:
            try:
                await self._watcher.run()
            except WatchFatal as exc:
                self._events_bus.emit(
                    "watch.failed", "error", namespace=self._watcher.namespace, error=str(exc)
                )

    # -- readiness -----------------------------------------------------------------------

    async def ready(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - public API
        """Wait until the initial load is done and the change stream is live.

        Args:
            timeout: Seconds to wait; None waits for as long as it takes.

        Raises:
            WatchFatal: The collection cannot be watched (e.g. a standalone server).
            TimeoutError: ``timeout`` passed first.
        """
        with anyio.fail_after(timeout):
            await self._watcher.ready.wait()
        if self._watcher.fatal is not None:
            raise self._watcher.fatal

    def loading(self) -> list[str]:
        """Names whose record is being loaded right now (the start-up error names them)."""
        return self._loader.loading()

    @property
    def is_ready(self) -> bool:
        """Initial load done and the stream live right now (``/readyz``)."""
        return self._watcher.ready.is_set() and self._watcher.fatal is None and self._watcher.live

    @property
    def status_reporter(self) -> StatusReporter | None:
        """The status write-back to the hosts collection (None when ``report_status`` is off)."""
        return self._reporter

    @property
    def triggers(self) -> TriggerEngine | None:
        """The trigger engine (None with ``triggers=False``): ``owned()``, ``stats``."""
        return self._triggers

    @property
    def draining(self) -> bool:
        """Shutdown has begun: new calls are refused."""
        return self._dispatcher.draining

    def stuck_threads(self) -> dict[str, int]:
        """Versions whose abandoned call threads would not stop: version -> threads."""
        return self._dispatcher.stuck_threads()

    @property
    def abandoned_threads(self) -> int:
        """Worker threads of timed-out sync calls still blocked (each holds a thread slot)."""
        return self._dispatcher.abandoned_threads

    # -- work ------------------------------------------------------------------------------

    def call(
        self,
        name: str,
        args: Args = None,
        *,
        timeout: float | None = None,
        version: str | None = None,
        key: object = None,
        served: list[str] | None = None,
    ) -> Coroutine[Any, Any, Any]:
        """Call the current version of plugin ``name`` (or its rollout's candidate).

        Await the result (``await host.call(...)``). A host's ``call`` is its dispatcher's
        own bound method (set when the host is built), so a call runs in one coroutine
        frame of the host's and no other; this method is its signature and documentation.

        Args:
            name: The plugin name.
            args: Passed to the entrypoint as ``args``.
            timeout: Seconds; overrides the record's and the host's default.
            version: Pin a version: ``7``, ``r7``, ``greet@r7`` or ``greet@r7:3f9a1c2e``
                (the stable version, the rollout's candidate, or a replaced version
                still held: ``held_versions``).
            key: Sticky routing key for a rollout (else the rollout's ``sticky_key``
                field of ``args``): the same key gets the same version on every host.
            served: If given, the version that serves the call is appended to it.

        Returns:
            What the entrypoint returned.

        Raises:
            PluginNotFound: No version of ``name`` is loaded.
            VersionNotLive: ``version`` names no version this host holds.
            PluginTimeout: The call ran out of time.
            PluginFailed: The plugin raised; carries its traceback.
            PluginBusy: Too many calls are queued on the plugin.
            HostClosed: The host is shutting down.
        """
        if version is None and key is None and served is None:
            return self._dispatcher.call(name, args, timeout=timeout)
        return self._dispatcher.call(
            name, args, timeout=timeout, version=version, key=key, served=served
        )

    def rollouts(self) -> dict[str, LiveRollout]:
        """The rollouts running on this host, by plugin name (a snapshot)."""
        return dict(self._registry.rollouts)

    def rollout(self, name: str) -> LiveRollout | None:
        """The rollout running for ``name`` on this host (routing state and statistics)."""
        return self._registry.rollouts.get(name)

    def candidate(self, name: str) -> Plugin | None:
        """The rollout candidate of ``name`` this host holds, or None."""
        return self._registry.candidate(name)

    def held(self, name: str) -> tuple[Plugin, ...]:
        """The replaced versions of ``name`` still held for pinned calls, newest first
        (none unless ``held_versions`` is set)."""
        return self._registry.held(name)

    def require(self, name: str) -> CallTarget:
        """A late-bound async callable: each call goes to the version current at that moment."""
        return self._dispatcher.require(name)

    def plugins(self) -> list[PluginInfo]:
        """Every known plugin: version, revision, loaded_at, status and last error."""
        return self._loader.infos()

    def current(self, name: str) -> Plugin | None:
        """The version of ``name`` serving calls now, or None (a snapshot: it may be
        replaced at the next await)."""
        return self._registry.get(name)

    def plugin(self, name: str) -> PluginInfo | None:
        """One plugin's status, or None if the host has never seen it."""
        return self._loader.info(name)

    def events(
        self, buffer: int = 10_000, accept: Callable[[HostEvent], bool] | None = None
    ) -> Subscription:
        """Subscribe to reload events (``async with host.events() as ev: async for e in ev``).

        Args:
            buffer: Events kept for a slow reader; <= 0 means unbounded.
            accept: If set, only the events it returns True for are delivered; it runs
                in the emitter's step (keep it cheap, never raise). A counter that
                returns False observes every event without waking a reader.
        """
        return self._events_bus.subscribe(buffer, accept)
