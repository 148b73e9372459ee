"""Configuration objects: the host's limits and timeouts, each default written once.

Every layer takes these (``PluginHost``, ``run_daemon``, the CLI), as httpx's
``_config.py`` gives ``Limits`` and ``Timeout`` to its clients. They are frozen: derive a
variant with :func:`dataclasses.replace`. The daemon's defaults differ from an embedded
host's in two places only (a call timeout and a per-version concurrency cap), spelled in
:data:`DAEMON_LIMITS` and :data:`DAEMON_TIMEOUTS`.

This module imports nothing from the host, so the CLI can read the defaults for its
``--help`` without importing the runtime.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any, Final, Literal, TypeVar

__all__ = (
    "DAEMON_LIMITS",
    "DAEMON_TIMEOUTS",
    "DEFAULT_LIMITS",
    "DEFAULT_TIMEOUTS",
    "UNSET",
    "HttpSettings",
    "Limits",
    "Timeouts",
    "Unset",
    "redact_uri",
    "with_overrides",
)

C = TypeVar("C", "Limits", "Timeouts")


class _Unset(enum.Enum):
    UNSET = "UNSET"


UNSET: Final = _Unset.UNSET
"""Marks a keyword argument that was not given (``None`` is a real value: "no limit")."""

Unset = Literal[_Unset.UNSET]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Sizes and counts the host enforces.

    Attributes:
        max_source_bytes: Largest accepted plugin source (UTF-8 bytes).
        max_body_bytes: Largest accepted HTTP request body.
        max_result_bytes: Largest JSON-encoded HTTP call reply.
        max_concurrency: Per-version concurrency for records that set none (None: no cap).
        max_waiting: Calls that may queue on a saturated version before ``PluginBusy``.
        require_depth: Deepest chain of plugin-to-plugin calls.
        history_size: Records kept per name for rollback.
        held_versions: Replaced versions kept live per name so that pinned calls
            (``X-Plugin-Version``) still reach them; the oldest retires when one more
            would be held. Each costs what a loaded version costs (module, setup state,
            tasks), and its teardown waits until it leaves: 0 (default) retires a
            replaced version at once.
    """

    max_source_bytes: int = 1_048_576
    max_body_bytes: int = 1_048_576
    max_result_bytes: int = 4_194_304
    max_concurrency: int | None = None
    max_waiting: int = 1000
    require_depth: int = 16
    history_size: int = 5
    held_versions: int = 0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Time bounds, in seconds.

    Attributes:
        top_level: Bound on a version's top-level code (CPU time; 10x as wall time).
        compile: Bound on compiling one source in a compiler process (``host.precompile``;
            small sources compile on the loop and need none).
        call: Per-call timeout for records that set none (None: unbounded).
        grace: How long an old version may drain after a swap before it is torn down.
        drain: How long in-flight calls may run at shutdown.
        startup: How long the daemon may take to become ready (0: forever).
    """

    top_level: float = 1.0
    compile: float = 10.0
    call: float | None = None
    grace: float = 30.0
    drain: float = 30.0
    startup: float = 30.0


DEFAULT_LIMITS: Final = Limits()
"""An embedded host's limits."""
DEFAULT_TIMEOUTS: Final = Timeouts()
"""An embedded host's timeouts."""
DAEMON_LIMITS: Final = Limits(max_concurrency=64)
"""The daemon's limits (``plugin-host run`` and ``dev``)."""
DAEMON_TIMEOUTS: Final = Timeouts(call=30.0)
"""The daemon's timeouts."""


def with_overrides(config: C, **values: Any) -> C:
    """``config`` with the fields given in ``values`` replaced, skipping :data:`UNSET` ones.

    Args:
        config: The base configuration.
        **values: Field values; :data:`UNSET` keeps the base's.

    Returns:
        ``config`` itself if nothing changes, else a new object.
    """
    changes = {name: value for name, value in values.items() if value is not UNSET}
    return dataclasses.replace(config, **changes) if changes else config


@dataclasses.dataclass(frozen=True, slots=True)
class HttpSettings:
    """How the daemon's HTTP server treats connections and requests.

    Attributes:
        idle_timeout: Seconds a connection may wait for the first byte of a request (after
            connecting or after a response); then it is closed.
        header_timeout: Seconds from a request's first byte to its complete headers (408).
        body_timeout: Seconds from complete headers to the complete body (closed).
        max_connections: Most open HTTP connections; at the cap a new one evicts the
            longest-idle connection, or gets a 503 if none is idle (None: three quarters
            of the descriptor limit).
        allowed_hosts: ``Host`` names accepted besides this machine's loopback names; the
            check runs on a loopback bind, and on any bind when this is not empty.
        allowed_origins: Browser origins (``scheme://host[:port]``, or ``*``) allowed to
            call; a request from another origin (not the daemon's own) gets a 403.
        access_log: Log one ``http.access`` event per call.
        otel: Trace calls and reloads with OpenTelemetry (the ``otel`` extra; spans are
            exported over OTLP/HTTP as the ``OTEL_EXPORTER_OTLP_*`` variables say, or to
            the console with ``OTEL_TRACES_EXPORTER=console``).
    """

    idle_timeout: float = 5.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int | None = None
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    access_log: bool = False
    otel: bool = False


def redact_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***`` (safe to print and log).

    Here, not in :mod:`host.daemon`, so the CLI's database commands can name the URI in
    their errors without importing Uvicorn and Starlette (about a second per command on a
    busy machine).

    Args:
        uri: A MongoDB connection string.

    Returns:
        The same string with the password of any ``user:password@`` replaced.
    """
    return re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", uri)
