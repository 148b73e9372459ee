"""Publishing commands: ``push``, ``list``, ``show``, ``rollback``, ``enable``, ``disable``,
``delete``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._common import (
    DEFAULT_URI,
    Collection,
    ConnectTimeout,
    Database,
    MongoUri,
    SignKey,
    _console,
    _load_signer,
    _sign_key_error,
    _with_db,
    app,
    fail,
)
from ._fleet import FleetWait, Wait, WaitTimeout, fleet_failed
from .rollouts import AsJson, Canary, MaxErrorRate, MaxP99Ms, MinCalls, Shadow, StickyKey

if TYPE_CHECKING:
    from ..publish import Published, PublishError

# -- publishing ---------------------------------------------------------------------------


@app.command()
def push(
    name: Annotated[str | None, typer.Argument(help="Plugin name.")] = None,
    file: Annotated[Path | None, typer.Argument(help="The plugin's .py file.")] = None,
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="Publish every NAME.py of this folder instead."),
    ] = None,
    entrypoint: Annotated[
        str | None, typer.Option("--entrypoint", help="Entrypoint function (default main).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="New revision even if nothing changed.")
    ] = False,
    mongodb_uri: MongoUri = DEFAULT_URI,
    database: Database = "app",
    collection: Collection = "functions",
    connect_timeout: ConnectTimeout = 5.0,
    sign_key: SignKey = None,
    wait: Wait = False,
    wait_timeout: WaitTimeout = 60.0,
    canary: Canary = None,
    shadow: Shadow = None,
    sticky_key: StickyKey = None,
    max_error_rate: MaxErrorRate = None,
    min_calls: MinCalls = None,
    max_p99_ms: MaxP99Ms = None,
    as_json: AsJson = False,
) -> None:
    """Publish a plugin file (or a folder of them) as a new revision (signed with --sign-key).

    With --wait: exit 0 once every live host serves it, 1 as soon as a host refuses it
    (naming the host, stage and error) or at --timeout (naming the hosts behind).

    With --canary PERCENT or --shadow FRACTION: start a rollout instead; the file becomes
    a candidate beside the stable version (see `rollout`, `promote`, `abort`).
    """
    from ..fleetview import FleetWaitError, Target
    from ..publish import PublishError, publish_file
    from ..trust import TrustError

    fleet_wait = FleetWait(collection, wait_timeout, quiet=as_json) if wait else None
    rollout_options = (sticky_key, max_error_rate, min_calls, max_p99_ms)
    if canary is not None and shadow is not None:
        raise fail("give --canary or --shadow, not both", usage=True)
    if canary is None and shadow is None and any(o is not None for o in rollout_options):
        raise fail(
            "--sticky-key, --max-error-rate, --min-calls and --max-p99-ms go with --canary",
            "plugin-host push greet greet.py --canary 5 --max-error-rate 0.05",
            usage=True,
        )
    if directory is not None:
        if name is not None or file is not None:
            raise fail("give either NAME FILE or --dir DIR, not both", usage=True)
        if canary is not None or shadow is not None:
            raise fail("a rollout is for one plugin: push NAME FILE --canary P", usage=True)
        if as_json:
            raise fail("--json goes with push NAME FILE", usage=True)
        if not directory.is_dir():
            raise fail(f"folder {str(directory)!r} does not exist", usage=True)
        _push_dir(
            directory,
            force,
            mongodb_uri,
            database,
            collection,
            connect_timeout,
            sign_key,
            fleet_wait,
        )
        return
    if name is None or file is None:
        raise fail(
            "push needs NAME and FILE",
            "plugin-host push greet plugins_examples/greet.py",
            usage=True,
        )
    if not file.is_file():
        raise fail(
            f"file {str(file)!r} does not exist", "check the path (relative to here)", usage=True
        )
    if canary is not None or shadow is not None:
        from ..records import RolloutPolicy
        from .rollouts import start_from_file

        start_from_file(
            name,
            file,
            canary=canary,
            shadow=shadow,
            sticky_key=sticky_key,
            policy=RolloutPolicy(
                max_error_rate=max_error_rate,
                max_p99_ms=max_p99_ms,
                **({"min_calls": min_calls} if min_calls is not None else {}),
            ),
            entrypoint=entrypoint,
            uri=mongodb_uri,
            database=database,
            collection=collection,
            timeout=connect_timeout,
            sign_key=sign_key,
            fleet_wait=fleet_wait,
            as_json=as_json,
        )
        return

    async def job(db: Any) -> None:
        signer = await _load_signer(sign_key)
        published = await publish_file(
            db,
            file,
            name=name,
            entrypoint=entrypoint,
            collection=collection,
            force=force,
            sign=signer,
        )
        if as_json:
            print(
                json.dumps(
                    {
                        "name": name,
                        "action": "published",
                        "revision": published.revision,
                        "changed": published.changed,
                        "created": published.created,
                    }
                ),
                flush=True,
            )
        elif published.changed:
            verb = "created" if published.created else "published"
            _console.print(f"[green]{verb}[/] {name} revision {published.revision}")
        else:
            _console.print(
                f"{name} is unchanged at revision {published.revision} (--force publishes anyway)"
            )
        if fleet_wait is not None:
            await fleet_wait(db, [Target(published.name, published.revision)])

    try:
        _with_db(mongodb_uri, database, connect_timeout, job)
    except PublishError as exc:
        raise fail(str(exc), "fix the file and push again") from None
    except TrustError as exc:
        raise _sign_key_error(exc) from None
    except FleetWaitError as exc:
        raise fleet_failed(exc) from None


def _push_dir(
    directory: Path,
    force: bool,
    uri: str,
    database: str,
    collection: str,
    timeout: float,
    sign_key: Path | None,
    fleet_wait: FleetWait | None = None,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ..fleetview import FleetWaitError, Target
    from ..publish import Published, PublishError, plugin_files, publish_dir
    from ..trust import TrustError

    files = plugin_files(directory)
    if not files:
        raise fail(f"no plugin files (NAME.py) in {str(directory)!r}")
    failures: list[str] = []
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=_console.get(),
        transient=not _console.is_terminal,
    ) as progress:
        task = progress.add_task("publishing", total=len(files))

        def step(name: str, outcome: Published | PublishError) -> None:
            if isinstance(outcome, PublishError):
                failures.append(str(outcome))
                progress.console.print(f"[red]failed[/] {name}: {outcome}")
            elif outcome.changed:
                progress.console.print(f"[green]published[/] {name} revision {outcome.revision}")
            else:
                progress.console.print(f"unchanged {name} (revision {outcome.revision})")
            progress.advance(task)

        async def job(db: Any) -> None:
            signer = await _load_signer(sign_key)
            outcomes = await publish_dir(
                db, directory, collection=collection, force=force, on_progress=step, sign=signer
            )
            progress.stop()
            done = [Target(o.name, o.revision) for o in outcomes if isinstance(o, Published)]
            if fleet_wait is not None and done and not failures:
                await fleet_wait(db, done)

        try:
            _with_db(uri, database, timeout, job)
        except TrustError as exc:
            raise _sign_key_error(exc) from None
        except FleetWaitError as exc:
            raise fleet_failed(exc) from None
    if failures:
        raise fail(
            f"{len(failures)} of {len(files)} plugins were not published", "fix them and push again"
        )


@app.command("list")
def list_(
    mongodb_uri: MongoUri = DEFAULT_URI,
    database: Database = "app",
    collection: Collection = "functions",
    connect_timeout: ConnectTimeout = 5.0,
) -> None:
    """List the plugins in the collection."""
    from rich.table import Table

    from ..publish import list_records

    async def job(db: Any) -> list[dict[str, Any]]:
        return await list_records(db, collection=collection)

    records = _with_db(mongodb_uri, database, connect_timeout, job)
    if not records:
        _console.print(f"no plugins in {database}.{collection} (publish one with `push`)")
        return
    table = Table(title=f"{database}.{collection}")
    for column in ("name", "revision", "enabled", "entrypoint", "bytes", "updated"):
        table.add_column(column, justify="right" if column in ("revision", "bytes") else "left")
    for rec in records:
        updated = rec["updatedAt"]
        table.add_row(
            rec["name"],
            str(rec["revision"] if rec["revision"] is not None else "-"),
            "yes" if rec["enabled"] else "[yellow]no[/]",
            rec["entrypoint"],
            str(rec["size"]),
            updated.strftime("%Y-%m-%d %H:%M:%S") if updated else "-",
        )
    _console.print(table)


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="Plugin name.")],
    revision: Annotated[
        int | None, typer.Option("--revision", help="A revision from the history.")
    ] = None,
    mongodb_uri: MongoUri = DEFAULT_URI,
    database: Database = "app",
    collection: Collection = "functions",
    connect_timeout: ConnectTimeout = 5.0,
) -> None:
    """Show a plugin's source (only the source when piped: `show greet > greet.py`)."""
    from rich.panel import Panel
    from rich.syntax import Syntax

    from ..publish import UnknownRevision, get_record

    async def job(db: Any) -> dict[str, Any]:
        return await get_record(db, name, revision=revision, collection=collection)

    try:
        record = _with_db(mongodb_uri, database, connect_timeout, job)
    except UnknownRevision as exc:
        raise fail(str(exc)) from None
    source = record.get("source") or record.get("fn") or ""
    if not _console.is_terminal:
        sys.stdout.write(source if source.endswith("\n") else source + "\n")
        return
    rev = record.get("revision")
    facts = [f"revision {rev}", f"entrypoint {record.get('entrypoint') or 'main'}"]
    if record.get("enabled") is False:
        facts.append("[yellow]disabled[/]")
    when = record.get("updatedAt") or record.get("publishedAt")
    if when is not None:
        facts.append(f"published {when:%Y-%m-%d %H:%M:%S}")
    _console.print(
        Panel(Syntax(source, "python", line_numbers=True), title=name, subtitle=", ".join(facts))
    )


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="Plugin name.")],
    to: Annotated[
        int | None, typer.Option("--to", help="Revision to go back to (default: the previous).")
    ] = None,
    mongodb_uri: MongoUri = DEFAULT_URI,
    database: Database = "app",
    collection: Collection = "functions",
    connect_timeout: ConnectTimeout = 5.0,
    sign_key: SignKey = None,
    wait: Wait = False,
    wait_timeout: WaitTimeout = 60.0,
) -> None:
    """Publish an earlier revision's source again, as a new (higher) revision.

    With --sign-key the old source is signed again for its new revision (hosts with
    --trusted-keys refuse an old signature: revisions must not go backwards).
    """
    from ..fleetview import FleetWaitError, Target
    from ..publish import UnknownRevision
    from ..publish import rollback as rollback_plugin
    from ..trust import TrustError

    fleet_wait = FleetWait(collection, wait_timeout) if wait else None

    async def job(db: Any) -> None:
        signer = await _load_signer(sign_key)
        published, source_rev = await rollback_plugin(
            db, name, to=to, collection=collection, sign=signer
        )
        _console.print(
            f"[green]rolled back[/] {name} to the source of revision {source_rev}, "
            f"published as revision {published.revision}"
        )
        if fleet_wait is not None:
            await fleet_wait(db, [Target(name, published.revision)])

    try:
        _with_db(mongodb_uri, database, connect_timeout, job)
    except TrustError as exc:
        raise _sign_key_error(exc) from None
    except UnknownRevision as exc:
        raise fail(str(exc), "pick one with --to N") from None
    except FleetWaitError as exc:
        raise fleet_failed(exc) from None


