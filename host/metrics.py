"""Prometheus metrics for the daemon, in the text exposition format, written by hand.

https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format

Metrics:

* ``plugin_host_reloads_total`` — versions that went live (``plugin.loaded`` and
  ``plugin.reloaded`` events);
* ``plugin_host_reload_failures_total`` — versions refused (``plugin.reload_failed``,
  ``plugin.rejected``);
* ``plugin_host_calls_total{outcome}`` — HTTP calls by outcome: ``ok``, ``not_found``,
  ``timeout``, ``failed``, ``busy``, ``closed``, ``bad_request``;
* ``plugin_host_call_seconds`` — histogram of HTTP call durations;
* ``plugin_host_change_to_live_seconds`` — histogram of the time from a record change
  (its ``wallTime``) to the new version serving;
* ``plugin_host_in_flight_calls`` — HTTP calls running now;
* ``plugin_host_ready`` — 1 when the host is ready (``/readyz``), else 0;
* ``plugin_host_fleet_report_lag_seconds`` — histogram of the time from a change of what
  this host serves (or refused) to the write that reported it to the hosts collection
  (``fleet.reported`` events' ``lag_ms``; see :mod:`host.fleet`);
* ``plugin_host_abandoned_threads`` — worker threads of timed-out sync calls that are
  still blocked and hold a thread slot (see ``host.threads``).

Updates are plain attribute writes on the event loop thread: no lock is needed.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runtime import PluginHost

__all__ = ("CALL_OUTCOMES", "Histogram", "Metrics", "follow_events")

CALL_OUTCOMES = ("ok", "not_found", "timeout", "failed", "busy", "closed", "bad_request")

CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LIVE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class Histogram:
    """A cumulative histogram with fixed upper bounds.

    Args:
        buckets: Upper bounds in ascending order (``+Inf`` is implicit).
    """

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> Iterable[str]:
        """Exposition lines: cumulative ``_bucket``s, then ``_sum`` and ``_count``."""
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            yield f'{name}_bucket{{le="{_fmt(bound)}"}} {running}'
        yield f"{name}_sum {_fmt(self.sum)}"
        yield f"{name}_count {self.count}"


class Metrics:
    """The daemon's metrics; :meth:`render` writes them in the Prometheus text format.

    Args:
        ready: Reports readiness for the ``plugin_host_ready`` gauge.
    """

    def __init__(self, ready: Callable[[], bool] | None = None) -> None:
        self.reloads = 0
        self.reload_failures = 0
        self.calls: dict[str, int] = dict.fromkeys(CALL_OUTCOMES, 0)
        self.in_flight = 0
        self.call_seconds = Histogram(CALL_BUCKETS)
        self.change_to_live_seconds = Histogram(LIVE_BUCKETS)
        self.report_lag_seconds = Histogram(LIVE_BUCKETS)
        self.ready = ready
        # Issue 11 (thread limits): read at render time, like `ready`.
        self.abandoned_threads: Callable[[], int] | None = None

    def count_call(self, outcome: str, seconds: float | None = None) -> None:
        """Count one call by outcome and, when it ran, observe its duration."""
        self.calls[outcome] = self.calls.get(outcome, 0) + 1
        if seconds is not None:
            self.call_seconds.observe(seconds)

    def on_event(self, event: str, fields: Any) -> None:
        """Update the reload metrics from one host event (see ``host.events()``)."""
        if event in ("plugin.loaded", "plugin.reloaded"):
            self.reloads += 1
            live_ms = fields.get("change_to_live_ms")
            if isinstance(live_ms, int | float):
                self.change_to_live_seconds.observe(max(live_ms, 0.0) / 1000.0)
        elif event in ("plugin.reload_failed", "plugin.rejected"):
            self.reload_failures += 1
        elif event == "fleet.reported":
            lag_ms = fields.get("lag_ms")
            if isinstance(lag_ms, int | float):
                self.report_lag_seconds.observe(max(lag_ms, 0.0) / 1000.0)

    def render(self) -> str:
        """The metrics in the Prometheus text exposition format (version 0.0.4)."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("plugin_host_reloads_total", "counter", "Plugin versions that went live.")
        out.append(f"plugin_host_reloads_total {self.reloads}")
        family(
            "plugin_host_reload_failures_total",
            "counter",
            "Plugin versions refused (compile, setup or validation failed).",
        )
        out.append(f"plugin_host_reload_failures_total {self.reload_failures}")
        family("plugin_host_calls_total", "counter", "Calls through the HTTP API, by outcome.")
        for outcome, n in self.calls.items():
            out.append(f'plugin_host_calls_total{{outcome="{outcome}"}} {n}')
        family("plugin_host_call_seconds", "histogram", "Duration of calls through the HTTP API.")
        out.extend(self.call_seconds.lines("plugin_host_call_seconds"))
        family(
            "plugin_host_change_to_live_seconds",
            "histogram",
            "Time from a record change to its version serving.",
        )
        out.extend(self.change_to_live_seconds.lines("plugin_host_change_to_live_seconds"))
        family(
            "plugin_host_fleet_report_lag_seconds",
            "histogram",
            "Time from a change of what this host serves to its report in the hosts collection.",
        )
        out.extend(self.report_lag_seconds.lines("plugin_host_fleet_report_lag_seconds"))
        family("plugin_host_in_flight_calls", "gauge", "Calls through the HTTP API running now.")
        out.append(f"plugin_host_in_flight_calls {self.in_flight}")
        if self.ready is not None:
            family("plugin_host_ready", "gauge", "1 when the host is ready to serve, else 0.")
            out.append(f"plugin_host_ready {int(self.ready())}")
        # Issue 11 (thread limits): one gauge, kept apart for the prometheus-client port.
        if self.abandoned_threads is not None:
            family(
                "plugin_host_abandoned_threads",
                "gauge",
                "Worker threads of timed-out sync calls still blocked, each holding a slot.",
            )
            out.append(f"plugin_host_abandoned_threads {self.abandoned_threads()}")
        return "\n".join(out) + "\n"


async def follow_events(host: PluginHost, metrics: Metrics) -> None:
    """Feed ``metrics`` from ``host.events()`` until cancelled (run it as a background task)."""
    async with host.events() as events:
        async for event in events:
            metrics.on_event(event.event, event.fields)
