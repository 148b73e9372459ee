"""Progressive delivery (issue 16): what a rollout costs a call, and how fast a bad one ends.

* **routing** — ``await host.call(name)`` per call, best of interleaved batches: a plugin
  with no rollout while no rollout runs anywhere (*baseline*), the same plugin while
  another plugin has a rollout (*other*), a plugin with a 10% canary (*canary*, unkeyed:
  weighted random) and with a sticky key (*sticky*: the contract's SHA-256 per call).
  The goal: a rollout adds at most 1 µs per call (*canary* minus *baseline*).
* **detection** — a candidate failing every call (weight 100, ``min_calls`` 20,
  ``max_error_rate`` 0.05), two hosts in this process on one database: from the start of
  its ``min_calls``-th call to the moment the calling host routes no more calls to it
  (the detecting host), and to the moment the second host has dropped it (it follows the
  abort written to the record through its change stream). Goals: 100 ms and 1 s.
* **shadow** — calls of the stable version with a 10% shadow running beside it, against
  the same plugin with none (interleaved batches; the mirrored calls run off the caller's
  path, and their cost is included because they share the loop). Goal: at most 5% more.

The rollouts are written to the record directly (the contract's documents), as
``host.publish``'s rollout operations would.
"""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime
from typing import Any

from host import PluginHost

from .common import Config, Target, async_source, database

RAISING = "async def main(ctx, args):\n    raise RuntimeError('candidate is broken')\n"
ECHO = "async def main(ctx, args):\n    return {'echo': args}\n"


async def _start(
    db: Any, name: str, source: str, weight: float, *, mode: str = "canary", **policy: Any
) -> int:
    record = await db.functions.find_one({"_id": name})
    revision = int(record.get("revision") or 0) + 1
    now = datetime.now(UTC)
    await db.functions.update_one(
        {"_id": name, "revision": record.get("revision"), "rollout": None},
        {
            "$set": {
                "rollout": {
                    "revision": revision,
                    "source": source,
                    "entrypoint": "main",
                    "signature": None,
                    "mode": mode,
                    "weight": weight,
                    "sticky_key": "user" if name.endswith("sticky") else None,
                    "policy": {"min_calls": 20, "window_s": 60.0, **policy},
                    "started_at": now,
                    "updated_at": now,
                }
            }
        },
    )
    return revision


async def _per_call_us(host: PluginHost, name: str, batch: int, args: Any = None) -> float:
    started = time.perf_counter()
    for _ in range(batch):
        await host.call(name, args)
    return (time.perf_counter() - started) / batch * 1e6


async def _best_of(
    host: PluginHost, variants: dict[str, tuple[str, Any]], batch: int, repeats: int
) -> dict[str, float]:
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        for variant, (name, args) in variants.items():
            samples[variant].append(await _per_call_us(host, name, batch, args))
    return {v: round(min(s), 3) for v, s in samples.items()}


async def routing_cost(db: Any, cfg: Config) -> dict[str, Any]:
    """Per-call cost without and with rollouts (µs, best of interleaved batches)."""
    batch, repeats = cfg.call_batch // 4, cfg.call_repeats + 2
    for name in ("plain", "canary", "sticky"):
        await db.functions.insert_one({"_id": name, "source": async_source(1), "revision": 1})
    async with PluginHost(db) as host, host.events() as events:
        before = await _best_of(host, {"baseline": ("plain", None)}, batch, repeats)
        for name in ("canary", "sticky"):
            await _start(db, name, async_source(2), 10.0)
        seen = 0
        async for event in events:
            seen += event.event == "rollout.started"
            if seen == 2:
                break
        during = await _best_of(
            host,
            {
                "baseline_again": ("plain", None),
                "canary": ("canary", None),
                "sticky": ("sticky", {"user": "u-42"}),
            },
            batch,
            repeats,
        )
    out: dict[str, Any] = {**before, **during, "batch": batch, "repeats": repeats}
    out["other_delta_us"] = round(during["baseline_again"] - before["baseline"], 3)
    out["canary_delta_us"] = round(during["canary"] - before["baseline"], 3)
    out["sticky_delta_us"] = round(during["sticky"] - before["baseline"], 3)
    out["canary_ratio"] = round(during["canary"] / before["baseline"], 3)
    return out


