"""CLI start-up: what ``plugin-host --help``, ``keygen`` and ``call`` pay before they act.

Two figures per command, each the median of several fresh processes:

* ``wall_ms``: the whole process, from ``subprocess.run`` to exit (the user's wait);
* ``import_ms``: the sum of top-level imports, from ``python -X importtime``.

The baseline in the same run is ``python -c pass`` (the interpreter alone), so a busy
machine shows up in both.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any

from .common import Config, Target

COMMANDS: dict[str, list[str]] = {
    "python -c pass": ["-c", "pass"],
    "plugin-host --help": ["-m", "host.cli", "--help"],
    "plugin-host keygen --help": ["-m", "host.cli", "keygen", "--help"],
    "plugin-host call --help": ["-m", "host.cli", "call", "--help"],
    "import host (library)": ["-c", "import host"],
}


def _import_ms(stderr: str) -> float:
    """Sum of the cumulative times of top-level imports in ``-X importtime`` output."""
    total_us = 0
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:") :].split("|")
        if not name[1:].startswith(" "):  # depth 0 ("| name"); nested ones are indented
            total_us += int(cumulative)
    return total_us / 1000.0


def _once(args: list[str]) -> tuple[float, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *args], capture_output=True, text=True, check=True
    )
    return (time.perf_counter() - started) * 1000.0, _import_ms(done.stderr)


async def run(target: Target, cfg: Config) -> dict[str, Any]:
    """Measure each command in fresh processes (``target`` is unused: no server needed)."""
    del target
    rounds = 3 if cfg.quick else 9
    results: dict[str, Any] = {}
    for label, args in COMMANDS.items():
        samples = [_once(args) for _ in range(rounds)]
        results[label] = {
            "wall_ms": round(statistics.median(s[0] for s in samples), 1),
            "import_ms": round(statistics.median(s[1] for s in samples), 1),
            "rounds": rounds,
        }
    return results
