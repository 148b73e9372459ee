"""The Node.js ``mongodb`` driver and mongosh against the embedded server.

The tools are installed with npm into ``tests/.node`` (git-ignored) once per session and
reused while their versions match the pins below. Without npm the tests skip, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from bson import json_util
from bson.timestamp import Timestamp

from host.embedded import EmbeddedMongoThread

pytestmark = [
    pytest.mark.node,
    # The first test of a session may include the npm install (about a minute, cold).
    pytest.mark.timeout(600),
]

Doc = dict[str, Any]
LogEvents = list[MutableMapping[str, Any]]

MONGODB_DRIVER_VERSION = "6.22.0"
MONGOSH_VERSION = "2.12.0"
ASSETS = Path(__file__).parent / "node"
PREFIX = Path(__file__).resolve().parents[1] / ".node"  # tests/.node, git-ignored
NPM_INSTALL_TIMEOUT = 540.0
RUN_TIMEOUT = 120.0


@dataclass(frozen=True, slots=True)
class NodeTools:
    """Where the Node.js tools for these tests live."""

    node: str
    mongosh: Path
    prefix: Path

    def env(self, home: Path) -> dict[str, str]:
        """The environment for a node or mongosh subprocess (``home`` isolates mongosh's files)."""
        return {
            **os.environ,
            "PLUGIN_HOST_NODE_PREFIX": str(self.prefix),
            "HOME": str(home),
            "DO_NOT_TRACK": "1",
            "NO_COLOR": "1",
        }


def _installed_version(prefix: Path, package: str) -> str | None:
    try:
        manifest = json.loads((prefix / "node_modules" / package / "package.json").read_text())
    except (OSError, ValueError):
        return None
    version = manifest.get("version") if isinstance(manifest, dict) else None
    return version if isinstance(version, str) else None


@pytest.fixture(scope="session")
def node_tools() -> NodeTools:
    """Node.js, the ``mongodb`` driver and mongosh at the pinned versions (installed once)."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.skip("npm not found: Node driver and mongosh tests need Node.js")
    wanted = {"mongodb": MONGODB_DRIVER_VERSION, "mongosh": MONGOSH_VERSION}
    if any(_installed_version(PREFIX, pkg) != version for pkg, version in wanted.items()):
        PREFIX.mkdir(parents=True, exist_ok=True)
        command = [
            npm,
            "install",
            "--prefix",
            str(PREFIX),
            "--no-audit",
            "--no-fund",
            "--save-exact",
            # Native add-ons (telemetry machine id, ssh tunnels, ...) are optional for mongosh;
            # skipping their builds keeps the install quick and free of a compiler.
            "--ignore-scripts",
            "--prefer-offline",
            *(f"{pkg}@{version}" for pkg, version in wanted.items()),
        ]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=NPM_INSTALL_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"npm install timed out after {NPM_INSTALL_TIMEOUT:.0f}s (offline?)")
        if done.returncode != 0:
            pytest.skip(f"npm install failed (offline?): {done.stderr.strip()[-1500:]}")
    mongosh = PREFIX / "node_modules" / ".bin" / "mongosh"
    if not mongosh.exists():
        pytest.skip(f"npm installed mongosh but {mongosh} is missing")
    return NodeTools(node=node, mongosh=mongosh, prefix=PREFIX)


@pytest.fixture
def server() -> Iterator[EmbeddedMongoThread]:
    """A fresh embedded server for one test (the Node tools see only its traffic)."""
    with EmbeddedMongoThread(port=0) as running:
        yield running


@pytest.fixture
def server_logs() -> Iterator[LogEvents]:
    """The structlog events emitted while the test runs (the server's included)."""
    with structlog.testing.capture_logs() as logs:
        yield logs


def _failures(logs: LogEvents) -> LogEvents:
    """Commands or connections that failed inside the server (an internal error, not a reply)."""
    return [
        e for e in logs if e["event"] in ("embedded.command_failed", "embedded.connection_failed")
    ]


def _run(args: list[str], tools: NodeTools, home: Path, stdin: str | None = None) -> str:
    done = subprocess.run(
        args,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=tools.env(home),
        check=False,
    )
    assert done.returncode == 0, (
        f"{Path(args[0]).name} exited {done.returncode}\n"
        f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    )
    return done.stdout


def _json_lines(output: str) -> list[Doc]:
    return [json_util.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_node_driver_change_stream_and_crud(
    node_tools: NodeTools,
    server: EmbeddedMongoThread,
    server_logs: LogEvents,
    db_name: str,
    tmp_path: Path,
) -> None:
    """The Node driver's watch() sees insert/update/delete events and its CRUD calls work."""
    script = ASSETS / "watch_insert.mjs"
    lines = _json_lines(
        _run([node_tools.node, str(script), server.uri, db_name], node_tools, tmp_path)
    )
    events = [line["event"] for line in lines if line["kind"] == "event"]
    results = {line["op"]: line for line in lines if line["kind"] == "result"}

    assert [e["operationType"] for e in events] == [
        "insert",
        "insert",
        "insert",
        "update",
        "delete",
    ]
    assert [e["documentKey"] for e in events] == [{"_id": i} for i in (1, 2, 3, 1, 3)]
    for event in events:
        assert event["ns"] == {"db": db_name, "coll": "items"}
        assert isinstance(event["_id"]["_data"], str)
        assert isinstance(event["clusterTime"], Timestamp)
        assert isinstance(event["wallTime"], datetime)
    times = [e["clusterTime"] for e in events]
    assert times == sorted(times)
    assert len(set(times)) == len(times)
    assert [e["fullDocument"] for e in events[:3]] == [
        {"_id": 1, "name": "a", "n": 1},
        {"_id": 2, "name": "b", "n": 2},
        {"_id": 3, "name": "c", "n": 3},
    ]
    update, delete = events[3], events[4]
    assert update["updateDescription"] == {
        "updatedFields": {"n": 10, "tags": ["x"]},
        "removedFields": ["name"],
        "truncatedArrays": [],
    }
    assert update["fullDocument"] == {"_id": 1, "n": 10, "tags": ["x"]}  # updateLookup
    assert "fullDocument" not in delete
    assert "updateDescription" not in delete

    assert results["tryNext"]["value"] is None
    assert results["insertOne"]["insertedId"] == 1
    assert results["insertMany"]["insertedCount"] == 2
    assert (results["updateOne"]["matchedCount"], results["updateOne"]["modifiedCount"]) == (1, 1)
    assert results["deleteOne"]["deletedCount"] == 1
    assert results["resumeToken"]["hasToken"] is True
    assert results["find"]["docs"] == [
        {"_id": 1, "n": 10, "tags": ["x"]},
        {"_id": 2, "name": "b", "n": 2},
    ]
    assert results["countDocuments"]["n"] == 2
    assert results["countDocumentsFiltered"]["n"] == 1
    assert results["estimatedDocumentCount"]["n"] == 2
    assert results["findOneAndUpdate"]["value"] == {"_id": 2, "name": "b", "n": 3}
    assert results["createIndex"]["name"] == "name_1"
    duplicate = results["duplicate"]
    assert duplicate["code"] == 11000
    assert duplicate["errorName"] == "MongoServerError"
    assert duplicate["keyValue"] == {"name": "b"}
    assert results["listIndexes"]["names"] == ["_id_", "name_1"]
    assert results["listCollections"]["names"] == ["items"]
    assert db_name in results["listDatabases"]["names"]
    assert _failures(server_logs) == []


def test_node_driver_streaming_monitor(
    node_tools: NodeTools,
    server: EmbeddedMongoThread,
    server_logs: LogEvents,
    tmp_path: Path,
) -> None:
    """The Node driver's streaming (exhaust) hello monitor keeps the server a healthy primary."""
    script = ASSETS / "monitor.mjs"
    (report,) = _json_lines(
        _run([node_tools.node, str(script), server.uri, "4"], node_tools, tmp_path)
    )
    assert report["failures"] == []
    assert report["outcome"] == "awaited"
    assert report["awaited"] >= 4
    assert report["topologyTypes"][-1] == "ReplicaSetWithPrimary"
    assert "Unknown" not in report["topologyTypes"]
    assert report["ping"] == 1
    assert _failures(server_logs) == []


def test_mongosh_eval(
    node_tools: NodeTools,
    server: EmbeddedMongoThread,
    server_logs: LogEvents,
    db_name: str,
    tmp_path: Path,
) -> None:
    """mongosh --eval inserts, finds, lists collections and databases (``show dbs``)."""
    script = f"""
const d = db.getSiblingDB("{db_name}");
d.items.insertOne({{_id: 1, name: "a"}});
d.items.insertMany([{{_id: 2, name: "b"}}, {{_id: 3, name: "c"}}]);
print(EJSON.stringify({{find: d.items.find({{_id: {{$gte: 2}}}}).sort({{_id: 1}}).toArray()}}));
print(EJSON.stringify({{collections: d.getCollectionNames()}}));
print(EJSON.stringify({{count: d.items.countDocuments({{}})}}));
print(EJSON.stringify({{rs: rs.status().ok, primary: db.hello().isWritablePrimary}}));
"""
    args = [str(node_tools.mongosh), server.uri, "--quiet", "--norc", "--eval", script]
    out = _run([*args, "--eval", "show dbs"], node_tools, tmp_path)
    lines = out.splitlines()
    docs = {key: value for doc in _json_lines(out) for key, value in doc.items()}
    assert docs["find"] == [{"_id": 2, "name": "b"}, {"_id": 3, "name": "c"}]
    assert docs["collections"] == ["items"]
    assert docs["count"] == 3
    assert docs["rs"] == 1
    assert docs["primary"] is True
    # `show dbs` (the last --eval) prints one "name  size" line per database.
    assert any(line.split()[:1] == [db_name] for line in lines), out
    assert server.server is not None
    assert server.server.command_counts["buildInfo"] >= 1
    assert _failures(server_logs) == []


def test_mongosh_startup_and_shell_helpers(
    node_tools: NodeTools,
    server: EmbeddedMongoThread,
    server_logs: LogEvents,
    db_name: str,
    tmp_path: Path,
) -> None:
    """mongosh's start-up commands (buildInfo, getLog, getParameter, ...) and shell helpers work."""
    script = f"""use {db_name}
db.items.insertOne({{_id: 1, v: "x"}})
print("FOUND " + EJSON.stringify(db.items.findOne({{_id: 1}})))
print("VERSION " + db.version())
print("RS " + rs.conf().members.length + " " + rs.status().members[0].stateStr)
"""
    out = _run([str(node_tools.mongosh), server.uri, "--norc"], node_tools, tmp_path, stdin=script)
    assert "Using MongoDB:\t\t7.0." in out
    assert 'FOUND {"_id":1,"v":"x"}' in out
    assert "VERSION 7.0." in out
    assert "RS 1 PRIMARY" in out
    assert "Uncaught" not in out, out
    assert server.server is not None
    counts = server.server.command_counts
    for name in ("buildInfo", "getParameter", "getLog", "atlasVersion"):
        assert counts[name] >= 1, f"mongosh did not send {name}: {dict(counts)}"
    assert _failures(server_logs) == []
