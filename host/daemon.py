"""The daemon: a :class:`~host.PluginHost` served over HTTP, with readiness and draining.

Life of a daemon (``plugin-host run`` and ``plugin-host dev``):

1. The CLI binds the listening socket itself (a port in use is a clear start-up error,
   not a traceback from deep inside Uvicorn) and builds the MongoDB client.
2. The host starts without waiting; HTTP serves at once, so ``/healthz`` answers and
   ``/readyz`` says 503 while the watcher retries an unreachable MongoDB with backoff.
3. Ready within ``startup_timeout`` (0: wait forever) or a :class:`StartupError`.
4. SIGTERM/SIGINT: new calls get 503, the host drains in-flight calls (bounded by its
   ``drain_timeout``), runs teardowns and closes the stream; then Uvicorn stops.

Uvicorn's own signal handling is switched off: the daemon owns the order of shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Coroutine, Generator, Sequence
from typing import Any

import anyio
import structlog
import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from . import tracing
from .config import DAEMON_LIMITS, DAEMON_TIMEOUTS, Limits, Timeouts, redact_uri
from .connections import ConnectionGuard, accept_errors_logged, guarded_protocol
from .errors import PluginHostError
from .fleet import StatusReporting
from .http import LOOPBACK_HOSTS, HttpSettings, create_app
from .metrics import Metrics, follow_triggers
from .runtime import PluginHost
from .triggers import TriggerOptions
from .trust import TrustedKeys
from .watcher import WatchFatal

__all__ = (
    "StartupError",
    "as_tcp_listener",
    "bind_socket",
    "close_client",
    "event_loop_options",
    "http_protocol",
    "is_loopback",
    "parse_address",
    "redact_uri",
    "run_daemon",
    "serving_stack",
    "uvicorn_options",
)

_log = structlog.get_logger("host.daemon")

Background = Callable[[anyio.Event], Coroutine[Any, Any, None]]
"""A task started once the host is ready; it must return soon after the event is set."""


class StartupError(PluginHostError):
    """The daemon could not start; ``str()`` is one line for the operator.

    Attributes:
        hint: How to fix it, if there is something to say.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def parse_address(address: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:8000`` for IPv6; ``:8000`` binds 127.0.0.1).

    Raises:
        ValueError: The address has no valid port.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:8000, got {address!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or ``localhost``) is reachable only from this machine."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything


