"""Tests for host.metrics: prometheus-client exposition, buckets, per-plugin cardinality."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pymongo.asynchronous.database import AsyncDatabase

from host import PluginHost
from host.http import create_app
from host.metrics import Histogram, Metrics
from host.publish import publish

from .support import wait_until

pytestmark = pytest.mark.anyio

Doc = dict[str, object]
JSON = {"content-type": "application/json"}
DOCUMENTED = {
    "plugin_host_reloads": "counter",
    "plugin_host_reload_failures": "counter",
    "plugin_host_calls": "counter",
    "plugin_host_call_seconds": "histogram",
    "plugin_host_plugin_calls": "counter",
    "plugin_host_plugin_call_seconds": "histogram",
    "plugin_host_change_to_live_seconds": "histogram",
    "plugin_host_fleet_report_lag_seconds": "histogram",
    "plugin_host_in_flight_calls": "gauge",
    "plugin_host_ready": "gauge",
}


def families(text: str) -> dict[str, object]:
    """Parse an exposition with prometheus-client's own parser: name -> family."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def per_plugin_series(text: str) -> set[tuple[str, str]]:
    """The (plugin, version) pairs that have per-plugin call series."""
    out = set()
    for family in text_string_to_metric_families(text):
        if family.name in ("plugin_host_plugin_calls", "plugin_host_plugin_call_seconds"):
            for sample in family.samples:
                out.add((sample.labels["plugin"], sample.labels["version"]))
    return out


def test_exposition_has_documented_names_and_standard_collectors() -> None:
    """Every documented family is there with its type, plus process_* and python_gc_*."""
    metrics = Metrics(ready=lambda: True)
    metrics.count_call("ok", 0.0003, plugin="echo", version="echo@r1:abc")
    parsed = families(metrics.render())
    for name, kind in DOCUMENTED.items():
        assert parsed[name].type == kind, name  # type: ignore[attr-defined]
    for standard in (
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds",
        "python_gc_objects_collected",
        "python_info",
    ):
        assert standard in parsed, standard
    text = metrics.render()
    assert "_created" not in text  # counts only: no creation-time series per counter


def test_call_buckets_resolve_sub_millisecond_calls() -> None:
    """A 0.3 ms call falls in the 0.5 ms bucket and not in the 0.25 ms one."""
    metrics = Metrics(process=False)
    metrics.count_call("ok", 0.0003)
    metrics.count_call("ok", 0.00009)
    text = metrics.render()
    assert 'plugin_host_call_seconds_bucket{le="0.0001"} 1.0' in text
    assert 'plugin_host_call_seconds_bucket{le="0.00025"} 1.0' in text
    assert 'plugin_host_call_seconds_bucket{le="0.0005"} 2.0' in text


def test_retired_version_series_are_dropped_and_stay_dropped() -> None:
    """plugin.retired drops a version's series; a late call to it does not bring them back."""
    metrics = Metrics(process=False)
    metrics.count_call("ok", 0.001, plugin="a", version="a@r1:1")
    metrics.count_call("ok", 0.001, plugin="a", version="a@r2:2")
    metrics.on_event("plugin.retired", {"plugin": "a", "version": "a@r1:1"})
    metrics.count_call("ok", 0.001, plugin="a", version="a@r1:1")  # abandoned call, late
    assert per_plugin_series(metrics.render()) == {("a", "a@r2:2")}
    assert 'plugin_host_calls_total{outcome="ok"} 3.0' in metrics.render()


