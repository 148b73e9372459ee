"""Prometheus metrics for the daemon, exposed by ``prometheus-client``.

Metrics (names and labels are part of the README's contract):

* ``plugin_host_reloads_total`` — versions that went live (``plugin.loaded`` and
  ``plugin.reloaded`` events);
* ``plugin_host_reload_failures_total`` — versions refused (``plugin.reload_failed``,
  ``plugin.rejected``);
* ``plugin_host_calls_total{outcome}`` — HTTP calls by outcome: ``ok``, ``not_found``,
  ``timeout``, ``failed``, ``busy``, ``closed``, ``bad_request``;
* ``plugin_host_call_seconds`` — histogram of HTTP call durations (buckets from 100 µs);
* ``plugin_host_plugin_calls_total{plugin,version,outcome}`` and
  ``plugin_host_plugin_call_seconds{plugin,version}`` — the same per plugin version;
* ``plugin_host_change_to_live_seconds`` — histogram of the time from a record change
  (its ``wallTime``) to the new version serving;
* ``plugin_host_fleet_report_lag_seconds`` — histogram of the time from a change of what
  this host serves to its report in the hosts collection (``fleet.reported``);
* ``plugin_host_in_flight_calls`` — HTTP calls running now;
* ``plugin_host_ready`` — 1 when the host is ready (``/readyz``), else 0;
* ``plugin_host_abandoned_threads`` — worker threads of timed-out sync calls that are
  still blocked and hold a thread slot (see ``host.threads``);
* ``plugin_host_trigger_events_total{trigger}`` — change events handled (or dead-lettered)
  by this host's triggers; ``rate()`` of it is events/s;
* ``plugin_host_trigger_dead_letters_total{trigger}`` — events dead-lettered;
* ``plugin_host_trigger_history_lost_total{trigger}`` — times a trigger's resume point had
  left the oplog (``trigger.history_lost``);
* ``plugin_host_trigger_lag_seconds`` — histogram of the time from an event's cluster
  time (its ``wallTime``) to its handler's start;
* ``plugin_host_trigger_in_flight`` — trigger handlers running now;
* ``plugin_host_triggers_owned`` — triggers whose lease this host holds;
* the standard ``process_*`` (resident memory, open descriptors, CPU...), ``python_gc_*``
  and ``python_info`` collectors of ``prometheus-client``.

Cardinality of the per-plugin series: only calls that reached a version are counted there
(an unknown name counts in ``plugin_host_calls_total{outcome="not_found"}`` only), and a
version's series are dropped when it retires (``plugin.retired``/``plugin.unloaded``). So
at any time there are series for at most the versions loaded or draining, times the
outcomes: a client cannot grow them by calling made-up names, and a plugin reloaded a
thousand times keeps only its live versions.

Counting is plain attribute and dict updates on the event loop thread (no lock, no
``prometheus_client`` instrument on the hot path); :class:`_Collector` turns the counts into
metric families when ``/metrics`` is scraped.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from . import tracing
from .triggers.stats import TriggerStats

if TYPE_CHECKING:
    from .runtime import PluginHost

__all__ = (
    "CALL_BUCKETS",
    "CALL_OUTCOMES",
    "CONTENT_TYPE",
    "Histogram",
    "Metrics",
    "follow_events",
    "follow_triggers",
)

CALL_OUTCOMES = ("ok", "not_found", "timeout", "failed", "busy", "closed", "bad_request")

CALL_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
"""Call duration buckets, in seconds: fine enough to tell 100 µs from 500 µs calls."""
LIVE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

RETIRED_MEMORY = 4096
"""How many retired versions :class:`Metrics` remembers, to keep their series dropped."""

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""The ``Content-Type`` of ``/metrics`` (the Prometheus text format, version 0.0.4)."""


class Histogram:
    """Per-bucket counts with fixed upper bounds (exposed cumulatively at scrape time).

    Args:
        buckets: Upper bounds in ascending order (``+Inf`` is implicit).
    """

    __slots__ = ("bounds", "count", "counts", "sum")

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

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, cumulative count)`` pairs as Prometheus wants them, ``+Inf`` last."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((_le(bound), running))
        out.append(("+Inf", self.count))
        return out


