"""Held versions in the fleet view (issue 16): what each host can serve to a pinned call.

Host ``a`` runs in this process (``held_versions=2``); host ``b`` is a real ``plugin-host
run --held-versions 1`` daemon. Both report to the hosts collection; the CLI's ``status``
(text and ``--json``) runs as a subprocess and ``GET /fleet`` is read from the daemon's
socket.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from host import PluginHost
from host.fleet import StatusReporting
from host.fleetview import fleet_status
from host.publish import publish
from host.rolloutview import sum_held

from .daemon_support import Daemon, free_port, wait_ready
from .support import Db, wait_until
from .test_fleet_daemons import cli

pytestmark = pytest.mark.anyio

FAST = StatusReporting(heartbeat=0.1, ttl=2.0, host_id="a")


def source(value: int) -> str:
    """A plugin returning ``value``."""
    return f"async def main(ctx, args):\n    return {value}\n"


def test_sum_held_counts_each_version_once_per_host_newest_first() -> None:
    """Versions are listed newest revision first, each with the number of hosts holding it."""
    rows = sum_held([["p@r3:cc", "p@r2:bb"], ["p@r2:bb", "p@r2:bb"], ["odd"]])
    assert rows == [
        {"version": "p@r3:cc", "revision": 3, "hosts": 1},
        {"version": "p@r2:bb", "revision": 2, "hosts": 2},
        {"version": "odd", "revision": None, "hosts": 1},
    ]
    assert sum_held([]) == []


async def _entries(db: Db) -> dict[str, dict[str, Any]]:
    """``{host id: its plugins[] entry for p}`` from the hosts collection."""
    out = {}
    async for doc in db.functions_hosts.find({}):
        for item in doc.get("plugins") or ():
            if item["name"] == "p":
                out[doc["_id"]] = item
    return out


async def test_status_and_get_fleet_list_the_versions_each_host_holds(
    mongo_uri: str, db: Db, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Each host reports its held versions (none: no key); status, --json and GET /fleet list
    them with the hosts holding each; a call pinned to a listed version is served."""
    first = await publish(db, "p", source(1))
    port = free_port()
    daemon = Daemon.run(
        tmp_path, mongo_uri, db.name, f"127.0.0.1:{port}",
        "--held-versions", "1", "--heartbeat", "0.2", "--host-id", "b",
    )  # fmt: skip
    daemons.append(daemon)
    async with (
        PluginHost(db, report_status=FAST, held_versions=2) as a,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as b,
    ):
        await wait_ready(b, daemon)

        async def both_report(revision: int) -> dict[str, dict[str, Any]] | None:
            entries = await _entries(db)
            serving = {h: e["revision"] for h, e in entries.items()}
            return entries if serving == {"a": revision, "b": revision} else None

        entries = await wait_until(lambda: both_report(first.revision), "both report r1")
        assert "held" not in entries["a"] and "held" not in entries["b"]  # nothing replaced
        assert (await fleet_status(db)).plugins["p"].held == ()

        revisions = [first.revision]
        for value in (2, 3):
            revisions.append((await publish(db, "p", source(value))).revision)
        r1, r2, r3 = revisions
        entries = await wait_until(lambda: both_report(r3), "both report r3")
        held_a = [plugin.version for plugin in a.held("p")]
        assert [v.split(":")[0] for v in held_a] == [f"p@r{r2}", f"p@r{r1}"]
        assert entries["a"]["held"] == held_a
        assert entries["b"]["held"] == held_a[:1]  # same source, same version string

        expected = [
            {"version": held_a[0], "revision": r2, "hosts": 2},
            {"version": held_a[1], "revision": r1, "hosts": 1},
        ]
        view = await fleet_status(db)
        assert [dict(h) for h in view.plugins["p"].held] == expected
        by_id = {h.id: h for h in view.hosts}
        assert by_id["a"].held == {"p": tuple(held_a)} and by_id["b"].held == {"p": (held_a[0],)}

        fleet = (await b.get("/fleet")).json()
        assert fleet["plugins"]["p"]["held"] == expected
        hosts = {h["id"]: h for h in fleet["hosts"]}
        assert hosts["a"]["plugins"]["p"]["held"] == held_a
        assert hosts["b"]["plugins"]["p"]["held"] == held_a[:1]

        shown = await cli(mongo_uri, db.name, "status", "--json")
        assert shown.returncode == 0, (shown.stdout, shown.stderr)
        assert json.loads(shown.stdout)["plugins"]["p"]["held"] == expected
        plain = await cli(mongo_uri, db.name, "status", "p")
        assert plain.returncode == 0, (plain.stdout, plain.stderr)
        assert (
            f"  held for pinned calls: {held_a[0]} (2/2 hosts), {held_a[1]} (1/2 hosts)"
        ) in plain.stdout
        assert "host a pid" in plain.stdout and ", 1 plugins, 2 held" in plain.stdout

        # What is listed is what a pinned call gets, on each host that holds it.
        assert await a.call("p", version=held_a[1]) == 1
        pinned = await b.post("/functions/p/call", headers={"X-Plugin-Version": held_a[0]})
        assert pinned.status_code == 200 and pinned.json()["result"] == 2
