"""Per-plugin call rates, error rates and latency percentiles over the last minutes.

The console's ``GET /stats`` reads them. They are computed from the counts the HTTP API
already keeps (:class:`host.metrics.Metrics`, per plugin version) by sampling them every
:data:`INTERVAL_S` on the event loop: nothing is added to the call path. A sample is the
difference of two snapshots; percentiles are interpolated inside the histogram's buckets
(so they are estimates, as exact as the buckets: 100 µs to 30 s). Only calls through the
HTTP API are counted (the metrics' own scope).

The last error of each plugin (a call that raised, timed out, or a version refused) comes
from the host's events, with the plugin's own traceback lines.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio

from ..metrics import CALL_BUCKETS, Metrics

if TYPE_CHECKING:
    from ..runtime import PluginHost

__all__ = ("HISTORY_S", "INTERVAL_S", "WINDOW_S", "CallRates", "percentile")

INTERVAL_S = 2.0
"""Seconds between two samples."""
WINDOW_S = 60.0
"""The window of the figures in the table (calls/s, error rate, p50, p99)."""
HISTORY_S = 600.0
"""How far back the charts' series go."""

_FAILURES = ("failed", "timeout")  # outcomes that count as errors (busy is load, not error)
_ERROR_EVENTS = frozenset(
    {"call.failed", "call.timeout", "plugin.reload_failed", "plugin.rejected"}
)


