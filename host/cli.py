"""The ``plugin-host`` command line (Typer).

The CLI is the one place that configures logging and installs signal handlers; the
library never does either.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import signal
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
import structlog
import typer
from pymongo import AsyncMongoClient
from pymongo.errors import (
    ConfigurationError,
    ConnectionFailure,
    OperationFailure,
    ServerSelectionTimeoutError,
)
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.syntax import Syntax
from rich.table import Table

from . import samples
from .daemon import (
    StartupError,
    bind_socket,
    is_loopback,
    parse_address,
    redact_uri,
    run_daemon,
)
from .devsync import sync_folder
from .fleet import StatusReporting
from .fleetview import (
    FleetRefused,
    FleetStatus,
    FleetTimeout,
    FleetWaitError,
    Target,
    fleet_status,
    wait_for_fleet,
)
from .fleetview import Progress as FleetProgress
from .http import OPEN_ENDPOINTS
from .publish import (
    Published,
    PublishError,
    Signer,
    UnknownPlugin,
    UnknownRevision,
    get_record,
    list_records,
    plugin_files,
    publish_dir,
    publish_file,
    set_enabled,
)
from .publish import delete as delete_plugin
from .publish import rollback as rollback_plugin
from .trust import (
    TrustedKeys,
    TrustError,
    generate_keypair,
    load_private_key,
    load_public_keys,
    sign_record,
)

app = typer.Typer(
    name="plugin-host",
    help="A live-reloading Python plugin runtime driven by MongoDB change streams.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """A live-reloading Python plugin runtime driven by MongoDB change streams."""


def configure_logging(fmt: str = "auto", level: int = logging.INFO) -> None:
    """Configure structlog for the CLI: JSON lines, or coloured console output.

    Args:
        fmt: ``json``, ``console``, or ``auto`` (console on a TTY, JSON otherwise).
        level: The minimum level to print.
    """
    if fmt == "auto":
        fmt = "console" if sys.stdout.isatty() else "json"
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if fmt == "json":
        shared += [structlog.processors.dict_tracebacks]
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )


def fail(message: str, hint: str | None = None) -> typer.Exit:
    """Print one clear error line (and a hint) to stderr; return the exit to raise."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    return typer.Exit(code=2)


@app.command("embedded-mongo")
def embedded_mongo(
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one).")] = 27017,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Directory for durable data; in memory when omitted."),
    ] = None,
    oplog_size: Annotated[
        int, typer.Option("--oplog-size", min=1, help="Oplog entries kept for change streams.")
    ] = 100_000,
    bind: Annotated[
        str, typer.Option(help="Address to bind. Not loopback means anyone who can reach it.")
    ] = "127.0.0.1",
    log_format: Annotated[
        str, typer.Option("--log-format", help="json, console or auto.")
    ] = "auto",
    ttl_monitor_period: Annotated[
        float,
        typer.Option(
            "--ttl-monitor-period",
            min=0.01,
            help="Seconds between TTL index sweeps (mongod's ttlMonitorSleepSecs).",
        ),
    ] = 60.0,
) -> None:
    """Run the embedded MongoDB-compatible server (single-node replica set) until SIGINT/SIGTERM."""
    from .embedded import EmbeddedMongo
    from .embedded.journal import DataDirLocked

    configure_logging(log_format)

    async def main() -> None:
        # The receiver opens before the server starts: a SIGTERM during start-up is queued
        # and handled once the server is up (a clean stop), never the default kill (-15).
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            server = EmbeddedMongo(
                port=port,
                data_dir=data_dir,
                host=bind,
                oplog_size=oplog_size,
                ttl_monitor_period=ttl_monitor_period,
            )
            try:
                await server.start()
            except DataDirLocked as exc:
                raise fail(str(exc), "stop the other server, or pass another --data-dir") from None
            except OSError as exc:
                raise fail(
                    f"cannot listen on {bind}:{port}: {exc.strerror or exc}",
                    "pick another --port (0 picks a free one)",
                ) from None
            try:
                signum = 0
                async for received in signals:
                    signum = int(received)
                    break
                structlog.get_logger("host.embedded").info(
                    "embedded.stopping", signal=signal.Signals(signum).name
                )
            finally:
                await server.aclose()

    anyio.run(main)


