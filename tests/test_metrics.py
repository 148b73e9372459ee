"""Tests for host.metrics: the Prometheus text the daemon serves on /metrics."""

from __future__ import annotations

from host.metrics import Histogram, Metrics


def _samples(text: str) -> dict[str, str]:
    """Sample lines of an exposition text: ``name{labels}`` -> value (comments dropped)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = value
    return out


def test_histogram_buckets_are_cumulative() -> None:
    """Each bucket counts observations at or below its bound; +Inf holds them all."""
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 7.0):
        histogram.observe(value)
    lines = dict(line.rsplit(" ", 1) for line in histogram.lines("h"))
    assert lines['h_bucket{le="0.1"}'] == "2"
    assert lines['h_bucket{le="1"}'] == "3"
    assert lines['h_bucket{le="+Inf"}'] == "4"
    assert lines["h_count"] == "4"
    assert float(lines["h_sum"]) == 7.65


def test_reload_events_count_and_observe_change_to_live() -> None:
    """plugin.loaded/reloaded count as reloads with their lag; refusals count as failures."""
    metrics = Metrics()
    metrics.on_event("plugin.loaded", {"change_to_live_ms": 20.0})
    metrics.on_event("plugin.reloaded", {})
    metrics.on_event("plugin.reload_failed", {})
    metrics.on_event("plugin.rejected", {})
    metrics.on_event("watch.resumed", {})
    samples = _samples(metrics.render())
    assert samples["plugin_host_reloads_total"] == "2"
    assert samples["plugin_host_reload_failures_total"] == "2"
    assert samples["plugin_host_change_to_live_seconds_count"] == "1"
    assert samples['plugin_host_change_to_live_seconds_bucket{le="0.025"}'] == "1"


def test_calls_by_outcome_and_gauges() -> None:
    """Calls are counted per outcome; ready and abandoned threads are read at render time."""
    abandoned = [0]
    metrics = Metrics(ready=lambda: True)
    metrics.abandoned_threads = lambda: abandoned[0]
    metrics.count_call("ok", 0.002)
    metrics.count_call("busy")
    abandoned[0] = 3
    text = metrics.render()
    samples = _samples(text)
    assert samples['plugin_host_calls_total{outcome="ok"}'] == "1"
    assert samples['plugin_host_calls_total{outcome="busy"}'] == "1"
    assert samples['plugin_host_calls_total{outcome="timeout"}'] == "0"
    assert samples["plugin_host_call_seconds_count"] == "1"
    assert samples["plugin_host_ready"] == "1"
    assert samples["plugin_host_abandoned_threads"] == "3"
    assert "# TYPE plugin_host_abandoned_threads gauge" in text


def test_optional_gauges_are_left_out_without_a_source() -> None:
    """Without a readiness or thread source, those gauges are not rendered at all."""
    samples = _samples(Metrics().render())
    assert "plugin_host_ready" not in samples
    assert "plugin_host_abandoned_threads" not in samples