def percentile(
    counts: Sequence[int], q: float, bounds: Sequence[float] = CALL_BUCKETS
) -> float | None:
    """The ``q`` quantile (0..1) of a histogram, interpolated inside its bucket, in seconds.

    Args:
        counts: Per-bucket counts (not cumulative), ``len(bounds) + 1`` of them (the last
            is ``+Inf``).
        q: The quantile, e.g. 0.99.
        bounds: The buckets' upper bounds.

    Returns:
        The estimate (the last bound for the ``+Inf`` bucket), or None without observations.
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    running = 0
    for i, n in enumerate(counts):
        if n and running + n >= rank:
            if i >= len(bounds):
                return bounds[-1]
            low = bounds[i - 1] if i else 0.0
            return low + (bounds[i] - low) * max(rank - running, 0.0) / n
        running += n
    return bounds[-1]


@dataclass(slots=True)
class _Sample:
    """What one plugin (or version) did during one interval."""

    at: float  # wall clock, seconds since the epoch
    seconds: float  # the interval's length
    calls: int
    failures: int
    buckets: list[int]


@dataclass(slots=True)
class _Series:
    samples: deque[_Sample] = field(default_factory=lambda: deque(maxlen=_maxlen()))


def _maxlen() -> int:
    return int(HISTORY_S / INTERVAL_S) + 1


def _figures(samples: Sequence[_Sample]) -> dict[str, Any]:
    seconds = sum(s.seconds for s in samples)
    calls = sum(s.calls for s in samples)
    failures = sum(s.failures for s in samples)
    buckets = (
        [sum(col) for col in zip(*(s.buckets for s in samples), strict=True)] if samples else []
    )
    p50 = percentile(buckets, 0.50) if buckets else None
    p99 = percentile(buckets, 0.99) if buckets else None
    return {
        "calls": calls,
        "failures": failures,
        "calls_per_s": round(calls / seconds, 3) if seconds else 0.0,
        "error_rate": round(failures / calls, 4) if calls else None,
        "p50_ms": None if p50 is None else round(p50 * 1000, 3),
        "p99_ms": None if p99 is None else round(p99 * 1000, 3),
    }


def _points(samples: Sequence[_Sample]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"t": [], "calls_per_s": [], "p99_ms": [], "error_rate": []}
    for s in samples:
        p99 = percentile(s.buckets, 0.99)
        out["t"].append(round(s.at, 3))
        out["calls_per_s"].append(round(s.calls / s.seconds, 3) if s.seconds else 0.0)
        out["p99_ms"].append(None if p99 is None else round(p99 * 1000, 3))
        out["error_rate"].append(round(s.failures / s.calls, 4) if s.calls else None)
    return out


class CallRates:
    """Samples :class:`Metrics` into per-plugin and per-version series.

    Args:
        metrics: The HTTP API's counts.
        interval: Seconds between samples.
    """

    # Invariant: every structure here is read and written on the event loop thread only
    # (the sampler task, the event follower and the /stats handler), so no lock. ``_last``
    # holds the previous snapshot of each live (plugin, version) key; a key that retired
    # since is dropped from it; a key seen for the first time is diffed against zero.

    def __init__(self, metrics: Metrics, interval: float = INTERVAL_S) -> None:
        self.metrics = metrics
        self.interval = interval
        self._last: dict[tuple[str, str], tuple[int, int, list[int]]] = {}
        self._last_at: float | None = None
        self._plugins: dict[str, _Series] = {}
        self._versions: dict[tuple[str, str], _Series] = {}
        self.last_errors: dict[str, dict[str, Any]] = {}

    def _snapshot(self) -> dict[tuple[str, str], tuple[int, int, list[int]]]:
        out: dict[tuple[str, str], tuple[int, int, list[int]]] = {}
        for key, series in list(self.metrics.per_plugin.items()):
            calls = sum(series.calls.values())
            failures = sum(series.calls.get(o, 0) for o in _FAILURES)
            out[key] = (calls, failures, list(series.seconds.counts))
        return out

    def sample(self, now: float | None = None) -> None:
        """Take one sample: what each plugin version did since the previous one."""
        wall = time.time() if now is None else now
        current = self._snapshot()
        if self._last_at is None:  # the baseline: calls before the console started
            self._last, self._last_at = current, wall
            return
        seconds = max(wall - self._last_at, 1e-9)
        per_plugin: dict[str, _Sample] = {}
        width = len(CALL_BUCKETS) + 1
        for key, (calls, failures, buckets) in current.items():
            before = self._last.get(key, (0, 0, [0] * width))
            sample = _Sample(
                wall,
                seconds,
                calls - before[0],
                failures - before[1],
                [a - b for a, b in zip(buckets, before[2], strict=True)],
            )
            self._versions.setdefault(key, _Series()).samples.append(sample)
            total = per_plugin.setdefault(key[0], _Sample(wall, seconds, 0, 0, [0] * width))
            total.calls += sample.calls
            total.failures += sample.failures
            total.buckets = [a + b for a, b in zip(total.buckets, sample.buckets, strict=True)]
        for name in set(self._plugins) | set(per_plugin):
            empty = _Sample(wall, seconds, 0, 0, [0] * width)
            self._plugins.setdefault(name, _Series()).samples.append(per_plugin.get(name, empty))
        for key in [k for k in self._versions if k not in current]:
            del self._versions[key]  # retired: its series went with it
        self._last, self._last_at = current, wall

    def on_event(self, event: str, fields: Mapping[str, Any], at: datetime) -> None:
        """Remember a plugin's latest error from one host event."""
        if event not in _ERROR_EVENTS:
            return
        name = fields.get("plugin")
        if not isinstance(name, str):
            return
        if event == "call.timeout":
            error_type, error = "PluginTimeout", f"timed out after {fields.get('timeout')} s"
        elif event == "plugin.rejected":
            error_type, error = "Rejected", str(fields.get("error") or fields.get("reason"))
        else:
            error_type = str(fields.get("error_type") or fields.get("stage") or "Error")
            error = str(fields.get("error"))
        self.last_errors[name] = {
            "event": event,
            "at": at.astimezone(UTC).isoformat(),
            "version": fields.get("version"),
            "error_type": error_type,
            "error": error,
            "traceback": fields.get("traceback"),
        }

    def as_dict(self, names: Sequence[str] = ()) -> dict[str, Any]:
        """The JSON of ``GET /stats``: figures over :data:`WINDOW_S` and series per plugin.

        Args:
            names: Plugins to include even without calls (those the host knows).

        Returns:
            ``{"interval_s", "window_s", "plugins": {name: {...}}}``.
        """
        window = max(int(WINDOW_S / self.interval), 1)
        plugins: dict[str, Any] = {}
        for name in sorted(set(names) | set(self._plugins) | set(self.last_errors)):
            samples = list(self._plugins[name].samples) if name in self._plugins else []
            versions = {
                version: {
                    **_figures(list(series.samples)[-window:]),
                    "series": _points(list(series.samples)),
                }
                for (plugin, version), series in sorted(self._versions.items())
                if plugin == name
            }
            plugins[name] = {
                **_figures(samples[-window:]),
                "series": _points(samples),
                "versions": versions,
                "last_error": self.last_errors.get(name),
            }
        return {
            "interval_s": self.interval,
            "window_s": WINDOW_S,
            "history_s": HISTORY_S,
            "plugins": plugins,
        }

    async def run(self, host: PluginHost) -> None:
        """Sample every ``interval`` and follow the host's errors, until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._follow, host)
            while True:
                self.sample()
                await anyio.sleep(self.interval)

    async def _follow(self, host: PluginHost) -> None:
        async with host.events() as events:
            async for event in events:
                self.on_event(event.event, event.fields, event.at)
