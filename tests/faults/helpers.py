"""Helpers shared by the fault-injection tests."""

from __future__ import annotations

from typing import Any

from host import PluginHost
from host.records import parse_record
from tests.support import Db


async def fail_command(db: Db, mode: Any, **data: Any) -> None:
    """Configure the ``failCommand`` failpoint of ``db``'s server (``mode="off"`` clears it)."""
    await db.client.admin.command("configureFailPoint", "failCommand", mode=mode, data=data)


async def collection_versions(db: Db, collection: str = "functions") -> dict[str, str]:
    """name -> version of every enabled record in the collection, as the host would load it."""
    out: dict[str, str] = {}
    async for doc in db[collection].find({}):
        record = parse_record(doc)
        if record.enabled:
            out[record.name] = record.version
    return out


def registry_versions(host: PluginHost) -> dict[str, str]:
    """name -> version of every version the host serves."""
    return {name: plugin.version for name, plugin in host._registry.items()}
