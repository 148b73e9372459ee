"""The trigger engine's counts, read by :mod:`host.metrics` at scrape time (loop thread only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

__all__ = ("Counted", "TriggerStats")


class Counted(Protocol):
    """A running trigger as the counts see it (a :class:`~host.triggers.runner.Runner`)."""

    @property
    def tid(self) -> str:
        """The trigger id."""

    @property
    def handled(self) -> int:
        """Events this run has handled (or dead-lettered)."""

    @property
    def in_flight(self) -> int:
        """Its handlers running now."""


class TriggerStats:
    """Counts of one host's triggers.

    Series are per trigger id: their number is bounded by the triggers declared by the
    plugins this host ran, not by the events. The lag goes to ``lag_observer`` (the
    metrics surface installs a histogram's ``observe``; the runtime imports no metrics
    library).

    The events handled and the handlers in flight are read from the running triggers
    when asked (a scrape), not counted here per event: the hot path pays no dict update
    and no counter of its own for them.
    """

    def __init__(self) -> None:
        # INVARIANT (events): for each trigger id, the events handled on this host are
        # _ended[tid] (the runs that finished) plus the ``handled`` of its runs in
        # _running (at most one at a time; a run is in _running from its start until
        # it ends, then folded into _ended exactly once, by unfollow).
        self._ended: dict[str, int] = {}
        self._running: set[Counted] = set()
        self.dead_letters: dict[str, int] = {}
        self.history_losses: dict[str, int] = {}
        self.owned = 0
        self.lag_observer: Callable[[float], None] | None = None

    @property
    def events(self) -> dict[str, int]:
        """Events handled (or dead-lettered) on this host, per trigger id."""
        counts = dict(self._ended)
        for run in self._running:
            counts[run.tid] = counts.get(run.tid, 0) + run.handled
        return counts

    @property
    def in_flight(self) -> int:
        """Trigger handlers running now."""
        return sum(run.in_flight for run in self._running)

    def follow(self, run: Counted) -> None:
        """Count a trigger's run from now until :meth:`unfollow`."""
        self._running.add(run)

    def unfollow(self, run: Counted) -> None:
        """A run ended: keep its events in the counts."""
        if run in self._running:
            self._running.discard(run)
            self._ended[run.tid] = self._ended.get(run.tid, 0) + run.handled

    def dead_lettered(self, trigger: str) -> None:
        """Count one dead letter."""
        self.dead_letters[trigger] = self.dead_letters.get(trigger, 0) + 1

    def history_lost(self, trigger: str) -> None:
        """Count one loss of a trigger's resume point."""
        self.history_losses[trigger] = self.history_losses.get(trigger, 0) + 1

    def observe_lag(self, seconds: float) -> None:
        """Observe one lag from an event's cluster time to its handler's start."""
        observe = self.lag_observer
        if observe is not None:
            observe(max(seconds, 0.0))
