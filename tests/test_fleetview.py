"""The fleet view (host/fleetview.py): liveness by the server's clock, convergence, waiting."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from host import PluginHost
from host.fleet import StatusReporting, hosts_collection_name
from host.fleetview import (
    FleetRefused,
    FleetTimeout,
    Progress,
    Target,
    fleet_status,
    summarize,
    wait_for_fleet,
)
from host.http import create_app
from host.publish import publish, set_enabled, wait_converged

from .support import wait_until

pytestmark = pytest.mark.anyio

Doc = dict[str, Any]
FAST = StatusReporting(heartbeat=0.1, ttl=1.0)
NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
BROKEN = "import plugin_host_no_such_module\n\nasync def main(ctx, args):\n    return 0\n"


def source(value: int) -> str:
    """A plugin returning ``value``."""
    return f"async def main(ctx, args):\n    return {value}\n"


def host_doc(host_id: str, age: float, plugins: dict[str, int], **extra: Any) -> Doc:
    """A hosts-collection document whose heartbeat is ``age`` seconds before ``NOW``."""
    return {
        "_id": host_id,
        "hostname": host_id.split(":")[0],
        "pid": 1,
        "heartbeat": (NOW - timedelta(seconds=age)).replace(tzinfo=None),
        "heartbeat_s": 5.0,
        "ttl_s": 15.0,
        "seq": 1,
        "plugins": [
            {"name": n, "version": f"{n}@r{r}:00000000", "revision": r} for n, r in plugins.items()
        ],
        **extra,
    }


def test_alive_and_late_are_judged_by_the_server_clock() -> None:
    """Age comes from the server's time: fresh hosts are alive, 12 s is late, 20 s is dead."""
    view = summarize(
        "app.functions",
        [{"_id": "greet", "revision": 2}],
        [
            host_doc("a:1", 0.5, {"greet": 2}),
            host_doc("b:1", 12, {"greet": 2}),
            host_doc("c:1", 20, {"greet": 1}),
        ],
        NOW,
    )
    alive = {h.id: (h.alive, h.late) for h in view.hosts}
    assert alive == {"a:1": (True, False), "b:1": (True, True), "c:1": (False, True)}
    greet = view.plugins["greet"]
    assert (greet.hosts_alive, greet.hosts_serving, greet.converged) == (2, 2, True)
    assert [h.id for h in view.late] == ["b:1", "c:1"]


def test_behind_rejected_and_draining() -> None:
    """A host on an old revision is behind; a refusal counts only for the latest revision."""
    refused_now = {"name": "greet", "revision": 3, "stage": "import", "error": "No module"}
    refused_before = {"name": "greet", "revision": 2, "stage": "setup", "error": "old"}
    view = summarize(
        "app.functions",
        [{"_id": "greet", "revision": 3}, {"_id": "off", "revision": 1, "enabled": False}],
        [
            host_doc("a:1", 0, {"greet": 2}, refused=[refused_now]),
            host_doc("b:1", 0, {"greet": 2}, refused=[refused_before]),
            host_doc("c:1", 0, {"greet": 3, "off": 1, "gone": 4}),
            host_doc("d:1", 0, {"greet": 1}, draining=True),
        ],
        NOW,
    )
    greet = view.plugins["greet"]
    assert greet.hosts_alive == 3 and greet.hosts_serving == 1 and not greet.converged
    assert greet.behind == (("a:1", 2), ("b:1", 2))
    assert [dict(r) for r in greet.rejected] == [
        {"host": "a:1", "revision": 3, "stage": "import", "error": "No module"}
    ]
    off = view.plugins["off"]  # disabled: converged once no live host serves it
    assert (off.revision, off.enabled, off.hosts_serving, off.behind) == (
        None,
        False,
        2,
        (("c:1", 1),),
    )
    assert view.plugins["gone"].behind == (("c:1", 4),)  # deleted record still served
    shape = view.as_dict()
    assert set(shape["plugins"]["greet"]) >= {
        "revision", "hosts_alive", "hosts_serving", "converged", "rejected"
    }  # fmt: skip
    assert set(shape["hosts"][0]) >= {"id", "hostname", "pid", "alive", "plugins"}
    assert shape["hosts"][0]["plugins"]["greet"] == {"version": "greet@r2:00000000", "revision": 2}


