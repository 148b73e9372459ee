"""Command handlers: each takes the command body and returns MongoDB's reply shape.

The shapes follow the MongoDB command reference and the drivers' specs (handshake in
``source/mongodb-handshake``, server monitoring in ``source/server-discovery-and-monitoring``,
CRUD in ``source/crud``). ``$clusterTime``, ``operationTime`` and error labels are
added by :mod:`.server` around every reply.
"""

from __future__ import annotations

import asyncio
import functools
import os
import platform
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import bson
from bson import ObjectId
from bson.binary import Binary
from bson.int64 import Int64
from bson.timestamp import Timestamp

from . import validation
from .capped import Tail, check_capped_options, enforce_cap, is_capped
from .changestream import ChangeStream, Target
from .cursors import CursorManager
from .errors import CloseConnection, CommandError
from .hints import apply_bounds, resolve_hint
from .merge import merge_into
from .pipeline import apply_let, check_filters
from .retryable import RetryHistory, StatementFault, fault_from_data, run_statements, txn_key
from .storage import (
    SYSTEM_DATABASES,
    WriteResult,
    filter_applies,
    refuse_collation,
    run_pipeline,
)
from .views import check_view_options, find_stages, refuse_write, view_of

if TYPE_CHECKING:
    from .server import EmbeddedMongo

SERVER_VERSION = "7.0.14"
VERSION_ARRAY = [7, 0, 14, 0]
MAX_WIRE_VERSION = 21  # MongoDB 7.0
FEATURE_COMPATIBILITY_VERSION = "7.0"
ELECTION_ID = ObjectId("7fffffff0000000000000001")
MAX_WRITE_BATCH_SIZE = 100_000
WRITE_COMMANDS = frozenset({"insert", "update", "delete", "findAndModify"})
INSERT_CHUNK = 1_000  # statements applied between two yields of a big insert

# Commands other than the CRUD writes that take a write concern (an aggregate only
# when it ends in $out or $merge).
_WRITE_CONCERN_COMMANDS = frozenset(
    {
        "create",
        "drop",
        "dropDatabase",
        "createIndexes",
        "dropIndexes",
        "deleteIndexes",
        "renameCollection",
        "collMod",
        "aggregate",
    }
)
MAX_BSON_SIZE = 16 * 1024 * 1024

Reply = dict[str, Any]


def _writes(pipeline: Any) -> bool:
    last = pipeline[-1] if isinstance(pipeline, list) and pipeline else None
    return isinstance(last, Mapping) and ("$out" in last or "$merge" in last)


_B = TypeVar("_B")  # a getMore batch (documents, or change events and their token)
Handler = Callable[["Session", str, dict[str, Any]], Awaitable[Reply] | Reply]


@dataclass(slots=True)
class Session:
    """Per-connection state a handler may need."""

    connection_id: int
    peer: str
    app_name: str | None = None


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _name(value: Any, what: str = "collection") -> str:
    if not isinstance(value, str) or not value:
        raise CommandError(73, f"{what} name must be a non-empty string, got {value!r}")
    return value


