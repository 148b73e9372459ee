"""End-to-end tests of the daemon: `plugin-host dev` and `plugin-host run` as real processes."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from pymongo import MongoClient
from pymongo.asynchronous.database import AsyncDatabase

from host.publish import publish

from .daemon_support import Daemon, free_port, wait_ready
from .support import Doc, wait_until

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "plugins_examples"
GREET_ARGS = {"firstName": "Blain", "lastName": "Smith"}
# Runs until the file named by its args exists: the test decides when the call ends.
GATED = """
import asyncio
import os


async def main(ctx, args):
    while not os.path.exists(args):
        await asyncio.sleep(0.01)
    return "opened"
"""


async def test_dev_serves_and_syncs_saved_files(tmp_path: Path, daemons: list[Daemon]) -> None:
    """`dev` serves greet over HTTP, and an edited plugin file is live on the next calls."""
    plugins = tmp_path / "plugins"
    shutil.copytree(EXAMPLES, plugins)
    http_port = free_port()
    daemon = Daemon(
        tmp_path,
        "dev",
        "--plugins-dir",
        str(plugins),
        "--data-dir",
        str(tmp_path / "data"),
        "--mongo-port",
        str(free_port()),
        "--http",
        f"127.0.0.1:{http_port}",
    )
    daemons.append(daemon)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as client:
        await wait_ready(client, daemon)
        reply = await client.post("/functions/greet/call", json=GREET_ARGS)
        assert reply.json()["result"] == (
            "Hello there, Blain!!! There are 13 with the same last name as you!"
        )
        greet = plugins / "greet.py"
        greet.write_text(greet.read_text().replace("Hello there", "Howdy"))

        async def edited() -> Any:
            result = (await client.post("/functions/greet/call", json=GREET_ARGS)).json()
            return result if result["result"].startswith("Howdy, Blain") else None

        result = await wait_until(edited, "the edited greet serves", interval=0.02)
        assert result["version"].startswith("greet@r2:")
        called = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "host.cli",
                    "call",
                    "greet",
                    "--args",
                    json.dumps(GREET_ARGS),
                    "--url",
                    f"http://127.0.0.1:{http_port}",
                ],
                capture_output=True,
                text=True,
                check=False,
                timeout=30,
            )
        )
        assert called.returncode == 0, called.stderr
        assert json.loads(called.stdout).startswith("Howdy, Blain")
        assert "greet@r2:" in called.stderr
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.exit_code() == 0
    out, err = daemon.output()
    assert "plugin.reloaded" in out
    assert "curl -s -X POST" in out
    assert f"console: http://127.0.0.1:{http_port}/console" in out  # what `make run` prints
    assert "Traceback" not in err


async def test_sigterm_drains_in_flight_calls(
    mongo_uri: str, db: AsyncDatabase[Doc], tmp_path: Path, daemons: list[Daemon]
) -> None:
    """On SIGTERM `run` finishes the call in flight, refuses new calls with 503, exits 0."""
    await publish(db, "gated", GATED)
    await publish(db, "echo", "async def main(ctx, args):\n    return args\n")
    gate = tmp_path / "open-the-gate"
    http_port = free_port()
    daemon = Daemon.run(
        tmp_path,
        mongo_uri,
        db.name,
        f"127.0.0.1:{http_port}",
    )
    daemons.append(daemon)
    base = f"http://127.0.0.1:{http_port}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        await wait_ready(client, daemon)
        gated_reply: list[httpx.Response] = []
        async with anyio.create_task_group() as tg:

            async def call_gated() -> None:
                gated_reply.append(await client.post("/functions/gated/call", json=str(gate)))

            tg.start_soon(call_gated)

            async def in_flight() -> bool:
                return "plugin_host_in_flight_calls 1" in (await client.get("/metrics")).text

            await wait_until(in_flight, "the gated call is in flight")
            daemon.proc.send_signal(signal.SIGTERM)

            async def refused() -> httpx.Response | None:
                reply = await client.post("/functions/echo/call", json=1)
                return reply if reply.status_code == 503 else None

            refusal = await wait_until(refused, "new calls are refused")
            assert not gated_reply, "the call in flight ended before its gate opened"
            gate.touch()
        assert refusal.json()["error"]["type"] == "HostClosed"
        assert gated_reply[0].status_code == 200
        assert gated_reply[0].json()["result"] == "opened"
    assert await daemon.exit_code() == 0
    out, err = daemon.output()
    assert '"event": "daemon.draining"' in out
    assert "Traceback" not in err


async def start_failure(tmp_path: Path, daemons: list[Daemon], *args: str) -> str:
    """Run `plugin-host run ARGS`, expect a non-zero exit, return stderr."""
    daemon = Daemon(tmp_path, "run", "--log-format", "json", *args)
    daemons.append(daemon)
    assert await daemon.exit_code() != 0
    _, err = daemon.output()
    assert "Traceback" not in err
    assert err.startswith("error: "), err
    return err


async def test_unreachable_mongodb_fails_after_startup_timeout(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """With nothing listening at the URI, `run` gives up after --startup-timeout, clearly."""
    uri = f"mongodb://127.0.0.1:{free_port()}/?replicaSet=rs0&serverSelectionTimeoutMS=300"
    err = await start_failure(
        tmp_path,
        daemons,
        "--mongodb-uri",
        uri,
        "--startup-timeout",
        "1",
        "--http",
        "127.0.0.1:0",
    )
    assert f"MongoDB at {uri} is not reachable: not ready within 1 s" in err
    assert "hint: " in err
    out, _ = daemons[-1].output()
    assert '"event": "host.stopped"' in out  # the watcher, triggers and status reporter stopped


@pytest.mark.parametrize("when", ["starting", "retrying"])
async def test_sigterm_while_mongodb_is_unreachable_stops_promptly(
    tmp_path: Path, daemons: list[Daemon], when: str
) -> None:
    """SIGTERM while `run` still waits for an unreachable MongoDB stops it cleanly, exit 0."""
    uri = f"mongodb://127.0.0.1:{free_port()}/?replicaSet=rs0&serverSelectionTimeoutMS=300"
    daemon = Daemon(
        tmp_path,
        "run",
        "--log-format",
        "json",
        "--mongodb-uri",
        uri,
        "--startup-timeout",
        "0",
        "--http",
        "127.0.0.1:0",
    )
    daemons.append(daemon)
    # "starting": as soon as the host runs (its first server selections are in flight);
    # "retrying": once the watcher has failed and backs off.
    marker = '"event": "host.started"' if when == "starting" else '"event": "watch.error"'
    await wait_until(
        lambda: marker in daemon.output()[0],
        lambda: f"the daemon logs {marker}; output: {daemon.output()}",
        timeout=30,
        interval=0.02,
    )
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.exit_code() == 0
    out, err = daemon.output()
    assert '"event": "host.stopped"' in out
    assert '"event": "daemon.stopped"' in out
    assert "Traceback" not in err and "Traceback" not in out


async def test_startup_error_names_the_records_still_loading(
    mongo_uri: str, db: AsyncDatabase[Doc], tmp_path: Path, daemons: list[Daemon]
) -> None:
    """When MongoDB answers but a record is still loading at the deadline, the error says so."""
    # Sleeps in short steps: the thread stops at the next step once the load is abandoned.
    await publish(db, "sleeper", "import time\nwhile True:\n    time.sleep(0.01)\n")
    err = await start_failure(
        tmp_path,
        daemons,
        "--mongodb-uri",
        mongo_uri,
        "--database",
        db.name,
        "--startup-timeout",
        "2",
        "--http",
        "127.0.0.1:0",
    )
    assert "the initial load did not finish within 2 s: 1 record(s) still loading: sleeper" in err
    assert "not reachable" not in err
    assert "hint: " in err


async def test_bad_uri_fails_clearly(tmp_path: Path, daemons: list[Daemon]) -> None:
    """A malformed connection string is one clear error line."""
    err = await start_failure(
        tmp_path, daemons, "--mongodb-uri", "mongodb://127.0.0.1:notaport", "--http", "127.0.0.1:0"
    )
    assert "invalid --mongodb-uri" in err


async def test_http_port_in_use_fails_clearly(
    mongo_uri: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """An HTTP port already taken is one clear error line, not a Uvicorn traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = await start_failure(
            tmp_path, daemons, "--mongodb-uri", mongo_uri, "--http", f"127.0.0.1:{port}"
        )
    assert "address already in use" in err


async def test_standalone_server_fails_clearly(
    mongo_uri: str, using_embedded: bool, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A deployment without change streams (standalone: error 40573) fails with WatchFatal's line.

    The embedded server is always a replica set, so a failCommand failpoint scoped to
    this test's appName makes its aggregate answer like a standalone server does.
    """
    if not using_embedded:
        pytest.skip("needs the embedded server's failCommand failpoint")
    app_name = "standalone-sim"
    admin: MongoClient[Doc]
    with MongoClient(mongo_uri) as admin:
        admin.admin.command(
            "configureFailPoint",
            "failCommand",
            mode="alwaysOn",
            data={"failCommands": ["aggregate"], "errorCode": 40573, "appName": app_name},
        )
        try:
            sep = "&" if "?" in mongo_uri else "/?"
            err = await start_failure(
                tmp_path,
                daemons,
                "--mongodb-uri",
                f"{mongo_uri}{sep}appName={app_name}",
                "--http",
                "127.0.0.1:0",
            )
        finally:
            admin.admin.command("configureFailPoint", "failCommand", mode="off")
    assert "standalone" in err
    assert "replica set" in err
