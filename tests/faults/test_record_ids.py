"""Record identity faults (issue 13 items 7 and 12): non-string ``_id``, ``updatedAt``, huge ids.

* A non-string ``_id`` (``5``, ``None``, ``True``, an ObjectId, a float) used to be
  stringified into the name "5", "None", "True"..., so deleting ``{_id: 5}`` unloaded the
  plugin "5", updating it marked "5" degraded, and inserting it hid "5" at the next start.
  It is now refused as that record, by its exact ``_id``, and touches no other plugin.
* A change to ``updatedAt`` alone reloaded the plugin; it no longer does.
* A 1 MB ``_id`` produced 40 MB of logs; event fields are now cut before anything sees them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from bson import ObjectId
from structlog.testing import capture_logs

from host import PluginHost
from host.events import MAX_EVENT_NAME_CHARS, MAX_EVENT_VALUE_CHARS
from host.records import describe_id
from tests.support import Db, drain, next_event, returning

pytestmark = pytest.mark.anyio

OID = ObjectId("65f0c0ffee0000000000abcd")
IDS: dict[str, Any] = {"int": 5, "null": None, "bool": True, "objectid": OID, "float": 5.5}


@pytest.mark.parametrize("case", sorted(IDS))
async def test_non_string_id_is_refused_and_never_touches_the_namesake(db: Db, case: str) -> None:
    """Insert, update, delete and restart with a non-string _id leave the plugin str(_id) alone."""
    raw = IDS[case]
    victim = str(raw)
    async with PluginHost(db) as host, host.events() as events:
        await db.functions.insert_one({"_id": victim, "source": returning(1)})
        await next_event(events, "plugin.loaded")
        await db.functions.insert_one({"_id": raw, "source": returning(2)})
        rejected = await next_event(events, "plugin.rejected")
        assert rejected["_id"] == describe_id(raw)
        assert rejected["plugin"] is None and rejected["field"] == "_id"
        assert "must be a string" in rejected["error"]
        await db.functions.update_one({"_id": raw}, {"$set": {"source": "syntax error("}})
        assert (await next_event(events, "plugin.rejected"))["_id"] == describe_id(raw)
        await db.functions.delete_one({"_id": raw})
        # A marker change, so that anything the delete caused has happened by now.
        await db.functions.insert_one({"_id": "marker", "source": returning(0)})
        await next_event(events, "plugin.loaded")
        seen = [e.event for e in await drain(events)]
        assert "plugin.unloaded" not in seen
        info = {i.name: i for i in host.plugins()}[victim]
        assert (info.status, info.last_error) == ("serving", None)
        assert await host.call(victim) == 1
        await db.functions.insert_one({"_id": raw, "source": returning(2)})
        await next_event(events, "plugin.rejected")
    async with PluginHost(db) as host:  # a restart with the bad record in the collection
        assert await host.call(victim) == 1
        assert set(host._registry.names()) == {victim, "marker"}


async def test_updated_at_alone_does_not_reload(db: Db) -> None:
    """Touching only updatedAt keeps the same version live: no reload, no new Plugin."""
    async with PluginHost(db) as host, host.events() as events:
        await db.functions.insert_one({"_id": "u", "source": returning(1)})
        await next_event(events, "plugin.loaded")
        before = host.current("u")
        for _ in range(3):
            await db.functions.update_one({"_id": "u"}, {"$set": {"updatedAt": datetime.now(UTC)}})
        await db.functions.insert_one({"_id": "marker", "source": returning(0)})
        await next_event(events, "plugin.loaded")
        seen = [e.event for e in await drain(events)]
        assert "plugin.reloaded" not in seen
        assert host.current("u") is before
        # A real change still reloads.
        await db.functions.update_one({"_id": "u"}, {"$set": {"source": returning(2)}})
        await next_event(events, "plugin.reloaded")
        assert await host.call("u") == 2


async def test_a_huge_id_does_not_flood_the_logs(db: Db) -> None:
    """A 1 MB _id is cut in every event: the whole log stays a few KB, not megabytes."""
    huge = "x" * 1_000_000
    with capture_logs() as logs:
        async with PluginHost(db) as host, host.events() as events:
            await db.functions.insert_one({"_id": huge, "source": returning(1)})
            rejected = await next_event(events, "plugin.rejected")
            await db.functions.update_one({"_id": huge}, {"$set": {"source": returning(2)}})
            await next_event(events, "plugin.rejected")
            await db.functions.delete_one({"_id": huge})
            await db.functions.insert_one({"_id": "marker", "source": returning(0)})
            await next_event(events, "plugin.loaded")
    assert rejected["field"] == "_id"
    assert len(rejected["plugin"]) <= MAX_EVENT_NAME_CHARS + 40
    assert len(rejected["error"]) <= MAX_EVENT_VALUE_CHARS + 40
    total = sum(len(repr(entry)) for entry in logs)
    assert total < 100_000, f"{total} characters of logs for one huge _id"
