"""Rollout commands (issue 16): ``rollout``, ``promote``, ``abort``, and the rollout half
of ``push --canary/--shadow`` (the options are defined here, ``push`` hands over to
:func:`start_from_file`).

The record operations are :mod:`host.publish`'s (``start_rollout``, ``set_rollout_weight``,
``promote``, ``abort_rollout``); every one is a compare-and-set, so these commands race
safely with each other, with hosts aborting on their own and with plain pushes.

``rollout NAME --steps 5,25,50,100 --interval 60s`` walks the weights while it runs: one
compare-and-set per step, pinned to the candidate's revision, then it follows the record
through a change stream until the next step is due, and stops at once when the rollout
ends (aborted by a host or an operator, promoted, superseded). If the command dies, or is
interrupted, the rollout stays at the weight it had: safe.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._common import (
    DEFAULT_URI,
    Collection,
    ConnectTimeout,
    Database,
    MongoUri,
    _console,
    _load_signer,
    _sign_key_error,
    _with_db,
    app,
    fail,
)
from ._fleet import FleetWait, Wait, WaitTimeout, fleet_failed

if TYPE_CHECKING:
    from ..fleetview import Target
    from ..records import RolloutPolicy

__all__ = (
    "AsJson",
    "Canary",
    "MaxErrorRate",
    "MaxP99Ms",
    "MinCalls",
    "Shadow",
    "StickyKey",
    "abort",
    "parse_duration",
    "policy_text",
    "promote",
    "rollout",
    "start_from_file",
)

Canary = Annotated[
    float | None,
    typer.Option(
        "--canary",
        min=0,
        max=100,
        help="Start a canary: route PERCENT of calls to this version beside the stable one.",
    ),
]
Shadow = Annotated[
    float | None,
    typer.Option(
        "--shadow",
        min=0,
        max=1,
        help="Start a shadow: mirror FRACTION (0-1) of calls to this version; it serves no one.",
    ),
]
StickyKey = Annotated[
    str | None,
    typer.Option("--sticky-key", help="Args field whose value keeps a caller on one version."),
]
MaxErrorRate = Annotated[
    float | None,
    typer.Option(
        "--max-error-rate",
        min=0,
        max=1,
        help="Hosts abort the candidate above this error rate (0.05 = 5%) if worse than stable.",
    ),
]
MinCalls = Annotated[
    int | None,
    typer.Option("--min-calls", min=1, help="Judge the candidate after this many calls (20)."),
]
MaxP99Ms = Annotated[
    float | None,
    typer.Option("--max-p99-ms", min=0.001, help="Hosts abort the candidate above this p99."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]

_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds in ``60s``, ``1.5m``, ``500ms``, ``2h`` or ``90`` (seconds).

    Raises:
        ValueError: Not a positive duration.
    """
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration (examples: 60s, 2m, 500ms)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


def _parse_steps(text: str) -> list[float]:
    weights: list[float] = []
    for part in text.split(","):
        try:
            weight = float(part)
        except ValueError:
            raise fail(
                f"--steps: {part.strip()!r} is not a percent",
                "e.g. --steps 5,25,50,100",
                usage=True,
            ) from None
        if not (math.isfinite(weight) and 0 <= weight <= 100):
            raise fail(f"--steps: {weight:g} is not a percent 0-100", usage=True)
        weights.append(weight)
    return weights


def _emit(as_json: bool, line: str, payload: Mapping[str, Any]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload, default=str) + "\n")
        sys.stdout.flush()
    else:
        _console.print(line)


def _rollout_failed(exc: Exception) -> typer.Exit:
    """A rollout operation refused (NoRollout, RolloutRunning, PublishError): exit 1."""
    from ..publish import NoRollout, RolloutRunning

    if isinstance(exc, RolloutRunning):
        hint = f"`plugin-host promote {exc.name}` or `plugin-host abort {exc.name}` first"
    elif isinstance(exc, NoRollout) and (exc.last or {}).get("outcome") == "aborted":
        hint = "the stable version serves every call: fix the candidate, push it with --canary"
    elif isinstance(exc, NoRollout):
        hint = f"start one with `plugin-host push {exc.name} FILE --canary 5`"
    else:
        hint = "fix the file and push again"
    return fail(str(exc), hint)


