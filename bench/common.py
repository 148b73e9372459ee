"""Shared pieces of the benchmark suite: servers, machine info, statistics, plugin sources.

Where the server runs decides what a figure means:

* ``thread`` — :class:`~host.embedded.EmbeddedMongoThread`: the embedded server runs on its
  own event loop in a background thread of the benchmark process, so it shares the GIL
  with the host: its CPU work and the host's take turns, even on several cores.
* ``process`` — ``plugin-host embedded-mongo --port 0`` as a subprocess: the server has its
  own interpreter and GIL, so on 2 cores the host and the server really run side by side,
  as they do against a real ``mongod``.
* ``uri`` — ``MONGODB_URI``: a real deployment (a replica set), measured as it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import structlog
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from host.embedded import EmbeddedMongoThread

Doc = dict[str, Any]
REPO = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Config:
    """How much work each benchmark does (``--quick`` or full).

    Attributes:
        quick: The ~1-minute variant.
        latency_updates: Sequential updates for change-to-live (ours and polling).
        issue_updates: Updates for the host-core issue's change-to-live figure.
        call_batch: Calls per timed batch in the throughput benchmark.
        call_repeats: Timed batches per variant (the median is reported).
        seed_seconds: How long the seed-style baseline is timed per variant.
        cold_counts: Plugin counts for cold start.
        reload_updates: Sequential updates for reload throughput.
        swap_seconds: Duration of each swap-under-load run.
        swap_callers: Concurrent caller counts for swap-under-load.
        load_callers: Spinning caller counts for change-to-live under load.
        load_updates: Sequential updates at each ``load_callers`` level.
    """

    quick: bool
    latency_updates: int
    issue_updates: int
    call_batch: int
    call_repeats: int
    seed_seconds: float
    cold_counts: tuple[int, ...]
    reload_updates: int
    swap_seconds: float
    swap_callers: tuple[int, ...]
    load_callers: tuple[int, ...]
    load_updates: int

    @classmethod
    def make(cls, quick: bool) -> Config:
        """The quick (~1 min) or the full (< 10 min on 2 cores) configuration."""
        if quick:
            return cls(
                True, 100, 200, 20_000, 3, 1.0, (1_000,), 200, 10.0, (50, 200), (0, 50, 200), 50
            )
        return cls(
            False, 500, 200, 50_000, 7, 3.0, (1_000, 10_000), 1_000, 30.0, (50, 200),
            (0, 50, 200), 100,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Target:
    """One deployment the suite runs against.

    Attributes:
        label: Short name used in tables and JSON (``embedded``, ``mongodb``).
        uri: Its connection string.
        server: ``thread``, ``process`` or ``uri`` (see the module docstring).
    """

    label: str
    uri: str
    server: str

    @property
    def embedded(self) -> bool:
        """Whether this is the embedded server (goals are stated for it)."""
        return self.server != "uri"

    @property
    def description(self) -> str:
        """One line for the report."""
        return {
            "thread": "embedded server in a background thread (shares the host's GIL)",
            "process": "embedded server in a subprocess (`plugin-host embedded-mongo`)",
            "uri": "MONGODB_URI (a real replica set)",
        }[self.server]


@contextlib.contextmanager
def embedded_server(mode: str) -> Iterator[str]:
    """Run the embedded server in a thread or a subprocess; yield its URI."""
    if mode == "thread":
        with EmbeddedMongoThread(port=0) as server:
            yield server.uri
        return
    cmd = [
        sys.executable,
        "-m",
        "host.cli",
        "embedded-mongo",
        "--port",
        "0",
        "--log-format",
        "json",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        uri = str(read_event(proc, "embedded.started", SERVER_START_TIMEOUT)["uri"])
        yield uri
    finally:
        stop_process(proc, 10)


def stop_process(proc: subprocess.Popen[str], grace: float) -> None:
    """SIGTERM ``proc``; SIGKILL it if it has not exited after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _drain(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    for _ in proc.stdout:
        pass


def read_event(proc: subprocess.Popen[str], event: str, timeout: float) -> dict[str, Any]:
    """The first JSON log line of ``proc`` naming ``event``; then its output is drained in a
    thread, so a full pipe can never block it.

    Raises:
        RuntimeError: The process exited, or did not log ``event`` within ``timeout``.
    """
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{proc.args!r} exited early (status {proc.poll()})")
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict) and data.get("event") == event:
                threading.Thread(target=_drain, args=(proc,), name="drain", daemon=True).start()
                return data
    raise RuntimeError(f"{proc.args!r} did not log {event} in time")


def configure_logging() -> None:
    """Log as the daemon does (JSON lines, info level), but into /dev/null.

    Reload events are part of the reload path, so their rendering cost stays in the
    figures; only the output is discarded so it cannot mix with the report.
    """
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=devnull),
        cache_logger_on_first_use=True,
    )


def git_commit() -> str:
    """The current commit, with ``+dirty`` when the work tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def cpu_model() -> str:
    """The CPU model name, where the platform tells it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def summarize(samples: Sequence[float]) -> dict[str, float | int]:
    """Count, mean, p50, p90, p99 and max of ``samples`` (nearest-rank percentiles)."""
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)

    def pct(p: float) -> float:
        rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
        return ordered[rank - 1]

    return {
        "n": len(ordered),
        "mean": statistics.fmean(ordered),
        "p50": statistics.median(ordered),
        "p90": pct(90),
        "p99": pct(99),
        "max": ordered[-1],
        "min": ordered[0],
    }


def rss_bytes() -> int:
    """Resident set size of this process."""
    return int(psutil.Process().memory_info().rss)


def fresh_name(prefix: str) -> str:
    """A database name unique to this run."""
    return f"bench_{prefix}_{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def database(
    uri: str, prefix: str, listeners: Sequence[Any] = ()
) -> AsyncIterator[AsyncDatabase[Doc]]:
    """A fresh database on ``uri``, dropped afterwards, and its client closed.

    ``listeners``: PyMongo event listeners for the client (command monitoring).
    """
    client: AsyncMongoClient[Doc] = AsyncMongoClient(
        uri, serverSelectionTimeoutMS=10_000, event_listeners=list(listeners)
    )
    name = fresh_name(prefix)
    try:
        await client.admin.command("ping")
        yield client[name]
    finally:
        with contextlib.suppress(Exception):
            await client.drop_database(name)
        await client.close()


def async_source(value: int, *, pad: str = "") -> str:
    """An async plugin returning ``value`` (``pad``: extra top-level text)."""
    return f"{pad}async def main(ctx, args):\n    return {value}\n"


def sync_source(value: int) -> str:
    """A sync plugin returning ``value``."""
    return f"def main(ctx, args):\n    return {value}\n"


def record(name: str, source: str, revision: int, **extra: Any) -> Doc:
    """A plugin record as our tools write it."""
    now = datetime.now(UTC)
    return {
        "_id": name,
        "source": source,
        "revision": revision,
        "createdAt": now,
        "updatedAt": now,
        **extra,
    }


def update(source: str, revision: int) -> Doc:
    """The ``$set`` our publish tool sends for a new revision."""
    return {"$set": {"source": source, "revision": revision, "updatedAt": datetime.now(UTC)}}