def _le(bound: float) -> str:
    return str(int(bound)) + ".0" if bound == int(bound) else repr(bound)


class _PluginSeries:
    """Counts of one plugin version."""

    __slots__ = ("calls", "seconds")

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.seconds = Histogram(CALL_BUCKETS)


class Metrics:
    """The daemon's metrics; :meth:`render` writes them in the Prometheus text format.

    Args:
        ready: Reports readiness for the ``plugin_host_ready`` gauge.
        process: Also expose the process, GC and platform collectors.
    """

    # Invariant: ``per_plugin`` holds a key only for a (plugin, version) that served a call
    # and has not retired since; ``retired`` remembers the last RETIRED_MEMORY retired keys,
    # so that a call abandoned by a forced retirement, finishing later, cannot bring its
    # version's series back. Every update runs on the event loop thread.

    def __init__(self, ready: Callable[[], bool] | None = None, *, process: bool = True) -> None:
        self.reloads = 0
        self.reload_failures = 0
        self.calls: dict[str, int] = dict.fromkeys(CALL_OUTCOMES, 0)
        self.in_flight = 0
        self.call_seconds = Histogram(CALL_BUCKETS)
        self.change_to_live_seconds = Histogram(LIVE_BUCKETS)
        self.report_lag_seconds = Histogram(LIVE_BUCKETS)
        self.per_plugin: dict[tuple[str, str], _PluginSeries] = {}
        self.retired: dict[tuple[str, str], None] = {}
        self.ready = ready
        # Read at render time, like `ready` (the host's count of abandoned worker threads).
        self.abandoned_threads: Callable[[], int] | None = None
        # The trigger engine's counts (None: the host runs no trigger engine); see
        # follow_triggers.
        self.triggers: TriggerStats | None = None
        self.trigger_lag_seconds = Histogram(CALL_BUCKETS)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        # The process collector reads /proc: rendered apart, in a worker thread.
        self.process_registry: CollectorRegistry | None = None
        if process:
            self.process_registry = CollectorRegistry(auto_describe=False)
            ProcessCollector(registry=self.process_registry)
            GCCollector(registry=self.process_registry)
            PlatformCollector(registry=self.process_registry)

    def count_call(
        self,
        outcome: str,
        seconds: float | None = None,
        *,
        plugin: str | None = None,
        version: str | None = None,
    ) -> None:
        """Count one call by outcome (and by plugin version when it reached one); observe
        its duration when it ran."""
        self.calls[outcome] = self.calls.get(outcome, 0) + 1
        if seconds is not None:
            self.call_seconds.observe(seconds)
        if plugin is None or version is None:
            return
        key = (plugin, version)
        series = self.per_plugin.get(key)
        if series is None:
            if key in self.retired:
                return
            series = self.per_plugin[key] = _PluginSeries()
        series.calls[outcome] = series.calls.get(outcome, 0) + 1
        if seconds is not None:
            series.seconds.observe(seconds)

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
        elif event in ("plugin.retired", "plugin.unloaded"):
            key = (fields.get("plugin"), fields.get("version"))
            self.per_plugin.pop(key, None)
            self.retired[key] = None
            if len(self.retired) > RETIRED_MEMORY:
                del self.retired[next(iter(self.retired))]

    def render(self) -> str:
        """The metrics in the Prometheus text exposition format (version 0.0.4)."""
        return self.render_host() + self.render_process()

    def render_host(self) -> str:
        """The ``plugin_host_*`` families (memory only: fine on the event loop)."""
        return generate_latest(self.registry).decode()

    def render_process(self) -> str:
        """The process, GC and platform families (reads /proc: blocking, use a thread)."""
        if self.process_registry is None:
            return ""
        return generate_latest(self.process_registry).decode()


