"""Serving commands: ``run``, ``dev`` and ``embedded-mongo``."""

from __future__ import annotations

import errno
import json
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..config import DAEMON_LIMITS, DAEMON_TIMEOUTS, HttpSettings, Limits, Timeouts
from ._common import (
    DEFAULT_URI,
    CallTimeout,
    Collection,
    Database,
    ExecTimeout,
    HeldVersions,
    LogFormat,
    MaxBodyBytes,
    MaxConcurrency,
    MaxResultBytes,
    MaxSourceBytes,
    MongoUri,
    RequireDepth,
    SignKey,
    TrustedKeyPaths,
    _check_exposure,
    _client,
    _console,
    _daemon_socket,
    _load_signer,
    _load_trusted,
    _parse_open_endpoints,
    _sign_key_error,
    app,
    configure_logging,
    fail,
)
from ._fleet import Heartbeat, HostId, HostTtl, ReportStatus, reporting
from .triggers import RunTriggers, TriggerLeaseTtl, trigger_options

if TYPE_CHECKING:
    import anyio
    from pymongo import AsyncMongoClient


@app.command("embedded-mongo")
def embedded_mongo(
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one).")] = 27017,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Directory for durable data; in memory when omitted."),
    ] = None,
    oplog_size: Annotated[
        float,
        typer.Option(
            "--oplog-size",
            "--oplogSize",
            min=0.001,
            help="Megabytes of oplog kept for change streams, as mongod's --oplogSize "
            "(it used to count entries).",
        ),
    ] = 64.0,
    bind: Annotated[
        str, typer.Option(help="Address to bind. Not loopback means anyone who can reach it.")
    ] = "127.0.0.1",
    log_format: Annotated[
        LogFormat, typer.Option("--log-format", help="json, console or auto.")
    ] = LogFormat.AUTO,
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
    import anyio
    import structlog

    from ..embedded import EmbeddedMongo
    from ..embedded.journal import DataDirError, DataDirLocked

    configure_logging(log_format.value)

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
            except DataDirError as exc:
                raise fail(str(exc), "free space or fix the disk holding --data-dir") from None
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


# -- HTTP server flags (run and dev): one HttpSettings --------------------------------------
_HTTP = HttpSettings()
IdleTimeout = Annotated[
    float,
    typer.Option(
        "--idle-timeout", min=0.001, help="Seconds a connection may wait before sending a request."
    ),
]
HeaderTimeout = Annotated[
    float,
    typer.Option(
        "--header-timeout", min=0.001, help="Seconds for a request's headers to arrive (408)."
    ),
]
BodyTimeout = Annotated[
    float,
    typer.Option("--body-timeout", min=0.001, help="Seconds for a request's body to arrive."),
]
MaxConnections = Annotated[
    int,
    typer.Option(
        "--max-connections",
        min=0,
        help="Most open HTTP connections; idle ones are evicted first (0: 3/4 of the fd limit).",
    ),
]
AllowedHosts = Annotated[
    str,
    typer.Option(
        "--allowed-hosts",
        help="Comma-separated Host names served besides the loopback names (403 for others).",
    ),
]
AllowedOrigins = Annotated[
    str,
    typer.Option(
        "--allowed-origins",
        help="Comma-separated browser origins allowed to call (scheme://host[:port], or *).",
    ),
]
AccessLog = Annotated[
    bool, typer.Option("--access-log", help="Log one http.access event per call.")
]
Otel = Annotated[
    bool,
    typer.Option(
        "--otel",
        help="OpenTelemetry spans for calls and reloads, over OTLP/HTTP (OTEL_* variables); "
        "needs plugin-host[otel].",
    ),
]


