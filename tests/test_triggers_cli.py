"""The trigger commands (`triggers`, `deadletter list|retry|drop`) through real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta

import anyio
import pytest

from host.triggerview import deadletters_collection_name, triggers_collection_name

from .support import Db
from .test_fleet_daemons import cli
from .test_triggerview import beat, dead_letter, server_now, state

pytestmark = pytest.mark.anyio


async def test_triggers_lists_owner_lag_dead_letters_and_gaps(mongo_uri: str, db: Db) -> None:
    """`triggers` shows owner, lag, dead letters and history-lost gaps per trigger (and --json)."""
    now = await server_now(db)
    await beat(db, "a:1")
    gap = {"from": now - timedelta(seconds=30), "to": now, "at": now, "policy": "resume_from_now"}
    await db[triggers_collection_name("functions")].insert_many(
        [
            state(
                "agg/sales",
                owner="a:1",
                lease_expires=now + timedelta(seconds=30),
                lag_ms=3.25,
                processed=7,
                history_lost=[gap],
            ),
            state("agg/orders", owner="dead:1", lease_expires=now - timedelta(seconds=1)),
        ]
    )
    await db[deadletters_collection_name("functions")].insert_one(dead_letter("agg/sales"))
    shown = await cli(mongo_uri, db.name, "triggers")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    sales = next(line for line in lines if line.startswith("agg/sales "))
    assert "owner a:1;" in sales and "lag 3.2 ms" in sales and "1 dead letters" in sales
    assert "7 processed" in sales
    assert any(
        "history lost" in line and "(30.0 s), policy resume_from_now" in line for line in lines
    )
    orders = next(line for line in lines if line.startswith("agg/orders "))
    assert "awaiting takeover" in orders and "owner dead:1 (dead)" in orders
    as_json = await cli(mongo_uri, db.name, "triggers", "agg", "--json")
    assert as_json.returncode == 0, as_json.stderr
    rows = {row["id"]: row for row in json.loads(as_json.stdout)}
    assert rows["agg/sales"]["dead_letters"] == 1
    assert rows["agg/sales"]["owner_alive"] is True
    assert rows["agg/sales"]["history_lost"][0]["seconds"] == 30.0
    assert rows["agg/orders"]["orphaned"] is True
    empty = await cli(mongo_uri, db.name, "triggers", "nothing", "--json")
    assert (empty.returncode, json.loads(empty.stdout)) == (0, [])


async def test_deadletter_list_and_drop(mongo_uri: str, db: Db) -> None:
    """`deadletter list` prints the dead letters; `drop --id`/`--all` delete them, and say so."""
    letters = [dead_letter("agg/sales"), dead_letter("agg/sales"), dead_letter("agg/orders")]
    await db[deadletters_collection_name("functions")].insert_many(letters)
    listed = await cli(mongo_uri, db.name, "deadletter", "list", "agg/sales")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [
        str(letters[0]["_id"]),
        str(letters[1]["_id"]),
    ]
    assert "5 attempts" in listed.stdout and "ValueError: boom" in listed.stdout
    full = await cli(mongo_uri, db.name, "deadletter", "list", "agg", "--json", "--full")
    assert full.returncode == 0, full.stderr
    assert [d["trigger"] for d in json.loads(full.stdout)] == ["agg/sales"] * 2 + ["agg/orders"]
    assert json.loads(full.stdout)[0]["event"]["operationType"] == "insert"

    one = str(letters[0]["_id"])
    dropped = await cli(mongo_uri, db.name, "deadletter", "drop", "agg/sales", "--id", one)
    assert dropped.returncode == 0, dropped.stderr
    assert "dropped 1 dead letter of agg/sales" in dropped.stdout
    again = await cli(mongo_uri, db.name, "deadletter", "drop", "agg/sales", "--id", one)
    assert again.returncode == 1
    assert f"no dead letter of agg/sales with id {one}" in again.stderr
    rest = await cli(mongo_uri, db.name, "deadletter", "drop", "agg", "--all", "--json")
    assert rest.returncode == 0, rest.stderr
    assert json.loads(rest.stdout) == {"dropped": 2, "missing": []}
    assert await db[deadletters_collection_name("functions")].count_documents({}) == 0


async def test_usage_errors_exit_2_and_runtime_errors_exit_1(mongo_uri: str, db: Db) -> None:
    """Bad names, ids or selections exit 2; an unreachable MongoDB (a runtime failure) exits 1."""
    for args, needle in (
        (("deadletter", "drop", "agg"), "--id ID (repeatable) or --all"),
        (("deadletter", "drop", "agg", "--all", "--id", "0" * 24), "not both"),
        (("deadletter", "list", "agg", "--id", "xyz"), "'xyz' is not an ObjectId"),
        (("deadletter", "list", "a/b/c"), "neither a plugin name nor a trigger id"),
    ):
        result = await cli(mongo_uri, db.name, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert needle in result.stderr and "Traceback" not in result.stderr
    unreachable = await cli(
        "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=300", db.name, "triggers"
    )
    assert unreachable.returncode == 1
    assert "is not reachable" in unreachable.stderr


@pytest.mark.parametrize(
    "command", [["triggers"], ["deadletter"], ["deadletter", "list"], ["deadletter", "drop"]]
)
async def test_every_trigger_command_has_help(command: list[str]) -> None:
    """--help works on each trigger command and names its purpose."""
    result = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "host.cli", *command, "--help"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    )
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    assert ("--json" in result.stdout) == (command != ["deadletter"])
