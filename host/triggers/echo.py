"""Spotting a trigger that feeds itself: a handler writing the document it was called for.

Decision (issue 17 item 7): a trigger on the collection its handler writes is allowed
(an aggregator may well keep a counter in the document it watches, and stop), so it is
not refused at validation; the host cannot see what a handler will write anyway. What
the host does is *warn*: ``trigger.recursion_suspected`` (warning, once per trigger per
run) when the same document's events keep arriving with a ``wallTime`` inside the run of
the handler of the previous event of that document, ``threshold`` times in a row. That
is the signature of ``on_change`` updating its own document: each write happens while
the handler runs, and causes the next event. Atlas warns about the same recursion
(https://mongodb.com/docs/atlas/atlas-ui/triggers).

Limits, stated: the test compares the server's ``wallTime`` with this host's clock (a
skew of more than a few milliseconds hides or fakes a chain); a document written by
others faster than the handler runs looks the same (hence a chain of ``threshold``, and
only a warning); a handler that inserts *new* documents into its own collection is not
spotted (each event has a new key). Ordered ``per_key`` (the default) or ``total`` is
needed for "the previous event's handler" to be well defined; ``none`` is not checked.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = ("EchoDetector",)

_SLACK = 0.005  # seconds: wallTime has millisecond precision
_KEYS = 4096  # documents remembered (least recently handled forgotten first)


def _wall(event: Mapping[str, Any]) -> float | None:
    wall = event.get("wallTime")
    if not isinstance(wall, datetime):
        return None
    return (wall if wall.tzinfo is not None else wall.replace(tzinfo=UTC)).timestamp()


class EchoDetector:
    """Counts, per document key, events written while the previous one's handler ran.

    Args:
        threshold: Chain length that counts as a suspected recursion.
    """

    def __init__(self, threshold: int = 10) -> None:
        self.threshold = threshold
        # key -> (handler start, handler end, chain), in this host's wall-clock seconds
        self._runs: OrderedDict[Any, tuple[float, float, int]] = OrderedDict()

    def check(self, key: Any, event: Mapping[str, Any]) -> int:
        """The chain length of ``event`` (0: not written during the previous handler run)."""
        previous = self._runs.get(key)
        if previous is None:  # the common case: no recent run of this document
            return 0
        wall = _wall(event)
        if wall is None:
            return 0
        start, end, chain = previous
        return chain + 1 if start - _SLACK <= wall <= end + _SLACK else 0

    def handled(self, key: Any, start: float, end: float, chain: int) -> None:
        """Record the run of the handler of an event of ``key`` (wall-clock seconds)."""
        runs = self._runs
        runs[key] = (start, end, chain)
        runs.move_to_end(key)
        if len(runs) > _KEYS:
            runs.popitem(last=False)
