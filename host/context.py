"""The ``ctx`` object handed to plugin code.

One ``Context`` serves one call, so construction is four slot stores: everything else
(the bound logger above all) is derived lazily, on first access.

Reuse protocol (the dispatcher's hot path, issue 19): building an object per call costs
about a fifth of a call, so the dispatcher keeps one spare. When a call's plugin has
returned and ``sys.getrefcount`` shows that nothing but the call's own frame holds its
``ctx`` (the plugin kept it in no global, closure, task or result; a ``Context`` takes
no weak references), the context becomes the spare, and the next call rebinds it by
storing ``_plugin``, ``_caller``, ``call_id`` and ``_log = None`` (so ``ctx.log`` binds
the new call's fields). A context anyone still holds is never reused, so what a plugin
keeps goes on naming its own call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import anyio.from_thread
import structlog
from structlog.typing import FilteringBoundLogger

from . import tracing
from .types import Args, Caller, CallTarget

if TYPE_CHECKING:
    from .plugin import Plugin

__all__ = ("SHADOW_DB", "Context", "EventContext")

SHADOW_DB: ContextVar[Callable[[Plugin], Any] | None] = ContextVar(
    "plugin_host_shadow_db", default=None
)
"""Set while a shadow's mirror runs (see :mod:`host.shadow`): maps each version the mirror
reaches (the shadow itself, and every plugin its ``ctx.call`` reaches, however deep) to
the read-only ``ctx.db`` it gets there, so a shadow cannot write through a nested call.
It lives in the mirror's context, so it follows the call into worker threads (sync
plugins) and into the tasks started from it, and never reaches other calls."""


class Context:
    """What a plugin sees as ``ctx``.

    Host globals are exposed as attributes: a host created with
    ``context={"foo": "bar"}`` gives ``ctx.foo == "bar"``. The built-in attributes below
    take precedence over globals of the same name.

    Attributes:
        call_id: Identifier of the current call; ``None`` in ``setup``/``teardown``.
    """

    __slots__ = ("_caller", "_log", "_plugin", "call_id")

    def __init__(self, plugin: Plugin, caller: Caller, call_id: int | None = None) -> None:
        """Bind a context to one version and the dispatcher that serves it.

        Args:
            plugin: The version the code runs on.
            caller: The dispatcher, for ``db``, globals and plugin-to-plugin calls.
            call_id: The call's identifier, if this context serves a call.
        """
        self._plugin = plugin
        self._caller = caller
        self.call_id = call_id
        self._log: FilteringBoundLogger | None = None

    @property
    def db(self) -> Any:
        """The database the host watches (read-only while a shadow's mirror runs)."""
        shadow = SHADOW_DB.get()
        if shadow is not None:
            return shadow(self._plugin)
        return self._caller.db

    @property
    def state(self) -> Any:
        """What this version's ``setup`` hook returned (``None`` without setup)."""
        return self._plugin.state

    @property
    def plugin_name(self) -> str:
        """The name of the running plugin."""
        return self._plugin.name

    @property
    def version(self) -> str:
        """The running version, e.g. ``greet@r7:3f9a1c2e``."""
        return self._plugin.version

    @property
    def log(self) -> FilteringBoundLogger:
        """A structlog logger bound to ``plugin``, ``version`` and ``call_id``."""
        log = self._log
        if log is None:
            log = self._log = structlog.get_logger("plugin").bind(**self._log_fields())
        return log

    def _log_fields(self) -> dict[str, Any]:
        plugin = self._plugin
        return {"plugin": plugin.name, "version": plugin.version, "call_id": self.call_id}

    async def call(self, name: str, args: Args = None, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - per-call timeout is the public contract
        """Call the current version of another plugin.

        Args:
            name: The plugin to call.
            args: Its argument.
            timeout: Per-call timeout in seconds; the callee's default if ``None``.

        Returns:
            The callee's result.

        Raises:
            PluginError: As ``Dispatcher.call``.
        """
        if tracing.tracer is None:
            return await self._caller.call(name, args, timeout=timeout)
        with tracing.span("ctx.call", **{"plugin.target": name}):
            return await self._caller.call(name, args, timeout=timeout)

    def require(self, name: str) -> CallTarget:
        """Return a late-bound handle: each call goes to the version current at that time.

        Args:
            name: The plugin to bind to; it need not be loaded yet.

        Returns:
            An async callable ``handle(args, *, timeout=None)``.
        """
        target = self._caller.require(name)
        if tracing.tracer is None:
            return target
        return tracing.wrap_target(target, name)

    def spawn(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start ``func(*args)`` in the background, owned by this plugin version.

        The task is cancelled when the version retires, so background work never
        outlives its code or doubles across reloads. Callable from sync plugins running
        in a worker thread, too.

        Args:
            func: An async function.
            *args: Its positional arguments.

        Raises:
            RuntimeError: If the version is not running.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # a sync plugin in a worker thread
            anyio.from_thread.run_sync(self._plugin.spawn, func, *args)
        else:
            self._plugin.spawn(func, *args)

    def __getattr__(self, attr: str) -> Any:
        # Only reached when normal lookup fails. Private and dunder names (copy, pickle)
        # never reach the globals, so a half-built instance cannot recurse here.
        if not attr.startswith("_"):
            try:
                return self._caller.globals[attr]
            except KeyError:
                pass
        raise AttributeError(
            f"ctx has no attribute {attr!r} (neither built in nor a host global)",
            name=attr,
            obj=self,
        )

    def __repr__(self) -> str:
        return f"<Context {self._plugin.version} call_id={self.call_id}>"


class EventContext(Context):
    """What a trigger handler sees as ``ctx``: a :class:`Context` plus the event's identity.

    Attributes:
        event_id: The change event's resume token as a string (its ``_data``): the same on
            every delivery of the event, so a handler can use it as an idempotency key.
        attempt: 1 for the first delivery of the event, 2 for the first retry, and so on.
        trigger: The trigger id, ``"<plugin>/<name>"``.
    """

    __slots__ = ("attempt", "event_id", "trigger")

    def __init__(
        self, plugin: Plugin, caller: Caller, *, trigger: str, event_id: str, attempt: int
    ) -> None:
        """Bind a context to one delivery of one event.

        Args:
            plugin: The version handling the event.
            caller: The dispatcher.
            trigger: The trigger id.
            event_id: The event's resume token, as a string.
            attempt: The delivery attempt, from 1.
        """
        super().__init__(plugin, caller)
        self.trigger = trigger
        self.event_id = event_id
        self.attempt = attempt

    def _log_fields(self) -> dict[str, Any]:
        # ctx.log is bound to the trigger, the event and the attempt too.
        plugin = self._plugin
        return {
            "plugin": plugin.name,
            "version": plugin.version,
            "trigger": self.trigger,
            "event_id": self.event_id,
            "attempt": self.attempt,
        }

    def __repr__(self) -> str:
        return f"<EventContext {self._plugin.version} {self.trigger} attempt={self.attempt}>"