# -- shared options ---------------------------------------------------------------------

DEFAULT_URI = "mongodb://127.0.0.1:27017/?replicaSet=rs0"

MongoUri = Annotated[
    str,
    typer.Option(
        "--mongodb-uri",
        envvar="PLUGIN_HOST_MONGODB_URI",
        help="MongoDB connection string (a replica set: change streams need one).",
    ),
]
Database = Annotated[str, typer.Option("--database", help="Database holding the collection.")]
Collection = Annotated[
    str, typer.Option("--collection", help="The functions collection (history: <name>_history).")
]
ConnectTimeout = Annotated[
    float,
    typer.Option("--connect-timeout", min=0.1, help="Seconds to find a MongoDB server."),
]

SignKey = Annotated[
    Path | None,
    typer.Option(
        "--sign-key",
        envvar="PLUGIN_HOST_SIGN_KEY",
        help="Sign with this private key (from `keygen`); hosts with --trusted-keys need it.",
    ),
]
TrustedKeyPaths = Annotated[
    list[Path] | None,
    typer.Option(
        "--trusted-keys",
        envvar="PLUGIN_HOST_TRUSTED_KEYS",
        help="Run only plugins signed by these public keys: a .pub file or a folder of them "
        "(repeatable; the variable takes whitespace-separated paths).",
    ),
]
MaxSourceBytes = Annotated[
    int, typer.Option("--max-source-bytes", min=1, help="Largest accepted plugin source.")
]
ExecTimeout = Annotated[
    float,
    typer.Option("--exec-timeout", min=0.001, help="Seconds a plugin's top-level code may run."),
]
CallTimeout = Annotated[
    float,
    typer.Option(
        "--call-timeout", min=0, help="Per-call timeout for plugins that set none (0: none)."
    ),
]
MaxConcurrency = Annotated[
    int,
    typer.Option(
        "--max-concurrency", min=0, help="Concurrent calls per plugin that sets none (0: no cap)."
    ),
]
RequireDepth = Annotated[
    int, typer.Option("--require-depth", min=1, help="Deepest chain of plugin-to-plugin calls.")
]
MaxBodyBytes = Annotated[
    int, typer.Option("--max-body-bytes", min=1, help="Largest accepted request body.")
]
MaxResultBytes = Annotated[
    int,
    typer.Option(
        "--max-result-bytes", min=1, help="Largest call result, JSON-encoded (500 beyond)."
    ),
]

_console = Console()
_errors = Console(stderr=True)


def _load_trusted(paths: list[Path] | None) -> TrustedKeys | None:
    """The trusted keys of ``--trusted-keys`` (CLI start-up: blocking is fine), or a clear error."""
    if not paths:
        return None
    try:
        return load_public_keys(paths)
    except TrustError as exc:
        raise fail(
            f"--trusted-keys: {exc}", "pass the .pub files written by `plugin-host keygen`"
        ) from None


async def _load_signer(path: Path | None) -> Signer | None:
    """A signer for ``--sign-key`` (the key file is read in a worker thread)."""
    if path is None:
        return None
    key = await anyio.to_thread.run_sync(load_private_key, path)
    return functools.partial(sign_record, key)


def _sign_key_error(exc: TrustError) -> typer.Exit:
    return fail(f"--sign-key: {exc}", "pass the private key (.key) written by `plugin-host keygen`")


def _check_exposure(address: str, auth_token: str | None) -> None:
    """Refuse to serve a non-loopback address without a token."""
    try:
        bind_host, _ = parse_address(address)
    except ValueError as exc:
        raise fail(f"bad --http address: {exc}") from None
    if auth_token is not None and not auth_token:
        raise fail("--auth-token is empty")
    if not is_loopback(bind_host) and auth_token is None:
        raise fail(
            f"refusing to serve the HTTP API on {address} without authentication: anyone who "
            "can reach it could call every plugin",
            "pass --auth-token (or set PLUGIN_HOST_AUTH_TOKEN), or bind 127.0.0.1",
        )