def _toggle(
    name: str,
    enabled: bool,
    uri: str,
    database: str,
    collection: str,
    t: float,
    fleet_wait: FleetWait | None = None,
) -> None:
    from ..fleetview import FleetWaitError, Target
    from ..publish import get_record, set_enabled

    async def job(db: Any) -> None:
        await set_enabled(db, name, enabled, collection=collection)
        _console.print(f"{'enabled' if enabled else 'disabled'} {name}")
        if fleet_wait is not None:
            revision = (await get_record(db, name, collection=collection)).get("revision")
            target = revision if enabled and isinstance(revision, int) else None
            await fleet_wait(db, [Target(name, target)])

    try:
        _with_db(uri, database, t, job)
    except FleetWaitError as exc:
        raise fleet_failed(exc) from None


@app.command()
def enable(
    name: Annotated[str, typer.Argument(help="Plugin name.")],
    mongodb_uri: MongoUri = DEFAULT_URI,
    database: Database = "app",
    collection: Collection = "functions",
    connect_timeout: ConnectTimeout = 5.0,
    wait: Wait = False,
    wait_timeout: WaitTimeout = 60.0,
) -> None:
    """Enable a plugin: hosts load it again (--wait: until every live host serves it)."""
    fleet_wait = FleetWait(collection, wait_timeout) if wait else None
    _toggle(name, True, mongodb_uri, database, collection, connect_timeout, fleet_wait)


@app.command()
def disable(
    name: Annotated[str, typer.Argument(help="Plugin name.")],
    mongodb_uri: MongoUri = DEFAULT_URI,
    database: Database = "app",
    collection: Collection = "functions",
    connect_timeout: ConnectTimeout = 5.0,
    wait: Wait = False,
    wait_timeout: WaitTimeout = 60.0,
) -> None:
    """Disable a plugin: hosts unload it (the record and its history stay).

    With --wait: until no live host serves it any more.
    """
    fleet_wait = FleetWait(collection, wait_timeout) if wait else None
    _toggle(name, False, mongodb_uri, database, collection, connect_timeout, fleet_wait)


@app.command("delete")
def delete_(
    name: Annotated[str, typer.Argument(help="Plugin name.")],
    mongodb_uri: MongoUri = DEFAULT_URI,
    database: Database = "app",
    collection: Collection = "functions",
    connect_timeout: ConnectTimeout = 5.0,
) -> None:
    """Delete a plugin's record (its history stays: `rollback` restores it)."""
    from ..publish import delete as delete_plugin

    async def job(db: Any) -> None:
        await delete_plugin(db, name, collection=collection)

    _with_db(mongodb_uri, database, connect_timeout, job)
    _console.print(f"deleted {name}")
