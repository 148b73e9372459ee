"""Trust from the command line: keygen, signed push/rollback, `run --trusted-keys`, auth, limits."""

from __future__ import annotations

import functools
import json
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.synchronous.database import Database
from typer.testing import CliRunner, Result

from host import PluginHost
from host.cli import app
from host.http import create_app
from host.publish import publish
from host.trust import (
    generate_keypair,
    load_private_key,
    load_public_keys,
    sign_record,
    verify_signature,
)
from tests.support import Doc

from .daemon_support import Daemon, free_port, wait_ready
from .support import wait_until

SOURCE = "async def main(ctx, args):\n    return 'signed hello'\n"
BIG = "async def main(ctx, args):\n    return 'x' * 5000\n"
SLOW = "import asyncio\n\n\nasync def main(ctx, args):\n    await asyncio.Event().wait()\n"
TOKEN = "s3cret-token"


def cli(*args: str, mongo_uri: str | None = None) -> Result:
    """Run a plugin-host command in-process."""
    env = {"COLUMNS": "200"}
    if mongo_uri is not None:
        env["PLUGIN_HOST_MONGODB_URI"] = mongo_uri
    return CliRunner().invoke(app, list(args), env=env)


def assert_signed_by(record: Doc, public_key: Path) -> str:
    """The record's signature is valid for its content and ``public_key``; its key id."""
    return verify_signature(
        load_public_keys(public_key),
        record.get("signature"),
        name=record["_id"],
        source=record["source"],
        entrypoint=record.get("entrypoint") or "main",
        revision=record.get("revision"),
    )


@pytest.mark.allow_blocking
def test_keygen_writes_private_0600_and_public(tmp_path: Path) -> None:
    """keygen writes NAME.key (0600) and NAME.pub, prints the key id, and says to copy the .pub."""
    result = cli("keygen", "--out", str(tmp_path / "keys"), "--name", "prod")
    assert result.exit_code == 0, result.output
    private, public = tmp_path / "keys" / "prod.key", tmp_path / "keys" / "prod.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes()
    assert b"PUBLIC KEY" in public.read_bytes()
    kid = next(iter(load_public_keys(public)))
    assert kid in result.output
    assert "Copy only prod.pub" in result.output
    again = cli("keygen", "--out", str(tmp_path / "keys"), "--name", "prod")
    assert again.exit_code != 0
    assert "error: refusing to overwrite" in again.output


@pytest.mark.allow_blocking
def test_push_sign_key_writes_a_valid_signature(
    tmp_path: Path, mongo_uri: str, sync_db: Database[Doc]
) -> None:
    """push --sign-key signs what it writes; unsigned or other-key records are re-signed."""
    key_a, pub_a = generate_keypair(tmp_path / "a")
    key_b, pub_b = generate_keypair(tmp_path / "b")
    plugin = tmp_path / "hello.py"
    plugin.write_text(SOURCE)
    base = ("--database", sync_db.name)
    assert cli("push", "hello", str(plugin), *base, mongo_uri=mongo_uri).exit_code == 0
    assert "signature" not in sync_db.functions.find_one({"_id": "hello"})  # type: ignore[operator]
    signed = cli("push", "hello", str(plugin), "--sign-key", str(key_a), *base, mongo_uri=mongo_uri)
    assert "published hello revision 2" in signed.output, signed.output
    record = sync_db.functions.find_one({"_id": "hello"})
    assert record is not None
    assert assert_signed_by(record, pub_a) == next(iter(load_public_keys(pub_a)))
    same = cli("push", "hello", str(plugin), "--sign-key", str(key_a), *base, mongo_uri=mongo_uri)
    assert "unchanged at revision 2" in same.output, same.output
    other = cli("push", "hello", str(plugin), "--sign-key", str(key_b), *base, mongo_uri=mongo_uri)
    assert "published hello revision 3" in other.output, other.output
    record = sync_db.functions.find_one({"_id": "hello"})
    assert record is not None
    assert_signed_by(record, pub_b)
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "bye.py").write_text(SOURCE)
    pushed = cli("push", "--dir", str(folder), "--sign-key", str(key_a), *base, mongo_uri=mongo_uri)
    assert pushed.exit_code == 0, pushed.output
    bye = sync_db.functions.find_one({"_id": "bye"})
    assert bye is not None
    assert_signed_by(bye, pub_a)
    bad = cli("push", "hello", str(plugin), "--sign-key", str(pub_a), *base, mongo_uri=mongo_uri)
    assert bad.exit_code != 0
    assert "error: --sign-key:" in bad.output


