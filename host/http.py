"""The HTTP API (Starlette): call plugins, inspect the registry, health, readiness, metrics.

Routes:

* ``POST /functions/{name}/call`` — the JSON body is the call's ``args`` (empty body:
  ``None``); ``?timeout=SECONDS`` overrides the plugin's timeout. Replies
  ``{"result": ..., "version": "greet@r7:3f9a1c2e"}``.
* ``GET /functions``, ``GET /functions/{name}`` — what the registry serves.
* ``GET /fleet`` — every host of the collection: what it serves and refused, and
  whether each plugin has converged (:mod:`host.fleetview`; 503 if MongoDB cannot say).
* ``GET /healthz`` (the process runs), ``GET /readyz`` (initial load done, change stream
  live, not draining), ``GET /metrics`` (Prometheus text format).
* The console (:mod:`host.console`): ``GET /`` and ``/console`` (the page, open: it holds
  no data), ``GET /stats`` (per-plugin calls/s, error rate, p50/p99 and their series),
  ``GET /events`` (the host's events as server-sent events, :mod:`host.eventstream`),
  ``GET /triggers`` (:func:`host.triggerview.trigger_status`; ``?plugin=`` filters) and
  ``POST /functions/{name}/rollout`` (promote, abort, set weight:
  :mod:`host.console.actions`).

Every error reply is ``{"error": {"type": ..., "message": ...}}`` with a status that says
who should act: 401 missing or wrong bearer token, 403 a ``Host`` or ``Origin`` that is not
allowed, 404 unknown plugin or route, 405 wrong method, 413 body too large, 415 a call body
that is not ``application/json``, 422 bad JSON (including NaN/Infinity and nesting deeper
than the parser allows), 500 the plugin failed (``traceback`` too when ``debug``;
``ResultTooLarge`` when its JSON result exceeds ``max_result_bytes``), 503 draining/closed
or plugin busy (with ``Retry-After``: the condition is the server's and passes; 429 would
blame the client's rate), 504 the call timed out.

With ``auth_token``, every route except those in ``open_endpoints`` requires
``Authorization: Bearer <token>``, compared in constant time (:func:`hmac.compare_digest`).

Cross-site requests (:class:`SiteGuard`): a page on another site can make a browser send a
"simple" POST (``text/plain``, no preflight) to the loopback daemon, and DNS rebinding can
make it read the replies. So a call with a body must be ``application/json`` (which a page
cannot send cross-site without a CORS preflight, which this API never grants), a request
with a foreign ``Origin`` is refused unless that origin is configured, and on a loopback
bind the ``Host`` header must name this machine (or a configured host).
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import math
import time
import traceback
import urllib.parse
from collections.abc import AsyncIterator, Collection
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
import anyio.lowlevel
import structlog
from pymongo.errors import PyMongoError
from starlette.applications import Starlette
from starlette.datastructures import QueryParams, State
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import tracing
from .config import DEFAULT_LIMITS, HttpSettings
from .console import CONFIG_PATH, CONSOLE_PATHS, SECURITY_HEADERS, static_file
from .console.actions import ActionError, rollout_action
from .console.rates import CallRates
from .errors import (
    HostClosed,
    PluginBusy,
    PluginFailed,
    PluginNotFound,
    PluginTimeout,
    VersionNotLive,
)
from .eventstream import RECENT, EventHub
from .fleetview import host_fleet_status
from .metrics import CONTENT_TYPE, Metrics, follow_events
from .triggerview import trigger_status
from .wire_json import (
    ResultEncodingTimeout,
    ResultTooLarge,
    encode_result,
    parse_json,
    to_json,
)

if TYPE_CHECKING:
    from .runtime import PluginHost

__all__ = (
    "LOOPBACK_HOSTS",
    "OPEN_ENDPOINTS",
    "BearerAuth",
    "HttpSettings",
    "SiteGuard",
    "create_app",
    "to_json",
)

OPEN_ENDPOINTS = frozenset({"healthz", "readyz", "metrics"})
"""The routes that may be left open when a token is required (``/healthz``...)."""

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
"""The ``Host`` names always allowed on a loopback bind."""

_log = structlog.get_logger("host.http")
_access = structlog.get_logger("host.http.access")


class _BodyTooLarge(Exception):
    pass


class BearerAuth:
    """ASGI middleware: require ``Authorization: Bearer <token>`` on every HTTP route.

    A missing or wrong token gets a bare 401 (no detail). The comparison runs in constant
    time. Lifespan and other non-HTTP scopes pass through.

    Args:
        app: The application to protect.
        token: The shared secret.
        open_paths: Exact paths that need no token (``/healthz``...).
        query_token_paths: Exact paths that also accept the token as ``?token=`` (the
            event stream: a browser's ``EventSource`` cannot send headers).
    """

    def __init__(
        self,
        app: ASGIApp,
        token: str,
        open_paths: Collection[str] = (),
        query_token_paths: Collection[str] = (),
    ) -> None:
        if not token:
            raise ValueError("the auth token must not be empty")
        self.app = app
        self._expected = f"Bearer {token}".encode()
        self._token = token.encode()
        self._open = frozenset(open_paths)
        self._query = frozenset(query_token_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the token, then hand the request to the app (or reply 401)."""
        if scope["type"] not in ("http", "websocket") or scope.get("path") in self._open:
            await self.app(scope, receive, send)
            return
        given = b""
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                given = value
                break
        if not hmac.compare_digest(given, self._expected) and not self._query_token(scope):
            reply = JSONResponse(
                {"error": {"type": "Unauthorized", "message": "unauthorized"}},
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await reply(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _query_token(self, scope: Scope) -> bool:
        if scope.get("path") not in self._query or not scope.get("query_string"):
            return False
        query = urllib.parse.parse_qs(scope["query_string"].decode("latin-1"))
        return any(hmac.compare_digest(t.encode(), self._token) for t in query.get("token", ()))


def _host_name(value: str) -> str:
    """The host part of a ``Host`` header or origin netloc, lower case, without the port."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


_SEEN_HOSTS = 64  # allowed Host header values SiteGuard remembers


class SiteGuard:
    """ASGI middleware: refuse foreign ``Host`` headers and foreign ``Origin`` s (403).

    Args:
        app: The application to protect.
        allowed_hosts: Host names accepted in the ``Host`` header (None: no check).
        allowed_origins: Origins accepted besides the request's own (``*``: any).
    """

    def __init__(
        self,
        app: ASGIApp,
        allowed_hosts: Collection[str] | None = None,
        allowed_origins: Collection[str] = (),
    ) -> None:
        self.app = app
        self._hosts = None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)
        origins = frozenset(o.lower().rstrip("/") for o in allowed_origins)
        self._any_origin = "*" in origins
        self._origins = origins
        # Invariant: every member is a raw Host header whose host name is allowed (a
        # client sends the same one every time, so the parse is done once); at most
        # _SEEN_HOSTS members, refused values never (so requests cannot grow it).
        self._seen_hosts: set[bytes] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check ``Host`` and ``Origin``, then hand the request to the app (or reply 403)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_host = raw_origin = None
        for key, value in scope["headers"]:
            if key == b"host":
                raw_host = value
            elif key == b"origin":
                raw_origin = value
        if raw_origin is None and (raw_host is None or raw_host in self._seen_hosts):
            await self.app(scope, receive, send)  # the usual request: nothing to parse
            return
        host = None if raw_host is None else raw_host.decode("latin-1")
        origin = None if raw_origin is None else raw_origin.decode("latin-1")
        problem = None
        if host is not None and self._hosts is not None and _host_name(host) not in self._hosts:
            problem = (
                "HostNotAllowed",
                f"Host {host[:100]!r} is not served here (see --allowed-hosts)",
            )
        elif raw_host is not None and len(self._seen_hosts) < _SEEN_HOSTS:
            self._seen_hosts.add(raw_host)
        if problem is None and origin is not None and not self._any_origin:
            plain = origin.lower().rstrip("/")
            same = host is not None and plain.partition("://")[2] == host.lower()
            if not same and plain not in self._origins:
                problem = (
                    "OriginNotAllowed",
                    f"requests from origin {origin[:100]!r} are not allowed "
                    "(see --allowed-origins)",
                )
        if problem is not None:
            await _error(403, *problem)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _error(
    status: int,
    kind: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    if status == 503:
        headers = {**(headers or {}), "Retry-After": "1"}
    return JSONResponse(
        {"error": {"type": kind, "message": message, **extra}}, status, headers=headers
    )


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


_HTTP_ERRORS = {404: "NotFound", 405: "MethodNotAllowed"}
_OUTCOMES = {200: "ok", 404: "not_found", 500: "failed", 503: "unavailable", 504: "timeout"}


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown route, wrong method) as JSON like every other error."""
    assert isinstance(exc, HTTPException)
    kind = _HTTP_ERRORS.get(exc.status_code, "HTTPError")
    message = (
        f"no route {request.url.path[:200]!r}"
        if exc.status_code == 404
        else f"{request.method} is not allowed on {request.url.path[:200]!r}"
        if exc.status_code == 405
        else str(exc.detail)
    )
    return _error(exc.status_code, kind, message, headers=dict(exc.headers or {}))


class _CallRequest:
    """What the call route reads of one request, taken straight from the ASGI scope.

    The call route is a raw ASGI endpoint (no Starlette ``Request``/``Response`` per
    call: that machinery cost more than the rest of the route). ``headers`` is a plain
    dict (lower-case names, first occurrence wins, as ``Request.headers.get`` answers);
    the query string is parsed only when there is one.
    """

    __slots__ = ("headers", "path_params", "receive", "scope")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        self.path_params: dict[str, Any] = scope["path_params"]
        self.headers: dict[str, str] = {
            key.decode("latin-1"): value.decode("latin-1")
            for key, value in reversed(scope["headers"])
        }

    @property
    def query_params(self) -> QueryParams:
        """The parsed query string."""
        return QueryParams(self.scope["query_string"])


def _client_disconnected(path: str) -> None:
    """The client went away before its body was in: nobody to answer, and no server
    error (Uvicorn would log a re-raised exception's traceback). One line says so."""
    _log.info("http.client_disconnected", path=path[:200], method="POST")


async def _read_body(request: Request | _CallRequest, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BodyTooLarge
    receive = request.receive
    body = b""
    chunks: list[bytes] | None = None  # only for a body that comes in several messages
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect: what Request.stream() does
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            if not body:
                body = chunk
            else:
                if chunks is None:
                    chunks = [body]
                chunks.append(chunk)
        if not message.get("more_body", False):
            return body if chunks is None else b"".join(chunks)


_JSON = "application/json"
_JSON_TYPE = (b"content-type", b"application/json")

_Reply: TypeAlias = Response | bytes
"""A call's reply: the JSON of its result (bytes, sent by :func:`_send_result`), or an error."""


async def _send_result(send: Send, content: bytes, version: str | None) -> None:
    # The 200 reply, as Starlette's Response(content, media_type="application/json",
    # headers={"X-Plugin-Version": ...}) would send it, without building one.
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"x-plugin-version", (version or "").encode("latin-1")),
                (b"content-length", str(len(content)).encode("latin-1")),
                _JSON_TYPE,
            ],
        }
    )
    await send({"type": "http.response.body", "body": content})


