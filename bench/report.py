"""The report: goals, a Markdown table, JSON and a plot of the latency distributions.

Every number in the report comes from the results of the run; only the goals' aims
are constants, and they are stated as aims, not as assertions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fleet import markdown_lines as fleet_lines
from .rollout import markdown_lines as rollout_lines
from .swap import SAMPLE_EVERY
from .triggers import markdown_lines as trigger_lines

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True, slots=True)
class Goal:
    """One aim for the closing note.

    Attributes:
        key: Stable identifier in the JSON.
        text: What the goal says.
        aim: The bound.
        unit: Unit of the figure.
        higher_is_better: Whether the figure must be at least (True) or at most the aim.
        figure: Extracts the figure from one target's results (None: not measured).
    """

    key: str
    text: str
    aim: float
    unit: str
    higher_is_better: bool
    figure: Callable[[dict[str, Any]], float | None]


def _get(results: dict[str, Any], *path: str) -> Any:
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _under_load_p99(callers: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: _get(r, "latency", "under_load", callers, "served_ms", "p99")


def _worst_drop(results: dict[str, Any]) -> float | None:
    runs = results.get("swap")
    if not isinstance(runs, dict) or "error" in runs:
        return None
    drops = [run["throughput_drop_pct"] for run in _swap_runs(runs) if "throughput_drop_pct" in run]
    return max(drops) if drops else None


def _swap_runs(runs: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-caller-count entries of the swap group (``_cost`` is not one)."""
    return [run for key, run in runs.items() if not key.startswith("_")]


def _failed_calls(results: dict[str, Any]) -> float | None:
    runs = results.get("swap")
    if not isinstance(runs, dict) or "error" in runs:
        return None
    return float(sum(run["failed"] + run["stale"] for run in _swap_runs(runs)))


GOALS: tuple[Goal, ...] = (
    Goal(
        "change_to_live_p99",
        "change-to-live p99 (embedded server)",
        10.0,
        "ms",
        False,
        lambda r: _get(r, "latency", "ours", "served_ms", "p99"),
    ),
    Goal(
        "call_overhead",
        "per-call overhead over a direct call, async plugin, no timeout",
        5.0,
        "µs",
        False,
        lambda r: _get(r, "throughput", "async", "overhead_us"),
    ),
    Goal(
        "call_overhead_2us",
        "in-process call overhead over a direct call, async plugin, no timeout (issue 19)",
        2.0,
        "µs",
        False,
        lambda r: _get(r, "throughput", "async", "overhead_us"),
    ),
    Goal(
        "call_overhead_timeout_2us",
        "in-process call overhead over a direct call, async plugin with a timeout (issue 19)",
        2.0,
        "µs",
        False,
        lambda r: _get(r, "throughput", "async_timeout", "overhead_us"),
    ),
    Goal(
        "vs_seed",
        "throughput over seed-style hot-require (async plugin)",
        100.0,
        "x",
        True,
        lambda r: _get(r, "throughput", "async", "vs_seed"),
    ),
    Goal(
        "cold_start_10k",
        "cold start of 10,000 plugins to ready()",
        3.0,
        "s",
        False,
        lambda r: _get(r, "coldstart", "10000", "ready_s"),
    ),
    Goal(
        "change_to_live_idle_p99",
        "change-to-live p99, idle (the under-load run with 0 callers)",
        5.0,
        "ms",
        False,
        _under_load_p99("0"),
    ),
    Goal(
        "change_to_live_50_p99",
        "change-to-live p99 under 50 spinning callers",
        20.0,
        "ms",
        False,
        _under_load_p99("50"),
    ),
    Goal(
        "change_to_live_200_p99",
        "change-to-live p99 under 200 spinning callers",
        50.0,
        "ms",
        False,
        _under_load_p99("200"),
    ),
    Goal(
        "storm_throughput_drop",
        "call throughput drop while a reload storm runs (worst caller count)",
        10.0,
        "%",
        False,
        _worst_drop,
    ),
    Goal(
        "swap_failures",
        "failed (or stale) calls under swaps",
        0.0,
        "calls",
        False,
        _failed_calls,
    ),
)