def _int(body: Mapping[str, Any], key: str, default: int | None = None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandError(14, f"BSON field '{key}' is the wrong type, expected a number")
    return int(value)


def _doc(body: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise CommandError(14, f"BSON field '{key}' is the wrong type, expected an object")
    return dict(value)


class Commands:
    """The command table of one server."""

    def __init__(self, server: EmbeddedMongo) -> None:
        self.server = server
        self.storage = server.storage
        self.oplog = server.oplog
        self.cursors = CursorManager()
        self.history = RetryHistory()
        self.storage.on_commit(self.history.settle)
        self.table: dict[str, Handler] = {
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
            "listDatabases": self.list_databases,
            "listCollections": self.list_collections,
            "create": self.create,
            "collMod": self.coll_mod,
            "drop": self.drop,
            "dropDatabase": self.drop_database,
            "renameCollection": self.rename_collection,
            "dbStats": self.db_stats,
            "insert": self.insert,
            "update": self.update,
            "delete": self.delete,
            "find": self.find,
            "getMore": self.get_more,
            "killCursors": self.kill_cursors,
            "aggregate": self.aggregate,
            "count": self.count,
            "distinct": self.distinct,
            "findAndModify": self.find_and_modify,
            "findandmodify": self.find_and_modify,
            "createIndexes": self.create_indexes,
            "listIndexes": self.list_indexes,
            "dropIndexes": self.drop_indexes,
            "deleteIndexes": self.drop_indexes,
            "endSessions": self.ok,
            "killAllSessions": self.ok,
            "killSessions": self.ok,
            "refreshSessions": self.ok,
            "startSession": self.start_session,
            "commitTransaction": self.no_transaction,
            "abortTransaction": self.no_transaction,
            "configureFailPoint": self.configure_fail_point,
            "explain": self.explain,
            "replSetGetStatus": self.repl_set_get_status,
            "replSetGetConfig": self.repl_set_get_config,
            "replSetInitiate": self.repl_set_initiate,
        }

    async def run(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """Run one command and return its reply (without cluster time).

        A snapshot read (``readConcern.level: snapshot``) reads the latest state and
        reports it as ``cursor.atClusterTime``, as mongod does.
        """
        name = next(iter(body))
        handler = self.table.get(name)
        if handler is None:
            raise CommandError(59, f"no such command: '{name}'")
        if body.get("autocommit") is False or body.get("startTransaction"):
            raise CommandError(
                20,
                "transactions are not supported by the embedded server; "
                "run against a real replica set to use them",
            )
        body = apply_let(name, body)
        check_filters(name, body)
        # find, count, distinct, aggregate and findAndModify carry it at the top level;
        # update and delete statements per statement (checked by the storage).
        refuse_collation(body.get("collation"))
        if name != "getMore" and body.get("maxTimeMS"):
            self._max_time_fault()
        token = validation.bypass.set(bool(body.get("bypassDocumentValidation")))
        try:
            result = handler(session, db, body)
            if isinstance(result, Awaitable):
                result = await result
        finally:
            validation.bypass.reset(token)
        self._write_concern(name, body, result)
        read_concern = body.get("readConcern")
        if isinstance(read_concern, Mapping) and read_concern.get("level") == "snapshot":
            at = read_concern.get("atClusterTime", self.oplog.last_ts)
            if isinstance(result.get("cursor"), dict):
                result["cursor"]["atClusterTime"] = at
            else:  # distinct, count: at the top level
                result["atClusterTime"] = at
        return result

    def _max_time_fault(self) -> None:
        """The ``maxTimeAlwaysTimeOut`` failpoint: an operation with a deadline times out."""
        if self.server.failpoints.fire("maxTimeAlwaysTimeOut") is not None:
            raise CommandError(50, "operation exceeded time limit")

    @staticmethod
    def _write_concern(name: str, body: Mapping[str, Any], reply: Reply) -> None:
        wc = body.get("writeConcern")
        if name not in WRITE_COMMANDS and name not in _WRITE_CONCERN_COMMANDS:
            return
        if name == "aggregate" and not _writes(body.get("pipeline")):
            return
        if isinstance(wc, Mapping) and isinstance(wc.get("w"), int) and wc["w"] > 1:
            reply["writeConcernError"] = {
                "code": 100,
                "codeName": "UnsatisfiableWriteConcern",
                "errmsg": f"Not enough data-bearing nodes to satisfy write concern w: {wc['w']} "
                "(this is a single-node replica set)",
                "errInfo": {"writeConcern": dict(wc)},
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
        import uuid

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

    # -- catalog -----------------------------------------------------------------------

    def list_databases(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """listDatabases."""
        entries = []
        flt = _doc(body, "filter")
        for name in self.storage.databases():
            size = (
                sum(
                    len(self.storage.raw(name, c).find_one() or {})
                    for c, _ in self.storage.collections(name)
                )
                * 256
            )
            entry: Reply = {"name": name, "sizeOnDisk": float(max(size, 8192)), "empty": False}
            if flt and not filter_applies(flt, entry):
                continue
            entries.append({"name": name} if body.get("nameOnly") else entry)
        total = float(sum(float(e["sizeOnDisk"]) for e in entries if "sizeOnDisk" in e))
        return {
            "databases": entries,
            "totalSize": total,
            "totalSizeMb": Int64(int(total) >> 20),
            "ok": 1.0,
        }

    def list_collections(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """listCollections, with filter and nameOnly."""
        flt = _doc(body, "filter")
        out = []
        for name, info in self.storage.collections(db):
            kind = "view" if "viewOn" in info.options else "collection"
            entry: Reply = {
                "name": name,
                "type": kind,
                "options": dict(info.options),
                "info": {"readOnly": kind == "view", "uuid": Binary.from_uuid(info.uuid)},
            }
            if kind == "collection":
                entry["idIndex"] = {"v": 2, "key": {"_id": 1}, "name": "_id_"}
            else:
                del entry["info"]["uuid"]  # views have no UUID
            if flt and not filter_applies(flt, entry):
                continue
            out.append({"name": name, "type": kind} if body.get("nameOnly") else entry)
        batch = _int(_doc(body, "cursor") or {}, "batchSize")
        return {**self.cursors.first_batch(f"{db}.$cmd.listCollections", out, batch), "ok": 1.0}

    _CREATE_GENERIC = frozenset(
        {
            "create",
            "$db",
            "lsid",
            "$clusterTime",
            "$readPreference",
            "writeConcern",
            "comment",
            "txnNumber",
            "apiVersion",
            "apiStrict",
            "apiDeprecationErrors",
            "maxTimeMS",
        }
    )

    def create(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """create, including ``changeStreamPreAndPostImages``."""
        name = _name(body["create"])
        options = {k: v for k, v in body.items() if k not in self._CREATE_GENERIC}
        if "viewOn" in options:
            check_view_options(options)
        if options.get("capped"):
            check_capped_options(options)
        for unsupported in ("timeseries", "clusteredIndex", "encryptedFields"):
            if options.get(unsupported):
                raise CommandError(
                    238, f"not supported by the embedded server: create with '{unsupported}'"
                )
        self.storage.create_collection(db, name, options)
        return {"ok": 1.0}

    def coll_mod(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """collMod: ``changeStreamPreAndPostImages`` (other options are accepted and stored)."""
        name = _name(body["collMod"])
        options = {k: v for k, v in body.items() if k not in self._CREATE_GENERIC | {"collMod"}}
        self.storage.coll_mod(db, name, options)
        return {"ok": 1.0}

    def drop(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """drop: ``{ns, nIndexesWas}``; a missing collection is not an error (7.0)."""
        name = _name(body["drop"])
        n_indexes = self.storage.drop_collection(db, name)
        if n_indexes is None:
            return {"ok": 1.0}
        return {"nIndexesWas": n_indexes, "ns": f"{db}.{name}", "ok": 1.0}

    def drop_database(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """dropDatabase: drop events per collection, then dropDatabase."""
        if db in SYSTEM_DATABASES and db != "config":
            raise CommandError(20, f"Dropping the '{db}' database is prohibited.")
        if not self.storage.collections(db):
            return {"ok": 1.0}
        self.storage.drop_database(db)
        return {"dropped": db, "ok": 1.0}

    def rename_collection(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """renameCollection (admin only): ``{renameCollection: "db.a", to: "db.b"}``."""
        if db != "admin":
            raise CommandError(13, "renameCollection may only be run against the admin database.")
        src, dst = body.get("renameCollection"), body.get("to")
        if not isinstance(src, str) or "." not in src or not isinstance(dst, str) or "." not in dst:
            raise CommandError(
                73, "renameCollection and to must be full namespaces 'db.collection'"
            )
        src_db, src_coll = src.split(".", 1)
        dst_db, dst_coll = dst.split(".", 1)
        self.storage.rename_collection(
            src_db, src_coll, dst_db, dst_coll, drop_target=bool(body.get("dropTarget", False))
        )
        return {"ok": 1.0}

    def db_stats(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """dbStats (approximate sizes)."""
        colls = self.storage.collections(db)
        objects = sum(self.storage.raw(db, c).count_documents({}) for c, _ in colls)
        indexes = sum(len(self.storage.raw(db, c).index_information()) for c, _ in colls)
        return {
            "db": db,
            "collections": len(colls),
            "views": 0,
            "objects": objects,
            "avgObjSize": 0.0,
            "dataSize": 0.0,
            "storageSize": 0.0,
            "indexes": indexes,
            "indexSize": 0.0,
            "totalSize": 0.0,
            "scaleFactor": 1,
            "ok": 1.0,
        }

    # -- writes ------------------------------------------------------------------------

    @staticmethod
    def _batch(body: Mapping[str, Any], key: str, command: str) -> list[Any]:
        items = body.get(key)
        if not isinstance(items, list):
            raise CommandError(9, f"BSON field '{command}.{key}' is missing but a required field")
        if not 1 <= len(items) <= MAX_WRITE_BATCH_SIZE:
            raise CommandError(
                16,
                f"Write batch sizes must be between 1 and {MAX_WRITE_BATCH_SIZE}. "
                f"Got {len(items)} operations.",
            )
        return items

    @staticmethod
    def _write_reply(result: WriteResult, *, update: bool = False) -> Reply:
        reply: Reply = {"n": result.n}
        if update:
            reply["nModified"] = result.n_modified
            if result.upserted:
                reply["upserted"] = result.upserted
        if result.write_errors:
            reply["writeErrors"] = result.write_errors
        reply["ok"] = 1.0
        return reply

    def _statements(
        self,
        body: Mapping[str, Any],
        statements: list[Any],
        run: Callable[[list[Any], bool], WriteResult],
        *,
        start: int = 0,
    ) -> WriteResult:
        """Run a write's statements: at once, or one by one when it is a retryable write.

        ``statements`` are the command's from index ``start`` on (a chunk of a big
        insert): their statement ids count from there, the result's indexes from 0.
        """
        ordered = body.get("ordered", True) is not False
        key = txn_key(body)
        if key is None:
            return run(statements, ordered)
        result, close = run_statements(
            statements,
            ordered=ordered,
            key=key,
            history=self.history,
            execute=lambda stmt: run([stmt], True),
            fault=self._transactional_write_fault,
            start=start,
        )
        if close:
            # The statements committed (journaled first), but the client never hears of it.
            self.storage.commit()
            raise CloseConnection()
        return result

    def _transactional_write_fault(self) -> StatementFault | None:
        data = self.server.failpoints.fire("onPrimaryTransactionalWrite")
        return None if data is None else fault_from_data(data)

    async def insert(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """insert: ``{n, writeErrors?}``.

        A big batch is applied in chunks of :data:`INSERT_CHUNK` statements, each
        journaled (``Storage.commit``) before the loop is yielded to other connections,
        as mongod yields between a batch's statements; a retryable batch records each
        chunk's statements under their own statement ids (see :mod:`.retryable`). If the
        journal fails, the chunk is rolled back and its statements (and the ones after
        it) are reported as write errors; the earlier chunks are durable and counted in
        ``n``.
        """
        coll = _name(body["insert"])
        refuse_write(self.storage, db, coll)
        docs = self._batch(body, "documents", "insert")
        for doc in docs:
            if isinstance(doc, Mapping) and len(bson.encode(doc)) > MAX_BSON_SIZE:
                raise CommandError(
                    10334, f"object to insert too large. size in bytes: over {MAX_BSON_SIZE}"
                )
        ordered = body.get("ordered", True) is not False
        total = WriteResult()
        for start in range(0, len(docs), INSERT_CHUNK):
            chunk = docs[start : start + INSERT_CHUNK]
            try:
                result = self._statements(
                    body,
                    chunk,
                    lambda items, ordered: self.storage.insert(db, coll, items, ordered=ordered),
                    start=start,
                )
                if len(docs) > INSERT_CHUNK:
                    self.storage.commit()
            except CommandError as err:
                if start == 0:
                    raise
                error = {"code": err.code, "codeName": err.code_name, "errmsg": err.message}
                failed = range(start, start + 1) if ordered else range(start, len(docs))
                total.write_errors.extend({"index": i, **error} for i in failed)
                break
            total.n += result.n
            total.write_errors.extend(
                {**e, "index": e["index"] + start} for e in result.write_errors
            )
            if ordered and result.write_errors:
                break
            if start + INSERT_CHUNK < len(docs):
                await asyncio.sleep(0)
        enforce_cap(self.storage, db, coll)
        return self._write_reply(total)

    def update(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """update: ``{n, nModified, upserted?, writeErrors?}``."""
        coll = _name(body["update"])
        refuse_write(self.storage, db, coll)
        stmts = self._batch(body, "updates", "update")
        for stmt in stmts:
            replacement = stmt.get("u") if isinstance(stmt, Mapping) else None
            if (
                isinstance(replacement, Mapping)
                and not any(k.startswith("$") for k in replacement)
                and len(bson.encode(replacement)) > MAX_BSON_SIZE
            ):
                raise CommandError(17420, "Replacement document too large: over 16 MiB")
            if isinstance(stmt, Mapping) and "sort" in stmt:
                # The sort option of update statements is MongoDB 8.0; 7.0 rejects it.
                raise CommandError(40415, "BSON field 'update.updates.sort' is an unknown field.")
        result = self._statements(
            body,
            stmts,
            lambda items, ordered: self.storage.update(db, coll, items, ordered=ordered),
        )
        return self._write_reply(result, update=True)

    def delete(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """delete: ``{n, writeErrors?}``."""
        coll = _name(body["delete"])
        refuse_write(self.storage, db, coll)
        stmts = self._batch(body, "deletes", "delete")
        result = self._statements(
            body,
            stmts,
            lambda items, ordered: self.storage.delete(db, coll, items, ordered=ordered),
        )
        return self._write_reply(result)

    def find_and_modify(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """findAndModify: ``{lastErrorObject, value}``; a retry replays the first reply."""
        key = txn_key(body)
        if key is None:
            return self._find_and_modify(db, body)
        recorded = self.history.get(key, 0)
        if recorded is not None:
            return dict(recorded)
        fault = self._transactional_write_fault()
        if fault is not None and fault.error is not None:
            if fault.close_connection:
                raise CloseConnection()
            raise fault.error
        reply = self._find_and_modify(db, body)
        self.history.put(key, 0, dict(reply))
        if fault is not None and fault.close_connection:
            raise CloseConnection()
        return reply

    def _find_and_modify(self, db: str, body: dict[str, Any]) -> Reply:
        coll = _name(body[next(iter(body))])
        refuse_write(self.storage, db, coll)
        from pymongo.errors import DuplicateKeyError

        try:
            reply = self.storage.find_and_modify(db, coll, body)
        except DuplicateKeyError as exc:
            details = exc.details or {}
            err = self.storage._dup_key_error(
                0, db, coll, details.get("doc", {}), details.get("exclude")
            )
            raise CommandError(
                11000,
                err["errmsg"],
                extra={k: err[k] for k in ("keyPattern", "keyValue") if k in err},
            ) from exc
        reply["ok"] = 1.0
        return reply

    # -- reads -------------------------------------------------------------------------

    async def find(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """find with filter, projection, sort, skip, limit, batchSize and singleBatch."""
        coll = _name(body["find"])
        limit = _int(body, "limit", 0) or 0
        skip = _int(body, "skip", 0) or 0
        if skip < 0:
            raise CommandError(2, "skip value must be non-negative")
        single = bool(body.get("singleBatch")) or limit < 0
        if body.get("tailable"):
            return self._tailable_find(db, coll, body, single)
        view = view_of(self.storage, db, coll)
        if view is not None:
            stages = find_stages(
                _doc(body, "filter"), _doc(body, "projection"), _doc(body, "sort"), skip, limit
            )
            docs = self.storage.aggregate(db, view[0], view[1] + stages)
        elif body.get("hint") is not None or body.get("min") or body.get("max"):
            docs = self._hinted_find(db, coll, body, skip, abs(limit))
        else:
            docs = await self.storage.find_async(
                db,
                coll,
                _doc(body, "filter"),
                projection=_doc(body, "projection"),
                sort=_doc(body, "sort"),
                skip=skip,
                limit=abs(limit),
            )
        batch = _int(body, "batchSize")
        if batch is not None and batch < 0:
            raise CommandError(2, "batchSize value must be non-negative")
        if limit and (batch is None or batch > abs(limit)):
            batch = abs(limit)
        return {
            **self.cursors.first_batch(
                f"{db}.{coll}",
                docs,
                batch,
                single_batch=single,
                lsid=body.get("lsid"),
                max_time_ms=_int(body, "maxTimeMS"),
            ),
            "ok": 1.0,
        }

    _EXPLAINABLE = frozenset({"find", "aggregate", "count", "distinct"})

    async def explain(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """explain of a read: runs it (reads only) and describes it as a collection scan.

        The engine has no planner, so the plan is always COLLSCAN (IXSCAN with a hint);
        writes are not explained (238) because explaining must not execute them.
        """
        inner = body.get("explain")
        if not isinstance(inner, Mapping) or not inner:
            raise CommandError(9, "explain command requires a nested object")
        name = next(iter(inner))
        if name not in self._EXPLAINABLE:
            raise CommandError(238, f"not supported by the embedded server: explain of {name}")
        verbosity = body.get("verbosity", "allPlansExecution")
        if verbosity not in ("queryPlanner", "executionStats", "allPlansExecution"):
            raise CommandError(2, f"verbosity string must be one of ..., got {verbosity!r}")
        command = {**inner, "$db": db}
        if name == "aggregate":
            command.setdefault("cursor", {})
        reply = self.table[name](session, db, command)
        if isinstance(reply, Awaitable):
            reply = await reply
        cursor = reply.get("cursor")
        returned = 0
        if isinstance(cursor, Mapping):
            returned = len(cursor.get("firstBatch", []))
            if cursor.get("id"):  # count everything, then close what the read opened
                more = self.cursors.get(cursor["id"], cursor["ns"])
                returned += len(more.take(None)) if more.stream is None else 0
                self.cursors.close(int(cursor["id"]))
        elif "n" in reply:
            returned = int(reply["n"])
        elif "values" in reply:
            returned = len(reply["values"])
        target = inner[name]
        namespace = f"{db}.{target}" if isinstance(target, str) else f"{db}.$cmd.aggregate"
        stage: Reply = {"stage": "COLLSCAN", "direction": "forward"}
        if inner.get("hint") is not None:
            stage = {
                "stage": "FETCH",
                "inputStage": {"stage": "IXSCAN", "keyPattern": inner["hint"]},
            }
        out: Reply = {
            "explainVersion": "1",
            "queryPlanner": {
                "namespace": namespace,
                "parsedQuery": dict(inner.get("filter") or inner.get("query") or {}),
                "winningPlan": stage,
                "rejectedPlans": [],
            },
            "command": dict(inner),
            "serverInfo": {"host": self.server.advertised, "version": SERVER_VERSION},
            "ok": 1.0,
        }
        if verbosity != "queryPlanner":
            out["executionStats"] = {
                "executionSuccess": True,
                "nReturned": returned,
                "executionTimeMillis": 0,
                "totalKeysExamined": 0,
                "totalDocsExamined": returned,
                "executionStages": {**stage, "nReturned": returned},
            }
        return out

    def _tailable_find(self, db: str, coll: str, body: Mapping[str, Any], single: bool) -> Reply:
        """find with ``tailable`` (capped collections only; see :mod:`.capped`)."""
        if not is_capped(self.storage, db, coll):
            raise CommandError(
                2,
                f"error processing query: ns={db}.{coll} :: caused by :: "
                "tailable cursor requested on non capped collection",
            )
        tail = Tail(db, coll, _doc(body, "filter") or {}, await_data=bool(body.get("awaitData")))
        tail.skip = _int(body, "skip", 0) or 0
        tail.projection = _doc(body, "projection")
        limit = abs(_int(body, "limit", 0) or 0)
        tail.remaining = limit or None
        batch = _int(body, "batchSize")
        docs = tail.fetch(self.storage, 101 if batch is None else batch) if batch != 0 else []
        cursor_id = 0
        if not single and not tail.done:
            cursor = self.cursors.open(f"{db}.{coll}", lsid=body.get("lsid"))
            cursor.tail = tail
            cursor_id = cursor.id
        return {
            "cursor": {"firstBatch": docs, "id": Int64(cursor_id), "ns": f"{db}.{coll}"},
            "ok": 1.0,
        }

    async def _await_data(
        self, fetch: Callable[[], _B], ready: Callable[[_B], bool], body: Mapping[str, Any]
    ) -> _B:
        """An awaitData getMore's batch: ``fetch()`` now, and again after each oplog append
        until ``ready(batch)``, the ``maxTimeMS`` wait (1 s by default) ends or the server
        closes. MongoDB's rule: the wait is a maximum, so a batch with data returns at once.

        ``fetch`` runs before each wait with no await in between, and ``Oplog.wait`` takes
        the append event before it suspends, so an append can never fall between the check
        and the wait (no missed wake-up).
        """
        max_time = _int(body, "maxTimeMS")
        deadline = time.monotonic() + (max_time if max_time is not None else 1000) / 1000
        found = fetch()
        while not ready(found) and not self.server.closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self.oplog.wait(remaining):
                break
            found = fetch()
        return found

    async def _tailable_get_more(self, cursor: Any, body: Mapping[str, Any]) -> Reply:
        tail: Tail = cursor.tail
        batch = _int(body, "batchSize")
        try:
            docs = await self._await_data(
                lambda: tail.fetch(self.storage, batch),
                lambda docs: bool(docs) or not tail.await_data,
                body,
            )
        except CommandError:
            self.cursors.close(cursor.id)
            raise
        if tail.done:
            self.cursors.close(cursor.id)
        return {
            "cursor": {
                "nextBatch": docs,
                "id": Int64(0 if tail.done else cursor.id),
                "ns": cursor.ns,
            },
            "ok": 1.0,
        }

    def _hinted_find(
        self, db: str, coll: str, body: Mapping[str, Any], skip: int, limit: int
    ) -> list[dict[str, Any]]:
        """A find with ``hint``/``min``/``max`` (see :mod:`.hints`)."""
        hint = body.get("hint")
        index = None
        if hint is not None and (db, coll) in self.storage.catalog:
            index = resolve_hint(f"{db}.{coll}", self.storage.index_specs(db, coll), hint)
        sort = _doc(body, "sort")
        natural = hint.get("$natural") if isinstance(hint, Mapping) else None
        order = dict(index["key"]) if index is not None else None
        docs = self.storage.find(db, coll, _doc(body, "filter"), sort=order)
        if isinstance(natural, int | float) and natural < 0:
            docs.reverse()
        docs = apply_bounds(docs, index, _doc(body, "min"), _doc(body, "max"))
        if sort:  # an explicit sort wins over the index order
            docs = run_pipeline(docs, [{"$sort": sort}], self.storage.client[db])
        docs = docs[skip:]
        if limit:
            docs = docs[:limit]
        projection = _doc(body, "projection")
        if projection:
            docs = run_pipeline(docs, [{"$project": projection}], self.storage.client[db])
        return docs

    async def count(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """count: ``{n}``."""
        coll = _name(body["count"])
        view = view_of(self.storage, db, coll)
        if view is not None:
            stages = find_stages(
                _doc(body, "query"), None, None, _int(body, "skip", 0) or 0,
                _int(body, "limit", 0) or 0,
            )  # fmt: skip
            return {"n": len(self.storage.aggregate(db, view[0], view[1] + stages)), "ok": 1.0}
        n = await self.storage.count(
            db,
            coll,
            _doc(body, "query"),
            skip=_int(body, "skip", 0) or 0,
            limit=abs(_int(body, "limit", 0) or 0),
        )
        return {"n": n, "ok": 1.0}

    def distinct(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """distinct: ``{values}``."""
        coll = _name(body["distinct"])
        key = body.get("key")
        if not isinstance(key, str):
            raise CommandError(14, "BSON field 'distinct.key' is missing or not a string")
        if (db, coll) not in self.storage.catalog:
            return {"values": [], "ok": 1.0}
        if view_of(self.storage, db, coll) is not None:
            raise CommandError(238, "not supported by the embedded server: distinct on a view")
        try:
            values = self.storage.raw(db, coll).distinct(key, _doc(body, "query") or {})
        except Exception as exc:
            from .storage import engine_error

            raise engine_error(exc) from exc
        # mongod returns the distinct values in BSON order (they are deduplicated in an
        # ordered set); the engine returns them in hash order.
        from mongomock.filtering import BsonComparable

        return {"values": sorted(values, key=BsonComparable), "ok": 1.0}

    async def aggregate(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """aggregate, including ``$changeStream`` on a collection, database or cluster."""
        target = body["aggregate"]
        pipeline = body.get("pipeline")
        if not isinstance(pipeline, list):
            raise CommandError(14, "'pipeline' option must be specified as an array")
        cursor_opts = _doc(body, "cursor")
        if cursor_opts is None and not body.get("explain"):
            raise CommandError(
                9, "The 'cursor' option is required, except for aggregate with the explain argument"
            )
        batch = _int(cursor_opts or {}, "batchSize")
        stages = [next(iter(s)) if isinstance(s, Mapping) and s else None for s in pipeline]
        if "$changeStream" in stages:
            if stages[0] != "$changeStream":
                raise CommandError(
                    40602, "$changeStream is only valid as the first stage in a pipeline."
                )
            return self._open_change_stream(db, target, pipeline, batch, body)
        if target == 1:
            if stages and stages[0] == "$documents":
                docs = pipeline[0]["$documents"]
                if not isinstance(docs, list):
                    raise CommandError(14, "$documents requires an array of documents")
                result = run_pipeline(list(docs), pipeline[1:], self.storage.client[db])
                ns = f"{db}.$cmd.aggregate"
            else:
                raise CommandError(
                    238,
                    "not supported by the embedded server: database-level "
                    f"aggregate starting with {stages[0] if stages else 'nothing'}",
                )
        else:
            coll = _name(target)
            ns = f"{db}.{coll}"
            result = await self._collection_aggregate(db, coll, pipeline)
        return {**self.cursors.first_batch(ns, result, batch, lsid=body.get("lsid")), "ok": 1.0}

    async def _collection_aggregate(
        self, db: str, coll: str, pipeline: list[Any]
    ) -> list[dict[str, Any]]:
        last = next(iter(pipeline[-1])) if pipeline and isinstance(pipeline[-1], Mapping) else None
        view = view_of(self.storage, db, coll)
        if view is not None:
            coll, pipeline = view[0], view[1] + pipeline
        if last == "$merge":
            merge_into(self.storage, db, pipeline[-1]["$merge"],
                       self.storage.aggregate(db, coll, pipeline[:-1]))  # fmt: skip
            return []
        if last != "$out":
            return await self.storage.aggregate_async(db, coll, pipeline)
        out = pipeline[-1]["$out"]
        out_db, out_coll = (
            (db, out) if isinstance(out, str) else (out.get("db", db), out.get("coll"))
        )
        docs = self.storage.aggregate(db, coll, pipeline[:-1])
        self.storage.drop_collection(out_db, _name(out_coll))
        if docs:
            self.storage.insert(out_db, out_coll, docs, ordered=True)
        else:
            self.storage.ensure(out_db, out_coll)
        return []

    def _open_change_stream(
        self, db: str, target: Any, pipeline: list[Any], batch: int | None, body: Mapping[str, Any]
    ) -> Reply:
        spec = pipeline[0]["$changeStream"]
        if not isinstance(spec, Mapping):
            raise CommandError(14, "$changeStream stage must be an object")
        read_concern = body.get("readConcern")
        level = read_concern.get("level") if isinstance(read_concern, Mapping) else None
        if level is not None and level != "majority":
            # mongod: the stage only supports majority (drivers do not validate it).
            raise CommandError(
                72,
                "Aggregation stage $changeStream cannot run with a readConcern other than "
                f"'majority'. Current readConcern: {level}",
            )
        if target == 1:
            if db == "admin":
                if not spec.get("allChangesForCluster"):
                    raise CommandError(
                        73, "$changeStream may not be opened on the internal admin database"
                    )
                stream_target = Target(None, None)
            else:
                if spec.get("allChangesForCluster"):
                    raise CommandError(
                        40575,
                        "A $changeStream with 'allChangesForCluster:true' may only be opened "
                        "on the 'admin' database",
                    )
                stream_target = Target(db, None)
        else:
            coll = _name(target)
            if db in SYSTEM_DATABASES or coll.startswith("system."):
                raise CommandError(
                    73, f"$changeStream may not be opened on the internal {db}.{coll}"
                )
            if spec.get("allChangesForCluster"):
                raise CommandError(
                    40575, "allChangesForCluster may only be used on aggregate: 1 against admin"
                )
            stream_target = Target(db, coll)
        stream = ChangeStream(self.oplog, self.storage, stream_target, spec, list(pipeline[1:]))
        events, token = stream.next_batch(batch)
        cursor_id = 0
        if not stream.closed:
            cursor_id = self.cursors.open(stream_target.ns, stream=stream, lsid=body.get("lsid")).id
        return {
            "cursor": {
                "firstBatch": events,
                "postBatchResumeToken": token,
                "id": Int64(cursor_id),
                "ns": stream_target.ns,
            },
            "ok": 1.0,
        }

    async def get_more(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """getMore; on a change stream, waits up to ``maxTimeMS`` for an event."""
        cursor_id = body["getMore"]
        coll = body.get("collection")
        if not isinstance(coll, str):
            raise CommandError(
                14, "BSON field 'getMore.collection' is missing but a required field"
            )
        ns = f"{db}.{coll}"
        cursor = self.cursors.get(cursor_id, ns)
        batch = _int(body, "batchSize")
        if cursor.tail is not None:
            return await self._tailable_get_more(cursor, body)
        if cursor.stream is None and (cursor.max_time_ms or body.get("maxTimeMS")):
            self._max_time_fault()
        if cursor.stream is None:
            # Encoding a big batch (up to 16 MiB) would hold the loop: off it when large.
            size = batch if batch else self.storage.readers.threshold
            docs = await self.storage.offload(functools.partial(cursor.take, batch), size)
            if cursor.exhausted:
                self.cursors.close(cursor.id)
            return {
                "cursor": {
                    "nextBatch": docs,
                    "id": Int64(0 if cursor.exhausted else cursor.id),
                    "ns": ns,
                },
                "ok": 1.0,
            }
        stream = cursor.stream
        failpoint = self.server.failpoints.check(
            "failGetMoreAfterCursorCheckout", "getMore", session.app_name, ns
        )
        if failpoint is not None:
            if failpoint.close_connection:
                raise CloseConnection()
            if failpoint.error is not None:
                failpoint.error.change_stream = True
                raise failpoint.error
        try:
            events, token = await self._await_data(
                lambda: stream.next_batch(batch),
                lambda found: bool(found[0]) or stream.closed,
                body,
            )
        except CommandError as exc:
            self.cursors.close(cursor.id)
            exc.change_stream = True
            raise
        if stream.closed:
            self.cursors.close(cursor.id)
        return {
            "cursor": {
                "nextBatch": events,
                "postBatchResumeToken": token,
                "id": Int64(0 if stream.closed else cursor.id),
                "ns": ns,
            },
            "ok": 1.0,
        }

    def kill_cursors(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """killCursors: ``{cursorsKilled, cursorsNotFound, cursorsAlive, cursorsUnknown}``."""
        ids = body.get("cursors")
        if not isinstance(ids, list):
            raise CommandError(14, "BSON field 'killCursors.cursors' must be an array")
        killed: list[Int64] = []
        missing: list[Int64] = []
        for cursor_id in ids:
            (killed if self.cursors.close(int(cursor_id)) else missing).append(Int64(cursor_id))
        return {
            "cursorsKilled": killed,
            "cursorsNotFound": missing,
            "cursorsAlive": [],
            "cursorsUnknown": [],
            "ok": 1.0,
        }

    # -- indexes -----------------------------------------------------------------------

    def create_indexes(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """createIndexes: ``{numIndexesBefore, numIndexesAfter, createdCollection...}``."""
        coll = _name(body["createIndexes"])
        specs = body.get("indexes")
        if not isinstance(specs, list) or not specs:
            raise CommandError(2, "Must specify at least one index to create")
        before, after, created = self.storage.create_indexes(db, coll, specs)
        reply: Reply = {
            "numIndexesBefore": before,
            "numIndexesAfter": after,
            "createdCollectionAutomatically": created,
        }
        if before == after:
            reply["note"] = "all indexes already exist"
        reply["ok"] = 1.0
        return reply

    def list_indexes(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """listIndexes; error 26 on a missing collection."""
        coll = _name(body["listIndexes"])
        specs = self.storage.index_specs(db, coll)
        batch = _int(_doc(body, "cursor") or {}, "batchSize")
        return {**self.cursors.first_batch(f"{db}.{coll}", specs, batch), "ok": 1.0}

    def drop_indexes(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """dropIndexes: ``{nIndexesWas}``."""
        coll = _name(body[next(iter(body))])
        before = self.storage.drop_indexes(db, coll, body.get("index"))
        return {"nIndexesWas": before, "ok": 1.0}


def cluster_time_fields(ts: Timestamp) -> Reply:
    """``$clusterTime`` and ``operationTime``, as every reply carries them."""
    return {
        "$clusterTime": {
            "clusterTime": ts,
            "signature": {"hash": Binary(b"\x00" * 20), "keyId": Int64(0)},
        },
        "operationTime": ts,
    }


__all__ = ["Commands", "Session", "cluster_time_fields"]
