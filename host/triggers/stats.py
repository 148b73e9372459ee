"""The trigger engine's counts, read by :mod:`host.metrics` at scrape time (loop thread only)."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ("TriggerStats",)


class TriggerStats:
    """Counts of one host's triggers.

    Series are per trigger id: their number is bounded by the triggers declared by the
    plugins this host ran, not by the events. The lag goes to ``lag_observer`` (the
    metrics surface installs a histogram's ``observe``; the runtime imports no metrics
    library).
    """

    def __init__(self) -> None:
        self.events: dict[str, int] = {}
        self.dead_letters: dict[str, int] = {}
        self.history_losses: dict[str, int] = {}
        self.in_flight = 0
        self.owned = 0
        self.lag_observer: Callable[[float], None] | None = None

    def handled(self, trigger: str) -> None:
        """Count one event done (handled or dead-lettered)."""
        self.events[trigger] = self.events.get(trigger, 0) + 1

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