def bind_socket(host: str, port: int, *, next_free: int = 0) -> socket.socket:
    """A listening TCP socket on ``host:port``.

    Args:
        host: The address to bind.
        port: The port (0: any free port).
        next_free: When the port is taken, try up to this many following ports.

    Raises:
        OSError: The address cannot be bound (``EADDRINUSE`` when taken).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    last: OSError | None = None
    for candidate in range(port, port + next_free + 1) if port else [0]:
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on an accepted connection only when
        # the listening socket says its protocol is TCP. With 0, every reply on a keep-alive
        # connection waited ~40 ms for the peer's delayed ACK (Nagle).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, candidate))
            sock.listen(2048)
        except OSError as exc:
            sock.close()
            last = exc
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        sock.setblocking(False)
        return sock
    assert last is not None
    raise last


def as_tcp_listener(sock: socket.socket) -> socket.socket:
    """``sock`` as a socket object whose protocol is ``IPPROTO_TCP`` (the same descriptor).

    asyncio enables ``TCP_NODELAY`` on the connections a listener accepts only when the
    listener's ``proto`` is ``IPPROTO_TCP`` (``base_events._set_nodelay``); a socket made
    with protocol 0 (``socket.socket(AF_INET, SOCK_STREAM)``, ``socket.create_server``, an
    inherited descriptor) reports 0, and its keep-alive replies then wait for the peer's
    delayed ACK. A socket that is not TCP is returned unchanged.

    Args:
        sock: A bound, listening socket.

    Returns:
        ``sock`` itself when its protocol already says TCP, else a new socket object
        owning the same descriptor (``sock`` is detached).
    """
    tcp = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
    if not tcp or sock.proto == socket.IPPROTO_TCP:
        return sock
    blocking = sock.getblocking()
    fixed = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
    fixed.setblocking(blocking)
    return fixed


def event_loop_options() -> dict[str, Any]:
    """anyio's asyncio backend options for the daemon: uvloop when it is installed (the
    ``speed`` extra) unless ``PLUGIN_HOST_LOOP=asyncio``; else the standard asyncio loop."""
    if os.environ.get("PLUGIN_HOST_LOOP", "").lower() == "asyncio":
        return {}
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def http_protocol() -> type[asyncio.Protocol]:
    """Uvicorn's HTTP protocol class for the daemon: httptools when it is installed (the
    ``speed`` extra) unless ``PLUGIN_HOST_HTTP=h11``; else the pure-Python h11."""
    if os.environ.get("PLUGIN_HOST_HTTP", "").lower() == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol
    return AutoHTTPProtocol


def serving_stack() -> dict[str, str]:
    """What serves HTTP in this process: the running event loop and the HTTP parser."""
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    parser = "httptools" if "HttpTools" in http_protocol().__name__ else "h11"
    return {"loop": "uvloop" if loop == "uvloop" else "asyncio", "http_parser": parser}


def uvicorn_options() -> dict[str, Any]:
    """The options the daemon gives ``uvicorn.Config`` besides the app (the bench's baseline
    uses the same, so both run on the same event loop and HTTP parser)."""
    return {
        "log_config": None,
        "log_level": "warning",
        "access_log": False,
        "lifespan": "on",
        "timeout_graceful_shutdown": 5,
        "server_header": False,
    }


class _Server(uvicorn.Server):
    """Uvicorn without its signal handlers: the daemon decides when and how to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def _wait_ready(host: PluginHost, stop: anyio.Event, limit: float) -> str | None:
    """Wait for readiness; return None when ready (or stopping), else what went wrong."""
    outcome: list[str | None] = []
    last_error: list[str] = []
    done = anyio.Event()

    async def ready() -> None:
        try:
            await host.ready()
            outcome.append(None)
        except WatchFatal as exc:
            outcome.append(f"fatal:{exc}")
        done.set()

    async def stopped() -> None:
        await stop.wait()
        done.set()

    async def errors() -> None:
        async with host.events() as events:
            async for event in events:
                if event.event == "watch.error":
                    last_error[:] = [str(event.get("error", ""))]

    async with anyio.create_task_group() as tg:
        tg.start_soon(ready)
        tg.start_soon(stopped)
        tg.start_soon(errors)
        with anyio.move_on_after(limit if limit > 0 else math.inf):
            await done.wait()
        tg.cancel_scope.cancel()
    if outcome:
        return outcome[0]
    if stop.is_set():
        return None
    loading = host.loading()
    if loading:  # MongoDB answered: the initial load itself is what is slow
        shown = ", ".join(loading[:5]) + (
            f" and {len(loading) - 5} more" if len(loading) > 5 else ""
        )
        return f"loading:{len(loading)} record(s) still loading: {shown}"
    return "timeout:" + (last_error[0] if last_error else "")


