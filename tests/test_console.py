"""Tests for the console's routes: the static page, GET /stats, GET /triggers, rollout actions."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import httpx
import pytest

from host import PluginHost, publish
from host.console import CONSOLE_PATHS, STATIC_FILES
from host.console.actions import ActionError, parse_action
from host.console.rates import percentile
from host.http import create_app
from host.triggers.lease import state_collection_name

from .support import Db, wait_until

pytestmark = pytest.mark.anyio

TOKEN = "console-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OK = "async def main(ctx, args):\n    return args\n"
BOOM = "def helper(x):\n    return 1 / x\n\n\ndef main(ctx, args):\n    return helper(args)\n"


@contextlib.asynccontextmanager
async def console_client(db: Db) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """A host with two plugins, its app with a token, and a client of it (lifespan on)."""
    await publish.publish(db, "ok", OK)
    await publish.publish(db, "boom", BOOM)
    async with PluginHost(db) as host:
        app = create_app(host, auth_token=TOKEN)
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://localhost") as client,
        ):
            yield client, app


async def test_page_and_files_are_open_and_data_routes_are_not(db: Db) -> None:
    """/, /console and its files need no token and carry the CSP; data routes need it."""
    async with console_client(db) as (client, _):
        for path in CONSOLE_PATHS:
            reply = await client.get(path)
            assert reply.status_code == 200, path
            assert "default-src 'self'" in reply.headers["content-security-policy"]
            assert reply.headers["x-content-type-options"] == "nosniff"
        page = await client.get("/")
        assert page.headers["content-type"].startswith("text/html")
        assert (
            (await client.get("/console/app.js"))
            .headers["content-type"]
            .startswith("text/javascript")
        )
        assert (await client.get("/console/secrets.txt", headers=AUTH)).status_code == 404
        for path in ("/functions", "/stats", "/triggers", "/fleet"):
            assert (await client.get(path)).status_code == 401, path
        refused = await client.post("/functions/ok/rollout", json={"action": "abort"})
        assert refused.status_code == 401


def test_every_file_the_page_loads_is_shipped() -> None:
    """Each /console/ path named by the page or imported by a module is a console route."""
    folder = resources.files("host.console")
    named: set[str] = set()
    for name in STATIC_FILES:
        text = folder.joinpath(name).read_text()
        named |= set(re.findall(r'"/console/([\w.-]+)"', text))
        named |= set(re.findall(r'from "\./([\w.-]+)"', text))
    assert named, "the page names no file"
    served = {path.removeprefix("/console/") for path in CONSOLE_PATHS}  # files + config.json
    assert named <= served, named - served


async def test_stats_counts_calls_errors_and_the_last_traceback(db: Db) -> None:
    """/stats gives calls/s, error rate and p99 per plugin and version, and the traceback."""
    async with console_client(db) as (client, app):
        app.state.rates.sample()  # a baseline of its own, whatever the sampler did
        for n in (1, 2, 4):
            assert (await client.post("/functions/ok/call", json=n, headers=AUTH)).is_success
            assert (await client.post("/functions/boom/call", json=n, headers=AUTH)).is_success
        failed = await client.post("/functions/boom/call", json=0, headers=AUTH)
        assert failed.status_code == 500
        app.state.rates.sample()
        # The last error comes from the host's events, delivered on a later loop turn.
        await wait_until(lambda: "boom" in app.state.rates.last_errors, "the error is seen")
        stats = (await client.get("/stats", headers=AUTH)).json()
    ok, boom = stats["plugins"]["ok"], stats["plugins"]["boom"]
    assert ok["calls"] == 3 and ok["failures"] == 0 and ok["error_rate"] == 0
    assert boom["calls"] == 4 and boom["failures"] == 1 and boom["error_rate"] == 0.25
    assert boom["p99_ms"] is not None and boom["p50_ms"] <= boom["p99_ms"]
    assert boom["calls_per_s"] > 0 and len(boom["series"]["t"]) >= 1
    (version,) = boom["versions"]
    assert version.startswith("boom@r1:") and boom["versions"][version]["calls"] == 4
    last = boom["last_error"]
    assert (last["event"], last["error_type"], last["version"]) == (
        "call.failed",
        "ZeroDivisionError",
        version,
    )
    assert 'File "<plugin boom@r1>", line 2, in helper' in last["traceback"]
    assert "dispatch.py" not in last["traceback"]  # the plugin's own frames only
    assert ok["last_error"] is None


def test_percentile_interpolates_inside_the_bucket() -> None:
    """Quantiles come from the bucket holding the rank, interpolated; none without data."""
    bounds = (1.0, 2.0, 4.0)
    assert percentile([0, 0, 0, 0], 0.5, bounds) is None
    assert percentile([10, 0, 0, 0], 0.5, bounds) == 0.5
    assert percentile([0, 10, 0, 0], 0.99, bounds) == pytest.approx(1.99)
    assert percentile([50, 0, 50, 0], 0.99, bounds) == pytest.approx(3.96)
    assert percentile([0, 0, 0, 3], 0.5, bounds) == 4.0  # +Inf: the last bound


def test_rollout_action_bodies_are_checked() -> None:
    """An action body names a known action and, for weight, a percent from 0 to 100."""
    assert parse_action({"action": "weight", "weight": 25}) == ("weight", 25.0)
    assert parse_action({"action": "promote", "canary": 5}) == ("promote", 5.0)
    assert parse_action({"action": "abort"}) == ("abort", None)
    for body, words in (
        ([], "JSON object"),
        ({"action": "delete"}, "one of promote, abort, weight"),
        ({"action": "weight"}, "'weight' must be a number"),
        ({"action": "weight", "weight": 101}, "from 0 to 100"),
        ({"action": "weight", "weight": True}, "'weight' must be a number"),
        ({"action": "abort", "force": 1}, "unknown field(s): force"),
    ):
        with pytest.raises(ActionError, match=re.escape(words)) as caught:
            parse_action(body)
        assert caught.value.status == 422


async def test_rollout_route_checks_the_body_then_calls_host_publish(db: Db) -> None:
    """POST /functions/{name}/rollout: 415/422 for bad bodies; no rollout running is said."""
    async with console_client(db) as (client, _):
        plain = {**AUTH, "content-type": "text/plain"}
        text = await client.post("/functions/ok/rollout", content=b"abort", headers=plain)
        assert text.status_code == 415
        bad = await client.post("/functions/ok/rollout", json={"action": "nope"}, headers=AUTH)
        assert bad.status_code == 422
        assert "'action' must be one of" in bad.json()["error"]["message"]
        reply = await client.post("/functions/ok/rollout", json={"action": "abort"}, headers=AUTH)
    if hasattr(publish, "abort_rollout"):  # issue 16's operations are in this build
        assert reply.status_code in (200, 409), reply.text
        if reply.status_code == 200:  # abort_rollout says it recorded nothing: none ran
            assert reply.json() == {"plugin": "ok", "action": "abort", "recorded": False}
    else:
        assert reply.status_code == 501
        assert "host.publish.abort_rollout" in reply.json()["error"]["message"]


async def test_triggers_route_serves_the_trigger_state(db: Db) -> None:
    """GET /triggers lists each trigger state document with its lag and dead letters."""
    now = datetime.now(UTC)
    await db[state_collection_name("functions")].insert_one(
        {
            "_id": "ok/orders",
            "plugin": "ok",
            "name": "orders",
            "collection": "orders",
            "owner": None,
            "status": "running",
            "lag_ms": 1234.5,
            "events_per_s": 3.5,
            "processed": 42,
            "history_lost": [],
            "updated_at": now,
        }
    )
    async with console_client(db) as (client, _):
        reply = await client.get("/triggers", headers=AUTH)
        only = await client.get("/triggers", params={"plugin": "other"}, headers=AUTH)
    assert reply.status_code == 200
    (row,) = reply.json()["triggers"]
    assert (row["id"], row["lag_ms"], row["processed"], row["dead_letters"]) == (
        "ok/orders",
        1234.5,
        42,
        0,
    )
    assert only.json() == {"triggers": []}