class _Collector:
    """Turns :class:`Metrics`' counts into metric families at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        yield _counter("plugin_host_reloads", "Plugin versions that went live.", m.reloads)
        yield _counter(
            "plugin_host_reload_failures",
            "Plugin versions refused (compile, setup or validation failed).",
            m.reload_failures,
        )
        calls = CounterMetricFamily(
            "plugin_host_calls", "Calls through the HTTP API, by outcome.", labels=["outcome"]
        )
        for outcome, n in m.calls.items():
            calls.add_metric([outcome], n)
        yield calls
        yield _histogram(
            "plugin_host_call_seconds", "Duration of calls through the HTTP API.", m.call_seconds
        )
        per_calls = CounterMetricFamily(
            "plugin_host_plugin_calls",
            "Calls through the HTTP API that reached a plugin version, by outcome.",
            labels=["plugin", "version", "outcome"],
        )
        per_seconds = HistogramMetricFamily(
            "plugin_host_plugin_call_seconds",
            "Duration of calls through the HTTP API, per plugin version.",
            labels=["plugin", "version"],
        )
        for (plugin, version), series in list(m.per_plugin.items()):
            for outcome, n in series.calls.items():
                per_calls.add_metric([plugin, version, outcome], n)
            if series.seconds.count:
                per_seconds.add_metric(
                    [plugin, version], series.seconds.cumulative(), series.seconds.sum
                )
        yield per_calls
        yield per_seconds
        yield _histogram(
            "plugin_host_change_to_live_seconds",
            "Time from a record change to its version serving.",
            m.change_to_live_seconds,
        )
        yield _histogram(
            "plugin_host_fleet_report_lag_seconds",
            "Time from a change of what this host serves to its report in the hosts collection.",
            m.report_lag_seconds,
        )
        yield GaugeMetricFamily(
            "plugin_host_in_flight_calls", "Calls through the HTTP API running now.", m.in_flight
        )
        if m.ready is not None:
            yield GaugeMetricFamily(
                "plugin_host_ready", "1 when the host is ready to serve, else 0.", int(m.ready())
            )
        if m.abandoned_threads is not None:
            yield GaugeMetricFamily(
                "plugin_host_abandoned_threads",
                "Worker threads of timed-out sync calls still blocked, each holding a slot.",
                m.abandoned_threads(),
            )
        if m.triggers is not None:
            yield from _trigger_families(m.triggers, m.trigger_lag_seconds)


def follow_triggers(stats: TriggerStats | None, metrics: Metrics) -> None:
    """Expose a trigger engine's counts (``host.trigger_stats``) in ``metrics``."""
    metrics.triggers = stats
    if stats is not None:
        stats.lag_observer = metrics.trigger_lag_seconds.observe


def _trigger_families(t: TriggerStats, lag: Histogram) -> Iterator[Metric]:
    for name, help_text, counts in (
        ("plugin_host_trigger_events", "Change events handled by triggers.", t.events),
        ("plugin_host_trigger_dead_letters", "Events dead-lettered by triggers.", t.dead_letters),
        (
            "plugin_host_trigger_history_lost",
            "Times a trigger's resume point had left the oplog.",
            t.history_losses,
        ),
    ):
        family = CounterMetricFamily(name, help_text, labels=["trigger"])
        for trigger, n in list(counts.items()):
            family.add_metric([trigger], n)
        yield family
    yield _histogram(
        "plugin_host_trigger_lag_seconds",
        "Time from a change event's cluster time to its handler's start.",
        lag,
    )
    yield GaugeMetricFamily(
        "plugin_host_trigger_in_flight", "Trigger handlers running now.", t.in_flight
    )
    yield GaugeMetricFamily(
        "plugin_host_triggers_owned", "Triggers whose lease this host holds.", t.owned
    )


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, value=value)


def _histogram(name: str, help_text: str, hist: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, help_text, buckets=hist.cumulative(), sum_value=hist.sum)


async def follow_events(host: PluginHost, metrics: Metrics) -> None:
    """Feed ``metrics`` (and, when tracing is on, ``plugin.reload`` spans) from
    ``host.events()`` until cancelled (run it as a background task)."""
    async with host.events() as events:
        async for event in events:
            metrics.on_event(event.event, event.fields)
            if tracing.tracer is not None and event.event in tracing.RELOAD_EVENTS:
                tracing.reload_span(event.event, event.fields)
