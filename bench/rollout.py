"""Progressive delivery (issue 16): what a rollout costs a call, and how fast a bad one ends.

* **routing** — ``await host.call(name)`` per call, best of interleaved batches: a plugin
  on a host where no rollout runs (*baseline*), the same plugin on a host where another
  plugin has a rollout (*other*), a plugin with a 10% canary (*canary*, unkeyed:
  weighted random) and with a sticky key (*sticky*: the contract's SHA-256 per call).
  The goal: a rollout adds at most 1 µs per call (*canary* minus *baseline*).
* **detection** — a candidate failing every call (weight 100, ``min_calls`` 20,
  ``max_error_rate`` 0.05), two hosts in this process on one database: from the start of
  its ``min_calls``-th call to the moment the calling host routes no more calls to it
  (the detecting host), and to the moment the second host has dropped it (it follows the
  abort written to the record through its change stream). Goals: 100 ms and 1 s.
* **shadow** — calls of the stable version with a 10% shadow running beside it, against
  the same plugin with none (the best of many short interleaved batches, the caller
  yielding between calls so the mirrors run): the caller's path (the ``await
  host.call`` alone; the goal, at most 5% more) and the loop time per call, mirrors
  included (each mirror is a whole call of the candidate plus two JSON encodings, so at
  10% this is necessarily well over 5%).

The rollouts are written to the record directly (the contract's documents), as
``host.publish``'s rollout operations would.
"""

from __future__ import annotations

import asyncio
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


async def routing_cost(db: Any, cfg: Config) -> dict[str, Any]:
    """Per-call cost without and with rollouts (µs, best of interleaved batches).

    Two hosts in this loop: one on a collection with no rollout at all (the baseline),
    one where two plugins have a 10% canary and a third has none.
    """
    # Many short batches (the same calls in all): the best of 25+ is robust to the other
    # work on a shared machine, where the best of 5 long ones swung by ±0.3 µs.
    batch, repeats = cfg.call_batch // 20, (cfg.call_repeats + 2) * 5
    await db.plain_functions.insert_one({"_id": "plain", "source": async_source(1), "revision": 1})
    for name in ("plain", "canary", "sticky"):
        await db.functions.insert_one({"_id": name, "source": async_source(1), "revision": 1})
    async with (
        PluginHost(db, "plain_functions") as bare,
        PluginHost(db) as host,
        host.events() as events,
    ):
        for name in ("canary", "sticky"):
            await _start(db, name, async_source(2), 10.0)
        await _next(events, "rollout.started")
        await _next(events, "rollout.started")
        variants = {
            "baseline": (bare, "plain", None),
            "baseline_again": (host, "plain", None),
            "canary": (host, "canary", None),
            "sticky": (host, "sticky", {"user": "u-42"}),
        }
        samples: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(repeats):
            for variant, (target, name, args) in variants.items():
                samples[variant].append(await _per_call_us(target, name, batch, args))
    best = {v: round(min(s), 3) for v, s in samples.items()}
    out: dict[str, Any] = {**best, "batch": batch, "repeats": repeats}
    out["other_delta_us"] = round(best["baseline_again"] - best["baseline"], 3)
    out["canary_delta_us"] = round(best["canary"] - best["baseline"], 3)
    out["sticky_delta_us"] = round(best["sticky"] - best["baseline"], 3)
    out["canary_ratio"] = round(best["canary"] / best["baseline"], 3)
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


async def _yielding(host: PluginHost, name: str, batch: int) -> tuple[float, float]:
    """(caller's path, wall) per call in µs: the path sums each ``await host.call`` only;
    the wall also counts the loop turns between calls, where the mirrors run."""
    path = 0.0
    started = time.perf_counter()
    for i in range(batch):
        t0 = time.perf_counter()
        await host.call(name, {"x": i})
        path += time.perf_counter() - t0
        await asyncio.sleep(0)  # let the mirrors (tasks on this loop) run between calls
    wall = time.perf_counter() - started
    return path / batch * 1e6, wall / batch * 1e6


async def shadow_cost(db: Any, cfg: Config) -> dict[str, Any]:
    """Stable calls with a 10% shadow beside them vs none (µs per call, yielding callers).

    Many short interleaved batches (in ABBA order), the best of each variant, as for
    ``routing_cost``: on a shared machine the best of 5 long batches swung the ratio by
    several percent from run to run, and medians are no better while half the batches
    run at half speed (a busy sibling core). Each batch sums the whole path of every
    call in it, its mirrors included (~200 of 2,000 calls at 10%).
    """
    batch, repeats = cfg.call_batch // 10, (cfg.call_repeats + 2) * 5
    for name in ("unshadowed", "shadowed"):
        await db.functions.insert_one({"_id": name, "source": ECHO, "revision": 1})
    async with PluginHost(db) as host, host.events() as events:
        await _start(db, "shadowed", ECHO, 10.0, mode="shadow")
        await _next(events, "rollout.started")
        samples: dict[str, list[tuple[float, float]]] = {"none": [], "shadow": []}
        order = (("none", "unshadowed"), ("shadow", "shadowed"))
        for i in range(repeats):  # ABBA: each variant goes first in every other round
            for variant, name in order if i % 2 else order[::-1]:
                samples[variant].append(await _yielding(host, name, batch))
        counts = host.shadow_counts().get("shadowed", {})
    none = min(p for p, _ in samples["none"])
    shadow = min(p for p, _ in samples["shadow"])
    none_wall = min(w for _, w in samples["none"])
    shadow_wall = min(w for _, w in samples["shadow"])
    return {
        "none": round(none, 3),
        "shadow": round(shadow, 3),
        "ratio": round(shadow / none, 3),
        "none_wall": round(none_wall, 3),
        "shadow_wall": round(shadow_wall, 3),
        "wall_ratio": round(shadow_wall / none_wall, 3),
        "mirrored": counts.get("match", 0) + counts.get("mismatch", 0),
        "dropped": counts.get("dropped", 0),
        "calls": batch * repeats,
    }


async def run(target: Target, cfg: Config) -> dict[str, Any]:
    """The ``rollout`` group of ``python -m bench``."""
    out: dict[str, Any] = {}
    async with database(target.uri, "rollout") as db:
        out["routing"] = await routing_cost(db, cfg)
    async with database(target.uri, "rollout_detect") as db:
        out["detection"] = await detection(db, cfg)
    async with database(target.uri, "rollout_shadow") as db:
        out["shadow"] = await shadow_cost(db, cfg)
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
            f"| caller's path with a 10% shadow vs none, µs (ratio; mirrored / dropped) | "
            f"{s['shadow']} vs {s['none']} ({s['ratio']}; {s['mirrored']} / {s['dropped']}) |"
        )
        lines.append(
            f"| loop time per call incl. the mirrors, 10% shadow vs none, µs (ratio) | "
            f"{s['shadow_wall']} vs {s['none_wall']} ({s['wall_ratio']}) |"
        )
    return lines
