"""Rollouts as readers see them: the record's candidate plus the hosts' reports, summed.

Used by :mod:`host.fleetview` (``plugin-host status``, ``GET /fleet``). Each host reports,
in every ``plugins[]`` entry of its hosts-collection document, the candidate it holds
(``candidate: {version, revision, mode, weight}``) and per-version statistics over its
sliding window (``stats: {stable: <Stats>, candidate: <Stats>}``, ``<Stats>`` being
``{calls, failures, timeouts, error_rate, p50_ms, p99_ms}``).

Summing over the hosts: ``calls``, ``failures`` and ``timeouts`` add up; ``error_rate`` is
recomputed for the fleet, as each host's rate weighted by its calls (the fleet's failed
calls over its calls, whatever each host counts as failed); ``p50_ms`` and ``p99_ms`` are
the highest of the hosts' values, an upper bound, because percentiles do not add. The
view says so in ``stats.summed``.

Held versions (``plugins[].held``: the replaced versions a host keeps for pinned calls,
``held_versions``) are listed per plugin by :func:`sum_held`: each version once, with the
number of live hosts holding it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from .fleet import revision_in_version
from .rollout import SHADOW_OUTCOMES
from .rollout_record import candidate_version

__all__ = (
    "SUMMED",
    "held_reports",
    "last_rollout_view",
    "plugin_reports",
    "rollout_view",
    "sum_held",
    "sum_shadow",
    "sum_stats",
)

SUMMED = (
    "calls, failures and timeouts add up over the hosts; error_rate is the fleet's "
    "(each host's weighted by its calls); p50_ms and p99_ms are the highest host's "
    "(percentiles do not add)"
)
"""How :func:`sum_stats` combines the hosts' statistics (shown by ``status``)."""