async def run_daemon(
    db: Any,
    sock: socket.socket,
    *,
    limits: Limits = DAEMON_LIMITS,
    timeouts: Timeouts = DAEMON_TIMEOUTS,
    collection: str = "functions",
    mongodb: str = "MongoDB",
    debug: bool = False,
    trusted_keys: TrustedKeys | None = None,
    auth_token: str | None = None,
    open_endpoints: Collection[str] = ("healthz", "metrics"),
    context: dict[str, Any] | None = None,
    on_ready: Callable[[PluginHost], None] | None = None,
    background: Sequence[Background] = (),
    http: HttpSettings | None = None,
    report_status: bool | StatusReporting = False,
    bound_exit: bool = False,
    triggers: bool | TriggerOptions = True,
) -> None:
    """Serve ``db[collection]``'s plugins over HTTP on ``sock`` until SIGTERM/SIGINT.

    Args:
        db: The database (PyMongo ``AsyncDatabase`` or Motor).
        sock: A bound, listening socket (see :func:`bind_socket`); closed on return.
        limits: Sizes and counts (request body, reply, source, concurrency, depth).
        timeouts: Time bounds (top level, calls, drain after a stop signal, start-up;
            ``startup=0`` waits forever).
        collection: The functions collection.
        mongodb: How to name the deployment in errors (a redacted URI).
        debug: Plugin tracebacks in HTTP 500 replies.
        trusted_keys: Run only records signed by one of these keys (None: unchecked,
            with a ``trust.disabled`` warning).
        auth_token: Require ``Authorization: Bearer <token>`` on the HTTP API.
        open_endpoints: With a token, which of healthz/readyz/metrics stay open.
        context: Host globals for plugins.
        on_ready: Called once when the host is ready.
        background: Tasks started when ready and stopped (their event set) on shutdown.
        http: Connection timeouts and cap, allowed hosts and origins, access log.
        report_status: Report what this host serves to the hosts collection (see
            :mod:`host.fleet`); ``run`` and ``dev`` turn it on.
        bound_exit: This process ends at most :data:`EXIT_GRACE` seconds after the
            daemon stops, whatever plugin threads still do (``os._exit``): for the CLI's
            own process only, never for a process that goes on after the daemon.
        triggers: Run the plugins' change-stream triggers (see :mod:`host.triggers`);
            on SIGTERM they drain with the calls (final checkpoint, lease released).

    Raises:
        StartupError: Not ready in time, or the collection cannot be watched.
    """
    host = PluginHost(
        db,
        collection,
        context=context,
        wait_ready=False,
        limits=limits,
        timeouts=timeouts,
        trusted_keys=trusted_keys,
        report_status=report_status,
        triggers=triggers,
    )
    startup_timeout = timeouts.startup
    http = http or HttpSettings()
    sock = as_tcp_listener(sock)
    address = sock.getsockname()
    allowed_hosts: set[str] | None = None
    if is_loopback(address[0]) or http.allowed_hosts:
        allowed_hosts = (
            {*LOOPBACK_HOSTS, address[0], *http.allowed_hosts}
            if is_loopback(address[0])
            else set(http.allowed_hosts)
        )
    guard = ConnectionGuard(
        idle_timeout=http.idle_timeout,
        header_timeout=http.header_timeout,
        body_timeout=http.body_timeout,
        max_connections=http.max_connections,
    )
    provider: Any = None
    if http.otel:
        try:
            provider = tracing.configure_sdk()
        except (RuntimeError, ImportError) as exc:
            raise StartupError(f"--otel: {exc}", "pip install 'plugin-host[otel]'") from None
        tracing.enable(provider)
    metrics = Metrics()
    follow_triggers(host.triggers.stats if host.triggers is not None else None, metrics)
    app = create_app(
        host,
        debug=debug,
        max_body_bytes=limits.max_body_bytes,
        max_result_bytes=limits.max_result_bytes,
        metrics=metrics,
        auth_token=auth_token,
        open_endpoints=open_endpoints,
        allowed_hosts=allowed_hosts,
        allowed_origins=http.allowed_origins,
        access_log=http.access_log,
    )
    options = uvicorn_options()
    options["timeout_keep_alive"] = http.idle_timeout
    config = uvicorn.Config(app, http=guarded_protocol(http_protocol(), guard), **options)
    server = _Server(config)
    stop = anyio.Event()
    problem: str | None = None

    with (
        _bound_exit_on_error(bound_exit, host),
        anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        accept_errors_logged(asyncio.get_running_loop()),
    ):

        async def on_signals() -> None:
            async for signum in signals:
                name = signal.Signals(signum).name
                if stop.is_set():
                    _log.warning("daemon.signal_ignored", signal=name, reason="already stopping")
                    continue
                _log.info("daemon.stopping", signal=name)
                stop.set()

        async def serve_http() -> None:
            try:
                await server.serve(sockets=[sock])
            finally:
                if not stop.is_set():  # Uvicorn gave up by itself (it logged why)
                    stop.set()

        async with anyio.create_task_group() as tg:
            signal_scope = anyio.CancelScope()

            async def signals_task() -> None:
                with signal_scope:
                    await on_signals()

            sweep_scope = anyio.CancelScope()

            async def sweep_task() -> None:
                with sweep_scope:
                    await guard.sweep()

            tg.start_soon(signals_task)
            tg.start_soon(sweep_task)
            async with host:
                tg.start_soon(serve_http)
                problem = await _wait_ready(host, stop, startup_timeout)
                if problem is None and not stop.is_set():
                    _log.info(
                        "daemon.ready",
                        http=f"http://{_netloc(address)}",
                        plugins=len(host.plugins()),
                        **serving_stack(),
                    )
                    if on_ready is not None:
                        on_ready(host)
                    async with anyio.create_task_group() as jobs:
                        for job in background:
                            jobs.start_soon(job, stop)
                        await stop.wait()
                app.state.draining = True
                if problem is None:
                    _log.info("daemon.draining", drain_timeout_s=timeouts.drain)
            # The host has drained, torn its versions down and closed its stream.
            server.should_exit = True
            signal_scope.cancel()
            sweep_scope.cancel()
    sock.close()
    if provider is not None:
        tracing.disable()
        await anyio.to_thread.run_sync(provider.shutdown)  # flushes the last spans
    if bound_exit:
        _bound_exit(0 if problem is None else 1, host)
    if problem is None:
        _log.info("daemon.stopped")
        return
    kind, _, detail = problem.partition(":")
    if kind == "fatal":
        raise StartupError(detail, "point --mongodb-uri at a replica set (see README)")
    if kind == "loading":
        raise StartupError(
            f"the initial load did not finish within {startup_timeout:g} s: {detail} "
            f"({mongodb} answered; each record is bounded by --exec-timeout and the "
            "compile bound, see the plugin.reload_failed events)",
            "raise --startup-timeout, or fix or disable the slow records",
        )
    last = f" (last error: {detail})" if detail else ""
    raise StartupError(
        f"{mongodb} is not reachable: not ready within {startup_timeout:g} s{last}",
        "check that MongoDB runs and --mongodb-uri is right; --startup-timeout 0 waits forever",
    )