def _http_ratio(conns: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: _get(r, "http", "default", "ratio", conns, "req_per_s")


def _failover_over_ttl(r: dict[str, Any]) -> float | None:
    over = _get(r, "triggers", "failover", "over_ttl_s")
    return float(over) if isinstance(over, int | float) else None


def _trigger_lost(r: dict[str, Any]) -> float | None:
    lost = _get(r, "triggers", "failover", "lost")
    return float(lost) if isinstance(lost, int) else None


GOALS = (
    *GOALS,
    Goal(
        "trigger_lag_p99",
        "trigger lag p99, insert ack → handler start, light load",
        10.0,
        "ms",
        False,
        lambda r: _get(r, "triggers", "lag", "lag_ms", "p99"),
    ),
    Goal(
        "trigger_throughput_ratio",
        "no-op trigger events/s vs a bare PyMongo watch() loop (per_key)",
        0.8,
        "x",
        True,
        lambda r: _get(r, "triggers", "throughput", "ratio_per_key"),
    ),
    Goal(
        "trigger_failover_over_ttl",
        "kill -9 of the trigger owner → survivor holds the lease, beyond the lease TTL",
        1.0,
        "s",
        False,
        _failover_over_ttl,
    ),
    Goal("trigger_events_lost", "trigger events lost in failover", 0.0, "", False, _trigger_lost),
)


def _http_p99_delta(r: dict[str, Any]) -> float | None:
    deltas = [_get(r, "http", "default", "ratio", c, "p99_delta_ms") for c in ("1", "32")]
    known = [d for d in deltas if d is not None]
    return max(known) if known else None


GOALS = (
    *GOALS,
    Goal(
        "http_ratio_32",
        "HTTP req/s vs bare Starlette on Uvicorn, 32 connections",
        0.8,
        "x",
        True,
        _http_ratio("32"),
    ),
    Goal(
        "http_ratio_1",
        "HTTP req/s vs bare Starlette on Uvicorn, 1 keep-alive connection",
        0.8,
        "x",
        True,
        _http_ratio("1"),
    ),
    Goal(
        "http_p99_delta",
        "HTTP p99 over the baseline's p99 (worst of 1 and 32 connections)",
        1.0,
        "ms",
        False,
        _http_p99_delta,
    ),
    Goal(
        "rollout_routing_delta",
        "a 10% canary's routing + statistics cost per call over no rollout",
        1.0,
        "µs",
        False,
        lambda r: _get(r, "rollout", "routing", "canary_delta_us"),
    ),
    Goal(
        "rollout_detect_local",
        "failing candidate out of rotation after its min_calls-th call (worst round)",
        100.0,
        "ms",
        False,
        lambda r: _get(r, "rollout", "detection", "local_ms", "max"),
    ),
    Goal(
        "rollout_detect_fleet",
        "failing candidate dropped by a second host (worst round)",
        1000.0,
        "ms",
        False,
        lambda r: _get(r, "rollout", "detection", "fleet_ms", "max"),
    ),
    Goal(
        "rollout_shadow_ratio",
        "caller's path of stable calls with a 10% shadow over none",
        1.05,
        "x",
        False,
        lambda r: _get(r, "rollout", "shadow", "ratio"),
    ),
)


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal against one target's results: measured figure and met/missed."""
    out = []
    for goal in GOALS:
        value = goal.figure(results)
        if value is None:
            status = "not measured"
        elif goal.higher_is_better:
            status = "met" if value >= goal.aim else "missed"
        else:
            status = "met" if value <= goal.aim else "missed"
        out.append(
            {
                "key": goal.key,
                "goal": goal.text,
                "aim": goal.aim,
                "unit": goal.unit,
                "at_least": goal.higher_is_better,
                "measured": value,
                "status": status,
            }
        )
    return out


# -- formatting ------------------------------------------------------------------------------


def _n(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def _lat(summary: Any, digits: int = 2) -> str:
    if not isinstance(summary, dict) or not summary.get("n"):
        return "—"
    return " / ".join(_n(summary[k], digits) for k in ("p50", "p99", "max"))


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _target_table(results: dict[str, Any]) -> list[str]:
    lines = [
        _row(
            [
                "Figure",
                "plugin-host",
                "polling reloader (1 s)",
                "seed-style hot-require",
                "direct call",
            ]
        ),
        _row(["---", "---:", "---:", "---:", "---:"]),
    ]
    lat = results.get("latency", {})
    if "error" in lat:
        lines.append(_row(["latency group failed", lat["error"], "", "", ""]))
    elif lat:
        ours, polling = lat["ours"], lat["polling"]
        lines.append(
            _row(
                [
                    f"change-to-live p50 / p99 / max, ms ({ours['served_ms']['n']} updates; "
                    "ack → first call served)",
                    _lat(ours["served_ms"]),
                    _lat(polling["served_ms"], 0),
                    "0 (reads the record on every call)",
                    "— (no reload)",
                ]
            )
        )
        lines.append(
            _row(
                [
                    "ack → `plugin.reloaded` event p50 / p99 / max, ms",
                    _lat(ours["event_ms"]),
                    "—",
                    "—",
                    "—",
                ]
            )
        )
        for callers, entry in lat.get("under_load", {}).items():
            lines.append(
                _row(
                    [
                        f"change-to-live under load, {callers} spinning callers, p50 / p99 / "
                        f"max ms ({entry['served_ms']['n']} updates; getMore reply p50 / p99 / "
                        f"max ms after the ack; {entry['await_timeout_events']} events at an "
                        "await timeout)",
                        f"{_lat(entry['served_ms'])} ({_lat(entry['stream_ms'])})",
                        "—",
                        "—",
                        "—",
                    ]
                )
            )
        rel = lat["reload"]
        lines.append(
            _row(
                [
                    f"reload throughput, updates/s made live ({rel['updates']:,} sequential "
                    f"updates of one plugin; {rel['compiled']:,} compiled)",
                    _n(rel["updates_per_s"], 0),
                    "—",
                    "—",
                    "—",
                ]
            )
        )
    tp = results.get("throughput", {})
    if "error" in tp:
        lines.append(_row(["throughput group failed", tp["error"], "", "", ""]))
    for key, entry in tp.items() if "error" not in tp else ():
        label = f"{entry['kind']} plugin{', timeout' if entry['timeout'] else ''}"
        direct = _n(entry["direct_calls_per_s"], 0)
        if "direct_thread_calls_per_s" in entry:
            direct += f" (in a thread: {_n(entry['direct_thread_calls_per_s'], 0)})"
        lines.append(
            _row(
                [
                    f"calls/s, {label} (one caller)",
                    _n(entry["ours_calls_per_s"], 0),
                    "—",
                    _n(entry["seed_calls_per_s"], 0),
                    direct,
                ]
            )
        )
        over = f"{_n(entry['overhead_us'], 2)}"
        if "overhead_vs_thread_us" in entry:
            over += f" ({_n(entry['overhead_vs_thread_us'], 2)} over the thread hop)"
        lines.append(
            _row(
                [
                    f"µs per call, {label} (overhead over direct)",
                    f"{_n(entry['ours_us'], 2)} (+{over})",
                    "—",
                    _n(entry["seed_us"], 0),
                    _n(entry["direct_us"], 3),
                ]
            )
        )
        if "ours_frames_per_call" in entry:  # profiled: independent of the machine's load
            lines.append(
                _row(
                    [
                        f"Python frames / C calls per call, {label}",
                        f"{_n(entry['ours_frames_per_call'], 2)} / "
                        f"{_n(entry['ours_c_calls_per_call'], 2)}",
                        "—",
                        "—",
                        "—",
                    ]
                )
            )
        del key
    cold = results.get("coldstart", {})
    if "error" in cold:
        lines.append(_row(["cold start failed", cold["error"], "", "", ""]))
    for count, entry in cold.items() if "error" not in cold else ():
        lines.append(
            _row(
                [
                    f"cold start, {int(count):,} plugins: s to ready() "
                    f"({entry['loaded']:,} loaded)",
                    _n(entry["ready_s"], 2),
                    "—",
                    "—",
                    "—",
                ]
            )
        )
        lines.append(
            _row(
                [
                    f"cold start, {int(count):,} plugins: RSS delta MB (KB per plugin)",
                    f"{_n(entry['rss_delta_mb'])} ({_n(entry['kb_per_plugin'])})",
                    "—",
                    "—",
                    "—",
                ]
            )
        )
    start = results.get("startup", {})
    if "error" in start:
        lines.append(_row(["CLI start-up failed", start["error"], "", "", ""]))
    for command, entry in start.items() if "error" not in start else ():
        lines.append(
            _row(
                [
                    f"start-up, `{command}`: ms wall (ms in imports, `-X importtime`)",
                    f"{_n(entry['wall_ms'], 0)} ({_n(entry['import_ms'], 0)})",
                    "—",
                    "—",
                    "—",
                ]
            )
        )
    swap = results.get("swap", {})
    if "error" in swap:
        lines.append(_row(["swap-under-load failed", swap["error"], "", "", ""]))
    for callers, entry in swap.items() if "error" not in swap else ():
        if callers.startswith("_"):
            continue
        rates = entry.get("drop_at_rate") or {}
        lines.append(
            _row(
                [
                    f"swap under load, {callers} callers, a storm of "
                    f"{entry.get('storm_rate_per_s', 0):g} updates/s over {entry['plugins']} "
                    f"plugins for {entry['seconds']:.0f} s: calls/s (quiet: no updates); "
                    "drop; failed; stale"
                    + "".join(f"; drop at {rate} updates/s" for rate in rates),
                    f"{_n(entry['calls_per_s'], 0)} ({_n(entry.get('quiet_calls_per_s'), 0)}); "
                    f"{_n(entry.get('throughput_drop_pct'))} %; {entry['failed']}; "
                    f"{entry['stale']}" + "".join(f"; {_n(drop)} %" for drop in rates.values()),
                    "—",
                    "—",
                    "—",
                ]
            )
        )
        lines.append(
            _row(
                [
                    f"… {callers} callers: call latency p50 / p99 / max µs, async plugins; "
                    "sync plugins (worker threads); "
                    f"{entry['reloads']:,} reloads of {entry['updates']:,} updates, "
                    "`change_to_live_ms` p50 / p99 / max (BSON wallTime, 1 ms resolution)",
                    f"{_lat(entry['call_us'], 1)}; {_lat(entry.get('sync_call_us'), 0)}; "
                    f"{_lat(entry['reload_lag_ms'], 1)}",
                    "—",
                    "—",
                    "—",
                ]
            )
        )
    cost = swap.get("_cost") if "error" not in swap else None
    if isinstance(cost, dict):
        lines.append(
            _row(
                [
                    f"reload cost: event-loop CPU per reload, no callers, "
                    f"{cost['storm_rate_per_s']:g} updates/s for {cost['seconds']:.0f} s "
                    "(loop thread's CPU time, idle seconds subtracted); loop busy",
                    f"{_n(cost.get('loop_cpu_per_reload_ms'), 3)} ms; "
                    f"{_n(cost.get('loop_share_pct'))} %",
                    "—",
                    "—",
                    "—",
                ]
            )
        )
        if cost.get("process_cpu_per_update_ms") is not None:
            lines.append(
                _row(
                    [
                        "reload storm's CPU per update written: the host process (every "
                        "thread); the embedded server's process; the compiler processes",
                        f"{_n(cost.get('process_cpu_per_update_ms'), 3)} ms; "
                        f"{_n(cost.get('server_cpu_per_update_ms'), 3)} ms; "
                        f"{_n(cost.get('compiler_cpu_per_update_ms'), 3)} ms",
                        "—",
                        "—",
                        "—",
                    ]
                )
            )
    return lines


def _http_point(point: Any) -> str:
    if not isinstance(point, dict):
        return "—"
    errors = point["errors"] + point["non_2xx"]
    text = f"{_n(point['req_per_s'], 0)} ({_n(point['p50_ms'], 2)} / {_n(point['p99_ms'], 2)})"
    return text + (f", **{errors:,} errors**" if errors else "")


def _cpu_point(out: dict[str, Any], conns: str) -> str:
    ratio = out.get("ratio", {}).get(conns, {}).get("cpu_ratio")
    if not ratio:
        return "—"
    ours = out["daemon"][conns]["cpu_us_per_req"]
    base = out["baseline"][conns]["cpu_us_per_req"]
    return f"{_n(ratio, 2)}x ({_n(ours, 0)} / {_n(base, 0)} µs)"


def http_table(results: dict[str, Any]) -> list[str]:
    """The HTTP group: req/s (p50 / p99 ms) per connection count, and ratios to the baseline."""
    group = results.get("http")
    if not isinstance(group, dict):
        return []
    if "error" in group or "skipped" in group:
        return [f"HTTP benchmark: {group.get('error') or 'skipped: ' + group['skipped']}", ""]
    conns = ("1", "32", "256")
    lines = [
        _row(["HTTP, req/s (p50 / p99 ms)", *(f"{c} conn." for c in conns)]),
        _row(["---", *("---:" for _ in conns)]),
    ]
    for label, out in group.items():
        if not isinstance(out, dict) or "baseline" not in out:
            continue
        stack = out["stack"]
        where = f"{stack['loop']} + {stack['http_parser']}"
        rows = [
            (f"bare Starlette echo on Uvicorn ({where})", out["baseline"]),
            (f"plugin-host, async echo plugin ({where})", out["daemon"]),
            ("plugin-host, sync `def main` echo", out.get("daemon_sync")),
            ("plugin-host, one `ctx.db` `find_one`", out.get("daemon_find")),
            ("plugin-host, async echo, `--access-log`", out.get("daemon_access_log")),
            ("plugin-host, async echo, `--otel` (spans to stdout)", out.get("daemon_otel")),
        ]
        for name, points in rows:
            if isinstance(points, dict):
                lines.append(_row([name, *(_http_point(points.get(c)) for c in conns)]))
        ratio = out.get("ratio", {})
        lines.append(
            _row(
                [
                    f"plugin-host ÷ baseline, req/s; p99 - baseline p99 ms ({label} stack)",
                    *(
                        f"{_n(ratio[c]['req_per_s'], 2)}x; {ratio[c]['p99_delta_ms']:+.2f}"
                        if c in ratio
                        else "—"
                        for c in conns
                    ),
                ]
            )
        )
        if any(isinstance(ratio.get(c), dict) and ratio[c].get("cpu_ratio") for c in conns):
            lines.append(
                _row(
                    [
                        f"plugin-host ÷ baseline, server CPU per request ({label} stack)",
                        *(_cpu_point(out, c) for c in conns),
                    ]
                )
            )
    seconds = group.get("seconds")
    lines += [
        "",
        f"wrk, {group.get('wrk_threads', 1)} thread, {seconds:g} s per point, best of "
        f"{group.get('repeats', 1)} interleaved runs.",
        "",
    ]
    return lines


def reload_http_table(results: dict[str, Any]) -> list[str]:
    """The daemon under wrk while reloads run: change-to-live and req/s with and without."""
    group = results.get("reload_http")
    if not isinstance(group, dict):
        return []
    if "error" in group or "skipped" in group:
        reason = group.get("error") or "skipped: " + str(group.get("skipped"))
        return [f"Daemon reloads under wrk: {reason}", ""]
    lines = [
        _row(
            [
                f"daemon under wrk, reloads every live + {group.get('pause_s', 0) * 1000:.0f} ms",
                "change-to-live p50 / p99 / max ms (reloads)",
                "req/s quiet (p99 ms)",
                "req/s reloading (p99 ms)",
                "drop",
            ]
        ),
        _row(["---", "---:", "---:", "---:", "---:"]),
    ]
    for conns, point in group.items():
        if not isinstance(point, dict) or "quiet" not in point:
            continue
        quiet, busy = point["quiet"], point["reloading"]
        lines.append(
            _row(
                [
                    f"{conns} connections",
                    f"{_lat(point['served_ms'], 1)} ({point['reloads']})",
                    f"{_n(quiet['req_per_s'], 0)} ({_n(quiet['p99_ms'], 1)})",
                    f"{_n(busy['req_per_s'], 0)} ({_n(busy['p99_ms'], 1)})",
                    f"{_n(point.get('drop_pct'))} %",
                ]
            )
        )
    lines += [
        "",
        "Change-to-live: from the update's ack to the first HTTP response naming the new "
        "version, read by a probe connection queued with wrk's; wrk "
        f"{group.get('wrk_threads', 1)} thread, {group.get('seconds', 0):g} s per run, best "
        f"of {group.get('repeats', 1)} interleaved runs each.",
        "",
    ]
    return lines


def _goal_table(goals: list[dict[str, Any]]) -> list[str]:
    lines = [_row(["Goal", "Aim", "Measured", "Result"]), _row(["---", "---:", "---:", "---"])]
    for goal in goals:
        sign = "≥" if goal["at_least"] else "≤"
        # The aim as stated (1.05 stays 1.05: a rounded aim would misstate the goal).
        aim = f"{sign} {goal['aim']:,g} {goal['unit']}"
        measured = "—" if goal["measured"] is None else f"{_n(goal['measured'], 2)} {goal['unit']}"
        mark = {"met": "met", "missed": "**missed**"}.get(goal["status"], goal["status"])
        lines.append(_row([goal["goal"], aim, measured, mark]))
    return lines


def _issue_table(results: dict[str, Any]) -> list[str]:
    issue = _get(results, "latency", "issue", "served_ms")
    tp = results.get("throughput", {})
    lines = [_row(["Figure", "Value"]), _row(["---", "---:"])]
    if isinstance(issue, dict) and issue.get("n"):
        lines.append(
            _row(
                [
                    f"change-to-live median / p99 ({issue['n']} updates), ms",
                    f"{_n(issue['p50'], 2)} / {_n(issue['p99'], 2)}",
                ]
            )
        )
    for key in ("async", "async_timeout", "sync", "sync_timeout"):
        entry = tp.get(key) if isinstance(tp, dict) else None
        if isinstance(entry, dict):
            lines.append(
                _row(
                    [
                        "`host.call` minus a direct call of the same function, "
                        f"{key.replace('_', ' + ')}, µs per call",
                        _n(entry["overhead_us"], 2),
                    ]
                )
            )
    return lines


def machine_line(machine: dict[str, Any]) -> str:
    """One line describing the machine and the commit."""
    load = machine.get("load_avg_start")
    load_text = f"; load average at start {load}" if load is not None else ""
    return (
        f"{machine['cpu_count']} CPUs ({machine['cpu_model']}), "
        f"{machine['memory_gb']} GB, Python {machine['python']} on {machine['platform']}, "
        f"commit `{machine['git_commit']}`, {machine['date']}{load_text}"
    )


def markdown(report: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    machine = report["machine"]
    cfg = report["config"]
    out = [
        f"Run: `{report['command']}` ({'quick' if cfg['quick'] else 'full'}, "
        f"{report['elapsed_s']:.0f} s). Machine: {machine_line(machine)}.",
        "",
    ]
    for label, target in report["targets"].items():
        results = target["results"]
        out += [
            f"### {label}: {target['description']}",
            "",
            *_target_table(results),
            "",
            *http_table(results),
            *reload_http_table(results),
            "Goals (aims, not assertions):",
            "",
            *_goal_table(target["goals"]),
            "",
            "Host-core issue figures (same run):",
            "",
            *_issue_table(results),
            "",
        ]
        if "triggers" in results:  # bench/triggers.py
            out += ["Trigger figures (same run):", "", *trigger_lines(results["triggers"]), ""]
        if "fleet" in results:  # bench/fleet.py: N daemons on this server
            out += [
                "Fleet figures (same run, see docs/fleet.md):",
                "",
                *fleet_lines(results["fleet"]),
                "",
            ]
        if "rollout" in results:  # bench/rollout.py: progressive delivery
            out += ["Rollout figures (same run):", "", *rollout_lines(results["rollout"]), ""]
    out += [
        "![Latency distributions](latency.png)",
        "",
        report["notes"],
    ]
    return "\n".join(out).rstrip() + "\n"


def _strip_samples(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_samples(v) for k, v in node.items() if not k.endswith("samples_us")}
    return node


def write_json(report: dict[str, Any], path: Path) -> None:
    """The report as JSON (change-to-live samples kept; per-call samples summarised)."""
    path.write_text(json.dumps(_strip_samples(report), indent=2, default=str) + "\n")


def plot(report: dict[str, Any], path: Path) -> None:
    """ECDFs of change-to-live (ours vs polling) and of call latency under swaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = report["targets"]
    fig, axes = plt.subplots(len(targets), 2, figsize=(12, 4.2 * len(targets)), squeeze=False)
    for row, (label, target) in enumerate(targets.items()):
        results = target["results"]
        ax = axes[row][0]
        for key, name in (("ours", "plugin-host"), ("polling", "polling reloader (1 s)")):
            samples = _get(results, "latency", key, "samples_ms")
            if samples:
                _ecdf(ax, samples, f"{name} (n={len(samples)})")
        ax.axvline(10.0, color="grey", linestyle=":", linewidth=1, label="goal: p99 ≤ 10 ms")
        ax.set_xscale("log")
        ax.set_xlabel("change-to-live, ms (update ack → first call served)")
        ax.set_ylabel("fraction of updates")
        ax.set_title(f"{label}: change-to-live")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        ax = axes[row][1]
        for callers, entry in (results.get("swap") or {}).items():
            if not isinstance(entry, dict):
                continue
            for key, kind in (("call_samples_us", "async"), ("sync_call_samples_us", "sync")):
                samples = entry.get(key)
                if samples:
                    _ecdf(ax, samples, f"{callers} callers, {kind} plugins (n={len(samples)})")
        ax.set_xscale("log")
        ax.set_xlabel("call latency under swaps, µs")
        ax.set_ylabel("fraction of calls")
        ax.set_title(f"{label}: host.call under swaps (every {SAMPLE_EVERY}th call)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    machine = report["machine"]
    fig.suptitle(
        f"plugin-host benchmarks ({'quick' if report['config']['quick'] else 'full'} run) — "
        f"{machine['cpu_count']} CPUs, Python {machine['python']}, "
        f"commit {machine['git_commit']}, {machine['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ecdf(ax: Any, samples: list[float], label: str) -> None:
    ordered = sorted(samples)
    n = len(ordered)
    ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=label)