@contextlib.asynccontextmanager
async def api(host: PluginHost) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the host's app, lifespan (and so the metrics' event feed) included."""
    app = create_app(host)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://plugin-host") as client,
    ):
        yield client


async def test_per_plugin_cardinality_is_bounded_by_loaded_versions(
    db: AsyncDatabase[Doc],
) -> None:
    """Per-plugin series exist only for loaded versions: made-up names add none, and a
    reloaded plugin's old version disappears when it retires."""
    await publish(db, "echo", "async def main(ctx, args):\n    return 1\n")
    async with PluginHost(db) as host, api(host) as client:
        first = host.plugin("echo")
        assert first is not None and first.version is not None
        for _ in range(3):
            assert (await client.post("/functions/echo/call", headers=JSON)).status_code == 200
        for n in range(50):
            assert (await client.post(f"/functions/nope{n}/call")).status_code == 404
        text = (await client.get("/metrics")).text
        assert per_plugin_series(text) == {("echo", first.version)}
        assert (
            f'plugin_host_plugin_calls_total{{outcome="ok",plugin="echo",version="{first.version}"}}'
            " 3.0" in text
        )
        for revision in range(2, 6):  # four reloads; each old version retires
            await publish(db, "echo", f"async def main(ctx, args):\n    return {revision}\n")

            async def served(want: int = revision) -> bool:
                reply = await client.post("/functions/echo/call", headers=JSON)
                return bool(reply.json()["result"] == want)

            await wait_until(served, f"revision {revision} serves")
        last = host.plugin("echo")
        assert last is not None

        async def only_live() -> bool:
            text = (await client.get("/metrics")).text
            return per_plugin_series(text) == {("echo", last.version)}

        await wait_until(only_live, "only the live version keeps per-plugin series")


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
    assert histogram.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert histogram.count == 4
    assert histogram.sum == pytest.approx(7.65)


def test_reload_events_count_and_observe_change_to_live() -> None:
    """plugin.loaded/reloaded count as reloads with their lag; refusals count as failures."""
    metrics = Metrics(process=False)
    metrics.on_event("plugin.loaded", {"change_to_live_ms": 20.0})
    metrics.on_event("plugin.reloaded", {})
    metrics.on_event("plugin.reload_failed", {})
    metrics.on_event("plugin.rejected", {})
    metrics.on_event("watch.resumed", {})
    samples = _samples(metrics.render())
    assert samples["plugin_host_reloads_total"] == "2.0"
    assert samples["plugin_host_reload_failures_total"] == "2.0"
    assert samples["plugin_host_change_to_live_seconds_count"] == "1.0"
    assert samples['plugin_host_change_to_live_seconds_bucket{le="0.025"}'] == "1.0"


def test_calls_by_outcome_and_gauges() -> None:
    """Calls are counted per outcome; ready and abandoned threads are read at render time."""
    abandoned = [0]
    metrics = Metrics(ready=lambda: True, process=False)
    metrics.abandoned_threads = lambda: abandoned[0]
    metrics.count_call("ok", 0.002)
    metrics.count_call("busy")
    abandoned[0] = 3
    text = metrics.render()
    samples = _samples(text)
    assert samples['plugin_host_calls_total{outcome="ok"}'] == "1.0"
    assert samples['plugin_host_calls_total{outcome="busy"}'] == "1.0"
    assert samples['plugin_host_calls_total{outcome="timeout"}'] == "0.0"
    assert samples["plugin_host_call_seconds_count"] == "1.0"
    assert samples["plugin_host_ready"] == "1.0"
    assert samples["plugin_host_abandoned_threads"] == "3.0"
    assert "# TYPE plugin_host_abandoned_threads gauge" in text


def test_optional_gauges_are_left_out_without_a_source() -> None:
    """Without a readiness or thread source, those gauges are not rendered at all."""
    samples = _samples(Metrics(process=False).render())
    assert "plugin_host_ready" not in samples
    assert "plugin_host_abandoned_threads" not in samples


def test_fleet_reports_observe_their_lag() -> None:
    """fleet.reported with a lag_ms is observed in seconds; a heartbeat without one is not."""
    metrics = Metrics(process=False)
    metrics.on_event("fleet.reported", {"lag_ms": 12.0, "kind": "full"})
    metrics.on_event("fleet.reported", {"kind": "heartbeat"})
    samples = _samples(metrics.render())
    assert samples["plugin_host_fleet_report_lag_seconds_count"] == "1.0"
    assert samples['plugin_host_fleet_report_lag_seconds_bucket{le="0.01"}'] == "0.0"
    assert samples['plugin_host_fleet_report_lag_seconds_bucket{le="0.025"}'] == "1.0"