def _parse_open_endpoints(value: str) -> tuple[str, ...]:
    names = tuple(part.strip().lstrip("/") for part in value.split(",") if part.strip())
    unknown = sorted(set(names) - OPEN_ENDPOINTS)
    if unknown:
        raise fail(
            f"unknown --open-endpoints {', '.join(unknown)}",
            f"choose among {', '.join(sorted(OPEN_ENDPOINTS))} (or '' for none)",
        )
    return names


T = TypeVar("T")


def _client(uri: str, server_timeout: float | None) -> AsyncMongoClient[dict[str, Any]]:
    """A client for ``uri``, or a clear error for a malformed connection string."""
    options: dict[str, Any] = {}
    if server_timeout is not None and "serverselectiontimeoutms" not in uri.lower():
        options["serverSelectionTimeoutMS"] = int(server_timeout * 1000)
    try:
        return AsyncMongoClient(uri, **options)
    except (ConfigurationError, ValueError) as exc:  # InvalidURI; a bad port is a ValueError
        raise fail(
            f"invalid --mongodb-uri {redact_uri(uri)!r}: {exc}",
            f"use a connection string like {DEFAULT_URI}",
        ) from None


def _with_db(uri: str, database: str, timeout: float, job: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``job(db)`` on a fresh client; MongoDB errors and unknown plugins become one
    clear line."""

    async def main() -> T:
        client = _client(uri, timeout)
        try:
            return await job(client[database])
        finally:
            await client.close()

    try:
        return anyio.run(main)
    except (ServerSelectionTimeoutError, ConnectionFailure) as exc:
        raise fail(
            f"MongoDB at {redact_uri(uri)} is not reachable ({type(exc).__name__})",
            "start MongoDB (or `plugin-host dev`), or pass the right --mongodb-uri "
            "/ PLUGIN_HOST_MONGODB_URI",
        ) from None
    except OperationFailure as exc:
        message = (exc.details or {}).get("errmsg") or str(exc)
        raise fail(f"MongoDB refused the operation: {message}") from None
    except UnknownPlugin as exc:
        raise fail(str(exc), "`plugin-host list` shows the plugins there are") from None


def _daemon_socket(address: str, *, next_free: int = 0) -> socket.socket:
    try:
        bind_host, port = parse_address(address)
    except ValueError as exc:
        raise fail(f"bad --http address: {exc}") from None
    try:
        return bind_socket(bind_host, port, next_free=next_free)
    except OSError as exc:
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise fail(
            f"cannot listen on {address}: {reason or exc}",
            "stop the process using it, or pick another --http HOST:PORT (port 0: any free one)",
        ) from None


# -- run ----------------------------------------------------------------------------------


@app.command()
def run(
    mongodb_uri: MongoUri = DEFAULT_URI,
    database: Database = "app",
    collection: Collection = "functions",
    http: Annotated[
        str, typer.Option("--http", help="HOST:PORT to serve the HTTP API on (port 0: any).")
    ] = "127.0.0.1:8000",
    log_format: Annotated[
        str, typer.Option("--log-format", help="json, console or auto (json when not a TTY).")
    ] = "auto",
    drain_timeout: Annotated[
        float,
        typer.Option("--drain-timeout", min=0, help="Seconds in-flight calls get on SIGTERM."),
    ] = 30.0,
    startup_timeout: Annotated[
        float,
        typer.Option("--startup-timeout", min=0, help="Seconds to become ready (0: wait forever)."),
    ] = 30.0,
    debug: Annotated[
        bool, typer.Option("--debug", help="Put plugin tracebacks in HTTP 500 replies.")
    ] = False,
    trusted_keys: TrustedKeyPaths = None,
    auth_token: Annotated[
        str | None,
        typer.Option(
            "--auth-token",
            envvar="PLUGIN_HOST_AUTH_TOKEN",
            help="Require 'Authorization: Bearer TOKEN' (needed to bind a non-loopback address).",
        ),
    ] = None,
    open_endpoints: Annotated[
        str,
        typer.Option(
            "--open-endpoints",
            help="With --auth-token, the endpoints left open: comma-separated among healthz, "
            "readyz, metrics ('' protects all).",
        ),
    ] = "healthz,metrics",
    max_body_bytes: MaxBodyBytes = 1_048_576,
    max_result_bytes: MaxResultBytes = 4_194_304,
    max_source_bytes: MaxSourceBytes = 1_048_576,
    exec_timeout: ExecTimeout = 1.0,
    call_timeout: CallTimeout = 30.0,
    max_concurrency: MaxConcurrency = 64,
    require_depth: RequireDepth = 16,
    report_status: ReportStatus = True,
    heartbeat: Heartbeat = 5.0,
    host_ttl: HostTtl = None,
    host_id: HostId = None,
) -> None:
    """Serve the plugins of a MongoDB collection over HTTP, reloading them live.

    While MongoDB is unreachable the daemon retries with backoff and /readyz says 503.
    SIGTERM/SIGINT: new calls get 503, in-flight calls finish (up to --drain-timeout),
    teardowns run, and the process exits 0.
    """
    _check_log_format(log_format)
    _check_exposure(http, auth_token)
    opened = _parse_open_endpoints(open_endpoints)
    keys = _load_trusted(trusted_keys)
    reporting = _reporting(report_status, heartbeat, host_ttl, host_id)
    configure_logging(log_format)
    sock = _daemon_socket(http)
    try:
        client = _client(mongodb_uri, 5.0)
    except BaseException:
        sock.close()
        raise

    async def main() -> None:
        try:
            await run_daemon(
                client[database],
                sock,
                collection=collection,
                mongodb=f"MongoDB at {redact_uri(mongodb_uri)}",
                drain_timeout=drain_timeout,
                startup_timeout=startup_timeout,
                debug=debug,
                max_body_bytes=max_body_bytes,
                max_result_bytes=max_result_bytes,
                max_source_bytes=max_source_bytes,
                exec_timeout=exec_timeout,
                call_timeout=call_timeout or None,
                max_concurrency=max_concurrency or None,
                require_depth=require_depth,
                trusted_keys=keys,
                auth_token=auth_token,
                open_endpoints=opened,
                report_status=reporting,
            )
        finally:
            await client.close()

    try:
        anyio.run(main)
    except StartupError as exc:
        raise fail(str(exc), exc.hint) from None


def _check_log_format(log_format: str) -> None:
    if log_format not in ("json", "console", "auto"):
        raise fail(f"unknown --log-format {log_format!r}", "use json, console or auto")


# -- dev ----------------------------------------------------------------------------------


@app.command()
def dev(
    plugins_dir: Annotated[
        Path, typer.Option("--plugins-dir", help="Folder of plugin files, synced on save.")
    ] = Path("plugins_examples"),
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Where the embedded MongoDB keeps its data.")
    ] = Path(".plugin-host"),
    mongo_port: Annotated[
        int,
        typer.Option(
            "--mongo-port", min=0, max=65535, help="Embedded MongoDB port (next free if taken)."
        ),
    ] = 27017,
    http: Annotated[
        str, typer.Option("--http", help="HOST:PORT of the HTTP API (next free port if taken).")
    ] = "127.0.0.1:8000",
    database: Database = "app",
    collection: Collection = "functions",
    debug: Annotated[
        bool, typer.Option("--debug/--no-debug", help="Plugin tracebacks in HTTP 500 replies.")
    ] = True,
    seed_data: Annotated[
        bool, typer.Option("--seed/--no-seed", help="Seed sample users and sales.")
    ] = True,
    sign_key: SignKey = None,
    trusted_keys: TrustedKeyPaths = None,
    max_body_bytes: MaxBodyBytes = 1_048_576,
    max_result_bytes: MaxResultBytes = 4_194_304,
    max_source_bytes: MaxSourceBytes = 1_048_576,
    exec_timeout: ExecTimeout = 1.0,
    call_timeout: CallTimeout = 30.0,
    max_concurrency: MaxConcurrency = 64,
    require_depth: RequireDepth = 16,
    report_status: ReportStatus = True,
    heartbeat: Heartbeat = 5.0,
    host_ttl: HostTtl = None,
    host_id: HostId = None,
) -> None:
    """Zero-infrastructure development: embedded MongoDB, the example plugins, HTTP, live sync.

    Every save in --plugins-dir is published into the collection (like `push`) and
    reaches the host through the change stream, like in production.
    """
    from .embedded import EmbeddedMongo
    from .embedded.journal import DataDirLocked

    configure_logging("console")
    if not plugins_dir.is_dir():
        raise fail(
            f"plugins folder {str(plugins_dir)!r} does not exist",
            "create it, or pass --plugins-dir",
        )
    plugins_dir = plugins_dir.resolve()
    _check_exposure(http, None)  # dev has no token: loopback only
    keys = _load_trusted(trusted_keys)
    reporting = _reporting(report_status, heartbeat, host_ttl, host_id)
    sock = _daemon_socket(http, next_free=20)
    wanted_port = parse_address(http)[1]
    log = structlog.get_logger("host.dev")

    async def start_mongo() -> EmbeddedMongo:
        ports = [mongo_port] if mongo_port == 0 else range(mongo_port, mongo_port + 20)
        last: OSError | None = None
        for port in ports:
            server = EmbeddedMongo(port=port, data_dir=data_dir)
            try:
                await server.start()
            except DataDirLocked:
                raise fail(
                    f"data directory {str(data_dir)!r} is in use by another plugin-host dev",
                    "stop the other one, or pass another --data-dir",
                ) from None
            except OSError as exc:
                await server.aclose()
                if exc.errno != errno.EADDRINUSE:
                    raise fail(f"cannot start the embedded MongoDB: {exc}") from None
                last = exc
                continue
            if mongo_port and port != mongo_port:
                log.warning("dev.mongo_port_taken", wanted=mongo_port, using=port)
            return server
        raise fail(
            f"cannot start the embedded MongoDB: ports {mongo_port}-{mongo_port + 19} are taken"
            f" ({last})",
            "pass --mongo-port 0 for any free port",
        )

    async def main() -> None:
        try:
            signer = await _load_signer(sign_key)
        except TrustError as exc:
            raise _sign_key_error(exc) from None
        server = await start_mongo()
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.uri)
        try:
            db = client[database]
            if seed_data:
                seeded = await samples.seed(db)
                if any(seeded.values()):
                    log.info("dev.seeded", **seeded)
            outcomes = await publish_dir(db, plugins_dir, collection=collection, sign=signer)
            for outcome in outcomes:
                if isinstance(outcome, PublishError):
                    log.error("dev.publish_failed", error=str(outcome))
            address = sock.getsockname()
            if wanted_port and address[1] != wanted_port:
                log.warning("dev.http_port_taken", wanted=wanted_port, using=address[1])
            url = f"http://{address[0]}:{address[1]}"

            def banner(_: object) -> None:
                _print_banner(url, server.uri, database, collection, plugins_dir)

            async def sync(stop: anyio.Event) -> None:
                await sync_folder(db, plugins_dir, stop, collection=collection, sign=signer)

            await run_daemon(
                db,
                sock,
                collection=collection,
                mongodb=f"the embedded MongoDB at {server.uri}",
                drain_timeout=5.0,
                startup_timeout=30.0,
                debug=debug,
                on_ready=banner,
                background=[sync],
                max_body_bytes=max_body_bytes,
                max_result_bytes=max_result_bytes,
                max_source_bytes=max_source_bytes,
                exec_timeout=exec_timeout,
                call_timeout=call_timeout or None,
                max_concurrency=max_concurrency or None,
                require_depth=require_depth,
                trusted_keys=keys,
                report_status=reporting,
            )
        finally:
            await client.close()
            await server.aclose()

    try:
        anyio.run(main)
    except StartupError as exc:
        raise fail(str(exc), exc.hint) from None


def _print_banner(url: str, mongo_uri: str, database: str, collection: str, folder: Path) -> None:
    try:
        shown = folder.relative_to(Path.cwd())
    except ValueError:
        shown = folder
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan")
    grid.add_column()
    grid.add_row("HTTP", f"{url}  (GET /functions, /metrics, /readyz)")
    grid.add_row("MongoDB", f"{mongo_uri}  (database {database}, collection {collection})")
    grid.add_row("Plugins", f"{shown}/  — every save is published and hot-swapped")
    _console.print(Panel(grid, title="plugin-host dev is ready", expand=False))
    body = json.dumps({"firstName": "Blain", "lastName": "Smith"})
    # Plain print: a wrapped curl line would not paste.
    print(
        f"curl -s -X POST {url}/functions/greet/call -H 'content-type: application/json' "
        f"-d '{body}'",
        flush=True,
    )


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
) -> None:
    """Publish a plugin file (or a folder of them) as a new revision (signed with --sign-key).

    With --wait: exit 0 once every live host serves it, 1 as soon as a host refuses it
    (naming the host, stage and error) or at --timeout (naming the hosts behind).
    """
    fleet_wait = _FleetWait(collection, wait_timeout) if wait else None
    if directory is not None:
        if name is not None or file is not None:
            raise fail("give either NAME FILE or --dir DIR, not both")
        if not directory.is_dir():
            raise fail(f"folder {str(directory)!r} does not exist")
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
        raise fail("push needs NAME and FILE", "plugin-host push greet plugins_examples/greet.py")
    if not file.is_file():
        raise fail(f"file {str(file)!r} does not exist", "check the path (relative to here)")

    async def job(db: Any) -> Published:
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
        if published.changed:
            verb = "created" if published.created else "published"
            _console.print(f"[green]{verb}[/] {name} revision {published.revision}")
        else:
            _console.print(
                f"{name} is unchanged at revision {published.revision} (--force publishes anyway)"
            )
        if fleet_wait is not None:
            await fleet_wait(db, [Target(published.name, published.revision)])
        return published

    try:
        _with_db(mongodb_uri, database, connect_timeout, job)
    except PublishError as exc:
        raise fail(str(exc), "fix the file and push again") from None
    except TrustError as exc:
        raise _sign_key_error(exc) from None
    except FleetWaitError as exc:
        raise _fleet_failed(exc) from None


def _push_dir(
    directory: Path,
    force: bool,
    uri: str,
    database: str,
    collection: str,
    timeout: float,
    sign_key: Path | None,
    fleet_wait: _FleetWait | None = None,
) -> None:
    files = plugin_files(directory)
    if not files:
        raise fail(f"no plugin files (NAME.py) in {str(directory)!r}")
    failures: list[str] = []
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=_console,
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
            raise _fleet_failed(exc) from None
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

    fleet_wait = _FleetWait(collection, wait_timeout) if wait else None

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
        raise _fleet_failed(exc) from None


def _toggle(
    name: str,
    enabled: bool,
    uri: str,
    database: str,
    collection: str,
    t: float,
    fleet_wait: _FleetWait | None = None,
) -> None:
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
        raise _fleet_failed(exc) from None


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
    fleet_wait = _FleetWait(collection, wait_timeout) if wait else None
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
    fleet_wait = _FleetWait(collection, wait_timeout) if wait else None
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

    async def job(db: Any) -> None:
        await delete_plugin(db, name, collection=collection)

    _with_db(mongodb_uri, database, connect_timeout, job)
    _console.print(f"deleted {name}")


# -- keys ---------------------------------------------------------------------------------


@app.command()
def keygen(
    out: Annotated[Path, typer.Option("--out", help="Folder for the key files.")],
    name: Annotated[
        str, typer.Option("--name", help="File stem: NAME.key (private), NAME.pub (public).")
    ] = "signing",
) -> None:
    """Create an Ed25519 key pair for signing plugins (private key mode 0600)."""
    try:
        private_path, public_path = generate_keypair(out, name)
        kid = next(iter(load_public_keys(public_path)))
    except TrustError as exc:
        raise fail(str(exc), "pick another --out or --name") from None
    _console.print(f"key id      {kid}")
    _console.print(f"private key {private_path}  (mode 0600: keep it secret, off the hosts)")
    _console.print(f"public key  {public_path}")
    _console.print(
        f"Copy only {public_path.name} to the hosts (`plugin-host run --trusted-keys "
        f"{public_path.name}`); publish with `plugin-host push --sign-key {private_path}`."
    )


# -- call ---------------------------------------------------------------------------------

_CALL_HINTS = {
    401: "the daemon requires a token: pass --auth-token (or set PLUGIN_HOST_AUTH_TOKEN)",
    404: "publish it with `plugin-host push NAME FILE`, or check the name with `list`",
    413: "send smaller arguments, or start the daemon with a larger --max-body-bytes",
    422: "check the arguments",
    500: "the plugin raised: see the daemon's log (call.failed), or run it with --debug",
    503: "the daemon is draining or the plugin is saturated: retry shortly",
    504: "the plugin ran out of time: pass a larger --timeout, or make it faster",
}


@app.command()
def call(
    name: Annotated[str, typer.Argument(help="Plugin name.")],
    args: Annotated[
        str | None, typer.Option("--args", help='JSON arguments, e.g. \'{"firstName": "Ada"}\'.')
    ] = None,
    url: Annotated[str, typer.Option("--url", help="The daemon's HTTP address.")] = (
        "http://127.0.0.1:8000"
    ),
    timeout: Annotated[
        float | None, typer.Option("--timeout", min=0.001, help="Call timeout in seconds.")
    ] = None,
    auth_token: Annotated[
        str | None,
        typer.Option("--auth-token", envvar="PLUGIN_HOST_AUTH_TOKEN", help="The daemon's token."),
    ] = None,
) -> None:
    """Call a plugin through a running daemon's HTTP API; prints the result as JSON."""
    body = b""
    if args is not None:
        try:
            body = json.dumps(json.loads(args)).encode()
        except json.JSONDecodeError as exc:
            raise fail(
                f"--args is not valid JSON: {exc}",
                'quote it for your shell, e.g. --args \'{"firstName": "Ada"}\'',
            ) from None
    target = f"{url.rstrip('/')}/functions/{urllib.parse.quote(name, safe='')}/call"
    if timeout is not None:
        target += f"?timeout={timeout:g}"
    headers = {"content-type": "application/json"}
    if auth_token:
        headers["authorization"] = f"Bearer {auth_token}"
    request = urllib.request.Request(target, data=body, method="POST", headers=headers)
    wait = (timeout or 0) + 300.0
    try:
        with urllib.request.urlopen(request, timeout=wait) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read()).get("error", {})
            message = f"{error.get('type', 'Error')}: {error.get('message', '')}"
            if error.get("traceback"):
                _errors.print(error["traceback"], markup=False, highlight=False)
        except (ValueError, AttributeError):
            message = f"HTTP {exc.code} {exc.reason}"
        raise fail(
            f"{name} failed with HTTP {exc.code} — {message}", _CALL_HINTS.get(exc.code)
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise fail(
            f"the daemon at {url} is not reachable ({reason})",
            "start it with `make run` / `plugin-host run`, or pass --url",
        ) from None
    except ValueError:
        raise fail(f"the reply from {url} is not JSON: is --url a plugin-host daemon?") from None
    _errors.print(f"[dim]{reply.get('version')}[/]")
    if _console.is_terminal:
        _console.print_json(data=reply.get("result"))
    else:
        sys.stdout.write(json.dumps(reply.get("result"), ensure_ascii=False) + "\n")


# -- fleet: status reporting, `status`, `--wait` (issue 15) -------------------------------
# One block on purpose: it moves as a whole into the host/cli/ package of the
# architecture pass. The logic lives in host/fleet.py and host/fleetview.py.

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


def _reporting(
    enabled: bool, heartbeat: float, ttl: float | None, host_id: str | None
) -> StatusReporting | bool:
    if not enabled:
        return False
    try:
        return StatusReporting(heartbeat=heartbeat, ttl=ttl, host_id=host_id)
    except ValueError as exc:
        raise fail(f"status reporting: {exc}", "pass --host-ttl longer than --heartbeat") from None


class _FleetWait:
    """``--wait``: follow the hosts collection until the fleet serves the targets."""

    def __init__(self, collection: str, timeout: float) -> None:
        self.collection = collection
        self.timeout = timeout

    async def __call__(self, db: Any, targets: list[Target]) -> None:
        if _errors.is_terminal:
            with _errors.status("waiting for the fleet") as status:
                done = await wait_for_fleet(
                    db,
                    targets,
                    collection=self.collection,
                    timeout=self.timeout,
                    on_progress=lambda p: status.update(p.line),
                )
        else:

            def show(progress: FleetProgress) -> None:
                print(progress.line, file=sys.stderr, flush=True)

            done = await wait_for_fleet(
                db, targets, collection=self.collection, timeout=self.timeout, on_progress=show
            )
        what = (
            f"{targets[0].name} r{targets[0].revision}"
            if len(targets) == 1 and targets[0].revision is not None
            else f"without {targets[0].name}"
            if len(targets) == 1
            else f"{len(targets)} plugins"
        )
        _console.print(
            f"[green]converged[/] in {done.seconds * 1000:.0f} ms: "
            f"{len(done.hosts)}/{len(done.hosts)} hosts serving {what}"
        )


def _fleet_failed(exc: FleetWaitError) -> typer.Exit:
    """Print why the fleet did not converge, one line per host; the exit (status 1)."""
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

    async def job(db: Any) -> FleetStatus:
        return await fleet_status(db, collection=collection, name=name)

    view = _with_db(mongodb_uri, database, connect_timeout, job)
    if as_json:
        sys.stdout.write(json.dumps(view.as_dict(), default=str) + "\n")
        return
    if _console.is_terminal:
        _print_status_table(view)
    else:
        _print_status_plain(view)


def _host_state(host: Any) -> str:
    if not host.alive:
        return f"dead ({host.age_s:.0f} s)"
    if host.draining:
        return "draining"
    if host.late:
        return f"late ({host.age_s:.1f} s)"
    return "ready" if host.ready else "starting"


def _print_status_plain(view: FleetStatus) -> None:
    if not view.hosts:
        print(f"no host reports to {view.namespace}_hosts (run `plugin-host run`)")
    for name, p in sorted(view.plugins.items()):
        rev = (
            f"r{p.revision}"
            if p.revision is not None
            else ("disabled" if p.enabled is False else "-")
        )
        state = "converged" if p.converged else "NOT converged"
        print(f"{name} {rev}: {p.hosts_serving}/{p.hosts_alive} hosts serving, {state}")
        for host, serving in p.behind:
            print(f"  behind: {host} on {'r' + str(serving) if serving is not None else 'nothing'}")
        for r in p.rejected:
            print(f"  refused: {r['host']} r{r['revision']} at stage {r['stage']}: {r['error']}")
    for h in view.hosts:
        print(f"host {h.id} pid {h.pid} {_host_state(h)}, {len(h.plugins)} plugins")
    for h in view.late:
        print(f"late heartbeat: {h.id} ({h.age_s:.1f} s ago, every {h.heartbeat_s:g} s)")


def _print_status_table(view: FleetStatus) -> None:
    plugins = Table(title=f"{view.namespace}: plugins")
    for column in ("plugin", "revision", "serving", "behind", "refused", "converged"):
        plugins.add_column(column)
    for name, p in sorted(view.plugins.items()):
        behind = ", ".join(f"{h} ({'r' + str(r) if r is not None else '-'})" for h, r in p.behind)
        refused = "\n".join(f"{r['host']}: {r['stage']}: {r['error']}" for r in p.rejected)
        rev = (
            str(p.revision)
            if p.revision is not None
            else ("disabled" if p.enabled is False else "-")
        )
        plugins.add_row(
            name,
            rev,
            f"{p.hosts_serving}/{p.hosts_alive}",
            behind or "-",
            f"[red]{refused}[/]" if refused else "-",
            "[green]yes[/]" if p.converged else "[yellow]no[/]",
        )
    _console.print(plugins)
    hosts = Table(title=f"{view.namespace}: hosts")
    for column in ("host", "hostname", "pid", "version", "state", "heartbeat", "plugins"):
        hosts.add_column(column)
    for h in view.hosts:
        state = _host_state(h)
        style = "red" if not h.alive else "yellow" if h.late or h.draining else "green"
        hosts.add_row(
            h.id,
            h.hostname,
            str(h.pid),
            h.version or "-",
            f"[{style}]{state}[/]",
            f"{h.age_s:.1f} s ago",
            str(len(h.plugins)),
        )
    if not view.hosts:
        _console.print(f"no host reports to {view.namespace}_hosts (run `plugin-host run`)")
    else:
        _console.print(hosts)


# -- end of the fleet block ---------------------------------------------------------------


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # Ctrl+C before the daemon took over signals
        sys.exit(130)


if __name__ == "__main__":
    main()