def test_no_live_host_is_not_converged() -> None:
    """With no live host, nothing has converged (a fleet of zero proves nothing)."""
    view = summarize("app.functions", [{"_id": "greet", "revision": 1}], [], NOW)
    assert not view.plugins["greet"].converged


def test_progress_line() -> None:
    """The progress line reads like `7/8 hosts serving greet r12`."""
    assert Progress(7, 8, (Target("greet", 12),), 0.1).line == "7/8 hosts serving greet r12"
    assert Progress(1, 2, (Target("a", 1), Target("b", 2)), 0).line == (
        "1/2 hosts serving all 2 plugins"
    )
    assert Progress(2, 2, (Target("a", None),), 0).line == "2/2 hosts serving without a"


@contextlib.asynccontextmanager
async def fleet(db: AsyncDatabase[Doc], n: int) -> AsyncIterator[list[PluginHost]]:
    """``n`` reporting hosts on ``db``."""
    async with contextlib.AsyncExitStack() as stack:
        hosts = [
            await stack.enter_async_context(PluginHost(db, report_status=FAST)) for _ in range(n)
        ]
        await wait_until(
            lambda: _all_ready(db, n), f"{n} hosts report ready", timeout=15, interval=0.02
        )
        yield hosts


async def _all_ready(db: AsyncDatabase[Doc], n: int) -> bool:
    view = await fleet_status(db)
    return sum(1 for h in view.hosts if h.alive and h.ready) == n


async def test_status_reads_the_real_fleet(db: AsyncDatabase[Doc]) -> None:
    """Three in-process hosts: fleet_status sees them alive, serving, converged."""
    await publish(db, "greet", source(1))
    async with fleet(db, 3):
        view = await fleet_status(db, name="greet")
        greet = view.plugins["greet"]
        assert (greet.revision, greet.hosts_alive, greet.hosts_serving) == (1, 3, 3)
        assert greet.converged and set(view.plugins) == {"greet"}


async def test_wait_converges_after_a_good_push(db: AsyncDatabase[Doc]) -> None:
    """wait_for_fleet returns once all three hosts serve the pushed revision."""
    await publish(db, "greet", source(1))
    async with fleet(db, 3) as hosts:
        lines: list[str] = []
        pushed = await publish(db, "greet", source(2))
        done = await wait_for_fleet(
            db,
            [Target("greet", pushed.revision)],
            timeout=15,
            on_progress=lambda p: lines.append(p.line),
        )
        assert len(done.hosts) == 3 and lines[-1] == "3/3 hosts serving greet r2"
        for host in hosts:
            assert await host.call("greet") == 2


async def test_wait_fails_fast_when_hosts_refuse(db: AsyncDatabase[Doc]) -> None:
    """A push the hosts refuse ends the wait with FleetRefused naming each host and the stage."""
    await publish(db, "greet", source(1))
    async with fleet(db, 2) as hosts:
        pushed = await publish(db, "greet", BROKEN)
        with pytest.raises(FleetRefused) as refused:
            await wait_for_fleet(db, [Target("greet", pushed.revision)], timeout=15)
        reporters = [h.status_reporter for h in hosts]
        ids = {r.host_id for r in reporters if r is not None}
        first = refused.value.refusals[0]
        assert first["host"] in ids and first["stage"] == "import"
        assert "plugin_host_no_such_module" in str(refused.value)
        for host in hosts:
            assert await host.call("greet") == 1


async def test_wait_times_out_naming_hosts_behind(db: AsyncDatabase[Doc]) -> None:
    """A revision no host will reach times out, naming the host and what it serves."""
    await publish(db, "greet", source(1))
    async with fleet(db, 1) as (host,):
        with pytest.raises(FleetTimeout) as late:
            await wait_for_fleet(db, [Target("greet", 99)], timeout=0.5)
        reporter = host.status_reporter
        assert reporter is not None
        assert late.value.behind == ({"host": reporter.host_id, "plugin": "greet", "revision": 1},)
        assert reporter.host_id in str(late.value) and "r1" in str(late.value)


