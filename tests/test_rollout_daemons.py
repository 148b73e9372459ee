"""Progressive delivery across real `plugin-host run` processes, over real HTTP."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from host.publish import publish

from .daemon_support import Daemon
from .rollout_support import RAISING, start, value_source
from .support import wait_until
from .test_fleet_daemons import fleet_of, host_ids

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(300)]

Doc = dict[str, Any]


async def test_candidate_aborted_fleet_wide_over_http(
    mongo_uri: str, db: AsyncDatabase[Doc], tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Two daemons: pinned calls and X-Plugin-Version name what served; an unknown pin is a
    409 naming the live versions; a candidate failing every call is aborted by the daemon
    that served it, dropped by both, recorded once, and both then serve only the stable."""
    await publish(db, "p", value_source("stable"))
    async with fleet_of(2, tmp_path, mongo_uri, db, daemons) as fleet:
        (first, one), (_, two) = fleet
        ids = await host_ids(db)
        revision = await start(
            db, "p", RAISING, weight=50, policy={"max_error_rate": 0.05, "min_calls": 20}
        )

        async def holds_candidate(client: Any) -> bool:
            reply = await client.post("/functions/p/call", headers={"X-Plugin-Version": "r2"})
            return bool(reply.status_code == 500)  # the candidate ran (and raised)

        for client in (one, two):
            await wait_until(functools.partial(holds_candidate, client), "the candidate is live")
        conflict = await one.post("/functions/p/call", headers={"X-Plugin-Version": "r9"})
        assert conflict.status_code == 409
        error = conflict.json()["error"]
        assert error["type"] == "VersionNotLive"
        assert error["live"][0].startswith("p@r1:") and error["live"][1].startswith("p@r2:")
        pinned = await two.post("/functions/p/call", headers={"X-Plugin-Version": "1"})
        assert pinned.json()["result"] == "stable"
        assert pinned.headers["x-plugin-version"] == pinned.json()["version"]

        # Unpinned calls on the first daemon until it takes the candidate out of rotation:
        # the two pinned calls above count, so at most 18 more failures reach callers.
        failures = 0
        for _ in range(2000):
            reply = await one.post("/functions/p/call", headers={"X-Plugin-Key": f"k{_}"})
            if reply.status_code == 500:
                failures += 1
                assert reply.json()["error"]["version"].startswith("p@r2:")
            else:
                assert reply.json()["result"] == "stable"
                assert reply.headers["x-plugin-version"].startswith("p@r1:")
            record = await db.functions.find_one({"_id": "p"})
            if record is not None and "rollout" not in record:
                break
        assert failures <= 19
        record = await db.functions.find_one({"_id": "p"})
        assert record is not None and "rollout" not in record
        last = record["last_rollout"]
        assert (last["revision"], last["outcome"]) == (revision, "aborted")
        assert last["by"] == ids[first.proc.pid]
        assert last["reason"].startswith("error rate 1.00 > 0.05 after 20 calls")

        for client in (one, two):
            await wait_until(
                functools.partial(_pin_refused, client), "the daemon dropped it", timeout=10
            )
            for _ in range(20):
                reply = await client.post("/functions/p/call")
                assert reply.status_code == 200 and reply.json()["result"] == "stable"


async def _pin_refused(client: Any) -> bool:
    reply = await client.post("/functions/p/call", headers={"X-Plugin-Version": "r2"})
    return bool(reply.status_code == 409)
