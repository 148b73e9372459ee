"""Handshake, diagnostics and replica-set commands: how the server introduces itself.

The server is a one-member replica set that is always primary, so drivers run their
full replica-set code paths (server discovery and monitoring, retryable writes, change
streams) against it. The shapes follow ``source/mongodb-handshake`` and
``source/server-discovery-and-monitoring`` in the drivers' specifications, and the
replSetGetStatus/replSetGetConfig pages of the MongoDB command reference.
"""

from __future__ import annotations

import os
import platform
import socket
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bson import ObjectId
from bson.binary import Binary
from bson.int64 import Int64
from bson.timestamp import Timestamp

from .errors import CommandError

if TYPE_CHECKING:
    from .commands import Handler, Session
    from .server import EmbeddedMongo

SERVER_VERSION = "7.0.14"
VERSION_ARRAY = [7, 0, 14, 0]
MAX_WIRE_VERSION = 21  # MongoDB 7.0
FEATURE_COMPATIBILITY_VERSION = "7.0"
ELECTION_ID = ObjectId("7fffffff0000000000000001")
MAX_WRITE_BATCH_SIZE = 100_000

Reply = dict[str, Any]


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class AdminCommands:
    """The handshake, diagnostic and replica-set handlers of one server."""

    def __init__(self, server: EmbeddedMongo) -> None:
        self.server = server
        self.oplog = server.oplog

    def table(self) -> dict[str, Handler]:
        """The commands this class answers, by name (aliases included)."""
        return {
            "hello": self.hello,
            "isMaster": self.hello,
            "ismaster": self.hello,
            "ping": self.ok,
            "buildInfo": self.build_info,
            "buildinfo": self.build_info,
            "hostInfo": self.host_info,
            "getParameter": self.get_parameter,
            "getCmdLineOpts": self.get_cmd_line_opts,
            "getLog": self.get_log,
            "serverStatus": self.server_status,
            "whatsmyuri": self.whatsmyuri,
            "connectionStatus": self.connection_status,
            "endSessions": self.ok,
            "killAllSessions": self.ok,
            "killSessions": self.ok,
            "refreshSessions": self.ok,
            "startSession": self.start_session,
            "commitTransaction": self.no_transaction,
            "abortTransaction": self.no_transaction,
            "configureFailPoint": self.configure_fail_point,
            "replSetGetStatus": self.repl_set_get_status,
            "replSetGetConfig": self.repl_set_get_config,
            "replSetInitiate": self.repl_set_initiate,
        }

    # -- handshake and diagnostics -----------------------------------------------------

    def ok(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """Commands that need no work."""
        return {"ok": 1.0}

    async def hello(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """hello / isMaster: a replica-set primary; awaitable with ``maxAwaitTimeMS``."""
        server = self.server
        client = body.get("client")
        if session.app_name is None and isinstance(client, Mapping):
            app = client.get("application")
            if isinstance(app, Mapping) and isinstance(app.get("name"), str):
                session.app_name = app["name"]
        tv = body.get("topologyVersion")
        wait_ms = body.get("maxAwaitTimeMS")
        if (
            isinstance(tv, Mapping)
            and isinstance(wait_ms, int)
            and (
                tv.get("processId") == server.process_id
                and tv.get("counter") == server.topology_counter
            )
        ):
            await server.wait_topology_change(wait_ms / 1000)
        name = next(iter(body))
        last = self.oplog.last_ts
        now = _now()
        reply: Reply = {}
        if name == "hello":
            reply["isWritablePrimary"] = True
        else:
            reply["ismaster"] = True
        if body.get("helloOk"):
            reply["helloOk"] = True
        addr = server.advertised
        reply.update(
            {
                "topologyVersion": {
                    "processId": server.process_id,
                    "counter": Int64(server.topology_counter),
                },
                "hosts": [addr],
                "setName": server.replica_set,
                "setVersion": 1,
                "secondary": False,
                "primary": addr,
                "me": addr,
                "electionId": ELECTION_ID,
                "lastWrite": {
                    "opTime": {"ts": last, "t": Int64(1)},
                    "lastWriteDate": now,
                    "majorityOpTime": {"ts": last, "t": Int64(1)},
                    "majorityWriteDate": now,
                },
                "maxBsonObjectSize": 16 * 1024 * 1024,
                "maxMessageSizeBytes": 48_000_000,
                "maxWriteBatchSize": MAX_WRITE_BATCH_SIZE,
                "localTime": now,
                "logicalSessionTimeoutMinutes": 30,
                "connectionId": session.connection_id,
                "minWireVersion": 0,
                "maxWireVersion": MAX_WIRE_VERSION,
                "readOnly": False,
                "ok": 1.0,
            }
        )
        return reply

    def build_info(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """buildInfo: version fields consistent with the advertised wire version."""
        return {
            "version": SERVER_VERSION,
            "gitVersion": "plugin-host-embedded",
            "versionArray": VERSION_ARRAY,
            "modules": [],
            "allocator": "system",
            "javascriptEngine": "none",
            "sysInfo": "deprecated",
            "bits": 64,
            "debug": False,
            "maxBsonObjectSize": 16 * 1024 * 1024,
            "storageEngines": ["embedded"],
            "openssl": {"running": "disabled", "compiled": "disabled"},
            "buildEnvironment": {"target_os": platform.system().lower(), "distmod": "embedded"},
            "ok": 1.0,
        }

    def host_info(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """hostInfo."""
        return {
            "system": {
                "currentTime": _now(),
                "hostname": socket.gethostname(),
                "cpuAddrSize": 64,
                "numCores": os.cpu_count() or 1,
                "cpuArch": platform.machine(),
            },
            "os": {
                "type": platform.system(),
                "name": platform.platform(),
                "version": platform.release(),
            },
            "extra": {},
            "ok": 1.0,
        }

    _PARAMETERS: dict[str, Any] = {
        "featureCompatibilityVersion": {"version": FEATURE_COMPATIBILITY_VERSION},
        "enableTestCommands": 1,
        "authenticationMechanisms": [],
        "transactionLifetimeLimitSeconds": 60,
    }

    def get_parameter(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """getParameter: ``'*'`` or named parameters."""
        if body["getParameter"] == "*" or body.get("allParameters"):
            return {**self._PARAMETERS, "ok": 1.0}
        wanted = [
            k
            for k in body
            if k
            not in ("getParameter", "$db", "lsid", "$clusterTime", "$readPreference", "comment")
        ]
        reply: Reply = {}
        for key in wanted:
            if key not in self._PARAMETERS:
                raise CommandError(72, f"no option found to get: {key}")
            reply[key] = self._PARAMETERS[key]
        reply["ok"] = 1.0
        return reply

    def get_cmd_line_opts(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """getCmdLineOpts."""
        return {"argv": [], "parsed": {}, "ok": 1.0}

    def get_log(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """getLog: no log lines are kept; ``'*'`` lists the log names."""
        which = body["getLog"]
        if which == "*":
            return {"names": ["global", "startupWarnings"], "ok": 1.0}
        if which not in ("global", "startupWarnings"):
            raise CommandError(2, f"No log named '{which}'")
        return {"totalLinesWritten": 0, "log": [], "ok": 1.0}

    def server_status(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """serverStatus: the minimal sections tools look at."""
        uptime = time.monotonic() - self.server.started_at
        return {
            "host": self.server.advertised,
            "version": SERVER_VERSION,
            "process": "mongod",
            "pid": Int64(os.getpid()),
            "uptime": float(int(uptime)),
            "uptimeMillis": Int64(int(uptime * 1000)),
            "uptimeEstimate": Int64(int(uptime)),
            "localTime": _now(),
            "connections": {
                "current": self.server.connection_count,
                "available": 1000,
                "totalCreated": self.server.connections_created,
            },
            "repl": {
                "setName": self.server.replica_set,
                "isWritablePrimary": True,
                "primary": self.server.advertised,
            },
            "storageEngine": {"name": "embedded", "persistent": self.server.data_dir is not None},
            "ok": 1.0,
        }

    def whatsmyuri(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """whatsmyuri."""
        return {"you": session.peer, "ok": 1.0}

    def connection_status(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """connectionStatus: no authentication, so nobody is authenticated."""
        return {"authInfo": {"authenticatedUsers": [], "authenticatedUserRoles": []}, "ok": 1.0}

    def start_session(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """startSession."""
        return {"id": {"id": Binary.from_uuid(uuid.uuid4())}, "timeoutMinutes": 30, "ok": 1.0}

    def no_transaction(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """commit/abortTransaction: no transaction can be open here (see :meth:`run`)."""
        raise CommandError(
            251,
            f"Given transaction number {body.get('txnNumber')} does not match "
            "any in-progress transactions (the embedded server does not support "
            "transactions)",
        )

    # -- replica set (one member, always primary) ------------------------------------
    # mongosh's rs.status() / rs.conf() / rs.initiate() and container health checks
    # (`mongosh --eval "rs.status().ok"`) use these; shapes follow MongoDB 7.0's replies.

    @staticmethod
    def _admin_only(name: str, db: str) -> None:
        if db != "admin":
            raise CommandError(13, f"{name} may only be run against the admin database.")

    def repl_set_get_status(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """replSetGetStatus: one healthy PRIMARY member (``self: true``)."""
        self._admin_only("replSetGetStatus", db)
        last = self.oplog.last_ts
        now = _now()
        optime = {"ts": last, "t": Int64(1)}
        uptime = int(time.monotonic() - self.server.started_at)
        return {
            "set": self.server.replica_set,
            "date": now,
            "myState": 1,
            "term": Int64(1),
            "syncSourceHost": "",
            "syncSourceId": -1,
            "heartbeatIntervalMillis": Int64(2000),
            "majorityVoteCount": 1,
            "writeMajorityCount": 1,
            "votingMembersCount": 1,
            "writableVotingMembersCount": 1,
            "optimes": {
                "lastCommittedOpTime": optime,
                "lastCommittedWallTime": now,
                "readConcernMajorityOpTime": optime,
                "appliedOpTime": optime,
                "durableOpTime": optime,
                "lastAppliedWallTime": now,
                "lastDurableWallTime": now,
            },
            "members": [
                {
                    "_id": 0,
                    "name": self.server.advertised,
                    "health": 1.0,
                    "state": 1,
                    "stateStr": "PRIMARY",
                    "uptime": uptime,
                    "optime": optime,
                    "optimeDate": now,
                    "lastAppliedWallTime": now,
                    "lastDurableWallTime": now,
                    "syncSourceHost": "",
                    "syncSourceId": -1,
                    "infoMessage": "",
                    "electionTime": Timestamp(int(time.time()) - uptime, 1),
                    "electionDate": now,
                    "configVersion": 1,
                    "configTerm": 1,
                    "self": True,
                    "lastHeartbeatMessage": "",
                }
            ],
            "ok": 1.0,
        }

    def repl_set_get_config(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """replSetGetConfig: a one-member configuration."""
        self._admin_only("replSetGetConfig", db)
        return {
            "config": {
                "_id": self.server.replica_set,
                "version": 1,
                "term": 1,
                "members": [
                    {
                        "_id": 0,
                        "host": self.server.advertised,
                        "arbiterOnly": False,
                        "buildIndexes": True,
                        "hidden": False,
                        "priority": 1.0,
                        "tags": {},
                        "secondaryDelaySecs": Int64(0),
                        "votes": 1,
                    }
                ],
                "protocolVersion": Int64(1),
                "writeConcernMajorityJournalDefault": True,
                "settings": {
                    "chainingAllowed": True,
                    "heartbeatIntervalMillis": 2000,
                    "heartbeatTimeoutSecs": 10,
                    "electionTimeoutMillis": 10000,
                    "catchUpTimeoutMillis": -1,
                    "catchUpTakeoverDelayMillis": 30000,
                    "getLastErrorModes": {},
                    "getLastErrorDefaults": {"w": 1, "wtimeout": 0},
                    "replicaSetId": self.server.process_id,
                },
            },
            "ok": 1.0,
        }

    def repl_set_initiate(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """replSetInitiate: the set is always initiated (23 AlreadyInitialized, as MongoDB)."""
        self._admin_only("replSetInitiate", db)
        raise CommandError(23, "already initialized")

    def configure_fail_point(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """configureFailPoint (admin only)."""
        if db != "admin":
            raise CommandError(13, "configureFailPoint may only be run against the admin database.")
        count = self.server.failpoints.configure(
            body["configureFailPoint"], body.get("mode"), body.get("data")
        )
        return {"count": count, "ok": 1.0}
