"""Save-to-serving latency of ``plugin-host dev``: from writing a plugin file to the HTTP API
answering with the new version.

Starts ``plugin-host dev`` as a subprocess (embedded MongoDB, free ports, a temporary copy
of ``plugins_examples/``), then rewrites ``greet.py`` N times; after each write it polls
``POST /functions/greet/call`` until the reply carries the new text. The measured path is
the real one: file save → OS notification → publish (record write) → change stream →
compile → swap → HTTP.

    .venv/bin/python -m bench.devsync --runs 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _post(url: str, body: Any) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as reply:
        return json.loads(reply.read())


def _wait_ready(base: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"plugin-host dev exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=1) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise SystemExit("plugin-host dev did not become ready within 60 s")


def main() -> None:
    """Run the benchmark and print latency statistics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="file saves to measure")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="devsync-") as tmp:
        work = Path(tmp)
        plugins = work / "plugins"
        shutil.copytree(ROOT / "plugins_examples", plugins)
        http_port = _free_port()
        base = f"http://127.0.0.1:{http_port}"
        log = (work / "dev.log").open("wb")
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "host.cli", "dev",
                "--plugins-dir", str(plugins),
                "--data-dir", str(work / "data"),
                "--mongo-port", str(_free_port()),
                "--http", f"127.0.0.1:{http_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=work,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            _wait_ready(base, proc, time.monotonic() + 60)
            greet = plugins / "greet.py"
            template = greet.read_text()
            args = {"firstName": "Blain", "lastName": "Smith"}
            samples: list[float] = []
            for run in range(options.runs):
                marker = f"Hello #{run}"
                started = time.perf_counter()
                greet.write_text(template.replace("Hello there", marker))
                while True:
                    result = _post(f"{base}/functions/greet/call", args)["result"]
                    if result.startswith(marker):
                        break
                    if time.perf_counter() - started > 10:
                        raise SystemExit(f"save #{run} did not go live within 10 s")
                samples.append((time.perf_counter() - started) * 1000.0)
                time.sleep(0.1)  # let the retired version's teardown pass: runs stay independent
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            log.close()

    samples.sort()
    p95 = samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]
    print(
        f"save-to-serving over {len(samples)} saves: median {statistics.median(samples):.1f} ms, "
        f"p95 {p95:.1f} ms, min {samples[0]:.1f} ms, max {samples[-1]:.1f} ms"
    )


if __name__ == "__main__":
    main()
