"""A full disk under ``plugin-host embedded-mongo --data-dir``: no acknowledged write is lost.

The real CLI on a 2 MiB tmpfs (mounted by the test as root; skipped visibly otherwise),
driven by real PyMongo: inserts until the disk is full, kill -9, a restart on the still
full disk (which must fail naming the disk, not the port), then a restart with room.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pymongo.errors import OperationFailure

from tests.embedded.support import Server, cli, remount

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.embedded_only("durability of the embedded server's data directory"),
]


def test_full_disk_loses_no_acknowledged_write(tiny_dir: Path) -> None:
    """Every acknowledged insert survives ENOSPC, kill -9 and restarts; nothing else appears."""
    server = Server(tiny_dir)
    acknowledged: list[int] = []
    try:
        with server.client() as client:
            coll = client.app.items
            failure: OperationFailure | None = None
            for i in range(2000):
                try:
                    coll.insert_one({"_id": i, "pad": "p" * 8000})
                except OperationFailure as exc:
                    failure = exc
                    break
                acknowledged.append(i)
            assert failure is not None, "the 2 MiB disk never filled up"
            assert failure.code == 14031
            assert failure.details is not None
            assert failure.details["codeName"] == "OutOfDiskSpace"
            assert "out of disk space" in str(failure)
            assert coll.count_documents({}) == len(acknowledged)
    finally:
        server.kill9()
    assert acknowledged, "nothing was acknowledged before the disk filled up"

    full = subprocess.run(
        [*cli(), "embedded-mongo", "--port", "0", "--data-dir", str(tiny_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert full.returncode == 1  # a run-time failure, not a usage error
    assert "cannot recover the data directory" in full.stderr
    assert "No space left on device" in full.stderr
    assert "--port" not in full.stderr

    remount(tiny_dir, "64m")
    again = Server(tiny_dir)
    try:
        recovered = [e for e in again.events if e.get("event") == "embedded.recovered"]
        assert recovered and recovered[0]["journal_entries_replayed"] == len(acknowledged) + 1
        assert not [e for e in again.events if e.get("event") == "embedded.journal_torn"]
        with again.client() as client:
            ids = [d["_id"] for d in client.app.items.find({}, {"_id": 1}).sort("_id", 1)]
        assert ids == acknowledged
    finally:
        again.kill9()
