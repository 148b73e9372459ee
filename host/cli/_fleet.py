"""Fleet options and helpers shared by the serving and publishing commands.

``run``/``dev`` take the status-reporting options defined here (:data:`ReportStatus`,
:data:`Heartbeat`, :data:`HostTtl`, :data:`HostId`); ``push``, ``rollback``, ``enable``
and ``disable`` take :data:`Wait` and :data:`WaitTimeout` and hand their targets to a
:class:`FleetWait`. The logic lives in :mod:`host.fleet` (the hosts' side) and
:mod:`host.fleetview` (the readers' side); heavy imports stay inside the functions, so
``plugin-host --help`` does not pay for them. The ``status`` command is in ``fleet.py``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._common import _console, _errors, fail

if TYPE_CHECKING:
    from ..fleet import StatusReporting
    from ..fleetview import Convergence, FleetWaitError, Progress, Target

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

    def __init__(self, collection: str, timeout: float, *, quiet: bool = False) -> None:
        self.collection = collection
        self.timeout = timeout
        self.quiet = quiet  # --json: the caller prints the outcome; progress stays on stderr

    async def __call__(self, db: Any, targets: list[Target]) -> Convergence:
        """Wait (progress on stderr), then print how long the fleet took.

        Returns:
            How long the fleet took, and which hosts serve the targets.

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
        if self.quiet:
            return done
        if len(targets) > 1:
            what = f"{len(targets)} plugins"
        elif targets[0].revision is not None:
            what = targets[0].label
        else:
            what = f"without {targets[0].name}"
        _console.print(
            f"[green]converged[/] in {done.seconds * 1000:.0f} ms: "
            f"{len(done.hosts)}/{len(done.hosts)} hosts serving {what}"
        )
        return done


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
