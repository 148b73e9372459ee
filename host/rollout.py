"""Progressive delivery on one host: routing between two live versions, and judging them.

A record may carry a candidate beside its stable version (``rollout``, see
:mod:`host.records`). The registry holds both compiled versions and one
:class:`LiveRollout` per name that has a candidate; the dispatcher asks it which version
serves each call and tells it how each call ended.

Routing, per call (issue 16 item 2):

* **pinned** — the caller names a version (``7``, ``r7``, ``greet@r7`` or
  ``greet@r7:3f9a1c2e``): that version, or :class:`~host.errors.VersionNotLive`;
* **sticky** — the call has a key (``X-Plugin-Key``, or ``args[sticky_key]``): the
  candidate iff ``sticky_fraction(name, candidate revision, key) < weight / 100``. The
  fraction depends only on the plugin, the candidate's revision and the key, so every
  host routes a key alike, and raising the weight only moves keys from stable to
  candidate;
* **weighted** — otherwise the candidate with probability ``weight / 100``, drawn as a
  geometric countdown of the calls up to the next candidate call (see
  :class:`LiveRollout`): the same distribution as a draw per call, one decrement per call.

Statistics (issue 16 item 4): :class:`VersionStats` is a ring of per-second buckets
(calls, failures, timeouts, slow calls, a log-scale latency histogram) with running
totals over the window, so recording a call and judging the policy are O(1); reading a
percentile scans the histogram (only for reports and abort reasons).

Trigger events (issue 17 item 5) route and count like calls: ``choose`` with the event's
document key as the sticky key, ``record`` with the handler's outcome, so a canary's
share of events goes to the candidate and the abort rules apply to them.

INVARIANT (loop thread only, no await inside any method): once :meth:`LiveRollout.abort`
has run, ``routing`` is False and ``choose`` returns the stable version for every
unpinned call; nothing sets it back (a new candidate is a new ``LiveRollout``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from .errors import VersionNotLive
from .plugin import Plugin
from .records import PluginRecord, Rollout

__all__ = (
    "FAILED",
    "MIRROR_SPAN",
    "OK",
    "SHADOW_OUTCOMES",
    "STABLE_SAMPLE",
    "TIMEOUT",
    "LiveRollout",
    "MirrorQueue",
    "VersionHolder",
    "VersionStats",
    "matches_version",
    "pick_version",
    "shadow_report",
    "sticky_fraction",
    "write_abort",
)

OK: int = False  # == 0; a truth test on a bool needs no __bool__ call (every call makes one)
FAILED: int = 1
TIMEOUT: int = 2
"""How a call ended, for :meth:`VersionStats.record` (``OK`` is ``False``, i.e. 0)."""

SHADOW_OUTCOMES = ("match", "mismatch", "candidate_error", "dropped", "refused_writes")
"""A shadow's counters (``host.shadow``): per plugin, and per rollout in its report."""

STABLE_SAMPLE = 8
"""One successful stable call in this many is recorded (weighted); see ``LiveRollout.record``."""

MIRROR_SPAN = 64
"""While a shadow mirrors, the stable's successes are sampled on the mirrored ones instead
(weighted by the successes since the last sample), and at least one in this many."""

_HIST_MIN_MS = 0.01
_HIST_STEPS_PER_DOUBLING = 4  # buckets ~19% wide
_HIST_SIZE = 100  # 0.01 ms .. ~330 s
_ZEROS = [0] * _HIST_SIZE
_log1p = math.log1p  # log1p and floor take one argument (METH_O): cheaper than log, int
_floor = math.floor
_now = time.perf_counter
_random = random.random
_bucket = bisect.bisect_left


def _upper_ms(index: int) -> float:
    return float(_HIST_MIN_MS * 2.0 ** (index / _HIST_STEPS_PER_DOUBLING))


_BOUNDS_S = [_upper_ms(i) / 1000.0 for i in range(_HIST_SIZE - 1)]
_MIN_S = _BOUNDS_S[0]
"""Upper bounds of the histogram's buckets in seconds: a latency goes to the first bucket
whose bound it does not exceed (the last bucket takes the rest)."""


