"""The rollout view (host/rolloutview.py, host/fleetview.py): the record's candidate and the
hosts' per-version statistics summed over the fleet, and waiting for a candidate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest

from host.fleet import hosts_collection_name
from host.fleetview import FleetRefused, Progress, Target, fleet_status, summarize, wait_for_fleet
from host.http import create_app
from host.publish import abort_rollout, publish, start_rollout
from host.rollout import STABLE_SAMPLE
from host.rolloutview import sum_stats

from .support import Db, returning, wait_until
from .test_fleet_cli import two_hosts

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
STARTED = datetime(2026, 12, 1, 11, 59, 0, tzinfo=UTC)


def stats(calls: int, failures: int, p99: float, timeouts: int = 0) -> dict[str, Any]:
    """One host's <Stats> of one version."""
    return {
        "calls": calls,
        "failures": failures,
        "timeouts": timeouts,
        "error_rate": failures / calls if calls else 0.0,
        "p50_ms": p99 / 4,
        "p99_ms": p99,
    }


def host_doc(
    host_id: str,
    *,
    age: float = 0.5,
    stable: int = 6,
    candidate: int | None = 7,
    weight: float = 10,
    per_version: dict[str, Any] | None = None,
    now: datetime = NOW,
    **extra: Any,
) -> dict[str, Any]:
    """A hosts document serving greet r``stable`` (+ candidate), heartbeat ``age`` s old."""
    entry: dict[str, Any] = {
        "name": "greet",
        "version": f"greet@r{stable}:00000000",
        "revision": stable,
        "candidate": None,
        "stats": None,
    }
    if candidate is not None:
        entry["candidate"] = {
            "version": f"greet@r{candidate}:11111111",
            "revision": candidate,
            "mode": "canary",
            "weight": weight,
        }
        entry["stats"] = per_version
    return {
        "_id": host_id,
        "hostname": host_id.split(":")[0],
        "pid": 1,
        "heartbeat": (now - timedelta(seconds=age)).replace(tzinfo=None),
        "heartbeat_s": 5.0,
        "ttl_s": 15.0,
        "seq": 1,
        "plugins": [entry],
        **extra,
    }


RECORD = {
    "_id": "greet",
    "revision": 6,
    "rollout": {
        "revision": 7,
        "source": returning(7),
        "entrypoint": "main",
        "signature": None,
        "mode": "canary",
        "weight": 10.0,
        "sticky_key": "userId",
        "policy": {"max_error_rate": 0.05, "min_calls": 20, "max_p99_ms": None, "window_s": 60.0},
        "started_at": STARTED.replace(tzinfo=None),
        "updated_at": STARTED.replace(tzinfo=None),
        "steps": None,
    },
    "last_rollout": {
        "revision": 5,
        "version": "greet@r5:22222222",
        "outcome": "aborted",
        "reason": "error rate 1.00 > 0.05 after 20 calls (stable 0.00)",
        "by": "host-a:1",
        "at": STARTED.replace(tzinfo=None),
        "stats": None,
    },
}


def test_sum_stats_adds_counts_and_keeps_the_worst_percentiles() -> None:
    """Counts add up, the error rate is the fleet's, p50/p99 are the highest host's."""
    total = sum_stats([stats(100, 1, 10.0, timeouts=1), stats(300, 30, 4.0), stats(0, 0, 0.0)])
    assert (total["calls"], total["failures"], total["timeouts"]) == (400, 31, 1)
    assert total["error_rate"] == pytest.approx(31 / 400)
    assert (total["p50_ms"], total["p99_ms"], total["hosts"]) == (2.5, 10.0, 3)
    # A host sending no error_rate: its failures over its calls; junk counts as absent.
    odd = sum_stats([{"calls": 10, "failures": 5}, {"calls": "many", "p99_ms": True}])
    assert (odd["calls"], odd["error_rate"], odd["p99_ms"]) == (10, 0.5, None)
    assert sum_stats([]) == {
        "calls": 0, "failures": 0, "timeouts": 0, "error_rate": 0.0,
        "p50_ms": None, "p99_ms": None, "hosts": 0,
    }  # fmt: skip


