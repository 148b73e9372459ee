"""Type aliases and protocols shared by several plugin-host modules."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

if TYPE_CHECKING:
    from .context import Context
    from .plugin import Plugin

__all__ = (
    "Args",
    "CallTarget",
    "Caller",
    "ContextFactory",
    "Document",
    "Entrypoint",
    "Hook",
    "SpawnTarget",
)

Document: TypeAlias = Mapping[str, Any]
"""A raw MongoDB document as read from the functions collection."""

Args: TypeAlias = Any
"""The argument a plugin entrypoint receives (usually a JSON-like mapping)."""

Entrypoint: TypeAlias = Callable[..., Any]
"""A plugin entrypoint: ``async def main(ctx, args)`` or ``def main(ctx, args)``."""

Hook: TypeAlias = Callable[..., Any]
"""A ``setup(ctx)`` or ``teardown(ctx)`` hook, sync or async."""

SpawnTarget: TypeAlias = Callable[..., Awaitable[Any]]
"""An async function started in the background with ``ctx.spawn``."""

ContextFactory: TypeAlias = "Callable[[Plugin], Context]"
"""Builds the ``ctx`` used by a version's ``setup``/``teardown`` hooks."""


class CallTarget(Protocol):
    """A late-bound plugin handle, as returned by ``require(name)``."""

    async def __call__(self, args: Args = None, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - per-call timeout is the public contract
        """Call whatever version of the plugin is current at this moment."""
        ...


class Caller(Protocol):
    """What a ``Context`` needs from the dispatcher (breaks the import cycle)."""

    @property
    def db(self) -> Any:
        """The database the host watches, handed to plugins as ``ctx.db``."""
        ...

    @property
    def globals(self) -> Mapping[str, Any]:
        """Host globals exposed as attributes of ``ctx``."""
        ...

    async def call(self, name: str, args: Args, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - per-call timeout is the public contract
        """Call the current version of plugin ``name``."""
        ...

    def require(self, name: str) -> CallTarget:
        """Return a late-bound handle on plugin ``name``."""
        ...
