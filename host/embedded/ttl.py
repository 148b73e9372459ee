"""The TTL monitor: deletes documents whose TTL index says they have expired.

MongoDB runs a background TTL monitor every ``ttlMonitorSleepSecs`` (60 s by default):
for each TTL index (a single-field index with ``expireAfterSeconds``) it deletes the
documents whose indexed field is a date (or an array holding one) older than ``now -
expireAfterSeconds``; for an array the earliest date counts. Documents whose field is
missing or not a date never expire. The deletes are ordinary deletes: they reach the
oplog, so change streams see ``delete`` events, and the journal keeps them.
https://www.mongodb.com/docs/manual/core/index-ttl/

Here the monitor is one task on the server's event loop. A sweep runs whole between two
commands (storage is synchronous), like any other command, so the oplog order stays the
apply order.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from .storage import Storage

__all__ = ("DEFAULT_PERIOD", "TTLMonitor", "expired")

DEFAULT_PERIOD = 60.0
"""Seconds between sweeps (mongod's ``ttlMonitorSleepSecs`` default)."""

log = structlog.get_logger("host.embedded")


def expired(value: Any, cutoff: datetime) -> bool:
    """Whether a TTL-indexed field's value has expired at ``cutoff`` (naive UTC).

    Args:
        value: The field's value.
        cutoff: ``now - expireAfterSeconds``.

    Returns:
        True for a date at or before the cutoff, or an array whose earliest date is.
    """
    if isinstance(value, datetime):
        naive = value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value
        return naive <= cutoff
    if isinstance(value, list):
        dates = [v for v in value if isinstance(v, datetime)]
        return bool(dates) and expired(min(dates), cutoff)
    return False


class TTLMonitor:
    """Sweeps a server's TTL indexes every ``period`` seconds.

    Args:
        storage: The server's storage.
        period: Seconds between sweeps.
        after_sweep: Called after a sweep that deleted something (the server flushes its
            journal there).
        clock: The current time, naive UTC (tests pass their own).

    Raises:
        ValueError: ``period`` is not a positive number.
    """

    def __init__(
        self,
        storage: Storage,
        period: float = DEFAULT_PERIOD,
        *,
        after_sweep: Callable[[], None] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not (math.isfinite(period) and period > 0):
            raise ValueError(f"the TTL monitor period must be a positive number: {period}")
        self.storage = storage
        self.period = period
        self._after_sweep = after_sweep
        self._clock = clock or (lambda: datetime.now(UTC).replace(tzinfo=None))
        self.sweeps = 0
        self.deleted = 0

    def sweep(self) -> int:
        """Delete every expired document now; returns how many were deleted."""
        now = self._clock()
        deleted = 0
        for (db, coll), info in list(self.storage.catalog.items()):
            for field_name, seconds in list(info.ttl.values()):
                cutoff = now - timedelta(seconds=seconds)
                candidates = self.storage.find(db, coll, {field_name: {"$lte": cutoff}})
                for doc in candidates:
                    # The filter found the dates; re-check top-level fields with MongoDB's
                    # rule (an array expires by its earliest date, non-dates never).
                    if "." not in field_name and not expired(doc.get(field_name), cutoff):
                        continue
                    result = self.storage.delete(
                        db, coll, [{"q": {"_id": doc["_id"]}, "limit": 1}], ordered=True
                    )
                    deleted += result.n
        self.sweeps += 1
        self.deleted += deleted
        if deleted:
            log.debug("embedded.ttl_deleted", deleted=deleted)
            if self._after_sweep is not None:
                self._after_sweep()
        return deleted

    async def run(self) -> None:
        """Sweep every ``period`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.period)
            try:
                self.sweep()
            except Exception:  # a bad document must not stop the monitor
                log.exception("embedded.ttl_failed")
