"""Bad records: each is rejected naming its field, the old version serves, nothing crashes."""

from __future__ import annotations

from typing import Any

import pytest
from bson import Binary

from host import PluginHost, PluginNotFound
from tests.support import Db, next_event, torn_pair

pytestmark = pytest.mark.anyio

# A field update that makes the "victim" record invalid, and the field the rejection names.
BAD_FIELDS: dict[str, tuple[dict[str, Any], str]] = {
    "source_over_default_limit": ({"source": "#" * 1_048_577}, "source"),
    "source_int": ({"source": 42}, "source"),
    "source_binary": ({"source": Binary(b"async def main(ctx, args):\n    return 1\n")}, "source"),
    "fn_binary": ({"source": None, "fn": Binary(b"x = 1\n")}, "fn"),
    "source_empty": ({"source": "   \n"}, "source"),
    "source_nul": ({"source": "x = 1\x00\n"}, "source"),
    "source_and_fn_conflict": ({"fn": "x = 2\n"}, "fn"),
    "timeout_text": ({"timeout": "soon"}, "timeout"),
    "timeout_negative": ({"timeout": -1}, "timeout"),
    "timeout_nan": ({"timeout": float("nan")}, "timeout"),
    "max_concurrency_zero": ({"max_concurrency": 0}, "max_concurrency"),
    "max_concurrency_float": ({"max_concurrency": 1.5}, "max_concurrency"),
    "enabled_text": ({"enabled": "yes"}, "enabled"),
    "revision_negative": ({"revision": -1}, "revision"),
    "revision_bool": ({"revision": True}, "revision"),
    "entrypoint_not_identifier": ({"entrypoint": "not an identifier"}, "entrypoint"),
    "entrypoint_keyword": ({"entrypoint": "class"}, "entrypoint"),
    "meta_text": ({"meta": "x"}, "meta"),
    "created_at_text": ({"createdAt": "yesterday"}, "createdAt"),
    "signature_int": ({"signature": 1}, "signature"),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
async def test_bad_field_is_rejected_and_old_version_serves(db: Db, case: str) -> None:
    """An invalid field → plugin.rejected naming the field; the old version keeps serving."""
    update, field = BAD_FIELDS[case]
    async with PluginHost(db) as host, host.events() as events:
        await db.functions.insert_one({"_id": "victim", "source": torn_pair(1)})
        loaded = await next_event(events, "plugin.loaded")
        unset = {k: "" for k, v in update.items() if v is None}
        change: dict[str, Any] = {"$set": {k: v for k, v in update.items() if v is not None}}
        if unset:
            change["$unset"] = unset
        await db.functions.update_one({"_id": "victim"}, change)
        rejected = await next_event(events, "plugin.rejected")
        assert rejected["plugin"] == "victim"
        assert rejected["field"] == field, rejected["error"]
        assert rejected["serving"] == loaded["version"]
        assert await host.call("victim") == (1, 1)
        info = host.plugin("victim")
        assert info is not None
        assert info.status == "degraded"
        # Nothing is wedged: a good record loads next.
        await db.functions.replace_one({"_id": "victim"}, {"source": torn_pair(2)})
        await next_event(events, "plugin.reloaded")
        assert await host.call("victim") == (2, 2)


async def test_source_limit_is_configurable(db: Db) -> None:
    """max_source_bytes bounds the source; a record just under it loads, one over is rejected."""
    small = torn_pair(1)
    async with PluginHost(db, max_source_bytes=200) as host, host.events() as events:
        await db.functions.insert_one({"_id": "s", "source": small + "#" * (199 - len(small))})
        await next_event(events, "plugin.loaded")
        await db.functions.update_one({"_id": "s"}, {"$set": {"source": torn_pair(2) + "#" * 200}})
        rejected = await next_event(events, "plugin.rejected")
        assert rejected["field"] == "source"
        assert "200" in rejected["error"]
        assert await host.call("s") == (1, 1)


@pytest.mark.parametrize(
    "name", ["../etc", "a/b", "x" * 129, "..", "with space", "naïve", "a\x00b", 42]
)
async def test_bad_name_is_rejected_and_loads_nothing(db: Db, name: Any) -> None:
    """A record whose _id is not a valid plugin name → plugin.rejected on _id; nothing loads."""
    async with PluginHost(db) as host, host.events() as events:
        await db.functions.insert_one({"_id": name, "source": torn_pair(1)})
        rejected = await next_event(events, "plugin.rejected")
        assert rejected["field"] == "_id"
        assert rejected["serving"] is None
        assert len(host._registry) == 0
        with pytest.raises(PluginNotFound):
            await host.call(str(name))
        # The host is fine: a good record next to it loads.
        await db.functions.insert_one({"_id": "ok", "source": torn_pair(3)})
        await next_event(events, "plugin.loaded")
        assert await host.call("ok") == (3, 3)


async def test_bad_records_in_initial_load_do_not_block_good_ones(db: Db) -> None:
    """Bad records present at start-up are rejected one by one; the good ones load and serve."""
    await db.functions.insert_many(
        [
            {"_id": "good", "source": torn_pair(1)},
            {"_id": "a/b", "source": torn_pair(2)},
            {"_id": "bin", "source": Binary(b"x")},
            {"_id": "late", "source": torn_pair(3), "timeout": "soon"},
            {"_id": "huge", "source": "#" * 2_000_000},
        ]
    )
    async with PluginHost(db) as host:
        assert set(host._registry.names()) == {"good"}
        assert await host.call("good") == (1, 1)
        statuses = {info.name: info.status for info in host.plugins()}
        assert statuses["good"] == "serving"
        assert statuses["late"] == statuses["bin"] == statuses["huge"] == "failed"
