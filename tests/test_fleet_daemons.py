"""The fleet with real processes: three `plugin-host run` daemons, `push --wait`, `status`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from host.fleet import hosts_collection_name
from host.fleetview import FleetStatus, fleet_status
from host.publish import publish

from .daemon_support import Daemon, free_port, wait_ready
from .support import status_writes_fail, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(300)]

Doc = dict[str, Any]
GOOD = "async def main(ctx, args):\n    return {value}\n"
BROKEN = "import plugin_host_no_such_module\n\n\nasync def main(ctx, args):\n    return 0\n"
# Short heartbeats so a killed host is out of the live count within a second.
FAST = ("--heartbeat", "0.2", "--host-ttl", "1.0")


async def cli(mongo_uri: str, database: str, *args: str, timeout: float = 60) -> Any:
    """Run ``plugin-host ARGS`` against the test database; the completed process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PLUGIN_HOST_MONGODB_URI", None)
    command = [sys.executable, "-m", "host.cli", *args]
    command += ["--mongodb-uri", mongo_uri, "--database", database]
    return await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=timeout, env=env
        )
    )


def write_plugin(tmp: Path, name: str, source: str) -> Path:
    """A plugin file to push."""
    path = tmp / f"{name}.py"
    path.write_text(source)
    return path


@contextlib.asynccontextmanager
async def fleet_of(
    n: int, tmp: Path, mongo_uri: str, db: AsyncDatabase[Doc], started: list[Daemon]
) -> AsyncIterator[list[tuple[Daemon, httpx.AsyncClient]]]:
    """``n`` daemons on ``db``, ready and reporting; with an HTTP client each."""
    out: list[tuple[Daemon, httpx.AsyncClient]] = []
    async with contextlib.AsyncExitStack() as stack:
        for i in range(n):
            folder = tmp / f"d{i}"
            folder.mkdir()
            port = free_port()
            daemon = Daemon.run(folder, mongo_uri, db.name, f"127.0.0.1:{port}", *FAST)
            started.append(daemon)
            client = await stack.enter_async_context(
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10)
            )
            out.append((daemon, client))
        for daemon, client in out:
            await wait_ready(client, daemon, timeout=180)  # several start at once
        await wait_until(
            lambda: _alive(db, n), f"{n} daemons report ready", timeout=30, interval=0.05
        )
        yield out


async def _alive(db: AsyncDatabase[Doc], n: int) -> FleetStatus | None:
    view = await fleet_status(db)
    live = [h for h in view.hosts if h.alive and h.ready]
    return view if len(live) == n else None


async def host_ids(db: AsyncDatabase[Doc]) -> dict[int, str]:
    """pid → host id of the hosts reporting now."""
    return {h.pid: h.id for h in (await fleet_status(db)).hosts if h.pid is not None}