def _http_settings(
    idle_timeout: float,
    header_timeout: float,
    body_timeout: float,
    max_connections: int,
    allowed_hosts: str,
    allowed_origins: str,
    access_log: bool,
    otel: bool,
) -> HttpSettings:
    """The HTTP server settings from the flags ``run`` and ``dev`` share (0 connections: auto)."""

    def items(value: str) -> tuple[str, ...]:
        return tuple(part.strip() for part in value.split(",") if part.strip())

    return HttpSettings(
        idle_timeout=idle_timeout,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        max_connections=max_connections or None,
        allowed_hosts=items(allowed_hosts),
        allowed_origins=items(allowed_origins),
        access_log=access_log,
        otel=otel,
    )


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
        LogFormat,
        typer.Option("--log-format", help="json, console or auto (json when not a TTY)."),
    ] = LogFormat.AUTO,
    drain_timeout: Annotated[
        float,
        typer.Option("--drain-timeout", min=0, help="Seconds in-flight calls get on SIGTERM."),
    ] = DAEMON_TIMEOUTS.drain,
    startup_timeout: Annotated[
        float,
        typer.Option("--startup-timeout", min=0, help="Seconds to become ready (0: wait forever)."),
    ] = DAEMON_TIMEOUTS.startup,
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
    max_body_bytes: MaxBodyBytes = DAEMON_LIMITS.max_body_bytes,
    max_result_bytes: MaxResultBytes = DAEMON_LIMITS.max_result_bytes,
    max_source_bytes: MaxSourceBytes = DAEMON_LIMITS.max_source_bytes,
    exec_timeout: ExecTimeout = DAEMON_TIMEOUTS.top_level,
    call_timeout: CallTimeout = DAEMON_TIMEOUTS.call or 0.0,
    max_concurrency: MaxConcurrency = DAEMON_LIMITS.max_concurrency or 0,
    require_depth: RequireDepth = DAEMON_LIMITS.require_depth,
    held_versions: HeldVersions = DAEMON_LIMITS.held_versions,
    idle_timeout: IdleTimeout = _HTTP.idle_timeout,
    header_timeout: HeaderTimeout = _HTTP.header_timeout,
    body_timeout: BodyTimeout = _HTTP.body_timeout,
    max_connections: MaxConnections = 0,
    allowed_hosts: AllowedHosts = "",
    allowed_origins: AllowedOrigins = "",
    access_log: AccessLog = _HTTP.access_log,
    otel: Otel = _HTTP.otel,
    report_status: ReportStatus = True,
    heartbeat: Heartbeat = 5.0,
    host_ttl: HostTtl = None,
    host_id: HostId = None,
    run_triggers: RunTriggers = True,
    trigger_lease_ttl: TriggerLeaseTtl = 15.0,
) -> None:
    """Serve the plugins of a MongoDB collection over HTTP, reloading them live.

    While MongoDB is unreachable the daemon retries with backoff and /readyz says 503.
    SIGTERM/SIGINT: new calls get 503, in-flight calls finish (up to --drain-timeout),
    teardowns run, and the process exits 0.
    """
    import anyio

    from ..daemon import StartupError, close_client, event_loop_options, redact_uri, run_daemon

    _check_exposure(http, auth_token)
    opened = _parse_open_endpoints(open_endpoints)
    keys = _load_trusted(trusted_keys)
    status_reporting = reporting(report_status, heartbeat, host_ttl, host_id)
    configure_logging(log_format.value)
    limits, timeouts = _serving_config(
        max_body_bytes,
        max_result_bytes,
        max_source_bytes,
        max_concurrency,
        require_depth,
        exec_timeout,
        call_timeout,
        drain_timeout,
        startup_timeout,
        held_versions=held_versions,
    )
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
                limits=limits,
                timeouts=timeouts,
                collection=collection,
                mongodb=f"MongoDB at {redact_uri(mongodb_uri)}",
                debug=debug,
                trusted_keys=keys,
                auth_token=auth_token,
                open_endpoints=opened,
                http=_http_settings(
                    idle_timeout,
                    header_timeout,
                    body_timeout,
                    max_connections,
                    allowed_hosts,
                    allowed_origins,
                    access_log,
                    otel,
                ),
                report_status=status_reporting,
                bound_exit=True,
                triggers=trigger_options(run_triggers, trigger_lease_ttl),
            )
        finally:
            await close_client(client)

    try:
        anyio.run(main, backend_options=event_loop_options())
    except StartupError as exc:
        raise fail(str(exc), exc.hint) from None


_DEV_DRAIN_TIMEOUT = 5.0  # dev stops quickly on Ctrl-C


