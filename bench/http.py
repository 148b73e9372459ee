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
  JSON lines to stdout, drained), to show what the access log costs;
* ``daemon_otel`` — the echo plugin with ``--otel`` (spans exported to stdout, drained).
  Without ``--otel`` (every other daemon figure) tracing costs one ``is None`` test per
  call and OpenTelemetry is not even imported.

Each point is req/s and wrk's latency p50/p99 at 1, 32 and 256 connections (one wrk
thread: the machine has two cores, and wrk's own CPU competes with the server's), and the
CPU time the server process used per request (``/proc/<pid>/stat``, every thread: on a
busy machine this moves much less than req/s does). All the
servers run at once, idle but for the one being measured; the points take turns (baseline,
daemon, baseline, daemon...) and each is repeated, the best run kept. The daemon is reported
as a ratio of the baseline measured at the same connection count. The ``pure`` stack
(``PLUGIN_HOST_LOOP=asyncio PLUGIN_HOST_HTTP=h11``) is measured too when the ``speed``
extra is installed, so both stacks have figures.

``python -m bench.http serve-baseline`` runs the baseline server alone (it prints one JSON
line with its port).
"""

from __future__ import annotations

import contextlib
import importlib.util
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
ECHO_CALL = "/functions/echo/call"

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
def _process(
    cmd: Sequence[str], event: str, env: dict[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    proc = subprocess.Popen(
        list(cmd),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        yield {**read_event(proc, event, START_TIMEOUT), "pid": proc.pid}
    finally:
        stop_process(proc, 30)


@contextlib.contextmanager
def baseline_server(env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """The bare Starlette echo app on Uvicorn in a subprocess; yields its ready event
    (``url``: the echo URL; ``loop`` and ``http_parser``: what serves)."""
    cmd = [sys.executable, "-m", "bench.http", "serve-baseline"]
    with _process(cmd, "baseline.ready", env) as ready:
        yield {**ready, "url": f"http://127.0.0.1:{ready['port']}/echo"}


@contextlib.contextmanager
def daemon_server(
    uri: str, db_name: str, *extra: str, env: dict[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    """``plugin-host run`` on ``uri``/``db_name`` in a subprocess; yields its ready event
    (``http``: its base URL; ``loop`` and ``http_parser``: what serves)."""
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
    with _process(cmd, "daemon.ready", env) as ready:
        yield ready


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, every thread) process ``pid`` has used; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(
    binary: str, url: str, connections: int, seconds: float, pid: int | None = None
) -> dict[str, Any]:
    """One wrk run of POSTs of :data:`BODY` to ``url``: req/s, p50/p99 in ms, errors, and
    (given the server's ``pid``) the server's CPU time per request."""
    cpu_before = cpu_seconds(pid) if pid is not None else None
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
    cpu_after = cpu_seconds(pid) if pid is not None else None
    line = done.stdout.strip().splitlines()[-1]
    raw = json.loads(line)
    cpu_us = None
    if cpu_before is not None and cpu_after is not None and raw["requests"]:
        cpu_us = (cpu_after - cpu_before) * 1e6 / raw["requests"]
    return {
        "cpu_us_per_req": cpu_us,
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


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the most req/s (timeit's convention: on a shared machine the slower runs
    measure the neighbours); every run's req/s is kept alongside, and the least server CPU
    per request of all the runs (the same convention)."""
    best = dict(max(runs, key=lambda r: r["req_per_s"]))
    best["runs_req_per_s"] = [r["req_per_s"] for r in runs]
    cpu = [r["cpu_us_per_req"] for r in runs if r.get("cpu_us_per_req") is not None]
    best["cpu_us_per_req"] = min(cpu) if cpu else None
    return best


def _interleaved(
    binary: str,
    urls: dict[str, tuple[str, int]],
    conns: Sequence[int],
    seconds: float,
    repeats: int,
) -> dict[str, dict[str, Any]]:
    """Each (URL, server pid) at each connection count, ``repeats`` times, taking turns point
    by point (so that a burst of load from the neighbours hits every server alike); best run
    each."""
    for url, _ in urls.values():
        wrk(binary, url, 8, 1)  # warm-up: caches, specialised bytecode, pools
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {k: {} for k in urls}
    for c in conns:
        for _ in range(repeats):
            for key, (url, pid) in urls.items():
                runs[key].setdefault(str(c), []).append(wrk(binary, url, c, seconds, pid))
    return {key: {c: _best(r) for c, r in by_conns.items()} for key, by_conns in runs.items()}


def _ratios(ours: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for conns, point in ours.items():
        ref = base.get(conns)
        if ref is None:
            continue
        ours_cpu, ref_cpu = point.get("cpu_us_per_req"), ref.get("cpu_us_per_req")
        out[conns] = {
            "req_per_s": point["req_per_s"] / ref["req_per_s"] if ref["req_per_s"] else None,
            "p99_delta_ms": point["p99_ms"] - ref["p99_ms"],
            # Less disturbed by the neighbours than req/s: CPU the server used per request.
            "cpu_ratio": ours_cpu / ref_cpu if ours_cpu and ref_cpu else None,
        }
    return out


OTEL = {"OTEL_TRACES_EXPORTER": "console"}
"""``--otel`` exports its spans to stdout (drained): the cost of making and exporting them."""

PURE = {"PLUGIN_HOST_LOOP": "asyncio", "PLUGIN_HOST_HTTP": "h11"}
"""The environment that selects the pure-Python fallback (asyncio loop, h11 parser)."""


def _speed_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("uvloop", "httptools"))


async def run(target: Target, cfg: Config) -> dict[str, Any]:
    """The HTTP group: baseline and daemon variants, req/s and latency, ratios."""
    binary = ensure_wrk()
    if binary is None:
        return {"skipped": "wrk is not installed and could not be installed with apt-get"}
    seconds, repeats = (2.0, 2) if cfg.quick else (5.0, 3)
    side = (32,) if cfg.quick else CONNECTIONS
    results: dict[str, Any] = {
        "seconds": seconds,
        "repeats": repeats,
        "body": BODY,
        "wrk_threads": 1,
    }
    async with database(target.uri, "http") as db:
        await db.bench_items.insert_one({"_id": 1, "name": "one", "tags": ["a", "b"]})
        for name, source in (("echo", ECHO), ("sync_echo", SYNC_ECHO), ("find", FIND)):
            await db.functions.insert_one(record(name, source, 1))
        stacks: list[tuple[str, dict[str, str]]] = [("default", {})]
        if _speed_installed():
            stacks.append(("pure", PURE))
        for label, env in stacks:
            conns = CONNECTIONS if label == "default" else side
            out: dict[str, Any] = {}
            with (
                baseline_server(env) as base,
                daemon_server(target.uri, db.name, env=env) as ready,
                daemon_server(target.uri, db.name, "--access-log", env=env) as logged,
                daemon_server(target.uri, db.name, "--otel", env={**env, **OTEL}) as traced,
            ):
                out["stack"] = {"loop": base["loop"], "http_parser": base["http_parser"]}
                out["daemon_stack"] = {"loop": ready["loop"], "http_parser": ready["http_parser"]}
                functions = f"{ready['http']}/functions"
                main = {
                    "baseline": (base["url"], base["pid"]),
                    "daemon": (f"{functions}/echo/call", ready["pid"]),
                }
                out.update(_interleaved(binary, main, conns, seconds, repeats))
                if label == "default":
                    others = {
                        "daemon_sync": (f"{functions}/sync_echo/call", ready["pid"]),
                        "daemon_find": (f"{functions}/find/call", ready["pid"]),
                    }
                    out.update(_interleaved(binary, others, side, seconds, repeats))
                    observed = {
                        "daemon_access_log": (
                            f"{logged['http']}/functions/echo/call",
                            logged["pid"],
                        ),
                        "daemon_otel": (f"{traced['http']}/functions/echo/call", traced["pid"]),
                    }
                    out.update(_interleaved(binary, observed, (32,), seconds, repeats))
            out["ratio"] = _ratios(out["daemon"], out["baseline"])
            results[label] = out
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
    import anyio
    import uvicorn

    from host.daemon import event_loop_options, http_protocol, serving_stack, uvicorn_options

    # The reference binds the way asyncio itself does (protocol IPPROTO_TCP, so accepted
    # connections get TCP_NODELAY), independently of the daemon's own helper.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    sock.setblocking(False)
    config = uvicorn.Config(_baseline_app(), http=http_protocol(), **uvicorn_options())
    server = uvicorn.Server(config)

    async def main() -> None:
        ready = {"event": "baseline.ready", "port": sock.getsockname()[1], **serving_stack()}
        print(json.dumps(ready), flush=True)
        await server.serve(sockets=[sock])

    anyio.run(main, backend_options=event_loop_options())


if __name__ == "__main__":
    if sys.argv[1:] == ["serve-baseline"]:
        serve_baseline()
    else:
        sys.exit("usage: python -m bench.http serve-baseline")