async def _next(events: Any, name: str) -> float:
    """Wait for the next ``name`` event; when it was emitted (``perf_counter`` clock)."""
    async for event in events:
        if event.event == name:
            return time.perf_counter()
    raise RuntimeError(f"the events ended before {name}")


async def detection(db: Any, cfg: Config) -> dict[str, Any]:
    """Time from the min_calls-th failing call to out of rotation, here and on a 2nd host."""
    rounds = 3 if cfg.quick else 8
    local_ms: list[float] = []
    fleet_ms: list[float] = []
    await db.functions.insert_one({"_id": "bad", "source": async_source(1), "revision": 1})
    async with (
        PluginHost(db) as one,
        PluginHost(db) as two,
        one.events() as ev1,
        two.events() as ev2,
    ):
        for _ in range(rounds):
            await _start(db, "bad", RAISING, 100.0, max_error_rate=0.05, min_calls=20)
            await _next(ev1, "rollout.started")
            await _next(ev2, "rollout.started")
            failures = 0
            t_min = 0.0
            while True:
                live = one.rollout("bad")
                if live is None or not live.routing:
                    break
                if failures == 19:
                    t_min = time.perf_counter()  # the min_calls-th candidate call starts
                try:
                    await one.call("bad")
                except Exception:
                    failures += 1
            local_ms.append((time.perf_counter() - t_min) * 1000.0)
            fleet_ms.append((await _next(ev2, "rollout.aborted") - t_min) * 1000.0)
            await _next(ev1, "rollout.aborted")
    return {
        "rounds": rounds,
        "local_ms": _summary(local_ms),
        "fleet_ms": _summary(fleet_ms),
    }


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


async def run(target: Target, cfg: Config) -> dict[str, Any]:
    """The ``rollout`` group of ``python -m bench``."""
    out: dict[str, Any] = {}
    async with database(target.uri, "rollout") as db:
        out["routing"] = await routing_cost(db, cfg)
    async with database(target.uri, "rollout_detect") as db:
        out["detection"] = await detection(db, cfg)
    return out


def markdown_lines(results: dict[str, Any]) -> list[str]:
    """The rollout figures as Markdown rows (for the report)."""
    if "error" in results:
        return [f"rollout benchmark failed: {results['error']}"]
    r, d = results.get("routing", {}), results.get("detection", {})
    lines = [
        "| Rollout figure | value |",
        "| --- | ---: |",
        f"| `host.call` per call, no rollout anywhere, µs | {r.get('baseline')} |",
        f"| same plugin while another has a rollout, µs (Δ) | {r.get('baseline_again')} "
        f"({r.get('other_delta_us')}) |",
        f"| plugin with a 10% canary, unkeyed, µs (Δ) | {r.get('canary')} "
        f"({r.get('canary_delta_us')}) |",
        f"| plugin with a 10% canary, sticky key, µs (Δ) | {r.get('sticky')} "
        f"({r.get('sticky_delta_us')}) |",
    ]
    if d:
        lines += [
            f"| failing candidate: min_calls-th call → out of rotation here, median / max ms "
            f"({d['rounds']} rounds) | {d['local_ms']['median']} / {d['local_ms']['max']} |",
            f"| failing candidate: min_calls-th call → dropped by a 2nd host, median / max ms | "
            f"{d['fleet_ms']['median']} / {d['fleet_ms']['max']} |",
        ]
    s = results.get("shadow")
    if s:
        lines.append(
            f"| stable calls with a 10% shadow vs none, µs (ratio) | {s['shadow']} vs "
            f"{s['none']} ({s['ratio']}) |"
        )
    return lines