async def test_three_daemons_converge_and_refuse(
    mongo_uri: str, db: AsyncDatabase[Doc], tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A good push converges (--wait exits 0); a bad one is refused by all three (exit 1)."""
    await publish(db, "greet", GOOD.format(value=1))
    async with fleet_of(3, tmp_path, mongo_uri, db, daemons) as fleet:
        ids = await host_ids(db)
        good = write_plugin(tmp_path, "greet", GOOD.format(value=2))
        done = await cli(
            mongo_uri, db.name, "push", "greet", str(good), "--wait", "--timeout", "30"
        )
        assert done.returncode == 0, done.stderr
        assert "converged in" in done.stdout and "3/3 hosts serving greet r2" in done.stdout
        for _, client in fleet:
            reply = (await client.post("/functions/greet/call")).json()
            assert reply["result"] == 2

        bad = write_plugin(tmp_path, "greet", BROKEN)
        refused = await cli(mongo_uri, db.name, "push", "greet", str(bad), "--wait")
        assert refused.returncode == 1, (refused.stdout, refused.stderr)
        for daemon, client in fleet:
            host_id = ids[daemon.proc.pid]
            assert f"host {host_id} refused greet r3 at stage import" in refused.stderr
            reply = (await client.post("/functions/greet/call")).json()
            assert reply["result"] == 2 and reply["version"].startswith("greet@r2:")

        shown = await cli(mongo_uri, db.name, "status", "greet", "--json")
        assert shown.returncode == 3, shown.stderr  # refused by all three: unhealthy
        assert shown.stderr.count("unhealthy: host ") == 3
        view = json.loads(shown.stdout)
        greet = view["plugins"]["greet"]
        assert (greet["revision"], greet["hosts_alive"], greet["hosts_serving"]) == (3, 3, 0)
        assert greet["converged"] is False
        assert {r["host"] for r in greet["rejected"]} == set(ids.values())
        assert {r["stage"] for r in greet["rejected"]} == {"import"}
        assert all(h["plugins"]["greet"]["revision"] == 2 for h in view["hosts"])
        plain = await cli(mongo_uri, db.name, "status")
        assert "greet r3: 0/3 hosts serving, NOT converged" in plain.stdout
        served = (await fleet[0][1].get("/fleet")).json()
        assert served["plugins"]["greet"]["rejected"] == greet["rejected"]


async def test_killed_host_drops_out_and_stopped_host_is_removed(
    mongo_uri: str, db: AsyncDatabase[Doc], tmp_path: Path, daemons: list[Daemon]
) -> None:
    """kill -9: out of the live count after its TTL, --wait ignores it; SIGTERM: doc removed."""
    await publish(db, "greet", GOOD.format(value=1))
    async with fleet_of(3, tmp_path, mongo_uri, db, daemons) as fleet:
        ids = await host_ids(db)
        (killed, _), (stopped, _), (survivor, client) = fleet
        killed.proc.send_signal(signal.SIGKILL)
        killed.proc.wait()
        good = write_plugin(tmp_path, "greet", GOOD.format(value=2))
        done = await cli(
            mongo_uri, db.name, "push", "greet", str(good), "--wait", "--timeout", "30"
        )
        assert done.returncode == 0, done.stderr
        assert "2/2 hosts serving greet r2" in done.stdout
        # The killed host is out of the live count. Its document stays until the TTL
        # index collects it: the TTL monitor sweeps at its own pace (every 60 s), so a
        # sweep may already have deleted it (its heartbeat is over a TTL old) — then it
        # is in no view at all, which is also "dropped out".
        dead_id = ids[killed.proc.pid]
        view = await fleet_status(db)
        assert view.plugins["greet"].hosts_alive == 2
        assert all(not h.alive for h in view.hosts if h.id == dead_id)
        shown = await cli(mongo_uri, db.name, "status", "--json")
        coll = db[hosts_collection_name("functions")]
        if f"unhealthy: host {dead_id} is dead" in shown.stderr:
            assert shown.returncode == 3, (shown.stdout, shown.stderr)
            assert json.loads(shown.stdout)["problems"] == [shown.stderr.splitlines()[0][11:]]
        else:  # not reported: only because the sweep deleted it (it never comes back)
            assert await coll.find_one({"_id": dead_id}) is None, (shown.stdout, shown.stderr)
            assert shown.returncode == 0, (shown.stdout, shown.stderr)
            assert json.loads(shown.stdout)["problems"] == []

        stopped.proc.send_signal(signal.SIGTERM)
        assert await stopped.exit_code() == 0
        assert await coll.find_one({"_id": ids[stopped.proc.pid]}) is None
        assert await coll.find_one({"_id": ids[survivor.proc.pid]}) is not None
        assert (await client.post("/functions/greet/call")).json()["result"] == 2


async def test_host_whose_status_writes_fail_keeps_serving(
    mongo_uri: str, db: AsyncDatabase[Doc], tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A daemon that cannot write its status serves anyway and logs fleet.report_failed once."""
    await publish(db, "greet", GOOD.format(value=1))
    async with status_writes_fail(db):
        port = free_port()
        daemon = Daemon.run(tmp_path, mongo_uri, db.name, f"127.0.0.1:{port}", *FAST)
        daemons.append(daemon)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            await wait_ready(client, daemon, timeout=180)  # several start at once
            await publish(db, "greet", GOOD.format(value=2))

            async def serves_new() -> bool:
                reply = await client.post("/functions/greet/call")
                return bool(reply.json().get("result") == 2)

            await wait_until(serves_new, "the daemon serves the new version", interval=0.05)

            def failures() -> list[str]:
                return [ln for ln in daemon.output()[0].splitlines() if "fleet.report_failed" in ln]

            await wait_until(failures, "the daemon logs fleet.report_failed")
            # Heartbeats every 0.2 s keep failing; the log line does not repeat.
            shown = await cli(mongo_uri, db.name, "status", "--json")
            assert json.loads(shown.stdout)["hosts"] == []
            assert len(failures()) == 1
            record = json.loads(failures()[0])
            assert record["level"] == "warning" and "hint" in record
