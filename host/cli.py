"""The ``plugin-host`` command line (Typer).

The CLI is the one place that configures logging and installs signal handlers; the
library never does either.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import anyio
import structlog
import typer

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


async def _wait_for_signal() -> int:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            return int(signum)
    return 0  # pragma: no cover - the receiver never ends by itself


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
) -> None:
    """Run the embedded MongoDB-compatible server (single-node replica set) until SIGINT/SIGTERM."""
    from .embedded import EmbeddedMongo
    from .embedded.journal import DataDirLocked

    configure_logging(log_format)

    async def main() -> None:
        server = EmbeddedMongo(port=port, data_dir=data_dir, host=bind, oplog_size=oplog_size)
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
            signum = await _wait_for_signal()
            structlog.get_logger("host.embedded").info(
                "embedded.stopping", signal=signal.Signals(signum).name
            )
        finally:
            await server.aclose()

    anyio.run(main)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
