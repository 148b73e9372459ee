"""The trigger commands (`triggers`, `deadletter list|retry|drop`) through real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta

import anyio
import pytest

from host import PluginHost
from host.triggers import deadletters_collection_name, state_collection_name
from host.triggers.runner import event_id_of

from .support import Db, Doc, wait_until
from .test_fleet_daemons import cli
from .test_triggerview import beat, dead_letter, server_now, state
from .triggers_support import FAST, record, wait_running

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]  # CLI subprocesses on a busy machine


async def test_triggers_lists_owner_lag_dead_letters_and_gaps(mongo_uri: str, db: Db) -> None:
    """`triggers` shows owner, lag, dead letters and history-lost gaps per trigger (and --json)."""
    now = await server_now(db)
    await beat(db, "a:1", ttl=3600)  # alive for the whole test, however slow the machine
    gap = {"from": now - timedelta(seconds=30), "to": now, "at": now, "policy": "resume_from_now"}
    await db[state_collection_name("functions")].insert_many(
        [
            state(
                "agg/sales",
                owner="a:1",
                lease_expires=now + timedelta(seconds=3600),
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
    "command",
    [
        ["triggers"],
        ["deadletter"],
        ["deadletter", "list"],
        ["deadletter", "drop"],
        ["deadletter", "retry"],
    ],
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


FLAKY = """
async def on_change(ctx, event):
    if await ctx.db.flags.find_one({"_id": "broken"}):
        raise RuntimeError("broken on purpose")
    await ctx.db.seen.insert_one(
        {"event_id": ctx.event_id, "attempt": ctx.attempt, "key": event["documentKey"]["_id"],
         "version": ctx.version}
    )
"""
"""A handler that fails while the ``broken`` flag exists, and records each success."""


async def dead_lettered(db: Db, keys: list[int]) -> list[Doc]:
    """Run FLAKY with the flag up over inserts of ``keys``: their dead letters."""
    await db.flags.insert_one({"_id": "broken"})
    await db.functions.insert_one(
        record("flaky", FLAKY, {"collection": "orders", "max_attempts": 2})
    )
    letters = db[deadletters_collection_name("functions")]
    async with PluginHost(db, triggers=FAST):
        await wait_running(db, "flaky/orders")
        await db.orders.insert_many([{"_id": k} for k in keys])

        async def all_dead() -> bool:
            return await letters.count_documents({}) == len(keys)

        await wait_until(all_dead, f"{len(keys)} dead letters", timeout=30)
    return await letters.find().sort("_id", 1).to_list(None)


async def test_deadletter_retry_runs_the_current_version_with_the_same_event_id(
    mongo_uri: str, db: Db
) -> None:
    """retry re-runs the stored event (same ctx.event_id, next attempt); success deletes it."""
    letters = await dead_lettered(db, [1, 2])
    assert [d["attempts"] for d in letters] == [2, 2]
    one = str(letters[0]["_id"])

    still = await cli(mongo_uri, db.name, "deadletter", "retry", "flaky/orders", "--id", one)
    assert still.returncode == 1
    assert "failed again (attempt 3)" in still.stdout and "broken on purpose" in still.stdout
    assert "1 of 1 dead letters of flaky/orders did not succeed" in still.stderr
    kept = await db[deadletters_collection_name("functions")].find_one({"_id": letters[0]["_id"]})
    assert kept is not None and kept["attempts"] == 3
    assert any("broken on purpose" in line for line in kept["traceback"])

    await db.flags.delete_one({"_id": "broken"})
    await db.functions.update_one(  # a fixed version: the retry must run this one
        {"_id": "flaky"}, {"$set": {"source": FLAKY + "\n# fixed\n", "revision": 2}}
    )
    done = await cli(mongo_uri, db.name, "deadletter", "retry", "flaky", "--all", "--json")
    assert done.returncode == 0, done.stderr
    outcomes = {o["id"]: o for o in json.loads(done.stdout)["outcomes"]}
    assert {i: (o["outcome"], o["attempt"]) for i, o in outcomes.items()} == {
        one: ("succeeded", 4),
        str(letters[1]["_id"]): ("succeeded", 3),
    }
    assert all(o["version"].startswith("flaky@r2:") for o in outcomes.values())
    seen = {s["key"]: s for s in await db.seen.find().to_list(None)}
    assert {k: s["event_id"] for k, s in seen.items()} == {
        d["event"]["documentKey"]["_id"]: event_id_of(d["event_id"]) for d in letters
    }
    assert {k: s["attempt"] for k, s in seen.items()} == {
        d["event"]["documentKey"]["_id"]: outcomes[str(d["_id"])]["attempt"] for d in letters
    }
    assert await db[deadletters_collection_name("functions")].count_documents({}) == 0


async def test_deadletter_retry_of_an_unloaded_plugin_keeps_the_dead_letter(
    mongo_uri: str, db: Db
) -> None:
    """A dead letter whose plugin is disabled stays, with a clear error, and the command exits 1."""
    await dead_lettered(db, [7])
    await db.functions.update_one({"_id": "flaky"}, {"$set": {"enabled": False}})
    result = await cli(mongo_uri, db.name, "deadletter", "retry", "flaky/orders", "--all")
    assert result.returncode == 1
    assert "plugin 'flaky' is not loaded" in result.stdout
    assert await db[deadletters_collection_name("functions")].count_documents({}) == 1
