"""The fleet command: ``status`` (what every host serves, who refused what, converged?)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._common import (
    DEFAULT_URI,
    Collection,
    ConnectTimeout,
    Database,
    MongoUri,
    _console,
    _with_db,
    app,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ..fleetview import FleetStatus, HostStatus, PluginFleet

__all__ = ("UNHEALTHY", "status", "unhealthy")


@app.command()
def status(
    name: Annotated[str | None, typer.Argument(help="Only this plugin.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    mongodb_uri: MongoUri = DEFAULT_URI,
    database: Database = "app",
    collection: Collection = "functions",
    connect_timeout: ConnectTimeout = 5.0,
) -> None:
    """Which host serves what, who refused it and why, and whether the fleet has converged.

    Exit status: 0 when healthy; 3 when a host is dead (its heartbeat stopped without it
    unregistering) or a live host refused a plugin's current revision (each problem on
    stderr, and in ``problems`` with ``--json``); 1 when MongoDB is not reachable. A fleet
    still converging (hosts starting, or behind a fresh push) is not unhealthy:
    ``push --wait`` waits for that.
    """
    from ..fleetview import fleet_status

    async def job(db: Any) -> FleetStatus:
        return await fleet_status(db, collection=collection, name=name)

    view = _with_db(mongodb_uri, database, connect_timeout, job)
    problems = unhealthy(view)
    if as_json:
        shown = {**view.as_dict(), "healthy": not problems, "problems": problems}
        sys.stdout.write(json.dumps(shown, default=str) + "\n")
    elif _console.is_terminal:
        _print_status_table(view)
    else:
        _print_status_plain(view)
    if problems:
        for problem in problems:
            sys.stderr.write(f"unhealthy: {problem}\n")
        raise typer.Exit(code=UNHEALTHY)


UNHEALTHY = 3
"""Exit status of ``status`` when the fleet is unhealthy (see :func:`unhealthy`)."""


def unhealthy(view: FleetStatus) -> list[str]:
    """What is wrong with the fleet, one line each; empty when healthy.

    Args:
        view: The fleet as ``status`` shows it.

    Returns:
        A dead host (heartbeat stopped, not unregistered), and each refusal by a live
        host of a plugin's current revision.
    """
    problems = [
        f"host {host.id} is dead (no heartbeat for {host.age_s:.0f} s)"
        for host in view.hosts
        if not host.alive
    ]
    for plugin in view.plugins.values():
        for refusal in plugin.rejected:
            problems.append(
                f"host {refusal['host']} refused {plugin.name} r{refusal['revision']} "
                f"at stage {refusal['stage']}: {refusal['error']}"
            )
    return problems


def _host_state(host: HostStatus) -> str:
    if not host.alive:
        return f"dead ({host.age_s:.0f} s)"
    if host.draining:
        return "draining"
    if host.late:
        return f"late ({host.age_s:.1f} s)"
    return "ready" if host.ready else "starting"


def _revision(revision: int | None, enabled: bool) -> str:
    if revision is not None:
        return f"r{revision}"
    return "disabled" if not enabled else "-"


def _stats_line(label: str, stats: Mapping[str, Any]) -> str:
    p99 = stats.get("p99_ms")
    latency = f", p99 {p99:.1f} ms" if isinstance(p99, int | float) else ""
    return (
        f"{label}: {stats.get('calls', 0)} calls, {stats.get('failures', 0)} failures, "
        f"{stats.get('timeouts', 0)} timeouts, error rate {100 * stats.get('error_rate', 0):.1f}%"
        f"{latency}"
    )


def _rollout_lines(p: PluginFleet) -> list[str]:
    """The rollout of one plugin, and how the last one ended: indented lines."""
    from .rollouts import policy_text

    lines: list[str] = []
    r = p.rollout
    if r is not None:
        sticky = f", sticky on {r['sticky_key']}" if r.get("sticky_key") else ""
        signed = ", signed" if r.get("signed") else ""
        lines.append(
            f"  rollout: {r['mode']} {r['version']} at {r['weight']:g}%{sticky}{signed}; "
            f"{r['hosts_holding']}/{r['hosts_alive']} hosts hold it; "
            f"{policy_text(r.get('policy') or {})}"
        )
        steps = r.get("steps")
        if isinstance(steps, dict) and steps.get("weights"):
            weights = ", ".join(f"{w:g}" for w in steps["weights"])
            lines.append(
                f"  steps: {weights} % every {steps.get('interval_s'):g} s, "
                f"next at {steps.get('next_at')}"
            )
        stats = r["stats"]
        lines.append("  " + _stats_line(f"stable    r{p.revision}", stats["stable"]))
        lines.append("  " + _stats_line(f"candidate r{r['revision']}", stats["candidate"]))
        lines.append(
            f"  (summed over {stats['hosts']} hosts: counts add up, p99 is the highest host's)"
        )
        shadow = r.get("shadow")
        if isinstance(shadow, dict):
            lines.append(
                f"  shadow: {shadow.get('match', 0)} match, {shadow.get('mismatch', 0)} "
                f"mismatch, {shadow.get('candidate_error', 0)} candidate errors, "
                f"{shadow.get('refused_writes', 0)} refused writes, "
                f"{shadow.get('dropped', 0)} dropped"
            )
            for entry in shadow.get("blocked") or ():
                lines.append(f"  shadow write refused: {entry}")
            for error in shadow.get("errors") or ():
                lines.append(f"  shadow error on {error.get('host')}: {error.get('error')}")
        for refusal in r.get("refused") or ():
            lines.append(
                f"  refused candidate: {refusal['host']} r{refusal['revision']} at stage "
                f"{refusal['stage']}: {refusal['error']}"
            )
    last = p.last_rollout
    if last is not None:
        lines.append(
            f"  last rollout: r{last.get('revision')} {last.get('outcome')} by {last.get('by')} "
            f"at {last.get('at')}: {last.get('reason')}"
        )
    return lines


def _held_lines(p: PluginFleet) -> list[str]:
    """The versions of one plugin held for pinned calls (``held_versions``): one line."""
    if not p.held:
        return []
    listed = ", ".join(f"{h['version']} ({h['hosts']}/{p.hosts_alive} hosts)" for h in p.held)
    return [f"  held for pinned calls: {listed}"]


def _held_count(host: HostStatus) -> str:
    held = sum(len(versions) for versions in host.held.values())
    return f", {held} held" if held else ""


def _print_status_plain(view: FleetStatus) -> None:
    if not view.hosts:
        print(f"no host reports to {view.namespace}_hosts (run `plugin-host run`)")
    for name, p in sorted(view.plugins.items()):
        state = "converged" if p.converged else "NOT converged"
        print(
            f"{name} {_revision(p.revision, p.enabled)}: "
            f"{p.hosts_serving}/{p.hosts_alive} hosts serving, {state}"
        )
        for host, serving in p.behind:
            on = _revision(serving, True) if serving is not None else "nothing"
            print(f"  behind: {host} on {on}")
        for r in p.rejected:
            print(f"  refused: {r['host']} r{r['revision']} at stage {r['stage']}: {r['error']}")
        for line in _held_lines(p) + _rollout_lines(p):
            print(line)
    for h in view.hosts:
        print(f"host {h.id} pid {h.pid} {_host_state(h)}, {len(h.plugins)} plugins{_held_count(h)}")
    for h in view.late:
        print(f"late heartbeat: {h.id} ({h.age_s:.1f} s ago, every {h.heartbeat_s:g} s)")


def _print_status_table(view: FleetStatus) -> None:
    from rich.table import Table

    plugins = Table(title=f"{view.namespace}: plugins")
    for column in ("plugin", "revision", "serving", "behind", "refused", "converged"):
        plugins.add_column(column)
    for name, p in sorted(view.plugins.items()):
        behind = ", ".join(f"{h} ({_revision(r, True)})" for h, r in p.behind)
        refused = "\n".join(f"{r['host']}: {r['stage']}: {r['error']}" for r in p.rejected)
        plugins.add_row(
            name,
            _revision(p.revision, p.enabled),
            f"{p.hosts_serving}/{p.hosts_alive}",
            behind or "-",
            f"[red]{refused}[/]" if refused else "-",
            "[green]yes[/]" if p.converged else "[yellow]no[/]",
        )
    _console.print(plugins)
    from rich.markup import escape

    for name, p in sorted(view.plugins.items()):
        lines = _held_lines(p) + _rollout_lines(p)
        if lines:
            _console.print(f"[bold]{escape(name)}[/]")
            for line in lines:
                _console.print(escape(line), highlight=False)
    if not view.hosts:
        _console.print(f"no host reports to {view.namespace}_hosts (run `plugin-host run`)")
        return
    hosts = Table(title=f"{view.namespace}: hosts")
    for column in ("host", "hostname", "pid", "version", "state", "heartbeat", "plugins"):
        hosts.add_column(column)
    for h in view.hosts:
        style = "red" if not h.alive else "yellow" if h.late or h.draining else "green"
        hosts.add_row(
            h.id,
            h.hostname,
            str(h.pid),
            h.version or "-",
            f"[{style}]{_host_state(h)}[/]",
            f"{h.age_s:.1f} s ago",
            f"{len(h.plugins)}{_held_count(h)}",
        )
    _console.print(hosts)
