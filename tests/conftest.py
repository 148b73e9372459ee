"""Shared fixtures: one embedded server per session (or ``MONGODB_URI``), a fresh db per test."""

from __future__ import annotations

import os
import sys
import threading
import types
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog
from blockbuster import BlockBuster, blockbuster_ctx
from pymongo import AsyncMongoClient, MongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.synchronous.database import Database

from host.embedded import EmbeddedMongo, EmbeddedMongoThread
from tests.daemon_support import Daemon
from tests.support import PROBE, Db, Doc

# The CLI and daemon tests start many ``python -m host.cli`` processes. With
# PYTHONDONTWRITEBYTECODE set (as on this CI machine) none of them writes a bytecode cache,
# so each one compiled PyMongo, Uvicorn, Starlette, structlog and the host from source:
# ~3.7 s of CPU before its first log line (cProfile: builtins.compile), 40 s and more on a
# loaded machine, which pushed the daemon tests past their deadlines. The first subprocess
# now writes the (git-ignored) ``__pycache__`` directories and the others read them.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio (the only backend the host supports)."""
    return "asyncio"


@pytest.fixture(scope="session")
def mongo_uri() -> Iterator[str]:
    """The deployment under test: ``MONGODB_URI`` if set, else one embedded server per session.

    The embedded server runs on its own loop in a background thread, so every test's
    event loop (and sync code) can use it.
    """
    uri = os.environ.get("MONGODB_URI")
    if uri:
        yield uri
        return
    with EmbeddedMongoThread(port=0) as server:
        yield server.uri


@pytest.fixture(scope="session")
def using_embedded() -> bool:
    """True when the suite runs against the embedded server (not ``MONGODB_URI``)."""
    return not os.environ.get("MONGODB_URI")


@pytest.fixture(autouse=True)
def _embedded_only(request: pytest.FixtureRequest, using_embedded: bool) -> None:
    """Skip tests marked ``embedded_only(reason)`` when the suite runs on ``MONGODB_URI``."""
    marker = request.node.get_closest_marker("embedded_only")
    if marker is not None and not using_embedded:
        pytest.skip(f"embedded server only: {marker.args[0] if marker.args else ''}")


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Iterator[Path]:
    """A data directory on a 2 MiB tmpfs (mounted by the test as root; skipped otherwise)."""
    from tests.embedded.support import tmpfs

    with tmpfs(tmp_path / "tiny", "2m") as mount:
        yield mount


@pytest.fixture
def db_name() -> str:
    """A database name unique to this test."""
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def client(mongo_uri: str) -> AsyncIterator[AsyncMongoClient[Doc]]:
    """An async PyMongo client on the test's event loop."""
    async_client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_uri, serverSelectionTimeoutMS=5000)
    yield async_client
    await async_client.close()


@pytest.fixture
async def db(client: AsyncMongoClient[Doc], db_name: str) -> AsyncIterator[AsyncDatabase[Doc]]:
    """A fresh database for one test, dropped afterwards."""
    yield client[db_name]
    await client.drop_database(db_name)


@pytest.fixture
def sync_client(mongo_uri: str) -> Iterator[MongoClient[Doc]]:
    """A synchronous PyMongo client."""
    sync: MongoClient[Doc] = MongoClient(mongo_uri, serverSelectionTimeoutMS=5000)
    yield sync
    sync.close()


@pytest.fixture
def sync_db(sync_client: MongoClient[Doc], db_name: str) -> Iterator[Database[Doc]]:
    """A fresh database for one synchronous test, dropped afterwards."""
    yield sync_client[db_name]
    sync_client.drop_database(db_name)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Give every test structlog's defaults, whatever an earlier test configured."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _no_blocking_in_loop(request: pytest.FixtureRequest) -> Iterator[BlockBuster | None]:
    """Fail a test when the host's code blocks an event loop (blocking I/O in async code)."""
    if request.node.get_closest_marker("allow_blocking"):
        yield None
        return
    # Only our code is scanned; the embedded server is a separate program in-process.
    with blockbuster_ctx(["host"], excluded_modules=["host.embedded"]) as bb:
        # PyMongo stats /.dockerenv once when a client opens its topology: not ours to fix.
        for name in ("os.stat", "os.path.exists", "os.path.isfile"):
            if name in bb.functions:
                bb.functions[name].can_block_in("pymongo/pool_options.py", "get_container_env_info")
        yield bb


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    """A module plugins can import (as ``PROBE``) to signal the test from a worker thread."""
    ns = types.SimpleNamespace(stopped=threading.Event(), gate=threading.Event())
    module = types.ModuleType(PROBE)
    module.__dict__.update(vars(ns))
    monkeypatch.setitem(sys.modules, PROBE, module)
    try:
        yield ns
    finally:
        ns.gate.set()  # never leave a thread blocked on the gate


@pytest.fixture
def own_oplog_size() -> int:
    """Oplog entries of ``own_server`` (a module may override it)."""
    return 100


@pytest.fixture
async def own_server(own_oplog_size: int) -> AsyncIterator[EmbeddedMongo]:
    """A private embedded server on this test's loop (failpoints are server-wide)."""
    async with EmbeddedMongo(port=0, oplog_max_entries=own_oplog_size) as server:
        yield server


@pytest.fixture
async def own_client(own_server: EmbeddedMongo) -> AsyncIterator[AsyncMongoClient[Doc]]:
    """An async client of the private server."""
    client: AsyncMongoClient[Doc] = AsyncMongoClient(own_server.uri, serverSelectionTimeoutMS=5000)
    yield client
    await client.close()


@pytest.fixture
def own_db(own_client: AsyncMongoClient[Doc]) -> Db:
    """The ``app`` database on the private server."""
    return own_client.app


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons (``tests.daemon_support.Daemon``) a test starts; killed at the end whatever
    happened."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()
