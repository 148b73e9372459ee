"""Status write-back (host/fleet.py): each host's document says what it serves and refused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from host import PluginHost
from host.fleet import TTL_INDEX, StatusReporting, hosts_collection_name, served_map
from host.fleetview import fleet_status
from host.metrics import Metrics, follow_events
from host.publish import publish

from .support import next_event, status_writes_fail, wait_until

pytestmark = pytest.mark.anyio

Doc = dict[str, Any]
FAST = StatusReporting(heartbeat=0.1)


def source(value: int) -> str:
    """A plugin returning ``value``."""
    return f"async def main(ctx, args):\n    return {value}\n"


BROKEN = "import plugin_host_no_such_module\n\nasync def main(ctx, args):\n    return 0\n"


async def host_doc(db: AsyncDatabase[Doc], host: PluginHost) -> Doc | None:
    """The host's document in the hosts collection."""
    reporter = host.status_reporter
    assert reporter is not None
    return await db[reporter.collection_name].find_one({"_id": reporter.host_id})


@pytest.fixture
async def failpoint(db: AsyncDatabase[Doc]) -> AsyncIterator[None]:
    """Makes every update and createIndexes on the hosts collection fail (Unauthorized)."""
    async with status_writes_fail(db):
        yield


def test_options_are_checked() -> None:
    """A non-positive heartbeat, a TTL not longer than it, or an empty host id is refused."""
    with pytest.raises(ValueError, match="heartbeat"):
        StatusReporting(heartbeat=0)
    with pytest.raises(ValueError, match="longer than the heartbeat"):
        StatusReporting(heartbeat=5, ttl=5)
    with pytest.raises(ValueError, match="host_id"):
        StatusReporting(host_id=" ")
    assert StatusReporting(heartbeat=2).ttl_seconds == 6


async def test_reports_what_it_serves_and_what_it_refused(db: AsyncDatabase[Doc]) -> None:
    """The document lists the version serving and, after a bad push, the refusal and stage."""
    await publish(db, "greet", source(1))
    async with PluginHost(db, report_status=FAST) as host, host.events() as events:
        doc = await wait_until(
            lambda: _doc_where(db, host, lambda d: d.get("ready")), "the host reports ready"
        )
        assert served_map(doc) == {"greet": {"version": host.plugins()[0].version, "revision": 1}}
        assert doc["pid"] > 0 and doc["hostname"] and doc["version"]
        assert doc["draining"] is False and doc["refused"] == []
        bad = await publish(db, "greet", BROKEN)
        await next_event(events, "plugin.reload_failed")
        doc = await wait_until(
            lambda: _doc_where(db, host, lambda d: d.get("refused")), "the refusal is reported"
        )
        (refusal,) = doc["refused"]
        assert refusal["name"] == "greet" and refusal["revision"] == bad.revision
        assert refusal["stage"] == "import"
        assert "plugin_host_no_such_module" in refusal["error"]
        assert served_map(doc)["greet"]["revision"] == 1  # the old version keeps serving
        assert await host.call("greet") == 1
        cursor = await db[hosts_collection_name("functions")].list_indexes()
        indexes = {i["name"]: i async for i in cursor}
        assert indexes[TTL_INDEX]["expireAfterSeconds"] == 1  # ceil(3 x 0.1 s)


async def _doc_where(db: AsyncDatabase[Doc], host: PluginHost, check: Any) -> Doc | None:
    doc = await host_doc(db, host)
    return doc if doc is not None and check(doc) else None


async def test_clean_shutdown_removes_its_document(db: AsyncDatabase[Doc]) -> None:
    """A host that stops deletes its own document; another host's stays."""
    await publish(db, "greet", source(1))
    async with PluginHost(db, report_status=FAST) as stays:
        async with PluginHost(db, report_status=FAST) as leaves:
            await wait_until(lambda: host_doc(db, leaves), "the leaving host reports")
            reporter = leaves.status_reporter
            assert reporter is not None
            gone = reporter.host_id
        coll = db[hosts_collection_name("functions")]
        assert await coll.find_one({"_id": gone}) is None
        assert await host_doc(db, stays) is not None


async def test_heartbeat_recreates_a_deleted_document(db: AsyncDatabase[Doc]) -> None:
    """A document deleted behind the host's back (TTL during a partition) comes back whole."""
    await publish(db, "greet", source(1))
    async with PluginHost(db, report_status=FAST) as host:
        first = await wait_until(
            lambda: _doc_where(db, host, lambda d: d.get("ready")), "the host reports"
        )
        await db[hosts_collection_name("functions")].delete_many({})
        again = await wait_until(lambda: host_doc(db, host), "the heartbeat writes it again")
        assert served_map(again) == served_map(first)
        assert again["seq"] > first["seq"]