class _RawEndpoint:
    """Makes Starlette's ``Route`` hand the scope to ``endpoint`` as a plain ASGI app (it
    wraps plain functions in ``request_response``)."""

    __slots__ = ("endpoint",)

    def __init__(self, endpoint: ASGIApp) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.endpoint(scope, receive, send)


_CALL_PREFIX = "/functions/"
_CALL_SUFFIX = "/call"


def _call_name(scope: Scope) -> str | None:
    """The plugin name when ``scope`` is ``POST /functions/{name}/call``, else None.

    It matches exactly what the first route, ``Route("/functions/{name}/call")``, matches
    (``{name}``: one non-empty path segment); with a ``root_path`` it says None and the
    request takes Starlette's way.
    """
    if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
        return None
    path: str = scope["path"]
    if not (path.startswith(_CALL_PREFIX) and path.endswith(_CALL_SUFFIX)):
        return None
    name = path[len(_CALL_PREFIX) : -len(_CALL_SUFFIX)]
    return name if name and "/" not in name else None


class _Api(Starlette):
    """Starlette, with the call route taken straight from the scope to its endpoint.

    ``POST /functions/{name}/call`` goes through the user middlewares (``SiteGuard``,
    ``BearerAuth``: the same classes, configured the same, as on every other route) and
    nothing else: Starlette's error and exception middlewares, its router and its route
    each cost a coroutine frame (two of them a wrapped ``send``) per request, more than
    the rest of the route. The endpoint answers every error itself and stands in for the
    error middleware (a 500 when something unexpected escapes, then re-raised for Uvicorn
    to log). Every other request, and the lifespan, go through Starlette as before.
    """

    def __init__(self, call_endpoint: ASGIApp, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._call_endpoint = call_endpoint
        self._call_stack: ASGIApp | None = None  # built on the first call, as Starlette's

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection (the call route's fast way, or Starlette's)."""
        name = _call_name(scope)
        if name is None:
            await super().__call__(scope, receive, send)
            return
        stack = self._call_stack
        if stack is None:
            stack = self._call_endpoint
            for cls, args, kwargs in reversed(self.user_middleware):
                stack = cls(stack, *args, **kwargs)
            self._call_stack = stack
        scope["app"] = self
        scope["path_params"] = {"name": name}
        await stack(scope, receive, send)


def create_app(
    host: PluginHost,
    *,
    debug: bool = False,
    max_body_bytes: int = DEFAULT_LIMITS.max_body_bytes,
    max_result_bytes: int = DEFAULT_LIMITS.max_result_bytes,
    metrics: Metrics | None = None,
    auth_token: str | None = None,
    open_endpoints: Collection[str] = ("healthz", "metrics"),
    allowed_hosts: Collection[str] | None = None,
    allowed_origins: Collection[str] = (),
    access_log: bool = False,
) -> Starlette:
    """Build the HTTP API over a running :class:`~host.PluginHost`.

    The app's lifespan follows ``host.events()`` to keep the reload metrics; the host's
    own lifetime is the caller's. Setting ``app.state.draining = True`` refuses new calls
    (503) before the host itself starts shutting down.

    Args:
        host: The plugin host.
        debug: Include plugin tracebacks in 500 replies (they show source lines: keep it
            off where callers are not trusted).
        max_body_bytes: Largest accepted request body (413 beyond).
        max_result_bytes: Largest JSON-encoded call reply (500 ``ResultTooLarge`` beyond).
        metrics: Where to count; a new :class:`Metrics` by default (``app.state.metrics``).
        auth_token: Require ``Authorization: Bearer <auth_token>`` (None: no check).
        open_endpoints: With a token, which of ``healthz``, ``readyz`` and ``metrics``
            stay open.
        allowed_hosts: ``Host`` names served (403 for others; None: no check).
        allowed_origins: Browser origins allowed besides the daemon's own (``*``: any).
        access_log: One ``http.access`` event per call (plugin, version, status,
            duration_ms, call_id).

    Raises:
        ValueError: ``open_endpoints`` names an unknown endpoint, or the token is empty.

    Returns:
        The Starlette application.
    """
    unknown = set(open_endpoints) - OPEN_ENDPOINTS
    if unknown:
        raise ValueError(
            f"unknown open endpoint(s) {', '.join(sorted(unknown))}: "
            f"use {', '.join(sorted(OPEN_ENDPOINTS))}"
        )
    if metrics is None:
        metrics = Metrics()

    # app.state's own dict, held here: State.__getattr__ raises and catches an
    # AttributeError inside before it looks, which cost more than the rest of the test.
    state: dict[str, Any] = {"draining": False}

    def draining() -> bool:
        return bool(state["draining"] or host.draining)

    if metrics.ready is None:
        metrics.ready = lambda: bool(host.is_ready) and not draining()
    if metrics.abandoned_threads is None:
        metrics.abandoned_threads = lambda: int(host.abandoned_threads)
    if metrics.shadow is None:
        metrics.shadow = host.shadow_counts

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(follow_events, host, metrics)
            tg.start_soon(rates.run, host)
            tg.start_soon(hub.run)
            yield
            tg.cancel_scope.cancel()

    rates = CallRates(metrics)
    hub = EventHub(host.events, draining)
    call_ids = itertools.count(1)

    async def call(scope: Scope, receive: Receive, send: Send) -> None:
        request = _CallRequest(scope, receive)
        try:
            if not access_log and tracing.tracer is None:
                reply, version = await handle_call(request)
            else:
                reply, version = await observed_call(request)
        except ClientDisconnect:
            _client_disconnected(scope["path"])
            return
        except Exception:
            # What Starlette's error middleware did here (_Api takes this route past it):
            # nothing was sent yet, so a 500; the error goes on to Uvicorn, which logs it.
            await _error(500, "InternalServerError", "internal server error")(scope, receive, send)
            raise
        if isinstance(reply, bytes):
            await _send_result(send, reply, version)
        else:
            if version is not None:  # a failed or timed-out call names its version too
                reply.headers["x-plugin-version"] = version
            await reply(scope, receive, send)

    async def observed_call(request: _CallRequest) -> tuple[_Reply, str | None]:
        # The access log and the trace span; off the plain path, which pays one test.
        call_id = next(call_ids)
        name = request.path_params["name"][:200]
        started = time.perf_counter()
        if tracing.tracer is None:
            reply, version = await handle_call(request)
        else:
            with tracing.server_span(name, request.headers) as span:
                reply, version = await handle_call(request)
                outcome = _OUTCOMES.get(_status(reply), "bad_request")
                tracing.finish_call(span, version, outcome, call_id)
        if access_log:
            _access.info(
                "http.access",
                plugin=name,
                version=version,
                status=_status(reply),
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
                call_id=call_id,
            )
        return reply, version

    def refuse(outcome: str, status: int, kind: str, message: str) -> tuple[Response, None]:
        metrics.count_call(outcome)
        return _error(status, kind, message), None

    async def handle_call(request: _CallRequest) -> tuple[_Reply, str | None]:
        name = request.path_params["name"]
        content_type = request.headers.get("content-type")
        if content_type is not None and content_type != _JSON and not _is_json(content_type):
            return refuse(
                "bad_request",
                415,
                "UnsupportedMediaType",
                f"a call's body must be application/json, not {content_type[:100]!r}",
            )
        if draining():
            return refuse(
                "closed", 503, "HostClosed", "the plugin host is draining: retry on another one"
            )
        timeout: float | None = None
        # Most calls have no query string: skip building QueryParams for them.
        raw_timeout = request.query_params.get("timeout") if request.scope["query_string"] else None
        if raw_timeout is not None:
            try:
                timeout = float(raw_timeout)
            except ValueError:
                timeout = math.nan
            if not math.isfinite(timeout) or timeout <= 0:
                return refuse(
                    "bad_request",
                    422,
                    "BadRequest",
                    f"timeout must be a positive number, got {raw_timeout!r}",
                )
        try:
            body = await _read_body(request, max_body_bytes)
        except _BodyTooLarge:
            return refuse(
                "bad_request",
                413,
                "BodyTooLarge",
                f"the request body is larger than {max_body_bytes} bytes",
            )
        args: Any = None
        if body.strip():
            if content_type is None:
                return refuse(
                    "bad_request",
                    415,
                    "UnsupportedMediaType",
                    "a call with a body needs 'Content-Type: application/json'",
                )
            try:
                args = parse_json(body)
            except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN, too deep
                return refuse(
                    "bad_request", 422, "BadRequest", f"the request body is not valid JSON: {exc}"
                )
        # The dispatcher names the version it routed the call to (a rollout may send it
        # to the candidate, X-Plugin-Version pins one, X-Plugin-Key makes it sticky).
        pins = request.headers
        served: list[str] = []
        version: str | None = None
        metrics.in_flight += 1
        started = time.perf_counter()
        try:
            result = await host.call(
                name,
                args,
                timeout=timeout,
                version=pins.get("x-plugin-version"),
                key=pins.get("x-plugin-key"),
                served=served,
            )
        except PluginNotFound as exc:
            return refuse("not_found", 404, "PluginNotFound", str(exc))
        except VersionNotLive as exc:
            metrics.count_call("bad_request")
            live, held = list(exc.live), list(exc.held)
            return _error(409, "VersionNotLive", str(exc), live=live, held=held), None
        except PluginTimeout as exc:
            elapsed = time.perf_counter() - started
            metrics.count_call("timeout", elapsed, plugin=name, version=exc.version)
            return _error(504, "PluginTimeout", str(exc), version=exc.version), exc.version
        except PluginBusy as exc:
            metrics.count_call("busy", plugin=name, version=exc.version)
            return _error(503, "PluginBusy", str(exc), version=exc.version), exc.version
        except HostClosed as exc:
            return refuse("closed", 503, "HostClosed", str(exc))
        except PluginFailed as exc:
            elapsed = time.perf_counter() - started
            metrics.count_call("failed", elapsed, plugin=name, version=exc.version)
            extra: dict[str, Any] = {"version": exc.version}
            if debug:
                extra["traceback"] = exc.traceback
            return _error(500, exc.error_type, exc.error_message, **extra), exc.version
        except Exception as exc:  # RequireDepthExceeded and the like: still the call's fault
            version = served[0] if served else None
            elapsed = time.perf_counter() - started
            metrics.count_call("failed", elapsed, plugin=name, version=version)
            extra = {"traceback": await anyio.to_thread.run_sync(_format, exc)} if debug else {}
            return _error(500, type(exc).__name__, str(exc), **extra), version
        finally:
            metrics.in_flight -= 1
        version = served[0]
        metrics.count_call("ok", time.perf_counter() - started, plugin=name, version=version)
        budget = timeout if timeout is not None else host.timeouts.call
        try:
            content = await encode_result(
                {"result": result, "version": version},
                max_result_bytes,
                None if budget is None else started + budget,
            )
        except ResultTooLarge as exc:
            _log.warning(
                "http.result_too_large",
                plugin=name,
                version=version,
                size=exc.size,
                limit=max_result_bytes,
            )
            return _error(
                500,
                "ResultTooLarge",
                f"plugin {version or name} returned a result of over {max_result_bytes} bytes "
                f"as JSON (stopped encoding at {exc.size} bytes)",
                version=version,
                size=exc.size,
                limit=max_result_bytes,
            ), version
        except ResultEncodingTimeout as exc:
            _log.warning("http.result_encoding_timeout", plugin=name, version=version)
            return _error(
                504, "PluginTimeout", f"plugin {version or name}: {exc}", version=version
            ), version
        except (TypeError, ValueError, RecursionError) as exc:
            _log.warning("http.result_not_json", plugin=name, version=version, error=str(exc))
            return _error(
                500,
                "ResultNotSerializable",
                f"plugin {version or name} returned a result that is not JSON-serialisable: {exc}",
                version=version,
            ), version
        return content, version

    async def list_functions(request: Request) -> Response:
        return JSONResponse({"functions": [info.as_dict() for info in host.plugins()]})

    async def get_function(request: Request) -> Response:
        name = request.path_params["name"]
        info = host.plugin(name)
        if info is None:
            return _error(404, "PluginNotFound", f"plugin {name!r} is not known to this host")
        return JSONResponse(info.as_dict())

    async def fleet(request: Request) -> Response:
        try:
            view = await host_fleet_status(host, request.query_params.get("name"))
        except PyMongoError as exc:
            return _error(503, "FleetUnavailable", f"cannot read the hosts collection: {exc}")
        return JSONResponse(view.as_dict())

    async def console_file(request: Request) -> Response:
        found = await static_file(request.path_params.get("file", "index.html"))
        if found is None:
            return _error(404, "NotFound", f"no console file {request.url.path[:200]!r}")
        return Response(found[0], media_type=found[1], headers=SECURITY_HEADERS)

    async def console_config(request: Request) -> Response:
        return JSONResponse({"auth_required": auth_token is not None}, headers=SECURITY_HEADERS)

    async def stats(request: Request) -> Response:
        return JSONResponse(rates.as_dict([info.name for info in host.plugins()]))

    async def events(request: Request) -> Response:
        params = request.query_params
        last_id = request.headers.get("last-event-id") or params.get("last_id")
        backlog = params.get("backlog", "0")
        if not backlog.isdigit() or (last_id is not None and not last_id.isdigit()):
            return _error(
                422, "BadRequest", "backlog and Last-Event-ID must be whole numbers (0 or more)"
            )
        client = request.client
        return hub.response(
            prefixes=params.getlist("event"),
            backlog=min(int(backlog), RECENT),
            last_id=None if last_id is None else int(last_id),
            peer=f"{client.host}:{client.port}" if client else "",
        )

    async def triggers(request: Request) -> Response:
        try:
            rows = await trigger_status(
                host.database,
                collection=host.collection_name,
                plugin=request.query_params.get("plugin"),
            )
        except PyMongoError as exc:
            return _error(503, "TriggersUnavailable", f"cannot read the trigger state: {exc}")
        body = to_json({"triggers": [row.as_dict() for row in rows]})
        return Response(body, media_type="application/json")

    async def rollout(request: Request) -> Response:
        if not _is_json(request.headers.get("content-type")):
            return _error(
                415, "UnsupportedMediaType", "a rollout action's body must be application/json"
            )
        try:
            body = parse_json(await _read_body(request, max_body_bytes))
            reply = await rollout_action(
                host.database,
                request.path_params["name"],
                body,
                collection=host.collection_name,
                by="console",
            )
        except _BodyTooLarge:
            return _error(413, "BodyTooLarge", f"the body is larger than {max_body_bytes} bytes")
        except ClientDisconnect:
            _client_disconnected(request.url.path)
            return Response(status_code=499)  # sent to no one: Uvicorn drops it
        except ValueError as exc:
            return _error(422, "BadRequest", f"the request body is not valid JSON: {exc}")
        except ActionError as exc:
            return _error(exc.status, exc.kind, exc.message)
        except PyMongoError as exc:
            return _error(503, "RolloutUnavailable", f"cannot update the record: {exc}")
        _log.info("http.rollout_action", **reply)
        return Response(to_json(reply), media_type="application/json")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ready = bool(host.is_ready)
        is_draining = draining()
        ok = ready and not is_draining
        return JSONResponse(
            {"ready": ok, "loaded": ready, "draining": is_draining}, 200 if ok else 503
        )

    async def metrics_endpoint(request: Request) -> Response:
        process = await anyio.to_thread.run_sync(metrics.render_process)
        return Response(metrics.render_host() + process, media_type=CONTENT_TYPE)

    app = _Api(
        call,
        debug=False,  # our own 500s say what failed; Starlette's debug page is not an API
        routes=[
            Route("/functions/{name}/call", _RawEndpoint(call), methods=["POST"]),
            Route("/functions", list_functions, methods=["GET"]),
            Route("/functions/{name}", get_function, methods=["GET"]),
            Route("/fleet", fleet, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/", console_file, methods=["GET"]),
            Route("/console", console_file, methods=["GET"]),
            Route(CONFIG_PATH, console_config, methods=["GET"]),
            Route("/console/{file}", console_file, methods=["GET"]),
            Route("/stats", stats, methods=["GET"]),
            Route("/events", events, methods=["GET"]),
            Route("/triggers", triggers, methods=["GET"]),
            Route("/functions/{name}/rollout", rollout, methods=["POST"]),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_exception},
    )
    if auth_token is not None:
        app.add_middleware(
            BearerAuth,
            token=auth_token,
            open_paths=[*(f"/{name}" for name in open_endpoints), *CONSOLE_PATHS],
            query_token_paths=["/events"],
        )
    if allowed_hosts is not None or allowed_origins:
        # Added last, so it runs first: a foreign page learns nothing, not even a 401.
        app.add_middleware(SiteGuard, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins)
    app.state = State(state)  # app.state.draining = True sets state["draining"]
    app.state.metrics = metrics
    app.state.rates = rates
    app.state.events = hub
    app.state.host = host
    return app


def _status(reply: _Reply) -> int:
    return 200 if isinstance(reply, bytes) else reply.status_code


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))
