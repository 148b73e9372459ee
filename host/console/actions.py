"""The console's buttons as HTTP operations: promote, abort, and set the weight of a rollout.

``POST /functions/{name}/rollout`` with ``{"action": "promote"|"abort"|"weight", "weight": P}``
calls the rollout operations of :mod:`host.publish` (issue 16's contract); ``promote`` also
takes ``"canary": P`` (a shadow becomes a canary at P percent).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .. import publish

__all__ = ("ACTIONS", "ActionError", "rollout_action")

ACTIONS = ("promote", "abort", "weight")
"""The actions ``POST /functions/{name}/rollout`` accepts."""

_OPERATIONS = {"promote": "promote", "abort": "abort_rollout", "weight": "set_rollout_weight"}


class ActionError(Exception):
    """An action that cannot run: ``status``, ``kind`` and ``message`` of the HTTP error."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def _percent(body: Mapping[str, Any], key: str, required: bool) -> float | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ActionError(
            422, "BadRequest", f"{key!r} must be a number from 0 to 100, got {value!r}"
        )
    if not 0 <= value <= 100:
        raise ActionError(422, "BadRequest", f"{key!r} must be from 0 to 100, got {value}")
    return float(value)


def parse_action(body: Any) -> tuple[str, float | None]:
    """Check an action body.

    Args:
        body: The parsed JSON.

    Returns:
        ``(action, percent)``: the weight for ``weight``, the canary share for
        ``promote`` (or None), None for ``abort``.

    Raises:
        ActionError: The body is not an object, names no known action, or a percent is bad.
    """
    if not isinstance(body, dict):
        raise ActionError(422, "BadRequest", "the body must be a JSON object with an 'action'")
    action = body.get("action")
    if action not in ACTIONS:
        raise ActionError(
            422, "BadRequest", f"'action' must be one of {', '.join(ACTIONS)}, got {action!r}"
        )
    unknown = set(body) - {"action", "weight", "canary"}
    if unknown:
        raise ActionError(422, "BadRequest", f"unknown field(s): {', '.join(sorted(unknown))}")
    if action == "weight":
        return action, _percent(body, "weight", True)
    if action == "promote":
        return action, _percent(body, "canary", False)
    return action, None


async def rollout_action(
    db: Any, name: str, body: Any, *, collection: str, by: str
) -> dict[str, Any]:
    """Run one rollout action on plugin ``name``.

    Args:
        db: The database of the functions collection.
        name: The plugin.
        body: The request's JSON.
        collection: The functions collection.
        by: Who asks (recorded by an abort).

    Returns:
        ``{"plugin", "action", ...}``: ``recorded`` for an abort (False: someone else ended
        it first), ``revision``/``version`` for a promote, ``weight`` for a weight change.

    Raises:
        ActionError: Bad body (422), no rollout running (409), or the rollout operations
            are not in this build (501).
    """
    action, percent = parse_action(body)
    operation = getattr(publish, _OPERATIONS[action], None)
    no_rollout = getattr(publish, "NoRollout", None)
    if operation is None or no_rollout is None:
        raise ActionError(
            501,
            "NotImplemented",
            f"rollout action {action!r} needs host.publish.{_OPERATIONS[action]} and "
            "host.publish.NoRollout (issue 16), which this build does not have",
        )
    try:
        if action == "abort":
            recorded = await operation(db, name, reason="by operator", by=by, collection=collection)
            return {"plugin": name, "action": action, "recorded": bool(recorded)}
        if action == "weight":
            await operation(db, name, percent, collection=collection)
            return {"plugin": name, "action": action, "weight": percent}
        published = await operation(db, name, canary=percent, collection=collection)
    except no_rollout as exc:
        raise ActionError(409, "NoRollout", str(exc)) from None
    except ValueError as exc:  # RolloutRunning, a weight the record refuses...
        raise ActionError(409, type(exc).__name__, str(exc)) from None
    out: dict[str, Any] = {"plugin": name, "action": action}
    for attr in ("revision", "version"):
        value = getattr(published, attr, None)
        if value is not None:
            out[attr] = value
    return out
