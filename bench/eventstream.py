"""Do event-stream clients slow calls down? ``python -m bench.eventstream [--clients 20]``.

One ``plugin-host run`` daemon on the embedded server (a subprocess). wrk POSTs (32
connections, one thread) to two plugins: ``fails`` raises, so every call emits
``call.failed`` (with its traceback): the stream's worst case, one event per call for every
client; ``echo`` returns, and emits nothing. Each is measured with no client on
``GET /events`` and with ``--clients`` of them (``curl -sN`` processes, which cost the
machine little CPU), taking turns, best of ``--repeats`` (timeit's convention on a shared
machine). Prints one JSON object: req/s and p99 per case, and the ratios with/without.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anyio
from pymongo import AsyncMongoClient

from host.publish import publish

from .common import embedded_server, fresh_name, machine_info
from .http import ECHO, _best, daemon_server, ensure_wrk, wrk

FAILS = "def main(ctx, args):\n    raise ValueError('no')\n"


@contextlib.contextmanager
def listeners(base: str, n: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``n`` curl processes following ``base``/events (all events), killed at the end."""
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("curl is needed to hold the event streams open")
    procs = [
        subprocess.Popen(
            [curl, "-sN", f"{base}/events"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(n)
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def _publish(uri: str, db_name: str) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    try:
        await publish(client[db_name], "echo", ECHO)
        await publish(client[db_name], "fails", FAILS)
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print it as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    binary = ensure_wrk()
    if binary is None:
        print(json.dumps({"skipped": "wrk is not installed"}))
        return 0
    db_name = fresh_name("bench_events")
    with embedded_server("subprocess") as uri:
        anyio.run(_publish, uri, db_name)
        with daemon_server(uri, db_name) as ready:
            base = str(ready["http"])
            runs: dict[str, list[dict[str, Any]]] = {}
            for plugin in ("fails", "echo"):
                wrk(binary, f"{base}/functions/{plugin}/call", 8, 1)  # warm-up
            for _ in range(args.repeats):
                for plugin in ("fails", "echo"):
                    url = f"{base}/functions/{plugin}/call"
                    runs.setdefault(f"{plugin}/0", []).append(
                        wrk(binary, url, args.connections, args.seconds)
                    )
                    with listeners(base, args.clients):
                        runs.setdefault(f"{plugin}/{args.clients}", []).append(
                            wrk(binary, url, args.connections, args.seconds)
                        )
    best = {key: _best(r) for key, r in runs.items()}
    out: dict[str, Any] = {"machine": machine_info(), "clients": args.clients, "runs": best}
    for plugin in ("fails", "echo"):
        without, with_ = best[f"{plugin}/0"], best[f"{plugin}/{args.clients}"]
        out[f"{plugin}_req_per_s_ratio"] = round(with_["req_per_s"] / without["req_per_s"], 3)
        out[f"{plugin}_p99_ratio"] = round(with_["p99_ms"] / without["p99_ms"], 3)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