EXIT_GRACE = 2.0
"""Seconds the process may live after the daemon stopped before its exit is forced."""

CLOSE_BOUND = 2.0
"""Seconds :func:`close_client` waits for the MongoDB client to close."""


async def close_client(client: Any, timeout: float = CLOSE_BOUND) -> None:  # noqa: ASYNC109 - shutdown bound
    """Close a MongoDB client at shutdown, giving up after ``timeout`` seconds.

    The CLI prints its start-up error only once the client is closed: a close that never
    returns (a client wedged by a cancelled server selection, see
    :mod:`host.pymongo_cancel`) must not keep the error, and the exit, from the operator.

    Args:
        client: A PyMongo ``AsyncMongoClient`` (or Motor client).
        timeout: Seconds to wait; then ``daemon.client_close_abandoned`` is logged.
    """
    with anyio.CancelScope(shield=True), anyio.move_on_after(timeout) as scope:
        closed = client.close()
        if closed is not None:
            await closed
    if scope.cancelled_caught:
        _log.warning("daemon.client_close_abandoned", timeout_s=timeout)


@contextlib.contextmanager
def _bound_exit_on_error(enabled: bool, host: PluginHost) -> Generator[None, None, None]:
    """Bound the process's exit (:func:`_bound_exit`, code 1) when the daemon fails with an
    unexpected exception too, not only after an orderly stop or a start-up error."""
    try:
        yield
    except BaseException:
        if enabled:
            _bound_exit(1, host)
        raise


def _bound_exit(code: int, host: PluginHost) -> None:
    """Make sure the process exits soon, whatever plugin threads still do (issue 13 #4).

    anyio's worker threads are not daemon threads, so the interpreter waits at exit for
    every one of them, including a thread abandoned in ``time.sleep(40)`` or in a plugin
    loop that swallows the interrupt: the process lived until SIGKILL. The drain timeout
    already ended every call (``Dispatcher.abort``); this daemon thread ends the process
    :data:`EXIT_GRACE` seconds later with ``os._exit(code)`` if it is still alive then,
    after logging ``daemon.exit_forced`` with the versions whose threads would not stop.
    A process that exits by itself first takes this thread with it.

    Args:
        code: The exit code the process would have had.
        host: The stopped host (for the report).
    """
    stuck = host.stuck_threads()
    main = threading.main_thread()

    def force() -> None:
        time.sleep(EXIT_GRACE)
        alive = [t.name for t in threading.enumerate() if t is not main and not t.daemon]
        _log.error("daemon.exit_forced", code=code, stuck_threads=stuck, threads=alive)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    threading.Thread(target=force, name="plugin-host exit bound", daemon=True).start()


def _netloc(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