def test_the_fleet_view_sums_the_rollout_over_live_hosts() -> None:
    """Live hosts holding the candidate are summed; dead ones are not; refusals are named."""
    refused = {
        "name": "greet", "revision": 7, "candidate": True, "stage": "import",
        "error": "No module named 'nope'", "version": "greet@r7:11111111",
    }  # fmt: skip
    stable_refusal = {"name": "greet", "revision": 5, "stage": "setup", "error": "old"}
    view = summarize(
        "app.functions",
        [RECORD],
        [
            host_doc("a:1", per_version={"stable": stats(90, 0, 3.0),
                                         "candidate": stats(10, 1, 5.0)}),
            host_doc("b:1", per_version={"stable": stats(180, 2, 8.0),
                                         "candidate": stats(20, 0, 4.0)}),
            host_doc("c:1", candidate=None, refused=[refused, stable_refusal]),
            host_doc("dead:1", age=60, per_version={"stable": stats(999, 999, 999.0)}),
        ],
        NOW,
    )  # fmt: skip
    greet = view.plugins["greet"]
    assert greet.converged and greet.hosts_serving == 3  # the stable r6 is everywhere
    rollout = greet.rollout
    assert rollout is not None
    assert rollout["revision"] == 7 and rollout["version"].startswith("greet@r7:")
    assert (rollout["mode"], rollout["weight"], rollout["sticky_key"]) == ("canary", 10.0, "userId")
    assert rollout["policy"]["max_error_rate"] == 0.05
    assert (rollout["hosts_holding"], rollout["hosts_alive"], rollout["behind"]) == (2, 3, ["c:1"])
    assert rollout["refused"] == [
        {"host": "c:1", "revision": 7, "stage": "import", "error": "No module named 'nope'"}
    ]
    summed = rollout["stats"]
    assert summed["hosts"] == 2 and "percentiles do not add" in summed["summed"]
    assert (summed["stable"]["calls"], summed["stable"]["failures"]) == (270, 2)
    assert summed["stable"]["p99_ms"] == 8.0
    assert (summed["candidate"]["calls"], summed["candidate"]["failures"]) == (30, 1)
    assert summed["candidate"]["error_rate"] == pytest.approx(1 / 30, abs=1e-6)
    assert summed["candidate"]["p99_ms"] == 5.0
    assert rollout["started_at"] == STARTED.isoformat()
    last = greet.last_rollout
    assert last is not None and last["outcome"] == "aborted" and last["by"] == "host-a:1"
    shape = view.as_dict()
    assert shape["plugins"]["greet"]["rollout"]["stats"]["candidate"]["calls"] == 30
    assert shape["plugins"]["greet"]["last_rollout"]["at"] == STARTED.isoformat()
    hosts = {h["id"]: h for h in shape["hosts"]}
    assert hosts["c:1"]["refused"]["greet"]["revision"] == 5  # both refusals are kept
    assert hosts["c:1"]["refused_candidates"]["greet"]["revision"] == 7
    assert hosts["a:1"]["plugins"]["greet"]["candidate"]["revision"] == 7
    assert hosts["a:1"]["plugins"]["greet"]["stats"]["candidate"]["calls"] == 10


def test_no_rollout_no_rollout_view() -> None:
    """A record without a rollout has rollout None (and no stats invented)."""
    plain = {"_id": "greet", "revision": 6}
    view = summarize("app.functions", [plain], [host_doc("a:1", candidate=None)], NOW)
    assert view.plugins["greet"].rollout is None
    assert view.plugins["greet"].as_dict()["last_rollout"] is None


def test_rollout_targets_read_well() -> None:
    """Progress lines name the candidate and weight, or the candidate that must go."""
    line = Progress(1, 2, (Target("greet", 6, candidate=7, weight=25),), 0).line
    assert line == "1/2 hosts serving greet r6 + candidate r7 at 25%"
    gone = Progress(2, 2, (Target("greet", 6, without=7),), 0).line
    assert gone == "2/2 hosts serving greet r6 without candidate r7"


async def _server_now(db: Db) -> datetime:
    reply = await db.command("hello")
    local: datetime = reply["localTime"]
    return local.replace(tzinfo=UTC)


