"""BaseExceptions from plugin code against a real `plugin-host run` (issue 13 item 1).

Before the fix: a ``setup`` raising ``KeyboardInterrupt``/``SystemExit`` made the daemon
exit 130 at every start; a ``teardown`` raising them hung it forever at SIGTERM; a
``teardown`` raising ``GeneratorExit`` or a custom ``BaseException`` left a zombie
(``/readyz`` 503 forever); a call raising one got a plain-text 500 with no
``call.failed`` and no count. Each is reproduced here through a real subprocess.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from host.publish import publish

from ..daemon_support import Daemon, free_port, wait_ready
from ..support import Doc, wait_until
from .test_base_exceptions import PRELUDE, RAISES, hook, main_returning

pytestmark = pytest.mark.anyio

KINDS = ("KeyboardInterrupt", "SystemExit", "GeneratorExit", "Custom")


def log_events(daemon: Daemon) -> list[dict[str, object]]:
    """The daemon's JSON log lines so far."""
    out, _ = daemon.output()
    events = []
    for line in out.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


async def test_setup_and_call_base_exceptions_leave_the_daemon_serving(
    mongo_uri: str, db: AsyncDatabase[Doc], tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Records whose setup raises them fail alone at start-up; calls raising them get JSON."""
    for kind in KINDS:
        bad_setup = PRELUDE + hook("def", "setup", RAISES[kind]) + main_returning("never")
        await publish(db, f"setup-{kind}", bad_setup)
        await publish(db, f"async-setup-{kind}", bad_setup.replace("def setup", "async def setup"))
        await publish(db, f"call-{kind}", PRELUDE + hook("async def", "main", RAISES[kind]))
        await publish(db, f"sync-call-{kind}", PRELUDE + hook("def", "main", RAISES[kind]))
    await publish(db, "ok", main_returning("fine"))
    port = free_port()
    daemon = Daemon.run(tmp_path, mongo_uri, db.name, f"127.0.0.1:{port}")
    daemons.append(daemon)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        await wait_ready(client, daemon)
        assert (await client.post("/functions/ok/call", json=None)).json()["result"] == "fine"
        for kind in KINDS:
            for prefix in ("setup-", "async-setup-"):
                reply = await client.post(f"/functions/{prefix}{kind}/call", json=None)
                assert reply.status_code == 404, reply.text
            for prefix in ("call-", "sync-call-"):
                reply = await client.post(f"/functions/{prefix}{kind}/call", json=None)
                assert reply.status_code == 500, reply.text
                assert reply.headers["content-type"].startswith("application/json")
                assert reply.json()["error"]["type"] == kind
        metrics = (await client.get("/metrics")).text
        assert f'plugin_host_calls_total{{outcome="failed"}} {2 * len(KINDS)}' in metrics
        assert (await client.get("/readyz")).status_code == 200
    failed_calls = [e for e in log_events(daemon) if e.get("event") == "call.failed"]
    assert sorted(str(e["error_type"]) for e in failed_calls) == sorted(KINDS * 2)
    setup_failures = {
        str(e["plugin"])
        for e in log_events(daemon)
        if e.get("event") == "plugin.reload_failed" and e.get("stage") == "setup"
    }
    assert setup_failures == {f"{p}{k}" for k in KINDS for p in ("setup-", "async-setup-")}
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.exit_code() == 0


async def test_teardown_base_exceptions_neither_hang_nor_wedge_the_daemon(
    mongo_uri: str, db: AsyncDatabase[Doc], tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A teardown raising them: reloads complete (/readyz 200), and SIGTERM still exits 0."""
    for kind in KINDS:
        for style in ("def", "async def"):
            name = f"{'sync' if style == 'def' else 'async'}-{kind}"
            await publish(
                db, name, PRELUDE + hook(style, "teardown", RAISES[kind]) + main_returning("old")
            )
    port = free_port()
    daemon = Daemon.run(tmp_path, mongo_uri, db.name, f"127.0.0.1:{port}")
    daemons.append(daemon)
    names = [f"{style}-{kind}" for kind in KINDS for style in ("sync", "async")]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        await wait_ready(client, daemon)
        # GeneratorExit and Custom: reload, so the old versions tear down while serving.
        reloaded = [n for n in names if n.endswith(("GeneratorExit", "Custom"))]
        for name in reloaded:
            source = PRELUDE + hook("def", "teardown", RAISES[name.split("-", 1)[1]])
            await publish(db, name, source + main_returning(f"new {name}"))

        def retired() -> bool:
            return {
                str(e["plugin"]) for e in log_events(daemon) if e.get("event") == "plugin.retired"
            } >= set(reloaded)

        await wait_until(retired, "every old version retired", timeout=30)
        for name in reloaded:
            reply = await client.post(f"/functions/{name}/call", json=None)
            assert reply.json()["result"] == f"new {name}", reply.text
        assert (await client.get("/readyz")).status_code == 200
    # KeyboardInterrupt and SystemExit: the versions tear down at shutdown.
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.exit_code() == 0
    failed = [e for e in log_events(daemon) if e.get("event") == "plugin.teardown_failed"]
    assert {str(e["plugin"]) for e in failed} == set(names)
    assert '"event": "daemon.stopped"' in daemon.output()[0]
