"""Tuning of the trigger engine (``PluginHost(triggers=TriggerOptions(...))``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ("TriggerOptions",)


@dataclass(frozen=True, slots=True)
class TriggerOptions:
    """How a host runs change-stream triggers.

    Attributes:
        lease_ttl: Seconds a lease lasts without renewal; the owner renews it every
            third of that. A dead owner's triggers move within about this time.
        poll_interval: Seconds between two looks at which triggers this host should run
            (leases free, expired, or preferred for this host).
        takeover_grace: Seconds a released lease (or a trigger nobody has started) waits
            for its preferred host before any other host takes it (default: the TTL).
        checkpoint_interval: Longest time between two checkpoint writes while events flow.
        checkpoint_every: Events after which the checkpoint is written without waiting
            for ``checkpoint_interval``.
        window: Most events of one trigger read but not yet covered by its checkpoint.
        retry_backoff: First delay between two attempts of a failing event, doubled per
            attempt up to ``retry_backoff_max``.
        retry_backoff_max: Longest delay between two attempts.
        max_await_ms: ``maxAwaitTimeMS`` of the triggers' getMores (server default if None).
        batch_size: Most events per batch of a trigger's stream (``batchSize`` of its
            ``aggregate`` and getMores; None: the server's default, which may be the whole
            backlog at once). Bounded batches let the next one be read while the
            handlers work through the previous one.
        host_id: This host's owner id in leases (default: the status reporter's host id,
            else ``hostname:pid:random``).
        acquire: Take leases and run triggers (False: only :meth:`TriggerEngine.handle`
            works, e.g. for a tool that retries dead letters beside the fleet).
    """

    lease_ttl: float = 15.0
    poll_interval: float | None = None
    takeover_grace: float | None = None
    checkpoint_interval: float = 1.0
    checkpoint_every: int = 1000
    window: int = 10_000
    retry_backoff: float = 0.1
    retry_backoff_max: float = 10.0
    max_await_ms: int | None = None
    batch_size: int | None = 1000
    host_id: str | None = None
    acquire: bool = True

    def __post_init__(self) -> None:
        for name in ("lease_ttl", "checkpoint_interval", "retry_backoff", "retry_backoff_max"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        for name in ("poll_interval", "takeover_grace"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if self.checkpoint_every < 1 or self.window < 1:
            raise ValueError("checkpoint_every and window must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (or None), got {self.batch_size!r}")
        if self.host_id is not None and not self.host_id.strip():
            raise ValueError("host_id must not be empty")

    @property
    def poll_seconds(self) -> float:
        """The effective poll interval (a third of the TTL by default)."""
        return self.poll_interval if self.poll_interval is not None else self.lease_ttl / 3

    @property
    def grace_seconds(self) -> float:
        """The effective takeover grace (the TTL by default)."""
        return self.takeover_grace if self.takeover_grace is not None else self.lease_ttl
