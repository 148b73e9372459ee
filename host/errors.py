"""Typed errors raised by plugin-host.

Every error says what went wrong in plain words and carries the facts as attributes, so
callers can branch on them and log them without parsing messages.

Every public error derives from one root, :class:`PluginHostError` (as httpx's errors
derive from ``HTTPError``), so ``except PluginHostError`` catches whatever the host
raises on purpose. ``PluginError`` is the base of everything a *call* or a *load* can
raise. ``RecordError`` is also a ``ValueError``: an invalid record is bad input, not a
plugin failure. The errors of other modules (``WatchFatal``, ``TrustError``,
``SignatureError``, ``PublishError``, ``UnknownPlugin``, ``UnknownRevision``,
``StartupError``) derive from the root too, and keep their standard-library base.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

__all__ = (
    "CompileError",
    "CompileStage",
    "HostClosed",
    "PluginBusy",
    "PluginError",
    "PluginFailed",
    "PluginHostError",
    "PluginNotFound",
    "PluginTimeout",
    "RecordError",
    "RequireDepthExceeded",
    "VersionNotLive",
)

CompileStage = Literal["syntax", "compile", "import", "timeout", "entrypoint", "setup", "busy"]


class PluginHostError(Exception):
    """Root of every error plugin-host raises on purpose."""


class PluginError(PluginHostError):
    """Base class of every error raised by plugin loading and dispatch."""


class PluginNotFound(PluginError):
    """No version of the plugin is currently installed.

    Attributes:
        name: The plugin name that was looked up.
    """

    def __init__(self, name: str) -> None:
        super().__init__(f"plugin {name!r} is not loaded")
        self.name = name


class PluginTimeout(PluginError):
    """A call did not finish within its timeout and was cancelled.

    Attributes:
        name: The plugin name.
        version: The version the call ran on, e.g. ``greet@r7:3f9a1c2e``.
        timeout: The timeout that expired, in seconds.
    """

    def __init__(self, name: str, version: str, timeout: float) -> None:
        super().__init__(f"plugin {version} did not finish within {timeout:g} s")
        self.name = name
        self.version = version
        self.timeout = timeout


class PluginFailed(PluginError):
    """The plugin raised an exception; ``__cause__`` is that exception.

    Attributes:
        name: The plugin name.
        version: The version the call ran on.
        error_type: The qualified class name of the plugin's exception.
        error_message: ``str()`` of the plugin's exception.
        traceback: The formatted traceback, including the plugin's own source lines.
    """

    def __init__(
        self,
        name: str,
        version: str,
        error_type: str,
        error_message: str,
        traceback: str,
    ) -> None:
        detail = f"{error_type}: {error_message}" if error_message else error_type
        super().__init__(f"plugin {version} failed: {detail}")
        self.name = name
        self.version = version
        self.error_type = error_type
        self.error_message = error_message
        self.traceback = traceback


class PluginBusy(PluginError):
    """The plugin is at its concurrency limit and its wait queue is full, or every
    worker thread for sync plugins is held by an abandoned call that still runs.

    Attributes:
        name: The plugin name.
        version: The version that was saturated.
        max_waiting: The wait-queue bound that was reached.
        abandoned_threads: When the threads are the cause: how many worker threads
            abandoned calls hold (all of them); else None.
    """

    def __init__(
        self, name: str, version: str, max_waiting: int, abandoned_threads: int | None = None
    ) -> None:
        if abandoned_threads is None:
            message = (
                f"plugin {version} is busy: all concurrency slots are taken and "
                f"{max_waiting} calls are already waiting"
            )
        else:
            message = (
                f"plugin {version} is busy: all {abandoned_threads} worker threads for sync "
                "plugins are held by calls that timed out and are still blocked "
                "(e.g. in C code that cannot be interrupted)"
            )
        super().__init__(message)
        self.name = name
        self.version = version
        self.max_waiting = max_waiting
        self.abandoned_threads = abandoned_threads


class RequireDepthExceeded(PluginError):
    """A chain of plugin-to-plugin calls got deeper than the configured limit.

    This is how ``a -> b -> a`` cycles are stopped.

    Attributes:
        chain: Plugin names from the outermost call to the one that was refused.
    """

    def __init__(self, chain: Sequence[str], limit: int) -> None:
        self.chain: tuple[str, ...] = tuple(chain)
        self.limit = limit
        super().__init__(
            f"plugin call depth exceeded the limit of {limit}: " + " -> ".join(self.chain)
        )


class VersionNotLive(PluginError, LookupError):
    """A call pinned a version of a plugin that this host does not hold (issue 16).

    Attributes:
        name: The plugin name.
        wanted: The version asked for (``7``, ``r7``, ``greet@r7`` or a full version).
        live: The versions this host can serve now, stable first.
        held: Recent replaced versions still held in memory for pinned calls, newest
            first (empty unless the host holds some: ``held_versions``).
    """

    def __init__(
        self,
        name: str,
        wanted: str,
        live: Sequence[str],
        held: Sequence[str] = (),
        hint: str = "",
    ) -> None:
        serving = ", ".join(live) if live else "none"
        message = f"plugin {name!r} has no live version matching {wanted[:100]!r}; live: {serving}"
        if held:
            message += f"; held: {', '.join(held)}"
        super().__init__(message + (f" ({hint})" if hint else ""))
        self.name = name
        self.wanted = wanted
        self.live = tuple(live)
        self.held = tuple(held)


class HostClosed(PluginError):
    """The host is draining or closed and accepts no new calls."""

    def __init__(self, message: str = "the plugin host is closed to new calls") -> None:
        super().__init__(message)


class CompileError(PluginError):
    """A plugin version could not be loaded; the previous version keeps serving.

    Attributes:
        name: The plugin name.
        version: The version that failed to load.
        stage: Where loading failed: ``"syntax"``, ``"compile"`` (compiling overran its
            bound or the compiler process failed), ``"import"`` (top-level code raised),
            ``"timeout"`` (top-level code ran too long), ``"entrypoint"`` (entrypoint or a
            hook missing or not callable), ``"setup"`` (the ``setup`` hook failed) or
            ``"busy"`` (every load thread is held by abandoned top-level code).
        reason: What was wrong, without the name/stage prefix.
        traceback: The formatted traceback or syntax-error excerpt; may be empty.
    """

    def __init__(
        self,
        name: str,
        version: str,
        stage: CompileStage,
        reason: str,
        traceback: str = "",
    ) -> None:
        super().__init__(f"cannot load plugin {version} ({stage}): {reason}")
        self.name = name
        self.version = version
        self.stage: CompileStage = stage
        self.reason = reason
        self.traceback = traceback


class RecordError(PluginHostError, ValueError):
    """A plugin record from the collection is invalid.

    Attributes:
        name: The record's ``_id`` when it is a usable name, else ``None``.
        field: The offending document field, e.g. ``"source"``.
        reason: What is wrong with it, e.g. ``"must be a string, got int"``.
        details: Extra facts added to the ``plugin.rejected`` event, e.g. ``key_id``
            (empty by default; keys must not repeat the event's own fields).
    """

    def __init__(
        self,
        name: str | None,
        field: str,
        reason: str,
        *,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        who = f"record {name!r}" if name is not None else "record <unnamed>"
        super().__init__(f"{who}: field {field!r}: {reason}")
        self.name = name
        self.field = field
        self.reason = reason
        self.details: Mapping[str, Any] = MappingProxyType(dict(details or {}))
