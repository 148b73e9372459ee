"""Fleet commands and options: ``status``, and ``--wait`` for the publishing commands.

``run``/``dev`` take the status-reporting options defined here (:data:`ReportStatus`,
:data:`Heartbeat`, :data:`HostTtl`, :data:`HostId`); ``push``, ``rollback``, ``enable``
and ``disable`` take :data:`Wait` and :data:`WaitTimeout` and hand their targets to a
:class:`FleetWait`. The logic lives in :mod:`host.fleet` (the hosts' side) and
:mod:`host.fleetview` (the readers' side); heavy imports stay inside the functions, so
``plugin-host --help`` does not pay for them.
"""

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
    _errors,
    _with_db,
    app,
    fail,
)

if TYPE_CHECKING:
    from ..fleet import StatusReporting
    from ..fleetview import FleetStatus, FleetWaitError, HostStatus, Progress, Target

__all__ = (
    "FleetWait",
    "Heartbeat",
    "HostId",
    "HostTtl",
    "ReportStatus",
    "Wait",
    "WaitTimeout",
    "fleet_failed",
    "reporting",
    "status",
)

ReportStatus = Annotated[
    bool,
    typer.Option(
        "--report-status/--no-report-status",
        help="Keep this host's document in <collection>_hosts (for `status` and `push --wait`).",
    ),
]
Heartbeat = Annotated[
    float, typer.Option("--heartbeat", min=0.01, help="Seconds between status heartbeats.")
]
HostTtl = Annotated[
    float | None,
    typer.Option(
        "--host-ttl",
        min=0.02,
        help="Seconds without a heartbeat before the host counts as dead (default: 3 heartbeats).",
    ),
]
HostId = Annotated[
    str | None,
    typer.Option(
        "--host-id",
        envvar="PLUGIN_HOST_ID",
        help="This host's id in the hosts collection (default hostname:pid:random).",
    ),
]
Wait = Annotated[
    bool,
    typer.Option(
        "--wait",
        help="Wait until every live host serves it: exit 1 if one refuses it, or at --timeout.",
    ),
]
WaitTimeout = Annotated[
    float, typer.Option("--timeout", min=0.1, help="With --wait: seconds to wait.")
]


def reporting(
    enabled: bool, heartbeat: float, ttl: float | None, host_id: str | None
) -> StatusReporting | bool:
    """The ``report_status`` of ``run``/``dev`` from their options (a clear error if bad)."""
    from ..fleet import StatusReporting

    if not enabled:
        return False
    try:
        return StatusReporting(heartbeat=heartbeat, ttl=ttl, host_id=host_id)
    except ValueError as exc:
        raise fail(
            f"status reporting: {exc}", "pass --host-ttl longer than --heartbeat", usage=True
        ) from None


class FleetWait:
    """``--wait``: follow the hosts collection until the fleet serves the targets.

    Args:
        collection: The functions collection.
        timeout: Seconds to wait.
    """

    def __init__(self, collection: str, timeout: float) -> None:
        self.collection = collection
        self.timeout = timeout

    async def __call__(self, db: Any, targets: list[Target]) -> None:
        """Wait (progress on stderr), then print how long the fleet took.

        Raises:
            FleetRefused: A live host refused a target (see :func:`fleet_failed`).
            FleetTimeout: Not converged within the timeout.
        """
        from ..fleetview import wait_for_fleet

        if _errors.is_terminal:
            with _errors.get().status("waiting for the fleet") as status:
                done = await wait_for_fleet(
                    db,
                    targets,
                    collection=self.collection,
                    timeout=self.timeout,
                    on_progress=lambda p: status.update(p.line),
                )
        else:

            def show(progress: Progress) -> None:
                print(progress.line, file=sys.stderr, flush=True)

            done = await wait_for_fleet(
                db, targets, collection=self.collection, timeout=self.timeout, on_progress=show
            )
        if len(targets) > 1:
            what = f"{len(targets)} plugins"
        elif targets[0].revision is not None:
            what = f"{targets[0].name} r{targets[0].revision}"
        else:
            what = f"without {targets[0].name}"
        _console.print(
            f"[green]converged[/] in {done.seconds * 1000:.0f} ms: "
            f"{len(done.hosts)}/{len(done.hosts)} hosts serving {what}"
        )


def fleet_failed(exc: FleetWaitError) -> typer.Exit:
    """Print why the fleet did not converge, one line per host; the exit (status 1)."""
    from ..fleetview import FleetRefused, FleetTimeout

    if isinstance(exc, FleetRefused):
        for r in exc.refusals:
            typer.secho(
                f"error: host {r['host']} refused {r['plugin']} r{r['revision']} at stage "
                f"{r['stage']}: {r['error']}",
                fg=typer.colors.RED,
                err=True,
            )
        typer.echo(
            "hint: the hosts keep serving the version they had; fix it and push again", err=True
        )
    elif isinstance(exc, FleetTimeout):
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        for b in exc.behind:
            serving = f"r{b['revision']}" if b["revision"] is not None else "nothing"
            typer.echo(f"  behind: {b['host']} serves {b['plugin']} {serving}", err=True)
        typer.echo("hint: `plugin-host status` shows every host; --timeout waits longer", err=True)
    else:  # pragma: no cover - the two kinds above are all there is
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=1)


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