async def test_wait_with_no_hosts_says_so(db: AsyncDatabase[Doc]) -> None:
    """With nothing reporting, the timeout says no live host reported."""
    with pytest.raises(FleetTimeout, match="no live host"):
        await wait_for_fleet(db, [Target("greet", 1)], timeout=0.3)
    with pytest.raises(ValueError, match="target"):
        await wait_for_fleet(db, [], timeout=1)


async def test_a_dead_host_drops_out_while_waiting(db: AsyncDatabase[Doc]) -> None:
    """A host that stops heartbeating stops counting after its TTL, without any event."""
    await publish(db, "greet", source(1))
    async with fleet(db, 1):
        # A host that went silent just now, on revision 0: alive for one more second.
        coll = db[hosts_collection_name("functions")]
        await coll.update_one(
            {"_id": "dead:1"},
            {
                "$set": {"hostname": "dead", "ttl_s": 1.0, "heartbeat_s": 0.1, "plugins": []},
                "$currentDate": {"heartbeat": True},
            },
            upsert=True,
        )
        lines: list[str] = []
        done = await wait_for_fleet(
            db, [Target("greet", 1)], timeout=15, on_progress=lambda p: lines.append(p.line)
        )
        assert (
            lines[0] == "1/2 hosts serving greet r1" and lines[-1] == "1/1 hosts serving greet r1"
        )
        assert "dead:1" not in done.hosts


async def test_wait_for_disable(db: AsyncDatabase[Doc]) -> None:
    """A disable converges when no live host serves the plugin any more."""
    await publish(db, "greet", source(1))
    async with fleet(db, 2) as hosts:
        await set_enabled(db, "greet", False)
        await wait_for_fleet(db, [Target("greet", None)], timeout=15)
        for host in hosts:
            assert host.plugin("greet") is None or host.plugin("greet").version is None  # type: ignore[union-attr]
        with anyio.fail_after(15):
            await set_enabled(db, "greet", True)
            await wait_for_fleet(db, [Target("greet", 1)], timeout=15)


async def test_get_fleet_serves_the_same_view(db: AsyncDatabase[Doc]) -> None:
    """GET /fleet answers what fleet_status says (and 503 when MongoDB cannot say)."""
    await publish(db, "greet", source(1))
    async with fleet(db, 2) as hosts:
        app = create_app(hosts[0])
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://plugin-host") as client,
        ):
            reply = await client.get("/fleet")
            assert reply.status_code == 200
            body = reply.json()
            assert body["plugins"]["greet"]["converged"] is True
            assert body["plugins"]["greet"]["hosts_serving"] == 2
            assert {h["id"] for h in body["hosts"]} == {
                h.status_reporter.host_id for h in hosts if h.status_reporter is not None
            }
            assert (await client.get("/fleet?name=nope")).json()["plugins"] == {}
            await db.client.admin.command(
                "configureFailPoint",
                "failCommand",
                mode={"times": 1},
                data={"failCommands": ["find"], "errorCode": 13,
                      "namespace": f"{db.name}.functions"},
            )  # fmt: skip
            failed = await client.get("/fleet")
            assert failed.status_code == 503
            assert failed.json()["error"]["type"] == "FleetUnavailable"


async def test_python_callers_wait_through_host_publish(db: AsyncDatabase[Doc]) -> None:
    """host.publish.wait_converged waits for what publish returned, like push --wait."""
    await publish(db, "greet", source(1))
    async with fleet(db, 2):
        pushed = await publish(db, "greet", source(2))
        done = await wait_converged(db, pushed, timeout=15)
        assert len(done.hosts) == 2 and done.targets == (Target("greet", 2),)
        bad = await publish(db, "greet", BROKEN)
        with pytest.raises(FleetRefused, match="stage import"):
            await wait_converged(db, [bad], timeout=15)