def policy_text(policy: Mapping[str, Any]) -> str:
    """``abort on error rate > 0.05 after 20 calls`` (or ``no automatic abort``)."""
    limits = []
    if policy.get("max_error_rate") is not None:
        limits.append(f"error rate > {policy['max_error_rate']:g}")
    if policy.get("max_p99_ms") is not None:
        limits.append(f"p99 > {policy['max_p99_ms']:g} ms")
    if not limits:
        return "no automatic abort"
    return f"abort on {' or '.join(limits)} after {policy.get('min_calls')} calls"


def start_from_file(
    name: str,
    file: Path,
    *,
    canary: float | None,
    shadow: float | None,
    sticky_key: str | None,
    policy: RolloutPolicy,
    entrypoint: str | None,
    uri: str,
    database: str,
    collection: str,
    timeout: float,
    sign_key: Path | None,
    fleet_wait: FleetWait | None,
    as_json: bool,
) -> None:
    """``push NAME FILE --canary P`` / ``--shadow F``: start a rollout of the file.

    Raises:
        typer.Exit: On any failure (a clear line first).
    """
    from ..fleetview import FleetWaitError, Target
    from ..publish import NoRollout, PublishError, RolloutRunning, read_source, start_rollout
    from ..trust import TrustError

    mode, weight = ("canary", canary) if canary is not None else ("shadow", (shadow or 0) * 100)

    async def job(db: Any) -> None:
        signer = await _load_signer(sign_key)
        source = await read_source(file)
        started = await start_rollout(
            db,
            name,
            source,
            mode=mode,
            weight=weight,
            sticky_key=sticky_key,
            policy=policy,
            entrypoint=entrypoint,
            sign=signer,
            collection=collection,
        )
        record = await db[collection].find_one({"_id": name}, {"revision": 1, "rollout": 1})
        stable = (record or {}).get("revision")
        rollout = (record or {}).get("rollout") or {}
        sticky = f", sticky on {sticky_key}" if sticky_key else ""
        _emit(
            as_json,
            f"[green]started[/] {mode} of {name} r{started.revision} at {weight:g}% beside "
            f"stable r{stable}{sticky} ({policy_text(rollout.get('policy') or {})})",
            {
                "name": name,
                "action": "started",
                "mode": mode,
                "candidate": started.revision,
                "stable": stable,
                "weight": weight,
                "sticky_key": sticky_key,
                "policy": rollout.get("policy"),
                "signed": bool(rollout.get("signature")),
            },
        )
        if fleet_wait is not None and isinstance(stable, int):
            await fleet_wait(db, [Target(name, stable, candidate=started.revision, weight=weight)])

    try:
        _with_db(uri, database, timeout, job)
    except (PublishError, RolloutRunning, NoRollout) as exc:
        raise _rollout_failed(exc) from None
    except TrustError as exc:
        raise _sign_key_error(exc) from None
    except FleetWaitError as exc:
        raise fleet_failed(exc) from None


async def _current(db: Any, collection: str, name: str) -> tuple[int | None, Mapping[str, Any]]:
    """(stable revision, running rollout), or NoRollout naming what there is."""
    from ..publish import NoRollout, UnknownPlugin

    record = await db[collection].find_one(
        {"_id": name}, {"revision": 1, "rollout": 1, "last_rollout": 1}
    )
    if record is None:
        raise UnknownPlugin(name)
    rollout = record.get("rollout")
    if not isinstance(rollout, Mapping) or not isinstance(rollout.get("revision"), int):
        raise NoRollout(name, stable=record.get("revision"), last=record.get("last_rollout"))
    return record.get("revision"), rollout


async def _fleet_stats(db: Any, collection: str, name: str) -> dict[str, Any] | None:
    """Both versions' statistics summed over the fleet now (for ``last_rollout``)."""
    from ..fleetview import fleet_status

    view = await fleet_status(db, collection=collection, name=name)
    plugin = view.plugins.get(name)
    if plugin is None or plugin.rollout is None:
        return None
    stats = plugin.rollout["stats"]
    return {"stable": stats["stable"], "candidate": stats["candidate"], "hosts": stats["hosts"]}


