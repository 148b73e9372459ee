"""The rollout sub-document of a record, and ending a rollout (issue 16).

A record may carry a candidate beside its stable version: ``rollout: {revision, source,
entrypoint, signature, mode, weight, sticky_key, policy, started_at, updated_at, steps}``
(see ``ROLLOUT_CONTRACT.md`` and ``docs/design.md``). Every change to it is a
compare-and-set on the record:

- start: ``{_id, revision: <stable read>, rollout: null}`` (:func:`host.publish.start_rollout`);
- weight, mode, promote, abort: ``{_id, "rollout.revision": R}``;
- a plain publish pins what it read, ``rollout.revision: R`` or ``rollout: null``.

So exactly one writer ends a given rollout, and the same update that ends it writes
``last_rollout`` (outcome, reason, by whom, when, statistics): there is never a record
without a rollout whose ``last_rollout`` is missing or names another outcome.

:mod:`host.publish` re-exports what is here. The abort's compare-and-set is
:func:`host.rollout.write_abort`, which hosts call for an automatic abort (the runtime may
not import :mod:`host.publish`, see ``tests/test_layering.py``); :func:`abort_rollout`
adds the operator's checks around it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .errors import PluginHostError
from .records import PluginRecord
from .rollout import write_abort

__all__ = (
    "OUTCOMES",
    "NoRollout",
    "RolloutRunning",
    "abort_rollout",
    "candidate_version",
    "ended",
)

OUTCOMES = ("promoted", "aborted", "superseded")
"""``last_rollout.outcome``."""


class NoRollout(PluginHostError, LookupError):
    """The plugin has no rollout running (or not the one asked for).

    Attributes:
        name: The plugin.
        revision: The candidate revision that was expected (None: any).
        last: The record's ``last_rollout`` (how the previous rollout ended), if any.
    """

    def __init__(
        self,
        name: str,
        *,
        revision: int | None = None,
        stable: int | None = None,
        last: Mapping[str, Any] | None = None,
        running: int | None = None,
    ) -> None:
        what = f"rollout of r{revision}" if revision is not None else "rollout"
        message = f"plugin {name!r} has no {what} running"
        if running is not None:
            message += f" (the rollout running is r{running})"
        elif stable is not None:
            message += f" (stable r{stable})"
        if last is not None and (revision is None or last.get("revision") == revision):
            message += (
                f"; the last rollout, r{last.get('revision')}, was {last.get('outcome')} "
                f"by {last.get('by')}: {last.get('reason')}"
            )
        super().__init__(message)
        self.name = name
        self.revision = revision
        self.last = dict(last) if last is not None else None


class RolloutRunning(PluginHostError, ValueError):
    """A rollout is already running: promote or abort it before starting another.

    Attributes:
        name: The plugin.
        revision: The running candidate's revision.
        stable: The stable revision.
    """

    def __init__(self, name: str, revision: int, stable: int | None) -> None:
        on = f" on stable r{stable}" if stable is not None else ""
        super().__init__(
            f"plugin {name!r}: a rollout of r{revision}{on} is running; promote or abort it first"
        )
        self.name = name
        self.revision = revision
        self.stable = stable


def candidate_version(name: str, rollout: Mapping[str, Any]) -> str:
    """The candidate's version string, as hosts name it (``greet@r7:3f9a1c2e``)."""
    source = rollout.get("source")
    entrypoint = rollout.get("entrypoint") or "main"
    revision = rollout.get("revision")
    if not isinstance(source, str) or not isinstance(revision, int):
        return f"{name}@r{revision}"
    return PluginRecord(name, source, entrypoint, revision=revision).version


def ended(
    name: str,
    rollout: Mapping[str, Any],
    outcome: str,
    reason: str,
    by: str,
    stats: Mapping[str, Any] | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """The ``last_rollout`` document that ends ``rollout`` (written in the same update).

    Args:
        name: The plugin.
        rollout: The record's ``rollout`` as read.
        outcome: One of :data:`OUTCOMES`.
        reason: Why (``"by operator"``, ``"error rate 1.00 > 0.05 after 20 calls"``...).
        by: Who: a host id, ``"cli"``, a user.
        stats: ``{"stable": <Stats>, "candidate": <Stats>}`` at the end, if known.
        at: When (default now).

    Returns:
        The document.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown rollout outcome {outcome!r}: one of {', '.join(OUTCOMES)}")
    return {
        "revision": rollout.get("revision"),
        "version": candidate_version(name, rollout),
        "mode": rollout.get("mode"),
        "outcome": outcome,
        "reason": reason,
        "by": by,
        "at": at or datetime.now(UTC),
        "stats": dict(stats) if stats is not None else None,
    }


async def abort_rollout(
    db: Any,
    name: str,
    *,
    reason: str = "by operator",
    by: str = "cli",
    stats: Mapping[str, Any] | None = None,
    expected_revision: int | None = None,
    collection: str = "functions",
) -> bool:
    """Drop the candidate of ``name``'s rollout; the stable version serves everything again.

    One update, a compare-and-set on the candidate's revision, unsets ``rollout`` and
    writes ``last_rollout`` (outcome ``aborted``): of many hosts (and operators) aborting
    the same candidate at once, exactly one records it; every host follows the record
    through its change stream.

    Args:
        db: A PyMongo ``AsyncDatabase`` (or a Motor database).
        name: The plugin.
        reason: Why, kept in ``last_rollout.reason``.
        by: Who, kept in ``last_rollout.by`` (a host id for an automatic abort).
        stats: Both versions' statistics, kept in ``last_rollout.stats``.
        expected_revision: Abort only the rollout of this candidate revision; if it has
            ended already (or another one runs), return False instead of raising.
        collection: The functions collection.

    Returns:
        True iff this call recorded the abort (False: someone else ended the rollout first).

    Raises:
        NoRollout: No rollout is running and ``expected_revision`` is None.
    """
    coll = db[collection]
    current = await coll.find_one({"_id": name}, {"rollout": 1, "revision": 1, "last_rollout": 1})
    rollout = (current or {}).get("rollout")
    if not isinstance(rollout, Mapping) or not isinstance(rollout.get("revision"), int):
        if expected_revision is not None:
            return False
        raise NoRollout(
            name,
            stable=(current or {}).get("revision"),
            last=(current or {}).get("last_rollout"),
        )
    revision = rollout["revision"]
    if expected_revision is not None and revision != expected_revision:
        return False
    # The compare-and-set itself is the hosts' (host.rollout.write_abort): one abort write.
    return await write_abort(coll, name, revision, reason=reason, by=by, stats=stats)
