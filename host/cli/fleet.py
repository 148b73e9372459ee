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
    from ..fleetview import FleetStatus, HostStatus

__all__ = ("status",)


@app.command()
def status(
    name: Annotated[str | None, typer.Argument(help="Only this plugin.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    mongodb_uri: MongoUri = DEFAULT_URI,
    database: Database = "app",
    collection: Collection = "functions",
    connect_timeout: ConnectTimeout = 5.0,
) -> None:
    """Which host serves what, who refused it and why, and whether the fleet has converged."""
    from ..fleetview import fleet_status

    async def job(db: Any) -> FleetStatus:
        return await fleet_status(db, collection=collection, name=name)

    view = _with_db(mongodb_uri, database, connect_timeout, job)
    if as_json:
        sys.stdout.write(json.dumps(view.as_dict(), default=str) + "\n")
    elif _console.is_terminal:
        _print_status_table(view)
    else:
        _print_status_plain(view)


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
    for h in view.hosts:
        print(f"host {h.id} pid {h.pid} {_host_state(h)}, {len(h.plugins)} plugins")
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
            str(len(h.plugins)),
        )
    _console.print(hosts)