class MirrorQueue:
    """Where a shadow's mirrored calls wait for its workers (``host.shadow`` drains it).

    :meth:`LiveRollout.due` appends to it inline, so a mirror costs the caller no Python
    call: ``entries`` takes ``(rollout, args, result, elapsed, weight)`` (the stable's
    answer and its statistics sample, which the worker records) while it holds fewer
    than ``room``; then, if ``ticking`` is False (the workers' ticker stopped), ``kick()``
    restarts it. When it is full, ``drop(rollout)`` counts the dropped mirror and the
    sample is recorded at once.

    Args:
        room: Mirrors that may wait (0: none, e.g. before the workers start).
        kick: Restarts the ticker (it sets ``ticking``).
        drop: Counts a dropped mirror of a rollout.
    """

    __slots__ = ("drop", "entries", "kick", "room", "ticking")

    def __init__(
        self, room: int, kick: Callable[[], None], drop: Callable[[LiveRollout], None]
    ) -> None:
        self.entries: deque[tuple[LiveRollout, Any, Any, float, int]] = deque()
        self.room = room
        self.kick = kick
        self.drop = drop
        self.ticking = False


def sticky_fraction(name: str, revision: int, key: object) -> float:
    """Where a key falls in [0, 1) for a candidate: the same on every host.

    The first 8 bytes of the SHA-256 of the compact UTF-8 JSON array
    ``[name, revision, str(key)]``, as a fraction of 2**64 (the rollout contract).

    Args:
        name: The plugin name.
        revision: The candidate's revision.
        key: The routing key (any value; ``str()`` of it is hashed).

    Returns:
        The fraction; the candidate serves the key iff it is below ``weight / 100``.
    """
    data = json.dumps([name, revision, str(key)], ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(data.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / _TWO_64


_GAPS_AHEAD = 128
"""Mirror gaps ``LiveRollout.prepare`` keeps drawn ahead (it tops up below half)."""
_TWO_64 = 2.0**64
_PLAIN_KEY = re.compile(r"[ !#-\[\]-~]*")  # printable ASCII but '"' and '\\': JSON as-is
_STICKY_CACHE_SIZE = 4096


class _StickyRouter:
    """``sticky_fraction`` for one (name, revision), with a bounded memo of recent keys.

    The same bytes as :func:`sticky_fraction`: plugin names need no JSON escaping, and a
    key of printable ASCII without quote or backslash neither; other keys go through
    ``json.dumps``.
    """

    __slots__ = ("_name", "_prefix", "_revision", "memo")

    def __init__(self, name: str, revision: int) -> None:
        self._name = name
        self._revision = revision
        self._prefix = json.dumps([name, revision], separators=(",", ":"))[:-1] + ',"'
        self.memo: dict[object, float] = {}
        """Recent string keys' fractions (at most ``_STICKY_CACHE_SIZE``; cleared in place)."""

    def fraction(self, key: object) -> float:
        memo = self.memo
        value = memo.get(key) if isinstance(key, str) else None
        if value is not None:
            return value
        text = str(key)
        if _PLAIN_KEY.fullmatch(text):
            data = (self._prefix + text + '"]').encode("ascii")
            value = int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / _TWO_64
        else:
            value = sticky_fraction(self._name, self._revision, key)
        if isinstance(key, str):
            if len(memo) >= _STICKY_CACHE_SIZE:
                memo.clear()
            memo[key] = value
        return value


def matches_version(wanted: str, plugin: Plugin) -> bool:
    """Tell whether a pinned version (``7``, ``r7``, ``greet@r7``, full) names ``plugin``."""
    return _names_record(wanted, plugin.record)


class VersionHolder(Protocol):
    """Where :func:`pick_version` finds held versions (``host.registry.Registry``)."""

    def held(self, name: str) -> Sequence[Plugin]:
        """Replaced versions of ``name`` still held for pinned calls, newest first."""
        ...  # pragma: no cover - a protocol

    def history(self, name: str) -> Sequence[PluginRecord]:
        """The records of ``name`` that went live recently, newest first."""
        ...  # pragma: no cover - a protocol


def pick_version(
    name: str,
    wanted: str,
    stable: Plugin,
    live: LiveRollout | None,
    holder: VersionHolder | None = None,
) -> Plugin:
    """The version a pinned call runs on.

    Args:
        name: The plugin name.
        wanted: What the caller asked for.
        stable: The stable version.
        live: The rollout, if one runs (its candidate may be pinned, even at weight 0 or
            after an automatic abort, until the record drops it).
        holder: The registry: its held versions are asked for only when neither the
            stable nor the candidate matches (a shadow's mirror, a pinned call, pays
            nothing for them), and its history only to say that a version ran here
            but is no longer held.

    Returns:
        The version.

    Raises:
        VersionNotLive: No version matches; the error names what is live and held.
    """
    if matches_version(wanted, stable):
        return stable
    if live is not None and matches_version(wanted, live.candidate):
        return live.candidate
    held = holder.held(name) if holder is not None else ()
    for plugin in held:
        if matches_version(wanted, plugin):
            return plugin
    serving = [stable.version]
    if live is not None:
        serving.append(f"{live.candidate.version} ({live.mode} candidate)")
    hint = ""
    for record in holder.history(name) if holder is not None else ():
        if _names_record(wanted, record):
            hint = (
                f"{record.version} ran here but is no longer held in memory "
                f"(this host holds {len(held)} replaced version(s)); roll back to it to serve it"
            )
            break
    raise VersionNotLive(name, wanted, serving, [plugin.version for plugin in held], hint)


def _names_record(wanted: str, record: PluginRecord) -> bool:
    """:func:`matches_version` for a record (a version no longer loaded)."""
    if wanted == record.version:
        return True
    rest = wanted.removeprefix(record.name + "@").removeprefix("r")
    return rest.isdigit() and len(rest) < 20 and int(rest) == record.revision


class VersionStats:
    """Sliding-window statistics of one live version (see the module docstring).

    Running totals over the window (calls, failures, timeouts, slow calls) plus a ring of
    per-second buckets, and a log-scale latency histogram per second. A call adds to the
    totals and to the current second's histogram only: a second's counts are taken as
    the totals' growth during it (``_base``) when the clock passes it, and leave the
    totals when it leaves the window. The histogram is summed over the buckets only when
    a percentile is read (reports, abort reasons).

    Args:
        window_s: The window, rounded up to whole seconds.
        slow_ms: Calls slower than this count as slow (the policy's ``max_p99_ms``).
        now: The current monotonic time (``time.perf_counter()``).
    """

    # INVARIANT (loop thread only): calls/failures/timeouts/slow are the sums over the
    # closed buckets in the window plus (totals - _base) for the current second, whose
    # ring entries stay zero until it closes; _cur is _hist[_slot].
    __slots__ = (
        "_base",
        "_calls",
        "_cur",
        "_failures",
        "_hist",
        "_second",
        "_slot",
        "_slow",
        "_slow_s",
        "_timeouts",
        "calls",
        "failures",
        "size",
        "slow",
        "slow_ms",
        "timeouts",
    )

    def __init__(self, window_s: float, slow_ms: float, now: float) -> None:
        self.size = size = max(1, math.ceil(window_s))
        self._calls = [0] * size
        self._failures = [0] * size
        self._timeouts = [0] * size
        self._slow = [0] * size
        self._hist = [[0] * _HIST_SIZE for _ in range(size)]
        self._second = int(now)
        self._slot = self._second % size
        self._cur = self._hist[self._slot]
        self.calls = self.failures = self.timeouts = self.slow = 0
        self._base = (0, 0, 0, 0)
        self.slow_ms = slow_ms
        self._slow_s = slow_ms / 1000.0

    def _advance(self, second: int) -> None:
        """Close the current second, expire the buckets that leave the window."""
        if second <= self._second:
            return  # the clock never goes back; a late ``now`` counts in this second
        size = self.size
        i = self._slot
        calls, failures, timeouts, slow = self._base
        self._calls[i] = self.calls - calls
        self._failures[i] = self.failures - failures
        self._timeouts[i] = self.timeouts - timeouts
        self._slow[i] = self.slow - slow
        for k in range(1, min(second - self._second, size) + 1):
            j = (self._second + k) % size
            if self._calls[j]:
                self.calls -= self._calls[j]
                self.failures -= self._failures[j]
                self.timeouts -= self._timeouts[j]
                self.slow -= self._slow[j]
                self._calls[j] = self._failures[j] = self._timeouts[j] = self._slow[j] = 0
                self._hist[j][:] = _ZEROS
        self._second = second
        self._slot = j = second % size
        self._cur = self._hist[j]
        self._base = (self.calls, self.failures, self.timeouts, self.slow)

    def record(self, outcome: int, elapsed: float | None, now: float, weight: int = 1) -> None:
        """Count one call (hot path while a rollout runs: a few increments).

        Args:
            outcome: ``OK``, ``FAILED`` or ``TIMEOUT``.
            elapsed: Its duration in seconds; None if it was not timed (it then counts
                in the calls and outcomes, not in the latencies: percentiles are over
                the timed calls).
            now: When it ended (``time.perf_counter()``).
            weight: How many calls it stands for (a sampled successful stable call).
        """
        second = int(now)
        if second != self._second:
            self._advance(second)
        self.calls += weight
        if outcome:
            if outcome == FAILED:
                self.failures += 1
            else:
                self.timeouts += 1
        if elapsed is None:
            return
        if elapsed > self._slow_s:
            self.slow += weight
        if elapsed > _MIN_S:
            self._cur[_bucket(_BOUNDS_S, elapsed)] += weight
        else:
            self._cur[0] += weight

    @property
    def hist(self) -> list[int]:
        """The latency histogram over the window (summed over the buckets)."""
        return [sum(column) for column in zip(*self._hist, strict=True)]

    @property
    def error_rate(self) -> float:
        """Failures and timeouts over calls in the window (0 with no calls)."""
        return (self.failures + self.timeouts) / self.calls if self.calls else 0.0

    def percentile_ms(self, q: float) -> float | None:
        """The ``q`` quantile (0..1) of the window's latencies, as a bucket's upper bound."""
        hist = self.hist
        timed = sum(hist)  # the calls minus the untimed ones (``record``'s elapsed None)
        if not timed:
            return None
        rank = max(1, math.ceil(q * timed))
        seen = 0
        for index, count in enumerate(hist):
            seen += count
            if seen >= rank:
                return round(_upper_ms(index), 3)
        return round(_upper_ms(_HIST_SIZE - 1), 3)  # pragma: no cover - counts add up

    def snapshot(self, now: float) -> dict[str, Any]:
        """The contract's ``<Stats>`` over the window.

        Returns:
            ``{calls, failures, timeouts, error_rate, p50_ms, p99_ms}``.
        """
        self._advance(int(now))
        return {
            "calls": self.calls,
            "failures": self.failures,
            "timeouts": self.timeouts,
            "error_rate": round(self.error_rate, 4),
            "p50_ms": self.percentile_ms(0.50),
            "p99_ms": self.percentile_ms(0.99),
        }


class LiveRollout:
    """The routing state and statistics of one running rollout on this host.

    Design note — the per-call cost (issue 16's goals: a rollout adds at most 1 µs per
    call, a 10% shadow at most 5% of the stable's path): nothing here draws a random
    number or reads a clock for most calls, and most calls make no Python call here at
    all. Weighted routing (and a shadow's sampling) counts down a gap drawn from the
    geometric distribution of the gaps between successes of independent ``weight / 100``
    draws: the same law as a draw per call, at one decrement per call.

    The stable's calls are counted in *spans*: all but the last call of a span take a
    quiet slot when they start (``quiet``), are not timed and, if they succeed, count
    nothing themselves; the last one (:meth:`due`) is timed and recorded with the span's
    length as its weight, so the count is exact (short by the open span: ``unsampled``)
    and the latencies are an unbiased sample (a span's length is drawn independently of
    the calls). A quiet call that fails counts at once (its failure must not wait) and
    its span then weighs one less (``_carry``, which also carries the slots of a span
    that :meth:`update` cut short). Without a mirroring shadow a span is
    ``STABLE_SAMPLE`` calls. While a shadow mirrors, a span ends at the next mirrored
    call (or after ``MIRROR_SPAN``): one countdown, so the caller pays one ``due`` call
    and two clock reads per mirror (about one call in ten at 10%), rather than per
    mirror *and* per 1-in-8 sample (one call in ~4.4 with two interleaved countdowns),
    and the sample is recorded by the shadow's worker with the mirror, off the path.

    Two countdowns are public so that the dispatcher can spend them inline; the protocol
    is that a caller may, instead of calling a method:

    * ``skip`` — for an unkeyed call while ``routing`` and ``sticky_key is None`` and
      ``skip > 0``: decrement ``skip`` and run the stable (what ``choose`` would do);
    * ``quiet`` — when a call of any version but the candidate *starts* with
      ``quiet > 0``: decrement ``quiet`` (the call takes a quiet slot of the span), time
      nothing, and at its end count nothing if it succeeded (its span's weight counts
      it) or call ``record`` with ``started`` 0.0 if it failed. Any other call is timed
      (``started``, a ``perf_counter`` reading) and ends in ``record``, or, for a stable
      success, in ``due`` if ``quiet`` is still 0 (else it decrements ``quiet``: calls
      overlapped). A clock read costs about a tenth of a call on a VM, and the test and
      decrement at the start are all that most shadowed or canaried calls pay.

    The candidate's calls are all counted, and its policy is judged only while its window
    holds failures, timeouts or slow calls (with none, no policy can break).

    Args:
        spec: The record's rollout.
        candidate: The candidate's compiled, installed version.
        now: The current monotonic time (``time.perf_counter()``).
    """

    __slots__ = (
        "_carry",
        "_gap",
        "_gaps",
        "_keep_log",
        "_max_error_rate",
        "_max_p99_ms",
        "_memo",
        "_min_calls",
        "_span",
        "abort_reason",
        "candidate",
        "candidate_stats",
        "mirror",
        "mirror_db",
        "quiet",
        "report",
        "routing",
        "skip",
        "spec",
        "stable_stats",
        "sticky",
        "sticky_key",
        "threshold",
    )

    def __init__(self, spec: Rollout, candidate: Plugin, now: float) -> None:
        self.candidate = candidate
        window = spec.policy.window_s
        slow = spec.policy.max_p99_ms if spec.policy.max_p99_ms is not None else math.inf
        self.stable_stats = VersionStats(window, slow, now)
        self.candidate_stats = VersionStats(window, slow, now)
        self.abort_reason: str | None = None
        self.mirror_db: Callable[[Plugin], Any] | None = None
        """A shadow's ``host.context.SHADOW_DB`` value (built once by ``host.shadow``)."""
        self.report: dict[str, Any] = {}
        """A shadow's comparison report (``host.shadow`` fills it): ``match``,
        ``mismatch``, ``candidate_error``, ``dropped``, ``refused_writes``, ``blocked``
        (the last refused writes, ``"plugin: operation"``), ``last_error``."""
        # INVARIANT (loop thread only): the open span has _span slots for stable calls,
        # the last one due (recorded with weight _carry + _span, at least 1), and quiet
        # of the others still free: the stable's statistics (plus the samples queued
        # with mirrors) hold every stable call but the open span's, adjusted by -_carry
        # (quiet failures counted ahead of their span, slots of spans update() cut
        # short). While mirroring, _gap (>= _span) counts down to the next mirrored
        # call, inclusive; the span ends at it, or earlier (MIRROR_SPAN).
        self._carry = 0
        self._gap = 1
        self._gaps: list[int] = []
        """Gaps to the next mirrors, drawn ahead (``prepare``; used from the end)."""
        self._span = 1
        self.quiet = 0
        self.skip = 0
        self._keep_log = 0.0
        self.spec = spec
        self.routing = False
        self.mirror = False
        self.threshold = 0.0
        self.sticky_key: str | None = None
        self.sticky = _StickyRouter(candidate.name, spec.revision)
        self._memo = self.sticky.memo  # the same dict (cleared in place), read inline
        self.update(spec)

    @property
    def name(self) -> str:
        """The plugin name."""
        return self.candidate.name

    @property
    def mode(self) -> str:
        """``canary`` or ``shadow``."""
        return self.spec.mode

    @property
    def revision(self) -> int:
        """The candidate's revision."""
        return self.spec.revision

    def update(self, spec: Rollout) -> None:
        """Take a new weight, mode, sticky key or policy of the same candidate."""
        self.spec = spec
        self.threshold = spec.weight / 100.0
        self.sticky_key = spec.sticky_key
        policy = spec.policy
        self._min_calls = policy.min_calls
        self._max_error_rate = policy.max_error_rate
        self._max_p99_ms = policy.max_p99_ms
        active = self.abort_reason is None and self.threshold > 0.0
        self.routing = active and spec.mode == "canary"
        self.mirror = active and spec.mode == "shadow"
        self._keep_log = math.log1p(-self.threshold) if 0.0 < self.threshold < 1.0 else 0.0
        self._gaps.clear()  # drawn for the old weight
        self.skip = self._next_gap() - 1
        # The open span ends here: its slots taken so far are carried to the next due
        # call's weight, and a new span starts under the new spec (in canary mode it
        # still ends at the next multiple of STABLE_SAMPLE calls).
        carry = self.unsampled
        self._gap = gap = self._next_gap()
        span = min(gap, MIRROR_SPAN) if self.mirror else max(STABLE_SAMPLE - carry, 1)
        self._carry = carry
        self._span = span
        self.quiet = span - 1

    @property
    def unsampled(self) -> int:
        """The stable's calls not yet in its statistics (the next due one adds them);
        negative while failures were counted ahead of their span."""
        return self._carry + self._span - 1 - self.quiet

    def prepare(self) -> None:
        """Draw the gaps of the next mirrors ahead (the shadow's worker calls it after a
        mirror, off the caller's path; ``due`` draws one itself if none is left)."""
        keep = self._keep_log
        gaps = self._gaps
        if keep and len(gaps) < _GAPS_AHEAD // 2:
            gaps.extend(
                _floor(_log1p(-_random()) / keep) + 1 for _ in range(_GAPS_AHEAD - len(gaps))
            )

    def _next_gap(self) -> int:
        """Calls up to and including the next candidate call (or mirror): geometric."""
        if not self._keep_log:
            return 1  # weight 100 (weight 0 routes nothing: ``routing`` is False)
        return _floor(_log1p(-_random()) / self._keep_log) + 1

    def choose(self, stable: Plugin, args: Any, key: object) -> Plugin:
        """The version an unpinned call runs on (sticky, else weighted)."""
        if not self.routing:
            return stable
        if key is None:
            if self.sticky_key is not None and isinstance(args, dict):
                key = args.get(self.sticky_key)
            if key is None:
                if self.skip:
                    self.skip -= 1
                    return stable
                self.skip = self._next_gap() - 1
                return self.candidate
        fraction = self._memo.get(key) if isinstance(key, str) else None  # memo hit: inline
        if fraction is None:
            fraction = self.sticky.fraction(key)
        return self.candidate if fraction < self.threshold else stable

    def record(self, plugin: Plugin, outcome: int, started: float) -> bool:
        """Count a call of either version; judge the candidate's policy.

        Args:
            plugin: The version that served the call.
            outcome: ``OK``, ``FAILED`` or ``TIMEOUT``; or -1 for an end that judges
                no version (busy, cancelled), which counts nothing.
            started: When it started (``time.perf_counter()``), or 0.0 for a stable call
                that took a quiet slot when it started (the dispatcher's protocol).

        Returns:
            True iff the candidate has just broken its policy (routing has stopped;
            ``abort_reason`` says why: report it). False for everything else, i.e.
            almost every call.
        """
        if outcome < 0:
            if not started:
                self._carry -= 1  # it took a quiet slot, but is not to be counted
            return False
        if plugin is not self.candidate:
            # The stable serves most calls: they are counted by spans (see the class
            # docstring), so its error rate and latencies stay unbiased estimates.
            if started and self.quiet:  # it takes a quiet slot now (calls overlapped)
                self.quiet -= 1
                started = 0.0
            if not started:  # it took a quiet slot: its span counts it
                if outcome:  # ...but its failure counts now, so the span weighs one less
                    self.stable_stats.record(outcome, None, _now())
                    self._carry -= 1
                return False
            self.due(started, outcome=outcome)  # it ends the span
            return False
        now = _now()
        stats = self.candidate_stats
        stats.record(outcome, now - started if started else None, now)
        if (
            stats.calls < self._min_calls
            or not (stats.failures or stats.timeouts or stats.slow)
            or self.abort_reason is not None
        ):
            return False
        reason = self._judge(stats)
        if reason is None:
            return False
        self.abort(reason)
        return True

    def due(
        self,
        started: float,
        args: Any = None,
        result: Any = None,
        mirror_to: MirrorQueue | None = None,
        outcome: int = OK,
    ) -> None:
        """The stable call that ends a span (it started while ``quiet`` was 0, and
        ``quiet`` is still 0): record it, weighted by the calls its span stands for, and
        hand it to ``mirror_to`` if it is a shadow's mirror. The dispatcher calls it
        directly for a success (``record`` for the rest).

        Args:
            started: When the call started (``time.perf_counter()``).
            args: The call's argument (for the mirror).
            result: What the stable returned (for the mirror).
            mirror_to: Where a mirrored success goes (the shadow's queue, whose worker
                then records the sample, off the caller's path); None: no mirroring.
            outcome: How the call ended (a failure is counted, never mirrored).
        """
        span = weight = self._span
        if self._carry:  # rare: quiet failures counted ahead, or a span update() cut
            weight += self._carry
            self._carry = 0
            if weight < 1:  # counted ahead of their span: the debt carries on
                self._carry = weight - 1
                weight = 1
        mirror = False
        if self.mirror:
            gap = self._gap - span
            if not gap:
                mirror = not outcome  # a failure has no answer to compare
                gaps = self._gaps  # drawn ahead by ``prepare``, off the caller's path
                gap = gaps.pop() if gaps else self._next_gap()
            self._gap = gap
            span = gap if gap < MIRROR_SPAN else MIRROR_SPAN
        else:
            span = STABLE_SAMPLE
        self._span = span
        self.quiet = span - 1
        now = _now()
        if mirror and mirror_to is not None:
            entries = mirror_to.entries
            if len(entries) < mirror_to.room:
                entries.append((self, args, result, now - started, weight))
                if not mirror_to.ticking:
                    mirror_to.kick()
                return
            mirror_to.drop(self)
        self.stable_stats.record(outcome, now - started, now, weight)

    def _judge(self, stats: VersionStats) -> str | None:
        """Why the candidate breaks its policy now, or None."""
        if self._max_error_rate is not None:
            rate = stats.error_rate
            stable_rate = self.stable_stats.error_rate
            if rate > self._max_error_rate and rate > stable_rate:
                return (
                    f"error rate {rate:.2f} > {self._max_error_rate:.2f} after "
                    f"{stats.calls} calls (stable {stable_rate:.2f})"
                )
        if self._max_p99_ms is not None and stats.slow * 100 > stats.calls:
            return (
                f"p99 {stats.percentile_ms(0.99)} ms > {self._max_p99_ms:g} ms after "
                f"{stats.calls} calls ({stats.slow} slower than {self._max_p99_ms:g} ms)"
            )
        return None

    def abort(self, reason: str) -> None:
        """Stop routing and mirroring to the candidate at once (see the INVARIANT)."""
        if self.abort_reason is None:
            self.abort_reason = reason
        self.routing = False
        self.mirror = False

    def stats(self, now: float) -> dict[str, Any]:
        """``{stable: <Stats>, candidate: <Stats>}`` over the window."""
        return {
            "stable": self.stable_stats.snapshot(now),
            "candidate": self.candidate_stats.snapshot(now),
        }

    def describe(self) -> dict[str, Any]:
        """``{version, revision, mode, weight}`` for the hosts document, plus ``shadow``
        (the comparison report, see ``report``) for a shadow."""
        described: dict[str, Any] = {
            "version": self.candidate.version,
            "revision": self.spec.revision,
            "mode": self.spec.mode,
            "weight": self.spec.weight,
        }
        if self.spec.mode == "shadow":
            described["shadow"] = shadow_report(self.report)
        return described


def shadow_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """A comparison report with every counter present (0 when nothing happened yet).

    Args:
        report: ``LiveRollout.report``.

    Returns:
        ``{match, mismatch, candidate_error, dropped, refused_writes, blocked,
        last_error}``.
    """
    out: dict[str, Any] = {key: int(report.get(key) or 0) for key in SHADOW_OUTCOMES}
    out["blocked"] = list(report.get("blocked") or ())
    out["last_error"] = report.get("last_error")
    return out


AbortHandler = Callable[[LiveRollout, str], None]
"""Called by the dispatcher when a host-side abort decision is taken (see runtime)."""


async def write_abort(
    collection: Any,
    name: str,
    revision: int,
    *,
    reason: str,
    by: str,
    stats: Mapping[str, Any] | None = None,
) -> bool:
    """Record the abort of candidate ``revision`` of ``name``: the contract's compare-and-set.

    ``update_one({_id, "rollout.revision": R}, {$unset: rollout, $set: last_rollout})``:
    of several writers aborting the same candidate (hosts that detected it, operators),
    exactly one modifies the record; every host follows it through its change stream.
    (``host.publish.abort_rollout`` is the public operation; the runtime calls this, as
    it may not import the publishing tools.)

    Args:
        collection: The functions collection (async PyMongo).
        name: The plugin name.
        revision: The candidate's revision.
        reason: Why, e.g. ``error rate 1.00 > 0.05 after 20 calls (stable 0.00)``.
        by: Who: a host id (an automatic abort) or ``cli``/a user.
        stats: ``{stable: <Stats>, candidate: <Stats>}`` at the time of the abort.

    Returns:
        True iff this call recorded the abort.
    """
    doc = await collection.find_one({"_id": name, "rollout.revision": revision}, {"rollout": 1})
    rollout = doc.get("rollout") if doc is not None else None
    if not isinstance(rollout, Mapping):
        return False  # already ended (or never this revision)
    version = None
    source, entrypoint = rollout.get("source"), rollout.get("entrypoint")
    if isinstance(source, str):
        version = PluginRecord(
            name, source, entrypoint if isinstance(entrypoint, str) else "main", revision=revision
        ).version
    now = datetime.now(UTC)
    result = await collection.update_one(
        {"_id": name, "rollout.revision": revision},
        {
            "$unset": {"rollout": ""},
            "$set": {
                "updatedAt": now,
                "last_rollout": {
                    "revision": revision,
                    "version": version,
                    "outcome": "aborted",
                    "reason": reason,
                    "by": by,
                    "at": now,
                    "stats": dict(stats) if stats is not None else None,
                },
            },
        },
    )
    return bool(result.modified_count == 1)
