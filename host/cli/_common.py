"""Shared by the command modules: the Typer app, logging set-up, options and helpers."""

from __future__ import annotations

import enum
import errno
import functools
import logging
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

if TYPE_CHECKING:
    import structlog
    from pymongo import AsyncMongoClient
    from rich.console import Console

    from ..publish import Signer
    from ..trust import TrustedKeys, TrustError


app = typer.Typer(
    name="plugin-host",
    help="A live-reloading Python plugin runtime driven by MongoDB change streams.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain click help: rich (with its markdown renderer) costs ~1 s of start-up on --help.
    rich_markup_mode=None,
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
    import structlog

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


class LogFormat(enum.StrEnum):
    """``--log-format``: JSON lines, coloured console output, or console on a TTY."""

    JSON = "json"
    CONSOLE = "console"
    AUTO = "auto"


USAGE_ERROR = 2
"""Exit code of a usage error (bad option or argument), as click uses."""
RUNTIME_ERROR = 1
"""Exit code of a failure at run time (MongoDB unreachable, a port taken...)."""


def fail(message: str, hint: str | None = None, *, usage: bool = False) -> typer.Exit:
    """Print one clear error line (and a hint) to stderr; return the exit to raise.

    Args:
        message: What went wrong.
        hint: How to fix it.
        usage: Whether the command line itself is wrong (exit 2) rather than something
            at run time (exit 1).

    Returns:
        The ``typer.Exit`` to raise.
    """
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    return typer.Exit(code=USAGE_ERROR if usage else RUNTIME_ERROR)


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
HeldVersions = Annotated[
    int,
    typer.Option(
        "--held-versions",
        min=0,
        help="Replaced versions kept live per plugin for X-Plugin-Version pins "
        "(each costs a loaded version's memory; 0: none).",
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


class _LazyConsole:
    """A rich ``Console`` made on first use: importing rich costs start-up time."""

    def __init__(self, *, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def get(self) -> Console:
        """The console itself (for rich objects that take one, e.g. ``Progress``)."""
        console = self._console
        if console is None:
            from rich.console import Console

            console = self._console = Console(stderr=self._stderr)
        return console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


_console = _LazyConsole()
_errors = _LazyConsole(stderr=True)


def _load_trusted(paths: list[Path] | None) -> TrustedKeys | None:
    """The trusted keys of ``--trusted-keys`` (CLI start-up: blocking is fine), or a clear error."""
    from ..trust import TrustError, load_public_keys

    if not paths:
        return None
    try:
        return load_public_keys(paths)
    except TrustError as exc:
        raise fail(
            f"--trusted-keys: {exc}",
            "pass the .pub files written by `plugin-host keygen`",
            usage=True,
        ) from None


async def _load_signer(path: Path | None) -> Signer | None:
    """A signer for ``--sign-key`` (the key file is read in a worker thread)."""
    import anyio

    from ..trust import load_private_key, sign_record

    if path is None:
        return None
    key = await anyio.to_thread.run_sync(load_private_key, path)
    return functools.partial(sign_record, key)


def _sign_key_error(exc: TrustError) -> typer.Exit:
    return fail(
        f"--sign-key: {exc}",
        "pass the private key (.key) written by `plugin-host keygen`",
        usage=True,
    )


def _check_exposure(address: str, auth_token: str | None) -> None:
    """Refuse to serve a non-loopback address without a token."""
    from ..daemon import is_loopback, parse_address

    try:
        bind_host, _ = parse_address(address)
    except ValueError as exc:
        raise fail(f"bad --http address: {exc}", usage=True) from None
    if auth_token is not None and not auth_token:
        raise fail("--auth-token is empty", usage=True)
    if not is_loopback(bind_host) and auth_token is None:
        raise fail(
            f"refusing to serve the HTTP API on {address} without authentication: anyone who "
            "can reach it could call every plugin",
            "pass --auth-token (or set PLUGIN_HOST_AUTH_TOKEN), or bind 127.0.0.1",
            usage=True,
        )


def _parse_open_endpoints(value: str) -> tuple[str, ...]:
    from ..http import OPEN_ENDPOINTS

    names = tuple(part.strip().lstrip("/") for part in value.split(",") if part.strip())
    unknown = sorted(set(names) - OPEN_ENDPOINTS)
    if unknown:
        raise typer.BadParameter(
            f"unknown endpoint(s) {', '.join(unknown)}: choose among "
            f"{', '.join(sorted(OPEN_ENDPOINTS))} (or '' for none)",
            param_hint="'--open-endpoints'",
        )
    return names


T = TypeVar("T")


def _client(uri: str, server_timeout: float | None) -> AsyncMongoClient[dict[str, Any]]:
    """A client for ``uri``, or a clear error for a malformed connection string."""
    from pymongo import AsyncMongoClient
    from pymongo.errors import ConfigurationError

    from ..config import redact_uri
    from ..pymongo_cancel import install

    install()  # cancelling a command mid server selection must not wedge the client

    options: dict[str, Any] = {}
    if server_timeout is not None and "serverselectiontimeoutms" not in uri.lower():
        options["serverSelectionTimeoutMS"] = int(server_timeout * 1000)
    try:
        return AsyncMongoClient(uri, **options)
    except (ConfigurationError, ValueError) as exc:  # InvalidURI; a bad port is a ValueError
        raise fail(
            f"invalid --mongodb-uri {redact_uri(uri)!r}: {exc}",
            f"use a connection string like {DEFAULT_URI}",
            usage=True,
        ) from None


def _with_db(uri: str, database: str, timeout: float, job: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``job(db)`` on a fresh client; MongoDB errors and unknown plugins become one
    clear line."""
    import anyio
    from pymongo.errors import ConnectionFailure, OperationFailure, ServerSelectionTimeoutError

    from ..config import redact_uri
    from ..publish import UnknownPlugin

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
    from ..daemon import bind_socket, parse_address

    try:
        bind_host, port = parse_address(address)
    except ValueError as exc:
        raise fail(f"bad --http address: {exc}", usage=True) from None
    try:
        return bind_socket(bind_host, port, next_free=next_free)
    except OSError as exc:
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise fail(
            f"cannot listen on {address}: {reason or exc}",
            "stop the process using it, or pick another --http HOST:PORT (port 0: any free one)",
        ) from None
