"""Calling plugins from the shell: ``call``."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Annotated

import typer

from ._common import (
    _console,
    _errors,
    app,
    fail,
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
            raise typer.BadParameter(
                f"not valid JSON ({exc}); quote it for your shell, e.g. "
                '--args \'{"firstName": "Ada"}\'',
                param_hint="'--args'",
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
