"""Optional OpenTelemetry traces (the ``otel`` extra): calls, plugin-to-plugin calls, reloads.

Off by default. :func:`enable` (the daemon's ``--otel``) sets the module's :data:`tracer`;
until then every hook below is one global lookup and an ``is None`` test, and nothing of
OpenTelemetry is even imported.

Spans:

* ``plugin.call`` — one per HTTP call, a child of the caller's trace when the request
  carries a W3C ``traceparent``; attributes ``plugin.name``, ``plugin.version``,
  ``plugin.outcome`` and ``plugin.call_id``; status ERROR unless the outcome is ``ok``;
* ``ctx.call`` / ``ctx.require`` — one per plugin-to-plugin call, children of the span of
  the call that makes them (``plugin.target`` names the callee);
* ``plugin.reload`` — one per version that went live or was refused, built from the reload
  event: it starts when the record changed (``change_to_live_ms`` before the event; the
  load time when the change time is unknown) and ends when the version served, with
  ``plugin.compile_ms``, ``plugin.load_ms`` and ``plugin.change_to_live_ms``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from .types import Args, CallTarget

__all__ = (
    "RELOAD_EVENTS",
    "configure_sdk",
    "disable",
    "enable",
    "finish_call",
    "reload_span",
    "server_span",
    "span",
    "tracer",
    "wrap_target",
)

tracer: Any = None
"""The OpenTelemetry tracer while tracing is enabled, else None (the fast path)."""

RELOAD_EVENTS = frozenset(
    {"plugin.loaded", "plugin.reloaded", "plugin.reload_failed", "plugin.rejected"}
)
_RELOAD_ATTRIBUTES = {
    "plugin": "plugin.name",
    "version": "plugin.version",
    "reason": "plugin.reason",
    "compile_ms": "plugin.compile_ms",
    "load_ms": "plugin.load_ms",
    "change_to_live_ms": "plugin.change_to_live_ms",
}


def enable(provider: Any = None) -> Any:
    """Turn tracing on with ``provider`` (default: the global tracer provider).

    Args:
        provider: An OpenTelemetry ``TracerProvider`` (the tests pass an SDK provider with
            an in-memory exporter).

    Returns:
        The tracer.

    Raises:
        RuntimeError: The ``otel`` extra is not installed.
    """
    global tracer
    try:
        from opentelemetry import trace
    except ImportError:
        raise RuntimeError(
            "OpenTelemetry is not installed: pip install 'plugin-host[otel]'"
        ) from None
    tracer = trace.get_tracer("plugin-host", tracer_provider=provider)
    return tracer


def disable() -> None:
    """Turn tracing off again."""
    global tracer
    tracer = None


def configure_sdk() -> Any:
    """An SDK tracer provider exporting over OTLP/HTTP (``OTEL_EXPORTER_OTLP_*`` env), or to
    the console with ``OTEL_TRACES_EXPORTER=console``; installed as the global provider.

    Returns:
        The provider.

    Raises:
        RuntimeError: The ``otel`` extra is not installed.
    """
    import os

    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise RuntimeError(
            "OpenTelemetry is not installed: pip install 'plugin-host[otel]'"
        ) from None
    provider = TracerProvider(resource=Resource.create({"service.name": "plugin-host"}))
    exporter: Any
    if os.environ.get("OTEL_TRACES_EXPORTER", "").lower() == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


@contextmanager
def server_span(name: str, headers: Mapping[str, str]) -> Iterator[Any]:
    """A ``plugin.call`` span for one HTTP call, joined to the caller's W3C trace."""
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    parent = extract(headers)
    with tracer.start_as_current_span(
        "plugin.call",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"plugin.name": name},
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        yield current


def finish_call(current: Any, version: str | None, outcome: str, call_id: int) -> None:
    """Set the outcome attributes (and the status) of a ``plugin.call`` span."""
    from opentelemetry.trace import Status, StatusCode

    if version is not None:
        current.set_attribute("plugin.version", version)
    current.set_attribute("plugin.outcome", outcome)
    current.set_attribute("plugin.call_id", call_id)
    if outcome != "ok":
        current.set_status(Status(StatusCode.ERROR, outcome))


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A child span of the current one (``ctx.call``, ``ctx.require``)."""
    with tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def wrap_target(target: CallTarget, name: str) -> CallTarget:
    """``target`` (a ``ctx.require`` handle) with a ``ctx.require`` span around each call."""

    return _TracedTarget(target, name)


class _TracedTarget:
    """A ``ctx.require`` handle that opens a ``ctx.require`` span around each call."""

    __slots__ = ("_name", "_target")

    def __init__(self, target: CallTarget, name: str) -> None:
        self._target = target
        self._name = name

    async def __call__(self, args: Args = None, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mirrors the handle's signature
        with span("ctx.require", **{"plugin.target": self._name}):
            return await self._target(args, timeout=timeout)


def reload_span(event: str, fields: Mapping[str, Any]) -> None:
    """Record a finished ``plugin.reload`` span from one reload event."""
    from opentelemetry.trace import Status, StatusCode

    end = time.time_ns()
    live_ms = fields.get("change_to_live_ms")
    load_ms = fields.get("load_ms")
    took = live_ms if isinstance(live_ms, int | float) else load_ms
    start = end - int(max(float(took), 0.0) * 1e6) if isinstance(took, int | float) else end
    attributes: dict[str, Any] = {"plugin.event": event}
    for key, attribute in _RELOAD_ATTRIBUTES.items():
        value = fields.get(key)
        if isinstance(value, str | int | float):
            attributes[attribute] = value
    current = tracer.start_span("plugin.reload", start_time=start, attributes=attributes)
    if event in ("plugin.reload_failed", "plugin.rejected"):
        current.set_status(Status(StatusCode.ERROR, str(fields.get("error", event))[:200]))
    current.end(end_time=end)