def _serving_config(
    max_body_bytes: int,
    max_result_bytes: int,
    max_source_bytes: int,
    max_concurrency: int,
    require_depth: int,
    exec_timeout: float,
    call_timeout: float,
    drain: float,
    startup: float,
    *,
    held_versions: int = 0,
) -> tuple[Limits, Timeouts]:
    """The daemon's limits and timeouts from the options ``run`` and ``dev`` share (0: none)."""
    limits = Limits(
        max_body_bytes=max_body_bytes,
        max_result_bytes=max_result_bytes,
        max_source_bytes=max_source_bytes,
        max_concurrency=max_concurrency or None,
        require_depth=require_depth,
        held_versions=held_versions,
    )
    timeouts = Timeouts(
        top_level=exec_timeout, call=call_timeout or None, drain=drain, startup=startup
    )
    return limits, timeouts


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
    max_body_bytes: MaxBodyBytes = DAEMON_LIMITS.max_body_bytes,
    max_result_bytes: MaxResultBytes = DAEMON_LIMITS.max_result_bytes,
    max_source_bytes: MaxSourceBytes = DAEMON_LIMITS.max_source_bytes,
    exec_timeout: ExecTimeout = DAEMON_TIMEOUTS.top_level,
    call_timeout: CallTimeout = DAEMON_TIMEOUTS.call or 0.0,
    max_concurrency: MaxConcurrency = DAEMON_LIMITS.max_concurrency or 0,
    require_depth: RequireDepth = DAEMON_LIMITS.require_depth,
    held_versions: HeldVersions = DAEMON_LIMITS.held_versions,
    idle_timeout: IdleTimeout = _HTTP.idle_timeout,
    header_timeout: HeaderTimeout = _HTTP.header_timeout,
    body_timeout: BodyTimeout = _HTTP.body_timeout,
    max_connections: MaxConnections = 0,
    allowed_hosts: AllowedHosts = "",
    allowed_origins: AllowedOrigins = "",
    access_log: AccessLog = _HTTP.access_log,
    otel: Otel = _HTTP.otel,
    report_status: ReportStatus = True,
    heartbeat: Heartbeat = 5.0,
    host_ttl: HostTtl = None,
    host_id: HostId = None,
) -> None:
    """Zero-infrastructure development: embedded MongoDB, the example plugins, HTTP, live sync.

    Every save in --plugins-dir is published into the collection (like `push`) and
    reaches the host through the change stream, like in production.
    """
    import anyio
    import structlog
    from pymongo import AsyncMongoClient

    from .. import samples
    from ..daemon import (
        StartupError,
        close_client,
        event_loop_options,
        parse_address,
        run_daemon,
    )
    from ..devsync import sync_folder
    from ..embedded import EmbeddedMongo
    from ..embedded.journal import DataDirError, DataDirLocked
    from ..publish import PublishError, publish_dir
    from ..trust import TrustError

    configure_logging("console")
    if not plugins_dir.is_dir():
        raise fail(
            f"plugins folder {str(plugins_dir)!r} does not exist",
            "create it, or pass --plugins-dir",
        )
    plugins_dir = plugins_dir.resolve()
    _check_exposure(http, None)  # dev has no token: loopback only
    keys = _load_trusted(trusted_keys)
    status_reporting = reporting(report_status, heartbeat, host_ttl, host_id)
    limits, timeouts = _serving_config(
        max_body_bytes,
        max_result_bytes,
        max_source_bytes,
        max_concurrency,
        require_depth,
        exec_timeout,
        call_timeout,
        drain=_DEV_DRAIN_TIMEOUT,
        startup=DAEMON_TIMEOUTS.startup,
        held_versions=held_versions,
    )
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
            except DataDirError as exc:
                await server.aclose()
                raise fail(str(exc), "free space or fix the disk holding --data-dir") from None
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
                limits=limits,
                timeouts=timeouts,
                collection=collection,
                mongodb=f"the embedded MongoDB at {server.uri}",
                debug=debug,
                on_ready=banner,
                background=[sync],
                trusted_keys=keys,
                http=_http_settings(
                    idle_timeout,
                    header_timeout,
                    body_timeout,
                    max_connections,
                    allowed_hosts,
                    allowed_origins,
                    access_log,
                    otel,
                ),
                report_status=status_reporting,
                bound_exit=True,
            )
        finally:
            await close_client(client)
            await server.aclose()

    try:
        anyio.run(main, backend_options=event_loop_options())
    except StartupError as exc:
        raise fail(str(exc), exc.hint) from None


def _print_banner(url: str, mongo_uri: str, database: str, collection: str, folder: Path) -> None:
    from rich.panel import Panel
    from rich.table import Table

    try:
        shown = folder.relative_to(Path.cwd())
    except ValueError:
        shown = folder
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan")
    grid.add_column()
    grid.add_row("Console", f"{url}/console  (live plugins, fleet, rollouts, triggers, events)")
    grid.add_row("HTTP", f"{url}  (GET /functions, /metrics, /readyz, /events)")
    grid.add_row("MongoDB", f"{mongo_uri}  (database {database}, collection {collection})")
    grid.add_row("Plugins", f"{shown}/  — every save is published and hot-swapped")
    _console.print(Panel(grid, title="plugin-host dev is ready", expand=False))
    body = json.dumps({"firstName": "Blain", "lastName": "Smith"})
    # Plain print: a wrapped curl line (or URL) would not paste.
    print(f"console: {url}/console", flush=True)
    print(
        f"curl -s -X POST {url}/functions/greet/call -H 'content-type: application/json' "
        f"-d '{body}'",
        flush=True,
    )