@pytest.mark.allow_blocking
def test_rollback_re_signs_for_the_new_revision(
    tmp_path: Path, mongo_uri: str, sync_db: Database[Doc]
) -> None:
    """rollback --sign-key republishes the old source as revision 3, signed for revision 3."""
    key, pub = generate_keypair(tmp_path / "k")
    plugin = tmp_path / "hello.py"
    base = ("--database", sync_db.name, "--sign-key", str(key))
    plugin.write_text(SOURCE)
    cli("push", "hello", str(plugin), *base, mongo_uri=mongo_uri)
    plugin.write_text(SOURCE.replace("hello", "v2"))
    cli("push", "hello", str(plugin), *base, mongo_uri=mongo_uri)
    rolled = cli("rollback", "hello", *base, mongo_uri=mongo_uri)
    assert "published as revision 3" in rolled.output, rolled.output
    record = sync_db.functions.find_one({"_id": "hello"})
    assert record is not None
    assert record["revision"] == 3
    assert record["source"] == SOURCE
    assert_signed_by(record, pub)


def test_non_loopback_bind_without_token_refuses_to_start() -> None:
    """`run --http 0.0.0.0:PORT` without --auth-token exits non-zero with one clear line."""
    result = cli("run", "--http", "0.0.0.0:0", "--log-format", "json")
    assert result.exit_code != 0
    assert "error: refusing to serve the HTTP API on 0.0.0.0:0 without authentication" in (
        result.output
    )
    assert "Traceback" not in result.output


def test_bad_trusted_key_file_is_one_clear_error(tmp_path: Path) -> None:
    """A --trusted-keys file that is not a public key is one `error:` line and a non-zero exit."""
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    result = cli("run", "--trusted-keys", str(bad), "--http", "127.0.0.1:0")
    assert result.exit_code != 0
    assert "error: --trusted-keys: public key file" in result.output
    assert "Traceback" not in result.output


def json_events(daemon: Daemon) -> list[dict[str, Any]]:
    """The daemon's JSON log lines so far, parsed."""
    out: list[dict[str, Any]] = []
    for line in daemon.output()[0].splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def find_event(daemon: Daemon, event: str, plugin: str) -> dict[str, Any] | None:
    """The first JSON log line of ``event`` for ``plugin``, if any."""
    return next(
        (e for e in json_events(daemon) if e.get("event") == event and e.get("plugin") == plugin),
        None,
    )


@pytest.mark.anyio
async def test_run_with_trusted_keys_refuses_unsigned_then_accepts_signed(
    mongo_uri: str, db: AsyncDatabase[Doc], tmp_path: Path, daemons: list[Daemon]
) -> None:
    """`run --trusted-keys` refuses unsigned, then serves it signed; token and limits hold."""
    key_path, pub_path = await anyio.to_thread.run_sync(generate_keypair, tmp_path / "keys")
    key = await anyio.to_thread.run_sync(load_private_key, key_path)
    sign = functools.partial(sign_record, key)
    port = free_port()
    daemon = Daemon.run(
        tmp_path,
        mongo_uri,
        db.name,
        f"127.0.0.1:{port}",
        "--trusted-keys",
        str(pub_path),
        "--auth-token",
        TOKEN,
        "--max-result-bytes",
        "1000",
        "--call-timeout",
        "0.2",
        "--max-source-bytes",
        "2000",
    )
    daemons.append(daemon)
    base = f"http://127.0.0.1:{port}"
    auth = {"authorization": f"Bearer {TOKEN}"}
    async with (
        httpx.AsyncClient(base_url=base, timeout=10, headers=auth) as client,
        httpx.AsyncClient(base_url=base, timeout=10) as anon,
    ):
        await wait_ready(client, daemon)
        await publish(db, "greet", SOURCE)  # a writer without the key
        rejected = await wait_until(
            lambda: find_event(daemon, "plugin.rejected", "greet"), "greet is rejected"
        )
        assert rejected["field"] == "signature"
        assert rejected["code"] == "unsigned"
        await publish(db, "greet", SOURCE, sign=sign)  # the same source, now signed
        loaded = await wait_until(
            lambda: find_event(daemon, "plugin.loaded", "greet"), "greet is loaded"
        )
        print("\nREFUSED:", json.dumps(rejected))
        print("ACCEPTED:", json.dumps(loaded))
        assert (await anon.post("/functions/greet/call")).status_code == 401
        wrong = await anon.post("/functions/greet/call", headers={"authorization": "Bearer x"})
        assert wrong.status_code == 401
        assert "greet" not in wrong.text
        ok = await client.post("/functions/greet/call")
        assert ok.status_code == 200
        assert ok.json()["result"] == "signed hello"
        assert (await anon.get("/healthz")).status_code == 200
        assert (await anon.get("/metrics")).status_code == 200
        assert (await anon.get("/functions")).status_code == 401

        await publish(db, "big", BIG, sign=sign)
        await publish(db, "slow", SLOW, sign=sign)
        await publish(db, "huge", SOURCE + "#" * 3000, sign=sign)
        await wait_until(
            lambda: (
                find_event(daemon, "plugin.loaded", "big")
                and find_event(daemon, "plugin.loaded", "slow")
            ),
            "big and slow load",
        )
        too_big = await client.post("/functions/big/call")
        assert too_big.status_code == 500
        error = too_big.json()["error"]
        assert error["type"] == "ResultTooLarge"
        assert error["limit"] == 1000
        assert "1000 bytes" in error["message"]
        assert (await client.post("/functions/slow/call")).status_code == 504
        huge = await wait_until(
            lambda: find_event(daemon, "plugin.rejected", "huge"), "huge is rejected"
        )
        assert huge["field"] == "source"
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.exit_code() == 0


