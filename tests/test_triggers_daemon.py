"""Triggers in `plugin-host run` (a real process): SIGTERM drains them, a restart resumes."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from tests.daemon_support import Daemon, free_port, wait_ready
from tests.support import Db
from tests.triggers_support import RECORDER, duplicates, record, state, wait_running, wait_seen

pytestmark = pytest.mark.anyio


async def test_sigterm_checkpoints_and_releases_and_a_restart_resumes(
    mongo_uri: str, db: Db, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """`run` handles the events, drains on SIGTERM (lease released), and the next run resumes."""
    await db.functions.insert_one(record("agg", RECORDER, {"collection": "orders"}))
    # (inserted while the daemon runs, seen in all by the end of the round)
    for round_, (first, last, expected) in enumerate(((0, 50, 50), (50, 60, 65))):
        port = free_port()
        run_dir = tmp_path / f"run{round_}"
        run_dir.mkdir()
        daemon = Daemon.run(run_dir, mongo_uri, db.name, f"127.0.0.1:{port}")
        daemons.append(daemon)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            await wait_ready(client, daemon)
            await wait_running(db, "agg/orders")
            if round_ == 1:  # written while no host ran: the checkpoint brings them back
                await wait_seen(db, 55)
            await db.orders.insert_many([{"_id": i} for i in range(first, last)])
            await wait_seen(db, expected)
            metrics = (await client.get("/metrics")).text
            assert "plugin_host_triggers_owned 1.0" in metrics
            assert 'plugin_host_trigger_events_total{trigger="agg/orders"}' in metrics
        daemon.proc.send_signal(signal.SIGTERM)
        assert await daemon.exit_code() == 0
        out, err = daemon.output()
        assert '"event": "trigger.stopped"' in out
        assert "Traceback" not in err
        doc = await state(db, "agg/orders")
        assert doc is not None and doc["owner"] is None and doc["status"] == "waiting"
        if round_ == 0:
            await db.orders.insert_many([{"_id": i} for i in range(100, 105)])
    assert await db.seen.count_documents({}) == 65
    assert await duplicates(db) == []
