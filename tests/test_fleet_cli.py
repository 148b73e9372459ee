"""The fleet commands (`push --dir --wait`, `rollback`/`disable`/`enable --wait`, timeouts)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from host import PluginHost
from host.fleet import StatusReporting
from host.fleetview import fleet_status
from host.publish import publish

from .support import wait_until
from .test_fleet_daemons import cli

pytestmark = pytest.mark.anyio

Doc = dict[str, Any]
FAST = StatusReporting(heartbeat=0.1, ttl=1.0)


def source(value: int) -> str:
    """A plugin returning ``value``."""
    return f"async def main(ctx, args):\n    return {value}\n"


@contextlib.asynccontextmanager
async def two_hosts(db: AsyncDatabase[Doc]) -> AsyncIterator[tuple[PluginHost, PluginHost]]:
    """Two in-process reporting hosts; the CLI runs in subprocesses against them."""
    async with PluginHost(db, report_status=FAST) as a, PluginHost(db, report_status=FAST) as b:

        async def ready() -> bool:
            view = await fleet_status(db)
            return sum(1 for h in view.hosts if h.alive and h.ready) == 2

        await wait_until(ready, "both hosts report ready", timeout=15)
        yield a, b


async def test_push_dir_rollback_disable_enable_wait(
    mongo_uri: str, db: AsyncDatabase[Doc], tmp_path: Path
) -> None:
    """--wait works for a folder push, a rollback, a disable and an enable."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    for name, value in (("one", 1), ("two", 2)):
        (folder / f"{name}.py").write_text(source(value))
    async with two_hosts(db) as (a, b):
        pushed = await cli(mongo_uri, db.name, "push", "--dir", str(folder), "--wait")
        assert pushed.returncode == 0, pushed.stderr
        assert "2/2 hosts serving 2 plugins" in pushed.stdout
        assert await a.call("one") == 1 and await b.call("two") == 2

        await publish(db, "one", source(10))
        back = await cli(mongo_uri, db.name, "rollback", "one", "--wait")
        assert back.returncode == 0, back.stderr
        assert "2/2 hosts serving one r3" in back.stdout
        assert await a.call("one") == 1 and await b.call("one") == 1

        off = await cli(mongo_uri, db.name, "disable", "two", "--wait")
        assert off.returncode == 0, off.stderr
        assert "serving without two" in off.stdout
        assert a.plugin("two") is None or a.plugin("two").status == "disabled"  # type: ignore[union-attr]

        on = await cli(mongo_uri, db.name, "enable", "two", "--wait")
        assert on.returncode == 0, on.stderr
        assert "2/2 hosts serving two r1" in on.stdout
        assert await b.call("two") == 2

        shown = await cli(mongo_uri, db.name, "status", "--json")
        view = json.loads(shown.stdout)
        assert all(p["converged"] for p in view["plugins"].values())


async def test_wait_timeout_names_the_hosts_behind(
    mongo_uri: str, db: AsyncDatabase[Doc], tmp_path: Path
) -> None:
    """A plugin whose setup never finishes in time: --wait exits 1 at --timeout, naming hosts."""
    await publish(db, "slow", source(1))
    async with two_hosts(db) as hosts:
        stuck = tmp_path / "slow.py"
        stuck.write_text(
            "import asyncio\n\n\nasync def setup(ctx):\n    await asyncio.sleep(60)\n\n\n"
            "async def main(ctx, args):\n    return 2\n"
        )
        late = await cli(mongo_uri, db.name, "push", "slow", str(stuck), "--wait", "--timeout", "1")
        assert late.returncode == 1, (late.stdout, late.stderr)
        assert "not converged after 1 s" in late.stderr
        for host in hosts:
            reporter = host.status_reporter
            assert reporter is not None
            assert f"behind: {reporter.host_id} serves slow r1" in late.stderr
            assert await host.call("slow") == 1


async def test_wait_needs_live_hosts(
    mongo_uri: str, db: AsyncDatabase[Doc], tmp_path: Path
) -> None:
    """With no host reporting, --wait says so at the timeout and exits 1."""
    plugin = tmp_path / "lonely.py"
    plugin.write_text(source(1))
    alone = await cli(
        mongo_uri, db.name, "push", "lonely", str(plugin), "--wait", "--timeout", "0.5"
    )
    assert alone.returncode == 1
    assert "no live host reported" in alone.stderr
    shown = await cli(mongo_uri, db.name, "status")
    assert "no host reports to" in shown.stdout and "lonely r1: 0/0" in shown.stdout


async def test_status_exit_code_says_whether_the_fleet_is_healthy(
    mongo_uri: str, db: AsyncDatabase[Doc]
) -> None:
    """`status` exits 0 when healthy, 3 once a host refused a plugin, 1 without MongoDB."""
    await publish(db, "fine", source(1))
    async with two_hosts(db) as hosts:
        await wait_until(
            lambda: all(h.plugin("fine") is not None for h in hosts), "both hosts serve fine"
        )
        healthy = await cli(mongo_uri, db.name, "status", "--json")
        assert healthy.returncode == 0, (healthy.stdout, healthy.stderr)
        shown = json.loads(healthy.stdout)
        assert shown["healthy"] is True and shown["problems"] == []

        await publish(db, "fine", "import plugin_host_no_such_module\n")

        async def refused() -> bool:
            view = await fleet_status(db)
            return len(view.plugins["fine"].rejected) == 2

        await wait_until(refused, "both hosts report refusing fine r2", timeout=15)
        sick = await cli(mongo_uri, db.name, "status", "--json")
        assert sick.returncode == 3, (sick.stdout, sick.stderr)
        shown = json.loads(sick.stdout)
        assert shown["healthy"] is False and len(shown["problems"]) == 2
        for host in hosts:
            reporter = host.status_reporter
            assert reporter is not None
            line = f"unhealthy: host {reporter.host_id} refused fine r2 at stage import"
            assert line in sick.stderr
        plain = await cli(mongo_uri, db.name, "status")
        assert plain.returncode == 3 and "fine r2: 0/2 hosts serving" in plain.stdout
    unreachable = "mongodb://127.0.0.1:1/?replicaSet=rs0"
    down = await cli(unreachable, db.name, "status", "--connect-timeout", "0.2")
    assert down.returncode == 1 and "is not reachable" in down.stderr, down.stderr
