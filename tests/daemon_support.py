"""Daemon subprocesses for the tests: `plugin-host` as a real process, its output in files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from .support import wait_until


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Daemon:
    """A ``plugin-host`` subprocess whose output goes to files (a full pipe would block it)."""

    def __init__(self, tmp: Path, *args: str, cwd: Path | None = None) -> None:
        self.out = tmp / "stdout.log"
        self.err = tmp / "stderr.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PLUGIN_HOST_MONGODB_URI", None)
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "host.cli", *args],
                stdout=out,
                stderr=err,
                cwd=cwd or tmp,
                env=env,
            )

    @classmethod
    def run(cls, tmp: Path, mongo_uri: str, database: str, http: str, *args: str) -> Daemon:
        """``plugin-host run`` with JSON logs against ``mongo_uri``/``database``."""
        return cls(
            tmp,
            "run",
            "--mongodb-uri",
            mongo_uri,
            "--database",
            database,
            "--http",
            http,
            "--log-format",
            "json",
            *args,
        )

    def output(self) -> tuple[str, str]:
        """Everything written so far to stdout and stderr."""
        return self.out.read_text(), self.err.read_text()

    async def exit_code(self, timeout: float = 30.0) -> int:
        """Wait for the process to end; its exit code."""
        await wait_until(
            lambda: self.proc.poll() is not None,
            lambda: f"the daemon exits; output: {self.output()}",
            timeout=timeout,
            interval=0.05,
        )
        code = self.proc.returncode
        assert code is not None
        return code

    def stop(self) -> None:
        """Kill the process if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def wait_ready(client: httpx.AsyncClient, daemon: Daemon, timeout: float = 30.0) -> None:
    """Poll /readyz until it says 200 (within ``timeout`` seconds)."""

    async def ready() -> bool:
        assert daemon.proc.poll() is None, f"the daemon died: {daemon.output()}"
        try:
            return (await client.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_until(ready, "the daemon is ready", timeout=timeout, interval=0.05)
