"""``configureFailPoint``: the ``failCommand`` family used by driver fault-injection tests.

Semantics follow MongoDB's ``failCommand`` (server ``fail_point.h`` and the drivers'
test docs): modes ``alwaysOn``, ``off``, ``{times: n}`` and ``{skip: n}``; data
``failCommands``, ``closeConnection``, ``errorCode``, ``errorLabels``,
``blockConnection``/``blockTimeMS``, ``writeConcernError``, ``appName`` and
``namespace``. A failpoint only fires when it would do something (close, block or
error), never on ``configureFailPoint`` itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import CommandError

KNOWN = frozenset(
    {
        "failCommand",
        "failGetMoreAfterCursorCheckout",
        # A retryable write statement closes the connection or fails (see .retryable).
        "onPrimaryTransactionalWrite",
        # Every operation with maxTimeMS fails with 50 MaxTimeMSExpired.
        "maxTimeAlwaysTimeOut",
    }
)


@dataclass(slots=True)
class FailPoint:
    """One configured failpoint."""

    name: str
    mode: Any = "off"
    data: dict[str, Any] = field(default_factory=dict)
    times_entered: int = 0
    remaining: int | None = None
    skip: int = 0

    @property
    def active(self) -> bool:
        """The failpoint can still fire."""
        return self.mode != "off" and (self.remaining is None or self.remaining > 0)


@dataclass(slots=True)
class Action:
    """What a fired failpoint asks the server to do."""

    close_connection: bool = False
    block_ms: int = 0
    error: CommandError | None = None
    write_concern_error: dict[str, Any] | None = None
    labels: list[str] | None = None  # data.errorLabels: replace the reply's labels


class FailPoints:
    """The server's failpoints, by name."""

    def __init__(self) -> None:
        self._points: dict[str, FailPoint] = {}

    def configure(self, name: Any, mode: Any, data: Any) -> int:
        """Apply ``configureFailPoint``; returns the previous ``times_entered`` count."""
        if name not in KNOWN:
            raise CommandError(2, f"Cannot find failpoint '{name}'")
        previous = self._points.get(name)
        count = previous.times_entered if previous else 0
        point = FailPoint(name=name)
        if mode == "off":
            self._points.pop(name, None)
            return count
        if mode == "alwaysOn":
            point.mode = mode
        elif isinstance(mode, Mapping) and "times" in mode:
            point.mode, point.remaining = "times", int(mode["times"])
        elif isinstance(mode, Mapping) and "skip" in mode:
            point.mode, point.skip = "skip", int(mode["skip"])
        elif isinstance(mode, Mapping) and "activationProbability" in mode:
            raise CommandError(2, "failpoint mode activationProbability is not supported")
        else:
            raise CommandError(2, f"invalid failpoint mode {mode!r}")
        if data is not None and not isinstance(data, Mapping):
            raise CommandError(2, "failpoint 'data' must be a document")
        point.data = dict(data or {})
        if name == "failCommand" and not isinstance(point.data.get("failCommands"), list):
            raise CommandError(2, "failCommand failpoint requires data.failCommands, an array")
        self._points[name] = point
        return count

    def times_entered(self, name: str) -> int:
        """How often ``name`` has fired."""
        point = self._points.get(name)
        return point.times_entered if point else 0

    def check(
        self, name: str, command: str, app_name: str | None, namespace: str | None
    ) -> Action | None:
        """Return the action of failpoint ``name`` for this command, if it fires."""
        point = self._points.get(name)
        if point is None or not point.active:
            return None
        data = point.data
        if name == "failCommand" and command not in data.get("failCommands", ()):
            return None
        if command == "configureFailPoint":
            return None
        if "appName" in data and data["appName"] != app_name:
            return None
        if "namespace" in data and data["namespace"] != namespace:
            return None
        action = Action(
            close_connection=bool(data.get("closeConnection", False)),
            block_ms=int(data.get("blockTimeMS", 0)) if data.get("blockConnection") else 0,
        )
        labels = data.get("errorLabels")
        if isinstance(labels, list):
            action.labels = [str(label) for label in labels]
        if "errorCode" in data:
            action.error = CommandError(
                int(data["errorCode"]),
                "Failing command via 'failCommand' failpoint",
                labels=list(labels) if isinstance(labels, list) else None,
            )
        if isinstance(data.get("writeConcernError"), Mapping):
            action.write_concern_error = dict(data["writeConcernError"])
        if not (
            action.close_connection or action.block_ms or action.error or action.write_concern_error
        ):
            return None
        return action if self._enter(point) else None

    def fire(self, name: str) -> dict[str, Any] | None:
        """Enter failpoint ``name`` (no filters): its ``data`` if it fires, else None."""
        point = self._points.get(name)
        if point is None or not point.active or not self._enter(point):
            return None
        return point.data

    @staticmethod
    def _enter(point: FailPoint) -> bool:
        """Count one pass through ``point``: False while ``skip`` lasts, else it fires."""
        if point.skip > 0:
            point.skip -= 1
            return False
        point.times_entered += 1
        if point.remaining is not None:
            point.remaining -= 1
        return True
