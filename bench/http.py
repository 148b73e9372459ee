"""The HTTP call path under a real load generator: the daemon against a bare Uvicorn app.

Both servers are separate processes, measured in the same run with ``wrk`` (Debian's
package; the bench bootstrap installs it with ``apt-get`` when it can, and the group is
skipped with the reason when it cannot be had):

* ``baseline`` — a bare Starlette echo app (``POST /echo`` returns the JSON body it got)
  on Uvicorn, served exactly as the daemon serves (:func:`host.daemon.uvicorn_options`:
  same event loop, same HTTP parser, same listening-socket helper);
* ``daemon`` — ``plugin-host run`` on the target deployment with an echo plugin
  (``async def main(ctx, args): return args``), the same JSON body;
* ``daemon_find`` — a plugin doing one ``ctx.db`` ``find_one`` per call;
* ``daemon_sync`` — the echo plugin as a sync ``def main`` (runs in a worker thread);
* ``daemon_access_log`` — the echo plugin with ``--access-log`` (one event per call, as
  JSON lines into a file), to show what the access log costs.

Each point is req/s and wrk's latency p50/p99 at 1, 32 and 256 connections (one wrk
thread: the machine has two cores, and wrk's own CPU competes with the server's). The
daemon is reported as a ratio of the baseline measured at the same connection count.

``python -m bench.http serve-baseline`` runs the baseline server alone (it prints one JSON
line with its port).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

from .common import REPO, Config, Target, database, read_event, record, stop_process

CONNECTIONS = (1, 32, 256)
BODY = json.dumps({"firstName": "Ada", "lastName": "Lovelace", "n": [1, 2, 3]})
ECHO = "async def main(ctx, args):\n    return args\n"
SYNC_ECHO = "def main(ctx, args):\n    return args\n"
FIND = (
    "async def main(ctx, args):\n"
    "    return await ctx.db.bench_items.find_one({'_id': 1}, {'_id': 0})\n"
)
START_TIMEOUT = 60.0

# wrk prints this JSON line at the end (latency in microseconds).
_LUA = """
wrk.method = "POST"
wrk.body = %s
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, "mean_us": %%f, ' ..
    '"max_us": %%d, "errors": %%d, "non_2xx": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, latency.max, e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def wrk_path() -> str | None:
    """The ``wrk`` binary, or None when it is not installed."""
    return shutil.which("wrk")


def ensure_wrk() -> str | None:
    """``wrk``, installed with ``apt-get`` when missing and we may (root); None if not had.

    Returns:
        The path to ``wrk``, or None (the caller reports why it skipped).
    """
    found = wrk_path()
    if found or os.environ.get("BENCH_NO_APT") or shutil.which("apt-get") is None:
        return found
    if os.geteuid() != 0:
        return None
    print("[bench] installing wrk with apt-get ...", file=sys.stderr, flush=True)
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 and cmd[1] == "install":
            return None
    return wrk_path()