async def test_failing_writes_keep_serving_and_say_so_once(
    db: AsyncDatabase[Doc], failpoint: None
) -> None:
    """While its writes fail the host serves, logs fleet.report_failed once, then recovers."""
    await publish(db, "greet", source(1))
    host = PluginHost(db, report_status=FAST)
    async with host.events() as events, host:
        reporter = host.status_reporter
        assert reporter is not None
        await wait_until(lambda: reporter.failures >= 5, "five writes have failed")
        assert await host.call("greet") == 1
        await publish(db, "greet", source(2))
        await wait_until(lambda: _call(host, 2), "the new version serves anyway")
        assert await host_doc(db, host) is None
        await db.client.admin.command("configureFailPoint", "failCommand", mode="off")
        warnings = []
        with anyio.fail_after(10):
            async for event in events:
                if event.event == "fleet.report_failed":
                    warnings.append(event)
                elif event.event == "fleet.report_recovered":
                    break
        (warning,) = warnings
        assert warning["collection"] == "functions_hosts" and "hint" in warning.fields
        assert "13" in warning["error"] or "fail" in warning["error"].lower()
        doc = await wait_until(lambda: host_doc(db, host), "the document is written")
        assert served_map(doc)["greet"]["revision"] == 2


async def _call(host: PluginHost, expected: int) -> bool:
    return bool(await host.call("greet") == expected)


async def test_coalesces_a_burst_and_writes_in_seq_order(db: AsyncDatabase[Doc]) -> None:
    """A burst of 60 loads takes far fewer writes; seen writes have increasing seq; none lost."""
    coll = db[hosts_collection_name("functions")]
    async with PluginHost(db, report_status=StatusReporting(heartbeat=30)) as host:
        reporter = host.status_reporter
        assert reporter is not None
        await wait_until(lambda: host_doc(db, host), "the first write")
        seqs: list[int] = []
        async with await coll.watch() as stream:
            before = reporter.writes
            async with anyio.create_task_group() as tg:
                for i in range(60):
                    tg.start_soon(publish, db, f"p{i}", source(i))

            async def complete() -> bool:
                doc = await host_doc(db, host)
                return doc is not None and len(served_map(doc)) == 60

            await wait_until(complete, "all 60 plugins are reported")
            writes = reporter.writes - before
            while len(seqs) < writes:
                event = await stream.next()  # each write's own seq, not the current one
                if event["operationType"] == "insert":
                    seqs.append(event["fullDocument"]["seq"])
                else:
                    seqs.append(event["updateDescription"]["updatedFields"]["seq"])
        assert 1 <= writes < 60
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_report_lag_reaches_the_metrics(db: AsyncDatabase[Doc]) -> None:
    """The daemon's metrics observe each report's lag from the host's fleet.reported events."""
    metrics = Metrics(process=False)  # the process collectors read /proc: not on the loop
    await publish(db, "greet", source(1))
    async with PluginHost(db, report_status=FAST) as host, anyio.create_task_group() as tg:
        tg.start_soon(follow_events, host, metrics)
        await publish(db, "greet", source(2))
        await wait_until(lambda: metrics.report_lag_seconds.count > 0, "a report's lag is seen")
        tg.cancel_scope.cancel()
    text = metrics.render()
    assert "# TYPE plugin_host_fleet_report_lag_seconds histogram" in text
    assert f"plugin_host_fleet_report_lag_seconds_count {metrics.report_lag_seconds.count}" in text


GATED = """
async def main(ctx, args):
    ctx.started.set()
    await ctx.gate.wait()
    return "done"
"""


async def test_draining_host_says_so_then_leaves(db: AsyncDatabase[Doc]) -> None:
    """While it drains, the host's document says draining (not counted); then it is deleted."""
    started, gate, leave, up = anyio.Event(), anyio.Event(), anyio.Event(), anyio.Event()
    await publish(db, "gated", GATED)
    hosts: list[PluginHost] = []

    async def serve() -> None:
        context = {"started": started, "gate": gate}
        async with PluginHost(db, report_status=FAST, context=context) as host:
            hosts.append(host)
            up.set()
            await leave.wait()

    coll = db[hosts_collection_name("functions")]
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        await up.wait()
        (host,) = hosts
        reporter = host.status_reporter
        assert reporter is not None
        host_id = reporter.host_id
        tg.start_soon(host.call, "gated")
        await started.wait()
        leave.set()  # shutdown begins; the call in flight holds it in the drain
        await wait_until(
            lambda: _doc_where(db, host, lambda d: d.get("draining")), "the host reports draining"
        )
        view = await fleet_status(db)
        assert view.plugins["gated"].hosts_alive == 0  # alive, but no longer counted
        assert [h.draining for h in view.hosts] == [True]
        gate.set()
    assert await coll.find_one({"_id": host_id}) is None