async def _until_ended(
    db: Any, collection: str, name: str, revision: int, seconds: float
) -> Mapping[str, Any] | None:
    """Follow ``name``'s record for ``seconds``; its ``last_rollout`` as soon as the rollout
    of ``revision`` is no longer running (None if it still runs at the end)."""
    import anyio

    coll = db[collection]
    stream = await coll.watch([{"$match": {"documentKey._id": name}}], max_await_time_ms=250)
    try:
        with anyio.move_on_after(seconds):
            while True:
                # Read after the stream opened: a change between the two is not missed.
                record = await coll.find_one({"_id": name}, {"rollout": 1, "last_rollout": 1})
                rollout = (record or {}).get("rollout")
                if not isinstance(rollout, Mapping) or rollout.get("revision") != revision:
                    last = (record or {}).get("last_rollout")
                    if isinstance(last, Mapping) and last.get("revision") == revision:
                        return last
                    return {"revision": revision, "outcome": "ended", "by": "?", "reason": ""}
                while await stream.try_next() is None:
                    pass
        return None
    finally:
        with anyio.CancelScope(shield=True):
            await stream.close()


@app.command()
def rollout(
    name: Annotated[str, typer.Argument(help="Plugin name.")],
    weight: Annotated[
        float | None,
        typer.Option("--weight", min=0, max=100, help="Set the candidate's share of calls (%)."),
    ] = None,
    steps: Annotated[
        str | None,
        typer.Option("--steps", help="Walk these weights, e.g. 5,25,50,100 (while this runs)."),
    ] = None,
    interval: Annotated[
        str | None,
        typer.Option("--interval", help="With --steps: time at each weight (60s, 2m...)."),
    ] = None,
    mongodb_uri: MongoUri = DEFAULT_URI,
    database: Database = "app",
    collection: Collection = "functions",
    connect_timeout: ConnectTimeout = 5.0,
    wait: Wait = False,
    wait_timeout: WaitTimeout = 60.0,
    as_json: AsJson = False,
) -> None:
    """Change a running rollout's weight, or walk it through --steps every --interval.

    The walk stops at once (exit 1) when the rollout ends under it: aborted by a host or
    an operator, promoted or superseded. Stopped or killed, it leaves the weight where it
    was. With --wait, each step waits until every live host routes at that weight.
    """
    from ..fleetview import FleetWaitError, Target
    from ..publish import NoRollout, PublishError, set_rollout_weight

    if (weight is None) == (steps is None):
        raise fail("give either --weight P or --steps W1,W2,...", usage=True)
    if interval is not None and steps is None:
        raise fail("--interval goes with --steps", usage=True)
    weights = _parse_steps(steps) if steps is not None else [weight or 0.0]
    try:
        interval_s = parse_duration(interval or "60s")
    except ValueError as exc:
        raise fail(f"--interval: {exc}", usage=True) from None
    fleet_wait = FleetWait(collection, wait_timeout, quiet=as_json) if wait else None
    where: dict[str, Any] = {}  # where the walk stands, for an interrupt's message

    async def job(db: Any) -> None:
        stable, running = await _current(db, collection, name)
        candidate = running["revision"]
        where["revision"], where["weight"] = candidate, running.get("weight")
        for index, share in enumerate(weights):
            last = index == len(weights) - 1
            plan = None
            if steps is not None and not last:
                next_at = datetime.now(UTC) + timedelta(seconds=interval_s)
                plan = {"weights": weights, "interval_s": interval_s, "next_at": next_at}
            await set_rollout_weight(
                db, name, share, revision=candidate, steps=plan, collection=collection
            )
            where["weight"] = share
            step = f"step {index + 1}/{len(weights)}: " if steps is not None else ""
            _emit(
                as_json,
                f"{step}{name} r{candidate} at [bold]{share:g}%[/] (stable r{stable})",
                {
                    "name": name,
                    "action": "weight",
                    "candidate": candidate,
                    "stable": stable,
                    "weight": share,
                    "step": index + 1,
                    "steps": len(weights),
                },
            )
            if fleet_wait is not None and isinstance(stable, int):
                await fleet_wait(db, [Target(name, stable, candidate=candidate, weight=share)])
            if last:
                break
            if not as_json:
                _console.print(f"  next: {weights[index + 1]:g}% in {interval_s:g} s")
            ended = await _until_ended(db, collection, name, candidate, interval_s)
            if ended is not None:
                where["ended"] = ended
                raise NoRollout(name, revision=candidate, stable=stable, last=ended)
        if steps is not None:
            _emit(
                as_json,
                f"[green]done[/]: {name} r{candidate} at {weights[-1]:g}%; "
                f"`plugin-host promote {name}` makes it stable",
                {"name": name, "action": "done", "candidate": candidate, "weight": weights[-1]},
            )

    try:
        _with_db(mongodb_uri, database, connect_timeout, job)
    except (NoRollout, PublishError) as exc:
        raise _rollout_failed(exc) from None
    except FleetWaitError as exc:
        raise fleet_failed(exc) from None
    except KeyboardInterrupt:
        if "revision" in where:
            typer.echo(
                f"interrupted: {name} r{where['revision']} stays at {where['weight']:g}% "
                f"(promote, abort, or run the steps again)",
                err=True,
            )
        raise typer.Exit(130) from None


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Plugin name.")],
    canary: Annotated[
        float | None,
        typer.Option(
            "--canary", min=0, max=100, help="Make a shadow a canary at this percent instead."
        ),
    ] = None,
    mongodb_uri: MongoUri = DEFAULT_URI,
    database: Database = "app",
    collection: Collection = "functions",
    connect_timeout: ConnectTimeout = 5.0,
    wait: Wait = False,
    wait_timeout: WaitTimeout = 60.0,
    as_json: AsJson = False,
) -> None:
    """Make the rollout's candidate the stable version (--canary P: a shadow becomes a canary).

    The candidate keeps the revision and signature it was pushed with. With --wait: until
    every live host serves it.
    """
    from ..fleetview import FleetWaitError, Target
    from ..publish import NoRollout, PublishError
    from ..publish import promote as promote_candidate

    fleet_wait = FleetWait(collection, wait_timeout, quiet=as_json) if wait else None

    async def job(db: Any) -> None:
        stable, running = await _current(db, collection, name)
        candidate = running["revision"]
        stats = await _fleet_stats(db, collection, name) if canary is None else None
        await promote_candidate(
            db, name, canary=canary, revision=candidate, stats=stats, collection=collection
        )
        targets: list[Target]
        if canary is not None:
            line = f"[green]promoted[/] {name} r{candidate} to a canary at {canary:g}%"
            targets = [Target(name, stable, candidate=candidate, weight=canary)]
        else:
            line = f"[green]promoted[/] {name} r{candidate} to stable (was r{stable})"
            targets = [Target(name, candidate)]
        _emit(
            as_json,
            line,
            {
                "name": name,
                "action": "promoted",
                "candidate": candidate,
                "stable": stable,
                "canary": canary,
            },
        )
        if fleet_wait is not None and isinstance(targets[0].revision, int):
            await fleet_wait(db, targets)

    try:
        _with_db(mongodb_uri, database, connect_timeout, job)
    except (NoRollout, PublishError) as exc:
        raise _rollout_failed(exc) from None
    except FleetWaitError as exc:
        raise fleet_failed(exc) from None


