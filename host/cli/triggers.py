"""The trigger commands: ``triggers`` (owner, lag, dead letters, history lost) and
``deadletter list|retry|drop``."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._common import (
    DEFAULT_URI,
    Collection,
    ConnectTimeout,
    Database,
    MongoUri,
    TrustedKeyPaths,
    _console,
    _load_trusted,
    _with_db,
    app,
    fail,
)

if TYPE_CHECKING:
    from bson import ObjectId

    from ..deadletters import DeadLetter, RetryOutcome
    from ..triggers import TriggerOptions
    from ..triggerview import TriggerStatus

__all__ = ("RunTriggers", "TriggerLeaseTtl", "deadletter_app", "trigger_options", "triggers")

# -- the daemon's trigger options (``run``) -----------------------------------------------

RunTriggers = Annotated[
    bool,
    typer.Option(
        "--triggers/--no-triggers",
        help="Run the change-stream triggers the plugins declare (`plugin-host triggers`).",
    ),
]
TriggerLeaseTtl = Annotated[
    float,
    typer.Option(
        "--trigger-lease-ttl",
        min=0.1,
        help="Seconds a trigger lease lasts unrenewed: a dead owner's triggers move within "
        "about this time.",
    ),
]


def trigger_options(enabled: bool, lease_ttl: float) -> TriggerOptions | bool:
    """What ``run_daemon(triggers=...)`` takes for ``--triggers`` and ``--trigger-lease-ttl``."""
    from ..triggers import TriggerOptions

    return TriggerOptions(lease_ttl=lease_ttl) if enabled else False


AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
TriggerName = Annotated[
    str,
    typer.Argument(help="A trigger id (plugin/name) or a plugin name (all its triggers)."),
]
Ids = Annotated[
    list[str] | None,
    typer.Option("--id", help="A dead letter's id, as `deadletter list` prints (repeatable)."),
]
All = Annotated[bool, typer.Option("--all", help="Every dead letter of NAME.")]


def _emit(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")


# -- triggers ---------------------------------------------------------------------------


@app.command()
def triggers(
    plugin: Annotated[str | None, typer.Argument(help="Only this plugin's triggers.")] = None,
    as_json: AsJson = False,
    mongodb_uri: MongoUri = DEFAULT_URI,
    database: Database = "app",
    collection: Collection = "functions",
    connect_timeout: ConnectTimeout = 5.0,
) -> None:
    """Change-stream triggers: owner (alive?), status, lag, dead letters, history-lost gaps."""
    from ..triggerview import trigger_status

    async def job(db: Any) -> list[TriggerStatus]:
        return await trigger_status(db, collection=collection, plugin=plugin)

    rows = _with_db(mongodb_uri, database, connect_timeout, job)
    if as_json:
        _emit([row.as_dict() for row in rows])
    elif _console.is_terminal:
        _print_triggers_table(rows)
    else:
        _print_triggers_plain(rows)


def _owner(row: TriggerStatus) -> str:
    if row.owner is None:
        return "nobody"
    if not row.owner_alive:
        return f"{row.owner} (dead)"
    return row.owner if row.lease_valid else f"{row.owner} (lease expired)"


def _state(row: TriggerStatus) -> str:
    state = row.status
    if row.orphaned:
        state += ", awaiting takeover"
    if row.error:
        state += f": {row.error}"
    return state


def _lag(row: TriggerStatus) -> str:
    lag = f"{row.lag_ms:.1f} ms" if row.lag_ms is not None else "-"
    if row.checkpoint_age_s is not None:
        lag += f", checkpoint {row.checkpoint_age_s:.1f} s behind"
    return lag


def _gaps(row: TriggerStatus) -> list[str]:
    out = []
    for gap in row.history_lost:
        start = gap.start.isoformat() if gap.start else "?"
        end = gap.end.isoformat() if gap.end else "?"
        length = f" ({gap.seconds:.1f} s)" if gap.seconds is not None else ""
        out.append(f"history lost {start} → {end}{length}, policy {gap.policy}")
    return out


def _print_triggers_plain(rows: Sequence[TriggerStatus]) -> None:
    if not rows:
        print("no triggers (declare them in a plugin record's `triggers`)")
    for row in rows:
        rate = f", {row.events_per_s:.1f} events/s" if row.events_per_s is not None else ""
        print(
            f"{row.id} on {row.collection or '?'}: {_state(row)}; owner {_owner(row)}; "
            f"lag {_lag(row)}; {row.processed} processed{rate}; "
            f"{row.dead_letters} dead letters"
        )
        for line in _gaps(row):
            print(f"  {line}")


def _print_triggers_table(rows: Sequence[TriggerStatus]) -> None:
    from rich.table import Table

    if not rows:
        _console.print("no triggers (declare them in a plugin record's `triggers`)")
        return
    table = Table(title="triggers")
    for column in ("trigger", "collection", "status", "owner", "lag", "processed", "dead", "gaps"):
        table.add_column(column)
    for row in rows:
        bad = row.status == "failed" or row.orphaned
        style = "red" if bad else "yellow" if row.status != "running" else "green"
        table.add_row(
            row.id,
            row.collection or "?",
            f"[{style}]{_state(row)}[/]",
            _owner(row),
            _lag(row),
            str(row.processed),
            f"[red]{row.dead_letters}[/]" if row.dead_letters else "0",
            "\n".join(_gaps(row)) or "-",
        )
    _console.print(table)


# -- deadletter ---------------------------------------------------------------------------

deadletter_app = typer.Typer(
    name="deadletter",
    help="Events a trigger gave up on: list them, retry them through the current version, "
    "or drop them.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(deadletter_app)


def _selection(name: str, ids: list[str] | None, every: bool, *, required: bool) -> Any:
    """The ObjectIds to act on (None: all of NAME's), or a usage error."""
    from ..deadletters import DeadLetterError, parse_ids, selector

    try:
        selector(name)
        parsed = parse_ids(ids) if ids else None
    except DeadLetterError as exc:
        raise fail(str(exc), usage=True) from None
    if parsed is not None and every:
        raise fail("give --id or --all, not both", usage=True)
    if required and parsed is None and not every:
        raise fail(
            f"say which dead letters of {name}: --id ID (repeatable) or --all",
            f"`plugin-host deadletter list {name}` shows them",
            usage=True,
        )
    return parsed


def _logs_to_stderr() -> None:
    """The host this command starts logs warnings and errors to stderr (stdout is output)."""
    import logging

    import structlog

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


async def _missing(
    db: Any, name: str, collection: str, wanted: Sequence[ObjectId] | None
) -> list[str]:
    """The ids of ``wanted`` that are not dead letters of ``name`` (none for "all")."""
    from ..deadletters import list_dead_letters

    if wanted is None:
        return []
    have = {d.id for d in await list_dead_letters(db, name, collection=collection, ids=wanted)}
    return [str(oid) for oid in wanted if str(oid) not in have]


@deadletter_app.command("list")
def list_(
    name: TriggerName,
    ids: Ids = None,
    limit: Annotated[int, typer.Option("--limit", min=0, help="At most this many (0: all).")] = 0,
    full: Annotated[
        bool, typer.Option("--full", help="With the stored event and the traceback.")
    ] = False,
    as_json: AsJson = False,
    mongodb_uri: MongoUri = DEFAULT_URI,
    database: Database = "app",
    collection: Collection = "functions",
    connect_timeout: ConnectTimeout = 5.0,
) -> None:
    """The dead letters of a trigger (plugin/name) or of every trigger of a plugin."""
    from ..deadletters import list_dead_letters

    wanted = _selection(name, ids, False, required=False)

    async def job(db: Any) -> list[DeadLetter]:
        return await list_dead_letters(db, name, collection=collection, ids=wanted, limit=limit)

    letters = _with_db(mongodb_uri, database, connect_timeout, job)
    if as_json:
        _emit([letter.as_dict(full=full) for letter in letters])
        return
    if not letters:
        print(f"no dead letters for {name}")
    for letter in letters:
        when = letter.last_failed_at.isoformat() if letter.last_failed_at else "?"
        print(
            f"{letter.id} {letter.trigger} {letter.operation or '?'} "
            f"{json.dumps(letter.document_key, default=str)}: {letter.attempts} attempts, "
            f"last {when} on {letter.version or '?'}: {letter.error}"
        )
        if full:
            print("  event: " + json.dumps(letter.event, default=str))
            for line in "".join(letter.traceback).rstrip().splitlines():
                print(f"  {line}")


@deadletter_app.command()
def drop(
    name: TriggerName,
    ids: Ids = None,
    every: All = False,
    as_json: AsJson = False,
    mongodb_uri: MongoUri = DEFAULT_URI,
    database: Database = "app",
    collection: Collection = "functions",
    connect_timeout: ConnectTimeout = 5.0,
) -> None:
    """Delete dead letters for good: their events will not run."""
    from ..deadletters import drop_dead_letters

    wanted = _selection(name, ids, every, required=True)

    async def job(db: Any) -> tuple[int, list[str]]:
        missing = await _missing(db, name, collection, wanted)
        return await drop_dead_letters(db, name, collection=collection, ids=wanted), missing

    dropped, missing = _with_db(mongodb_uri, database, connect_timeout, job)
    if as_json:
        _emit({"dropped": dropped, "missing": missing})
    else:
        print(f"dropped {dropped} dead letter{'s' if dropped != 1 else ''} of {name}")
    if missing:
        raise fail(f"no dead letter of {name} with id {', '.join(missing)}")


@deadletter_app.command()
def retry(
    name: TriggerName,
    ids: Ids = None,
    every: All = False,
    trusted_keys: TrustedKeyPaths = None,
    as_json: AsJson = False,
    mongodb_uri: MongoUri = DEFAULT_URI,
    database: Database = "app",
    collection: Collection = "functions",
    connect_timeout: ConnectTimeout = 5.0,
) -> None:
    """Run dead letters again through the plugin's current version; delete each that succeeds.

    The handler runs in this process (the collection's plugins are loaded here, triggers
    off) with the event's own ctx.event_id; a crash before the delete leaves the dead
    letter in place, so a retry may repeat an event, never lose one.
    """
    from ..deadletters import host_deliverer, list_dead_letters, retry_dead_letters
    from ..runtime import PluginHost

    wanted = _selection(name, ids, every, required=True)
    keys = _load_trusted(trusted_keys)
    _logs_to_stderr()

    async def job(db: Any) -> tuple[list[RetryOutcome], list[str]]:
        missing = await _missing(db, name, collection, wanted)
        if not await list_dead_letters(db, name, collection=collection, ids=wanted, limit=1):
            return [], missing  # nothing to run: do not load the plugins
        async with PluginHost(db, collection, trusted_keys=keys, triggers=False) as host:
            outcomes = await retry_dead_letters(
                db, name, host_deliverer(host), collection=collection, ids=wanted
            )
        return outcomes, missing

    outcomes, missing = _with_db(mongodb_uri, database, connect_timeout, job)
    if as_json:
        _emit({"outcomes": [o.as_dict() for o in outcomes], "missing": missing})
    else:
        if not outcomes and not missing:
            print(f"no dead letters for {name}")
        for o in outcomes:
            detail = {
                "succeeded": f"succeeded on {o.version} (attempt {o.attempt}); deleted",
                "failed": f"failed again (attempt {o.attempt}): {o.error}",
                "claimed": "skipped: another retry is running it",
            }[o.outcome]
            print(f"{o.id} {o.trigger}: {detail}")
    if missing:
        raise fail(f"no dead letter of {name} with id {', '.join(missing)}")
    failed = [o for o in outcomes if o.outcome != "succeeded"]
    if failed:
        raise fail(
            f"{len(failed)} of {len(outcomes)} dead letters of {name} did not succeed; "
            "they are kept",
            f"`plugin-host deadletter list {name} --full` shows the errors",
        )
