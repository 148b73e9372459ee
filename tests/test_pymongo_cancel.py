"""Cancelling PyMongo's async server selection from an anyio scope leaves the client usable.

Without :mod:`host.pymongo_cancel` (Python 3.11), every round here wedged the topology
lock: ``client.close()`` never returned (the daemon that could not reach MongoDB hung).
"""

from __future__ import annotations

import contextlib
import sys

import anyio
import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from host import pymongo_cancel

from .daemon_support import free_port

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("cancel_after", [0.0, 0.05, 0.3])
async def test_close_returns_after_a_cancelled_server_selection(cancel_after: float) -> None:
    """Operations cancelled while selecting an unreachable server do not wedge the client."""
    import pymongo.asynchronous.topology as topology

    import host.runtime  # importing the host installs the replacement  # noqa: F401

    if sys.version_info < (3, 12):
        assert getattr(topology, "_async_cond_wait") is pymongo_cancel._cond_wait  # noqa: B009
    uri = f"mongodb://127.0.0.1:{free_port()}/?replicaSet=rs0&serverSelectionTimeoutMS=20000"
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(uri)

    async def find() -> None:
        with contextlib.suppress(PyMongoError):  # cancelled long before its 20 s timeout
            await client.app.c.find_one({})

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(find)
        await anyio.sleep(cancel_after)
        tg.cancel_scope.cancel()
    with anyio.move_on_after(15) as scope:
        await client.close()
    assert not scope.cancelled_caught, "client.close() hung: the topology lock was left held"
    assert not client._topology._lock.locked()