@app.command()
def abort(
    name: Annotated[str, typer.Argument(help="Plugin name.")],
    reason: Annotated[
        str, typer.Option("--reason", help="Why (kept in the record's last_rollout).")
    ] = "by operator",
    mongodb_uri: MongoUri = DEFAULT_URI,
    database: Database = "app",
    collection: Collection = "functions",
    connect_timeout: ConnectTimeout = 5.0,
    wait: Wait = False,
    wait_timeout: WaitTimeout = 60.0,
    as_json: AsJson = False,
) -> None:
    """Drop the rollout's candidate: the stable version serves every call again.

    With --wait: until no live host holds the candidate any more.
    """
    from ..fleetview import FleetWaitError, Target
    from ..publish import NoRollout, abort_rollout

    fleet_wait = FleetWait(collection, wait_timeout, quiet=as_json) if wait else None

    async def job(db: Any) -> None:
        stable, running = await _current(db, collection, name)
        candidate = running["revision"]
        stats = await _fleet_stats(db, collection, name)
        recorded = await abort_rollout(
            db,
            name,
            reason=reason,
            by="cli",
            stats=stats,
            expected_revision=candidate,
            collection=collection,
        )
        if not recorded:  # someone else ended it between our read and our write
            record = await db[collection].find_one({"_id": name}, {"last_rollout": 1})
            raise NoRollout(
                name, revision=candidate, stable=stable, last=(record or {}).get("last_rollout")
            )
        _emit(
            as_json,
            f"[yellow]aborted[/] {name} r{candidate}: stable r{stable} serves every call",
            {
                "name": name,
                "action": "aborted",
                "candidate": candidate,
                "stable": stable,
                "reason": reason,
            },
        )
        if fleet_wait is not None and isinstance(stable, int):
            await fleet_wait(db, [Target(name, stable, without=candidate)])

    try:
        _with_db(mongodb_uri, database, connect_timeout, job)
    except NoRollout as exc:
        raise _rollout_failed(exc) from None
    except FleetWaitError as exc:
        raise fleet_failed(exc) from None