@contextlib.contextmanager
def _process(cmd: Sequence[str], event: str) -> Iterator[dict[str, Any]]:
    proc = subprocess.Popen(
        list(cmd), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        yield read_event(proc, event, START_TIMEOUT)
    finally:
        stop_process(proc, 30)


@contextlib.contextmanager
def baseline_server() -> Iterator[str]:
    """The bare Starlette echo app on Uvicorn in a subprocess; yields its echo URL."""
    cmd = [sys.executable, "-m", "bench.http", "serve-baseline"]
    with _process(cmd, "baseline.ready") as ready:
        yield f"http://127.0.0.1:{ready['port']}/echo"


@contextlib.contextmanager
def daemon_server(uri: str, db_name: str, *extra: str) -> Iterator[str]:
    """``plugin-host run`` on ``uri``/``db_name`` in a subprocess; yields its base URL."""
    cmd = [
        sys.executable,
        "-m",
        "host.cli",
        "run",
        "--mongodb-uri",
        uri,
        "--database",
        db_name,
        "--http",
        "127.0.0.1:0",
        "--log-format",
        "json",
        *extra,
    ]
    with _process(cmd, "daemon.ready") as ready:
        yield str(ready["http"])


def wrk(binary: str, url: str, connections: int, seconds: float) -> dict[str, Any]:
    """One wrk run of POSTs of :data:`BODY` to ``url``: req/s, p50/p99 in ms, errors."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_LUA % json.dumps(BODY))
    try:
        done = subprocess.run(
            [
                binary,
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        os.unlink(script.name)
    line = done.stdout.strip().splitlines()[-1]
    raw = json.loads(line)
    return {
        "connections": connections,
        "requests": raw["requests"],
        "req_per_s": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "mean_ms": raw["mean_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "errors": raw["errors"],
        "non_2xx": raw["non_2xx"],
    }


def _measure(binary: str, url: str, conns: Sequence[int], seconds: float) -> dict[str, Any]:
    wrk(binary, url, 8, 1)  # warm-up: caches, specialised bytecode, the connection pool
    return {str(c): wrk(binary, url, c, seconds) for c in conns}


def stack() -> dict[str, str]:
    """Which event loop and HTTP parser Uvicorn's ``auto`` picks in this environment."""
    from host.daemon import uvicorn_options

    options = uvicorn_options()
    loop, parser = options.get("loop", "auto"), options.get("http", "auto")
    if loop == "auto":
        loop = "uvloop" if _importable("uvloop") else "asyncio"
    if parser == "auto":
        parser = "httptools" if _importable("httptools") else "h11"
    return {"loop": str(loop), "http": str(parser)}


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _ratios(ours: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for conns, point in ours.items():
        ref = base.get(conns)
        if ref is None:
            continue
        out[conns] = {
            "req_per_s": point["req_per_s"] / ref["req_per_s"] if ref["req_per_s"] else None,
            "p99_delta_ms": point["p99_ms"] - ref["p99_ms"],
        }
    return out


async def run(target: Target, cfg: Config) -> dict[str, Any]:
    """The HTTP group: baseline and daemon variants, req/s and latency, ratios."""
    binary = ensure_wrk()
    if binary is None:
        return {"skipped": "wrk is not installed and could not be installed with apt-get"}
    seconds = 3.0 if cfg.quick else 10.0
    side_conns = (32,) if cfg.quick else CONNECTIONS
    results: dict[str, Any] = {"stack": stack(), "seconds": seconds, "body": BODY}
    async with database(target.uri, "http") as db:
        await db.bench_items.insert_one({"_id": 1, "name": "one", "tags": ["a", "b"]})
        for name, source in (("echo", ECHO), ("sync_echo", SYNC_ECHO), ("find", FIND)):
            await db.functions.insert_one(record(name, source, 1))
        # The daemons and the baseline take turns so that neighbours' load hits all alike.
        with baseline_server() as url:
            results["baseline"] = _measure(binary, url, CONNECTIONS, seconds)
        with daemon_server(target.uri, db.name) as base:
            results["daemon"] = _measure(
                binary, f"{base}/functions/echo/call", CONNECTIONS, seconds
            )
            results["daemon_sync"] = _measure(
                binary, f"{base}/functions/sync_echo/call", side_conns, seconds
            )
            results["daemon_find"] = _measure(
                binary, f"{base}/functions/find/call", side_conns, seconds
            )
        with daemon_server(target.uri, db.name, "--access-log") as base:
            results["daemon_access_log"] = _measure(
                binary, f"{base}/functions/echo/call", (32,), seconds
            )
    results["ratio"] = _ratios(results["daemon"], results["baseline"])
    return results


# -- the baseline server ---------------------------------------------------------------------


def _baseline_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def echo(request: Request) -> Response:
        body = json.loads(await request.body())
        return Response(json.dumps({"result": body}), media_type="application/json")

    return Starlette(routes=[Route("/echo", echo, methods=["POST"])])


def serve_baseline() -> None:
    """Serve the baseline app on a free loopback port until SIGTERM; print the port first."""
    import asyncio

    import uvicorn

    from host.daemon import uvicorn_options

    # The reference binds the way asyncio itself does (protocol IPPROTO_TCP, so accepted
    # connections get TCP_NODELAY), independently of the daemon's own helper.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    sock.setblocking(False)
    config = uvicorn.Config(_baseline_app(), **uvicorn_options())
    server = uvicorn.Server(config)
    print(json.dumps({"event": "baseline.ready", "port": sock.getsockname()[1]}), flush=True)
    asyncio.run(server.serve(sockets=[sock]))


if __name__ == "__main__":
    if sys.argv[1:] == ["serve-baseline"]:
        serve_baseline()
    else:
        sys.exit("usage: python -m bench.http serve-baseline")