_COUNTS = ("calls", "failures", "timeouts")
_PERCENTILES = ("p50_ms", "p99_ms")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def sum_stats(reports: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The fleet's statistics of one version from each host's ``<Stats>``.

    Args:
        reports: One ``{calls, failures, timeouts, error_rate, p50_ms, p99_ms}`` per host.

    Returns:
        The same shape, summed as the module docstring says, plus ``hosts`` (how many
        reports). Malformed fields count as absent.
    """
    counts = dict.fromkeys(_COUNTS, 0)
    errors = 0.0
    highest: dict[str, float | None] = dict.fromkeys(_PERCENTILES)
    hosts = 0
    for report in reports:
        hosts += 1
        calls = _number(report.get("calls")) or 0.0
        for key in _COUNTS:
            counts[key] += int(_number(report.get(key)) or 0)
        rate = _number(report.get("error_rate"))
        if rate is None:  # a host that sends no rate: its failures over its calls
            rate = (_number(report.get("failures")) or 0.0) / calls if calls else 0.0
        errors += rate * calls
        for key in _PERCENTILES:
            value = _number(report.get(key))
            best = highest[key]
            if value is not None and (best is None or value > best):
                highest[key] = value
    calls_total = counts["calls"]
    return {
        **counts,
        "error_rate": round(errors / calls_total, 6) if calls_total else 0.0,
        **highest,
        "hosts": hosts,
    }


def sum_shadow(reports: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """The fleet's comparison report of a shadow from each host's (``candidate.shadow``).

    Args:
        reports: ``(host id, {match, mismatch, candidate_error, dropped, refused_writes,
            blocked, last_error})`` per host (see ``host.rollout.shadow_report``).

    Returns:
        The counters added up; ``blocked`` the distinct refused writes the hosts name;
        ``errors`` each host's last candidate error (``{host, error}``); ``hosts``.
    """
    counts = dict.fromkeys(SHADOW_OUTCOMES, 0)
    blocked: list[str] = []
    errors: list[dict[str, Any]] = []
    hosts = 0
    for host, report in reports:
        hosts += 1
        for key in SHADOW_OUTCOMES:
            counts[key] += int(_number(report.get(key)) or 0)
        for entry in report.get("blocked") or ():
            if isinstance(entry, str) and entry not in blocked:
                blocked.append(entry)
        if isinstance(report.get("last_error"), str):
            errors.append({"host": host, "error": report["last_error"]})
    return {**counts, "blocked": blocked, "errors": errors, "hosts": hosts}


def held_reports(doc: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """``{name: held versions}`` of a hosts document's ``plugins[]`` entries that hold some.

    ``held`` (newest first) is what a host keeps for pinned calls (``held_versions``);
    entries without it, and malformed items in it, count as holding nothing.
    """
    out: dict[str, tuple[str, ...]] = {}
    for name, item in _plugin_entries(doc):
        held = item.get("held")
        if isinstance(held, list):
            versions = tuple(v for v in held if isinstance(v, str))
            if versions:
                out[name] = versions
    return out


def sum_held(reports: Iterable[Sequence[str]]) -> list[dict[str, Any]]:
    """The held versions of one plugin over the fleet, from each live host's ``held``.

    Args:
        reports: One list of held versions per host (hosts holding none may be left out).

    Returns:
        ``[{version, revision, hosts}]``, newest revision first: every version some host
        can serve to a pinned call, and how many hosts hold it (a pinned call reaching a
        host that does not hold it gets a 409 naming what that host holds).
    """
    counts: dict[str, int] = {}
    for versions in reports:
        for version in dict.fromkeys(versions):  # a host counts once per version
            counts[version] = counts.get(version, 0) + 1

    listed: list[dict[str, Any]] = [
        {"version": v, "revision": revision_in_version(v), "hosts": n} for v, n in counts.items()
    ]
    listed.sort(key=lambda h: (-h["revision"] if h["revision"] is not None else 1, h["version"]))
    return listed


def plugin_reports(doc: Mapping[str, Any], key: str) -> dict[str, Mapping[str, Any]]:
    """``{name: entry[key]}`` of a hosts document's ``plugins[]`` entries that carry it."""
    out: dict[str, Mapping[str, Any]] = {}
    for name, item in _plugin_entries(doc):
        value = item.get(key)
        if isinstance(value, Mapping):
            out[name] = value
    return out


def _plugin_entries(doc: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(name, entry) of a hosts document's well-formed ``plugins[]`` entries."""
    for item in doc.get("plugins") or ():
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            yield item["name"], item


def _json(value: Any) -> Any:
    if isinstance(value, datetime):  # BSON dates come back naive, in UTC
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, Mapping):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    return value


def last_rollout_view(doc: Any) -> dict[str, Any] | None:
    """The record's ``last_rollout``, JSON-ready (None if absent or malformed)."""
    return _json(dict(doc)) if isinstance(doc, Mapping) else None


def rollout_view(
    name: str,
    rollout: Mapping[str, Any],
    hosts: Iterable[Any],
) -> dict[str, Any]:
    """One running rollout: the record's candidate and the hosts' reports on it.

    Args:
        name: The plugin.
        rollout: The record's ``rollout`` sub-document.
        hosts: The live, counted :class:`host.fleetview.HostStatus` of the fleet.

    Returns:
        ``{revision, version, mode, weight, sticky_key, policy, started_at, updated_at,
        steps, signed, hosts_holding, hosts_alive, behind, refused, shadow, stats}``,
        where ``shadow`` is a shadow's comparison report (:func:`sum_shadow`; None for a
        canary) and
        ``stats`` is ``{stable, candidate, hosts, summed}`` over the hosts that hold the
        candidate (see :func:`sum_stats`).
    """
    revision = rollout.get("revision")
    holding: list[Any] = []
    behind: list[str] = []
    refused: list[dict[str, Any]] = []
    alive = 0
    for host in hosts:
        alive += 1
        held = host.candidates.get(name) or {}
        if held.get("revision") == revision:
            holding.append(host)
            continue
        behind.append(host.id)
        refusal = host.candidate_refusal(name, revision)
        if refusal is not None:
            refused.append(
                {
                    "host": host.id,
                    "revision": refusal.get("revision"),
                    "stage": refusal.get("stage"),
                    "error": refusal.get("error"),
                }
            )
    shadows: list[tuple[str, Mapping[str, Any]]] = []
    for host in holding:
        report = (host.candidates.get(name) or {}).get("shadow")
        if isinstance(report, Mapping):
            shadows.append((host.id, report))
    per_version: dict[str, list[Mapping[str, Any]]] = {"stable": [], "candidate": []}
    for host in holding:
        stats = host.stats.get(name) or {}
        for which, reports in per_version.items():
            report = stats.get(which)
            if isinstance(report, Mapping):
                reports.append(report)
    return {
        "revision": revision,
        "version": candidate_version(name, rollout),
        "mode": rollout.get("mode"),
        "weight": rollout.get("weight"),
        "sticky_key": rollout.get("sticky_key"),
        "policy": _json(rollout.get("policy")),
        "started_at": _json(rollout.get("started_at")),
        "updated_at": _json(rollout.get("updated_at")),
        "steps": _json(rollout.get("steps")),
        "signed": bool(rollout.get("signature")),
        "hosts_holding": len(holding),
        "hosts_alive": alive,
        "behind": behind,
        "refused": refused,
        "shadow": sum_shadow(shadows) if rollout.get("mode") == "shadow" else None,
        "stats": {
            "stable": sum_stats(per_version["stable"]),
            "candidate": sum_stats(per_version["candidate"]),
            "hosts": len(holding),
            "summed": SUMMED,
        },
    }
