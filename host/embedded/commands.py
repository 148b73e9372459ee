"""Command handlers: each takes the command body and returns MongoDB's reply shape.

The shapes follow the MongoDB command reference and the drivers' specs (handshake in
``source/mongodb-handshake``, server monitoring in ``source/server-discovery-and-monitoring``,
CRUD in ``source/crud``). ``$clusterTime``, ``operationTime`` and error labels are
added by :mod:`.server` around every reply.

This module holds the command table, the CRUD and cursor handlers (reads, writes,
getMore, change streams); :mod:`.admin` answers the handshake, diagnostic and
replica-set commands and :mod:`.catalog` the catalog and index commands.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import bson
from bson.binary import Binary
from bson.int64 import Int64
from bson.timestamp import Timestamp

from . import validation
from .admin import MAX_WRITE_BATCH_SIZE, SERVER_VERSION, AdminCommands
from .body import doc_field, int_field, name_field
from .bsonorder import distinct_values
from .capped import Tail, enforce_cap, is_capped
from .catalog import CatalogCommands
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
    refuse_collation,
    run_pipeline,
)
from .views import find_stages, refuse_write, view_of

if TYPE_CHECKING:
    from .server import EmbeddedMongo

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


class Commands:
    """The command table of one server."""

    def __init__(self, server: EmbeddedMongo) -> None:
        self.server = server
        self.storage = server.storage
        self.oplog = server.oplog
        self.cursors = CursorManager()
        self.history = RetryHistory()
        self.storage.on_commit(self.history.settle)
        self.admin = AdminCommands(server)
        self.catalog = CatalogCommands(server, self.cursors)
        self.table: dict[str, Handler] = {
            **self.admin.table(),
            **self.catalog.table(),
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
            "explain": self.explain,
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
        coll = name_field(body["insert"])
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
        coll = name_field(body["update"])
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
        coll = name_field(body["delete"])
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
        coll = name_field(body[next(iter(body))])
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
        coll = name_field(body["find"])
        limit = int_field(body, "limit", 0) or 0
        skip = int_field(body, "skip", 0) or 0
        if skip < 0:
            raise CommandError(2, "skip value must be non-negative")
        single = bool(body.get("singleBatch")) or limit < 0
        if body.get("tailable"):
            return self._tailable_find(db, coll, body, single)
        view = view_of(self.storage, db, coll)
        if view is not None:
            stages = find_stages(
                doc_field(body, "filter"),
                doc_field(body, "projection"),
                doc_field(body, "sort"),
                skip,
                limit,
            )
            docs = self.storage.aggregate(db, view[0], view[1] + stages)
        elif body.get("hint") is not None or body.get("min") or body.get("max"):
            docs = self._hinted_find(db, coll, body, skip, abs(limit))
        else:
            docs = await self.storage.find_async(
                db,
                coll,
                doc_field(body, "filter"),
                projection=doc_field(body, "projection"),
                sort=doc_field(body, "sort"),
                skip=skip,
                limit=abs(limit),
            )
        batch = int_field(body, "batchSize")
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
                max_time_ms=int_field(body, "maxTimeMS"),
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
        tail = Tail(
            db, coll, doc_field(body, "filter") or {}, await_data=bool(body.get("awaitData"))
        )
        tail.skip = int_field(body, "skip", 0) or 0
        tail.projection = doc_field(body, "projection")
        limit = abs(int_field(body, "limit", 0) or 0)
        tail.remaining = limit or None
        batch = int_field(body, "batchSize")
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
        max_time = int_field(body, "maxTimeMS")
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
        batch = int_field(body, "batchSize")
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
        sort = doc_field(body, "sort")
        natural = hint.get("$natural") if isinstance(hint, Mapping) else None
        order = dict(index["key"]) if index is not None else None
        docs = self.storage.find(db, coll, doc_field(body, "filter"), sort=order)
        if isinstance(natural, int | float) and natural < 0:
            docs.reverse()
        docs = apply_bounds(docs, index, doc_field(body, "min"), doc_field(body, "max"))
        if sort:  # an explicit sort wins over the index order
            docs = run_pipeline(docs, [{"$sort": sort}], self.storage.client[db])
        docs = docs[skip:]
        if limit:
            docs = docs[:limit]
        projection = doc_field(body, "projection")
        if projection:
            docs = run_pipeline(docs, [{"$project": projection}], self.storage.client[db])
        return docs

    async def count(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """count: ``{n}``."""
        coll = name_field(body["count"])
        view = view_of(self.storage, db, coll)
        if view is not None:
            stages = find_stages(
                doc_field(body, "query"), None, None, int_field(body, "skip", 0) or 0,
                int_field(body, "limit", 0) or 0,
            )  # fmt: skip
            return {"n": len(self.storage.aggregate(db, view[0], view[1] + stages)), "ok": 1.0}
        n = await self.storage.count(
            db,
            coll,
            doc_field(body, "query"),
            skip=int_field(body, "skip", 0) or 0,
            limit=abs(int_field(body, "limit", 0) or 0),
        )
        return {"n": n, "ok": 1.0}

    def distinct(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """distinct: ``{values}``."""
        coll = name_field(body["distinct"])
        key = body.get("key")
        if not isinstance(key, str):
            raise CommandError(14, "BSON field 'distinct.key' is missing or not a string")
        if (db, coll) not in self.storage.catalog:
            return {"values": [], "ok": 1.0}
        if view_of(self.storage, db, coll) is not None:
            raise CommandError(238, "not supported by the embedded server: distinct on a view")
        try:
            docs = self.storage.raw(db, coll).find(doc_field(body, "query") or {})
            values = distinct_values(key, docs)
        except Exception as exc:
            from .storage import engine_error

            raise engine_error(exc) from exc
        return {"values": values, "ok": 1.0}

    async def aggregate(self, session: Session, db: str, body: dict[str, Any]) -> Reply:
        """aggregate, including ``$changeStream`` on a collection, database or cluster."""
        target = body["aggregate"]
        pipeline = body.get("pipeline")
        if not isinstance(pipeline, list):
            raise CommandError(14, "'pipeline' option must be specified as an array")
        cursor_opts = doc_field(body, "cursor")
        if cursor_opts is None and not body.get("explain"):
            raise CommandError(
                9, "The 'cursor' option is required, except for aggregate with the explain argument"
            )
        batch = int_field(cursor_opts or {}, "batchSize")
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
            coll = name_field(target)
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
        self.storage.drop_collection(out_db, name_field(out_coll))
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
            coll = name_field(target)
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
        batch = int_field(body, "batchSize")
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