async def test_fleet_status_reads_rollouts_from_the_server(db: Db) -> None:
    """fleet_status carries the record's rollout and the hosts' reports (real server)."""
    await publish(db, "greet", returning(6))
    started = await start_rollout(db, "greet", returning(7), weight=10)
    now = await _server_now(db)
    hosts = db[hosts_collection_name("functions")]
    per_version = {"stable": stats(50, 0, 2.0), "candidate": stats(5, 5, 9.0)}
    await hosts.insert_many(
        [
            host_doc(
                f"h{i}:1", stable=1, candidate=started.revision, per_version=per_version, now=now
            )
            for i in range(3)
        ]
    )
    view = await fleet_status(db, name="greet")
    rollout = view.plugins["greet"].rollout
    assert rollout is not None and rollout["hosts_holding"] == 3
    assert rollout["stats"]["candidate"]["failures"] == 15
    assert rollout["stats"]["candidate"]["error_rate"] == 1.0
    await abort_rollout(db, "greet", reason="by operator", by="cli")
    after = (await fleet_status(db, name="greet")).plugins["greet"]
    assert after.rollout is None and after.last_rollout is not None
    assert after.last_rollout["outcome"] == "aborted" and after.last_rollout["revision"] == 2


async def test_waiting_for_a_candidate_converges_or_names_the_refusal(db: Db) -> None:
    """wait_for_fleet with a candidate target ends when hosts hold it, or when one refuses it."""
    hosts = db[hosts_collection_name("functions")]
    now = await _server_now(db)
    await hosts.insert_many(
        [host_doc(f"h{i}:1", stable=6, candidate=None, now=now) for i in range(2)]
    )
    target = Target("greet", 6, candidate=7, weight=10)
    lines: list[str] = []

    async def hosts_take_it() -> None:
        for i in range(2):
            await anyio.sleep(0.05)
            doc = host_doc(f"h{i}:1", stable=6, candidate=7, weight=10, now=now)
            await hosts.update_one(
                {"_id": doc["_id"]},
                {"$set": {"plugins": doc["plugins"]}, "$currentDate": {"heartbeat": True}},
            )

    async with anyio.create_task_group() as tg:
        tg.start_soon(hosts_take_it)
        done = await wait_for_fleet(
            db, [target], timeout=15, on_progress=lambda p: lines.append(p.line)
        )
    assert set(done.hosts) == {"h0:1", "h1:1"}
    assert lines[-1] == "2/2 hosts serving greet r6 + candidate r7 at 10%"

    refusal = {"name": "greet", "revision": 8, "candidate": True, "stage": "compile",
               "error": "SyntaxError: invalid syntax"}  # fmt: skip
    await hosts.update_many(
        {}, {"$set": {"refused": [refusal]}, "$currentDate": {"heartbeat": True}}
    )
    with pytest.raises(FleetRefused, match="refused greet r8 at stage compile"):
        await wait_for_fleet(db, [Target("greet", 6, candidate=8)], timeout=15)


async def test_get_fleet_sums_what_real_hosts_report(db: Db) -> None:
    """Two real hosts serve a canary; GET /fleet sums their per-version calls."""
    await publish(db, "greet", returning(1))
    async with two_hosts(db) as hosts:
        started = await start_rollout(db, "greet", returning(2), weight=50)
        await wait_for_fleet(db, [Target("greet", 1, candidate=started.revision)], timeout=15)
        served = [await hosts[i % 2].call("greet", {"userId": f"u{i}"}) for i in range(40)]
        assert set(served) <= {1, 2}
        app = create_app(hosts[0])
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://plugin-host") as client,
        ):

            async def summed() -> dict[str, Any] | None:
                rollout = (await client.get("/fleet")).json()["plugins"]["greet"]["rollout"]
                stats = rollout["stats"]
                return rollout if stats["candidate"]["calls"] == served.count(2) else None

            rollout = await wait_until(summed, "both hosts report their candidate calls")
        assert rollout["hosts_holding"] == 2 and rollout["stats"]["hosts"] == 2
        assert rollout["stats"]["candidate"]["failures"] == 0
        # Hosts count every candidate call, but sample the stable's successes (each host
        # counts every STABLE_SAMPLE-th, as that many): the sum is short by < one sample a host.
        stable = rollout["stats"]["stable"]["calls"]
        assert stable % STABLE_SAMPLE == 0
        assert served.count(1) - 2 * STABLE_SAMPLE < stable <= served.count(1)
