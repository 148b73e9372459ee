"""Durability of ``plugin-host embedded-mongo --data-dir``: kill -9, restart, nothing lost.

These run the real CLI as a subprocess, so they are embedded-only.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo.errors import DuplicateKeyError

from tests.embedded.support import Server, cli

Doc = dict[str, Any]


pytestmark = pytest.mark.embedded_only("durability of the embedded server's data directory")


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers started by a test; any still running are killed afterwards."""
    started: list[Server] = []
    yield started
    for server in started:
        if server.proc.poll() is None:
            server.kill9()


def start(servers: list[Server], data_dir: Path | None) -> Server:
    """Start a server and remember it for cleanup."""
    server = Server(data_dir)
    servers.append(server)
    return server


def test_acknowledged_writes_survive_kill_9(tmp_path: Path, servers: list[Server]) -> None:
    """After kill -9 and restarts: every acknowledged write, index and resume token is there.

    One data directory through a crash, a clean stop and a lock conflict: each CLI start
    costs a second of imports, so the scenarios share servers.
    """
    first = start(servers, tmp_path)
    client = first.client()
    coll = client.app.items
    coll.create_index("sku", unique=True)
    coll.insert_many([{"_id": i, "sku": f"s{i}", "n": 0} for i in range(200)])
    coll.update_many({"_id": {"$lt": 50}}, {"$inc": {"n": 1}})
    coll.delete_many({"_id": {"$gte": 190}})
    client.app.create_collection("images", changeStreamPreAndPostImages={"enabled": True})
    with coll.watch() as stream:
        coll.insert_one({"_id": "marker", "sku": "m"})
        token = stream.next()["_id"]
    coll.insert_one({"_id": "after1", "sku": "a1"})
    coll.update_one({"_id": "after1"}, {"$set": {"late": True}})
    client.close()
    first.kill9()

    second = start(servers, tmp_path)
    assert any(e.get("event") == "embedded.recovered" for e in second.events)
    with second.client() as client:
        coll = client.app.items
        assert coll.count_documents({}) == 192
        assert coll.count_documents({"n": 1}) == 50
        assert coll.find_one({"_id": 195}) is None
        assert coll.find_one({"_id": "after1"}) == {"_id": "after1", "sku": "a1", "late": True}
        assert "sku_1" in coll.index_information()
        with pytest.raises(DuplicateKeyError):
            coll.insert_one({"sku": "s3"})
        options = client.app["images"].options()
        assert options["changeStreamPreAndPostImages"] == {"enabled": True}
        with coll.watch(resume_after=token) as resumed:
            insert, update = resumed.next(), resumed.next()
        assert (insert["operationType"], insert["documentKey"]) == ("insert", {"_id": "after1"})
        assert update["operationType"] == "update"
        assert update["updateDescription"]["updatedFields"] == {"late": True}
        coll.insert_one({"_id": "second", "sku": "s-second"})
    assert second.terminate() == 0

    third = start(servers, tmp_path)
    with third.client() as client:
        assert client.app.items.count_documents({}) == 193
        assert client.app.items.find_one({"_id": "second"}) is not None
    locked = subprocess.run(
        [*cli(), "embedded-mongo", "--port", "0", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert locked.returncode != 0
    assert "in use" in locked.stderr
    assert str(tmp_path) in locked.stderr
    third.kill9()


def test_in_memory_and_sigterm(servers: list[Server]) -> None:
    """Without --data-dir nothing survives a restart; SIGTERM exits with status 0."""
    server = start(servers, None)
    with server.client() as client:
        client.app.c.insert_one({"_id": 1})
    # A served command also proves the CLI got past installing its signal handlers,
    # which it does just after logging embedded.started.
    assert server.terminate() == 0
    assert server.events[-1]["event"] == "embedded.stopped"
    server = start(servers, None)
    with server.client() as client:
        assert "app" not in client.list_database_names()
    server.kill9()
