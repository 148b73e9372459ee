"""The rollout commands (`push --canary/--shadow`, `rollout`, `promote`, `abort`, `status`)
through real subprocesses against in-process hosts, and their usage errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from pymongo.synchronous.database import Database
from typer.testing import CliRunner

from host import PluginHost
from host.cli import app
from host.publish import abort_rollout, publish, start_rollout

from .support import Db, Doc, returning, wait_until
from .test_cli import assert_clean_error
from .test_fleet_cli import two_hosts
from .test_fleet_daemons import cli

pytestmark = pytest.mark.anyio

GOOD = "async def main(ctx, args):\n    return f\"Hello, {args['firstName']}!\"\n"
BROKEN = "async def main(ctx, args):\n    return f\"Hello, {args['nickname']}!\"\n"
FIXED = (
    "async def main(ctx, args):\n"
    "    return f\"Hello, {args.get('nickname') or args['firstName']}!\"\n"
)


def write(tmp: Path, name: str, source: str) -> Path:
    """A plugin file."""
    path = tmp / name
    path.write_text(source)
    return path


async def calls_until_aborted(db: Db, hosts: tuple[PluginHost, PluginHost]) -> None:
    """Call both hosts (user keys u0..u99) until the record says the rollout ended."""
    i = 0

    async def ended() -> bool:
        nonlocal i
        for _ in range(20):
            host = hosts[i % 2]
            # The broken candidate raises KeyError: that is the point.
            with contextlib.suppress(Exception):
                await host.call("greet", {"firstName": "Ada", "userId": f"u{i % 100}"})
            i += 1
        doc = await db.functions.find_one({"_id": "greet"})
        return doc is not None and "rollout" not in doc

    await wait_until(ended, "a host aborts the failing candidate", timeout=30, interval=0)


@pytest.mark.timeout(300)  # seven CLI subprocesses; slow on a busy machine
async def test_canary_abort_fix_steps_promote(mongo_uri: str, db: Db, tmp_path: Path) -> None:
    """The README's walk: canary → automatic abort → fixed canary → steps → promote."""
    await publish(db, "greet", GOOD)
    async with two_hosts(db) as hosts:
        started = await cli(
            mongo_uri, db.name, "push", "greet", str(write(tmp_path, "v2.py", BROKEN)),
            "--canary", "50", "--sticky-key", "userId", "--max-error-rate", "0.05",
            "--min-calls", "5", "--wait", "--json",
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        payload = json.loads(started.stdout)
        assert payload["action"] == "started" and payload["candidate"] == 2
        assert payload["policy"]["min_calls"] == 5 and payload["sticky_key"] == "userId"
        assert "2/2 hosts serving greet r1 + candidate r2 at 50%" in started.stderr

        await calls_until_aborted(db, hosts)
        view = json.loads((await cli(mongo_uri, db.name, "status", "--json")).stdout)
        last = view["plugins"]["greet"]["last_rollout"]
        ids = {h.status_reporter.host_id for h in hosts if h.status_reporter is not None}
        assert last["outcome"] == "aborted" and last["by"] in ids
        assert last["reason"].startswith("error rate 1.00 > 0.05 after 5 calls")
        assert view["plugins"]["greet"]["rollout"] is None

        fixed = await cli(
            mongo_uri, db.name, "push", "greet", str(write(tmp_path, "v3.py", FIXED)),
            "--canary", "5", "--max-error-rate", "0.05", "--wait",
        )  # fmt: skip
        assert fixed.returncode == 0, fixed.stderr
        assert "started canary of greet r3 at 5% beside stable r1" in fixed.stdout
        for i in range(40):
            await hosts[i % 2].call("greet", {"firstName": "Ada"})
        shown = await cli(mongo_uri, db.name, "status")
        assert "rollout: canary greet@r3:" in shown.stdout and "2/2 hosts hold it" in shown.stdout
        assert "last rollout: r2 aborted by" in shown.stdout
        assert "stable    r1: " in shown.stdout and "candidate r3: " in shown.stdout

        walked = await cli(
            mongo_uri, db.name, "rollout", "greet", "--steps", "5,50,100", "--interval", "0.3s",
            "--wait",
        )  # fmt: skip
        assert walked.returncode == 0, walked.stderr
        for line in ("step 1/3: greet r3 at 5%", "step 3/3: greet r3 at 100%", "done: greet r3"):
            assert line in walked.stdout, walked.stdout
        assert "2/2 hosts serving greet r1 + candidate r3 at 100%" in walked.stderr

        promoted = await cli(mongo_uri, db.name, "promote", "greet", "--wait", "--json")
        assert promoted.returncode == 0, promoted.stderr
        assert json.loads(promoted.stdout)["action"] == "promoted"
        for host in hosts:
            assert await host.call("greet", {"firstName": "Ada"}) == "Hello, Ada!"
            assert host.plugin("greet").version.startswith("greet@r3:")  # type: ignore[union-attr]
        doc = await db.functions.find_one({"_id": "greet"})
        assert doc is not None and doc["revision"] == 3 and doc["source"] == FIXED
        assert doc["last_rollout"]["outcome"] == "promoted"


@pytest.mark.timeout(180)
async def test_weight_and_abort_with_wait(mongo_uri: str, db: Db, tmp_path: Path) -> None:
    """`rollout --weight --wait` and `abort --wait` end when every host routes accordingly."""
    await publish(db, "greet", GOOD)
    async with two_hosts(db) as hosts:
        await start_rollout(db, "greet", FIXED, mode="shadow", weight=10)
        shadow = await cli(mongo_uri, db.name, "promote", "greet", "--canary", "20", "--wait")
        assert shadow.returncode == 0, shadow.stderr
        assert "promoted greet r2 to a canary at 20%" in shadow.stdout
        moved = await cli(mongo_uri, db.name, "rollout", "greet", "--weight", "30", "--wait")
        assert moved.returncode == 0, moved.stderr
        assert "converged" in moved.stdout and "candidate r2 at 30%" in moved.stdout
        dropped = await cli(mongo_uri, db.name, "abort", "greet", "--reason", "enough", "--wait")
        assert dropped.returncode == 0, dropped.stderr
        assert "aborted greet r2: stable r1 serves every call" in dropped.stdout
        assert "without candidate r2" in dropped.stdout
        for host in hosts:
            assert host.plugin("greet").version.startswith("greet@r1:")  # type: ignore[union-attr]
        doc = await db.functions.find_one({"_id": "greet"})
        assert doc is not None and doc["last_rollout"]["reason"] == "enough"
        again = await cli(mongo_uri, db.name, "abort", "greet")
        assert again.returncode == 1
        assert "no rollout running (stable r1); the last rollout, r2, was aborted" in again.stderr


@pytest.mark.timeout(180)  # CLI subprocesses; slow on a busy machine
async def test_a_refused_candidate_fails_the_wait(mongo_uri: str, db: Db, tmp_path: Path) -> None:
    """`push --canary --wait` exits 1 naming each host that refused the candidate."""
    await publish(db, "greet", GOOD)
    async with two_hosts(db) as hosts:
        broken = write(tmp_path, "v2.py", "import plugin_host_no_such_module\n\n" + GOOD)
        pushed = await cli(
            mongo_uri, db.name, "push", "greet", str(broken), "--canary", "10", "--wait"
        )
        assert pushed.returncode == 1, (pushed.stdout, pushed.stderr)
        for host in hosts:
            assert host.status_reporter is not None
            assert f"host {host.status_reporter.host_id} refused greet r2 at stage import" in (
                pushed.stderr
            )
            assert await host.call("greet", {"firstName": "Ada"}) == "Hello, Ada!"
        view = json.loads((await cli(mongo_uri, db.name, "status", "--json")).stdout)
        rollout = view["plugins"]["greet"]["rollout"]
        assert rollout["hosts_holding"] == 0 and len(rollout["refused"]) == 2


def walker(mongo_uri: str, database: str, *args: str) -> subprocess.Popen[str]:
    """A `plugin-host rollout ...` subprocess (its own process group, for SIGINT)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PLUGIN_HOST_MONGODB_URI", None)
    command = [sys.executable, "-m", "host.cli", "rollout", *args]
    command += ["--mongodb-uri", mongo_uri, "--database", database]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


async def walker_at_first_step(db: Db) -> None:
    """Until the walker has written its plan (step 1 done, waiting for the next)."""

    async def planned() -> bool:
        doc = await db.functions.find_one({"_id": "greet"})
        return bool(doc and (doc.get("rollout") or {}).get("steps"))

    await wait_until(planned, "the walker records its steps", timeout=30, interval=0.02)


async def finished(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Its exit code and output (it must exit within 30 s)."""
    out, err = await anyio.to_thread.run_sync(lambda: process.communicate(timeout=30))
    return process.returncode, out, err


@pytest.mark.timeout(180)  # CLI subprocesses; slow on a busy machine
async def test_the_walker_stops_at_once_when_a_host_aborts(mongo_uri: str, db: Db) -> None:
    """`rollout --steps` exits 1 naming who aborted, without waiting for its interval."""
    await publish(db, "greet", returning(1))
    await start_rollout(db, "greet", returning(2), weight=1)
    process = walker(mongo_uri, db.name, "greet", "--steps", "5,50", "--interval", "10m")
    try:
        await walker_at_first_step(db)
        reason = "error rate 1.00 > 0.05 after 20 calls (stable 0.00)"
        assert await abort_rollout(db, "greet", by="host-x", reason=reason, expected_revision=2)
        code, out, err = await finished(process)
    finally:
        process.kill()
    assert code == 1, (out, err)
    assert "step 1/2: greet r2 at 5%" in out and "step 2/2" not in out
    assert f"the last rollout, r2, was aborted by host-x: {reason}" in err
    assert "the stable version serves every call" in err


@pytest.mark.timeout(180)  # CLI subprocesses; slow on a busy machine
async def test_an_interrupted_walker_leaves_the_rollout_where_it_was(
    mongo_uri: str, db: Db
) -> None:
    """Ctrl-C during `rollout --steps`: exit 130, the weight stays at the step reached."""
    await publish(db, "greet", returning(1))
    await start_rollout(db, "greet", returning(2), weight=1)
    process = walker(mongo_uri, db.name, "greet", "--steps", "5,50", "--interval", "10m")
    try:
        await walker_at_first_step(db)
        process.send_signal(signal.SIGINT)
        code, out, err = await finished(process)
    finally:
        process.kill()
    assert code == 130, (out, err)
    assert "interrupted: greet r2 stays at 5%" in err
    doc = await db.functions.find_one({"_id": "greet"})
    assert doc is not None and doc["rollout"]["weight"] == 5.0 and doc["revision"] == 1


# -- usage errors (exit 2) and refusals (exit 1), in-process like tests/test_cli.py ----------


@pytest.fixture
def run(mongo_uri: str, sync_db: Database[Doc]) -> Any:
    """Invoke the CLI in-process against this test's database."""
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(
            app,
            [*args, "--database", sync_db.name],
            env={"PLUGIN_HOST_MONGODB_URI": mongo_uri, "COLUMNS": "200"},
        )

    return invoke


def test_rollout_usage_errors_exit_2(run: Any, tmp_path: Path) -> None:
    """Bad rollout options are usage errors (exit 2) naming what is wrong."""
    plugin = write(tmp_path, "greet.py", returning(1))
    cases = [
        (("push", "greet", str(plugin), "--canary", "150"), "Invalid value for '--canary'"),
        (("push", "greet", str(plugin), "--shadow", "5"), "Invalid value for '--shadow'"),
        (("push", "greet", str(plugin), "--sticky-key", "u"), "go with --canary"),
        (("push", "greet", str(plugin), "--canary", "5", "--shadow", "0.1"), "not both"),
        (("push", "--dir", str(tmp_path), "--canary", "5"), "a rollout is for one plugin"),
        (("rollout", "greet"), "give either --weight P or --steps"),
        (("rollout", "greet", "--weight", "5", "--interval", "1s"), "--interval goes with"),
        (("rollout", "greet", "--steps", "5,abc"), "'abc' is not a percent"),
        (("rollout", "greet", "--steps", "5,500"), "500 is not a percent 0-100"),
        (("rollout", "greet", "--steps", "5", "--interval", "soon"), "is not a duration"),
        (("promote", "greet", "--canary", "-1"), "Invalid value for '--canary'"),
    ]
    for args, needle in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_rollout_refusals_exit_1(run: Any, tmp_path: Path, sync_db: Database[Doc]) -> None:
    """No rollout to move, promote or abort, or one already running: exit 1, one clear line."""
    plugin = write(tmp_path, "greet.py", returning(1))
    assert run("push", "greet", str(plugin)).exit_code == 0
    for args in (("promote", "greet"), ("abort", "greet"), ("rollout", "greet", "--weight", "5")):
        assert_clean_error(run(*args), "'greet' has no rollout running (stable r1)")
    assert_clean_error(run("abort", "nope"), "no plugin named 'nope'")
    assert_clean_error(
        run("push", "greet", str(plugin), "--canary", "5"), "identical to the stable r1"
    )
    candidate = write(tmp_path, "v2.py", returning(2))
    assert run("push", "greet", str(candidate), "--shadow", "0.1").exit_code == 0
    doc = sync_db.functions.find_one({"_id": "greet"})
    assert doc is not None and doc["rollout"]["mode"] == "shadow"
    assert doc["rollout"]["weight"] == pytest.approx(10.0)
    assert_clean_error(
        run("push", "greet", str(write(tmp_path, "v3.py", returning(3))), "--canary", "5"),
        "a rollout of r2 on stable r1 is running; promote or abort it first",
    )
    plain = run("push", "greet", str(write(tmp_path, "v4.py", returning(4))), "--json")
    assert plain.exit_code == 0 and json.loads(plain.output)["revision"] == 3
    doc = sync_db.functions.find_one({"_id": "greet"})
    assert doc is not None and doc["last_rollout"]["outcome"] == "superseded"
