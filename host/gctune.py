"""The cyclic garbage collector's young-generation threshold, raised once per process.

Why: a trigger's events wait in its window (:mod:`host.triggers.window`) while earlier
ones are handled, so at CPython's default threshold (700 allocations) they survive the
young collections and are promoted; the old generation fills, and a full collection
(~60-95 ms here, with ~120,000 tracked objects in the bench process) ran about once
per 7,000 events. A larger young generation lets most of an event's objects
die (by reference count) before any collection sees them.

Measured on a busy 2-core machine (load average 1.4-2.2), ``python -m bench --quick
--only triggers`` with a no-op handler, events/s against a bare ``watch()`` loop,
``per_key`` / ``total`` (collections counted with ``gc.callbacks``): threshold 700:
0.66 / 0.66 and 0.68 / 0.67, 3 full collections (~200 ms); 2,000: 0.93 / 0.79 and
0.61 / 0.62, 1 full; 4,000: 0.88 / 0.84 and 0.83 / 0.72, none (young collections
~1.7 ms each, middle ones ~14 ms); 7,000 (load 6-7): 0.86 / 1.01 and 1.01 / 1.08, none,
but middle collections ~27 ms. 4,000 is the modest choice: no full collection in the
run, middle pauses well under the full ones they replace.

``gc.freeze()`` after the initial load was measured too and not kept: full collections
still ran (3, ~38 ms each; ratios 0.54-0.63), and every object alive at the freeze
(the initial versions of the plugins, whatever garbage the process had) would never be
collected: a replaced initial version would leak.
"""

from __future__ import annotations

import gc

__all__ = ("YOUNG_THRESHOLD", "tune_gc")

YOUNG_THRESHOLD = 4_000
"""Allocations between two young collections (CPython's default: 700)."""

_tuned = False


def tune_gc() -> None:
    """Raise the young-generation threshold to :data:`YOUNG_THRESHOLD`, once per process.

    It never lowers a threshold set higher, leaves a collector disabled by
    ``gc.set_threshold(0)`` alone, and runs only the first time (so an application that
    sets its own thresholds after starting a host keeps them).
    """
    global _tuned
    if _tuned:
        return
    _tuned = True
    young, middle, old = gc.get_threshold()
    if 0 < young < YOUNG_THRESHOLD:
        gc.set_threshold(YOUNG_THRESHOLD, middle, old)