@pytest.fixture
async def protected(
    db: AsyncDatabase[Doc],
) -> AsyncIterator[tuple[PluginHost, dict[str, httpx.AsyncClient]]]:
    """Apps over one host: token with defaults, token protecting everything, no token."""
    await db.functions.insert_one({"_id": "const", "source": SOURCE})
    async with PluginHost(db) as host:
        apps = {
            "default": create_app(host, auth_token=TOKEN),
            "closed": create_app(host, auth_token=TOKEN, open_endpoints=()),
        }
        clients = {
            k: httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://h")
            for k, a in apps.items()
        }
        try:
            yield host, clients
        finally:
            for c in clients.values():
                await c.aclose()


@pytest.mark.anyio
async def test_token_checks_every_route_but_the_open_ones(
    protected: tuple[PluginHost, dict[str, httpx.AsyncClient]],
) -> None:
    """Every route needs the bearer token except the open endpoints; 401s carry no detail."""
    _, clients = protected
    auth = {"authorization": f"Bearer {TOKEN}"}
    default, closed = clients["default"], clients["closed"]
    for path in ("/functions", "/functions/const", "/readyz"):
        reply = await default.get(path)
        assert reply.status_code == 401
        assert reply.json() == {"error": {"type": "Unauthorized", "message": "unauthorized"}}
        assert (await default.get(path, headers={"authorization": TOKEN})).status_code == 401
    assert (await default.get("/functions", headers=auth)).status_code == 200
    assert (await default.get("/healthz")).status_code == 200
    assert (await default.get("/metrics")).status_code == 200
    assert (await closed.get("/healthz")).status_code == 401
    assert (await closed.get("/metrics")).status_code == 401
    assert (await closed.get("/healthz", headers=auth)).status_code == 200


def test_unknown_open_endpoint_is_refused() -> None:
    """`--open-endpoints` accepts only healthz, readyz and metrics."""
    result = cli("run", "--open-endpoints", "healthz,functions", "--http", "127.0.0.1:0")
    assert result.exit_code == 2  # a usage error
    assert "Invalid value for '--open-endpoints'" in result.output
    assert "unknown endpoint(s) functions" in result.output


def test_embedded_mongo_non_loopback_bind_warns(tmp_path: Path) -> None:
    """`embedded-mongo --bind 0.0.0.0` prints the unauthenticated-bind warning (console)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "host.cli",
            "embedded-mongo",
            "--bind",
            "0.0.0.0",
            "--port",
            "0",
            "--log-format",
            "console",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        for line in proc.stdout:
            seen.append(line)
            if "embedded.started" in line:
                break
        proc.send_signal(signal.SIGTERM)
        # Read through the same buffered file: communicate() reads the raw pipe and would
        # lose lines the line iterator above has already buffered.
        rest = proc.stdout.read()
        proc.stdout.close()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(seen) + rest
    assert "embedded.unauthenticated_bind" in output, output
    assert proc.returncode == 0, output
