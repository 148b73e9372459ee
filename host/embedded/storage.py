"""Document storage: mongomock for query, update and aggregation semantics, plus a catalog.

mongomock (a well-kept pure-Python engine) decides what a filter matches, what an
update operator does and what a pipeline returns; this module adds what MongoDB has
and mongomock lacks: collection UUIDs and options, one oplog entry per document
written (with pre- and post-images for change streams), duplicate-key details
(keyPattern/keyValue), ``arrayFilters`` and ``$[]``, and durability through the
journal. Everything here runs on the server's event loop: a write is applied whole
before the next one starts, which is what makes the oplog order the apply order.

Design note: stored documents are immutable, so reads can leave the loop.
    mongomock updates a document in place; before it does, :meth:`Storage._apply`
    puts a deep copy under the key (copy-on-write), so a document object, once stored,
    is never changed. A list of the stored objects is therefore a consistent
    point-in-time snapshot that costs one pointer per document. Heavy reads (a full
    scan of a large collection for find, count or aggregate) take that snapshot on the
    loop and match, sort and project it in a worker thread (:meth:`Storage.offload`),
    so a long query never stalls the other connections: the loop keeps answering
    pings, getMores and writes, and the GIL is handed back every few milliseconds.
    Lookups by ``_id`` and by indexed fields take the index fast path
    (:mod:`.indexes`) and stay on the loop.

Design note: durable or rolled back. Every write is journaled before its command
    replies (:meth:`Storage.commit`, called by the server after each command and before
    any await). A document write is applied, then logged; if the journal cannot be
    written, :meth:`Storage.commit` undoes every write since the last commit (in
    reverse, from the entries' images) and drops their oplog entries, which nobody has
    seen yet (no await in between), then raises MongoDB's error (14031
    OutOfDiskSpace for a full disk). Catalog changes that cannot be undone (drop,
    rename, dropIndexes, collMod) are journaled first and applied after.

Known gaps of the engine (each surfaces as error 238 NotImplemented naming the
feature, never as a wrong answer): collations other than ``simple``, ``$redact``
and some rarer aggregation operators.
"""

from __future__ import annotations

import contextlib
import copy
import uuid as uuidlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import mongomock
from bson import Binary
from mongomock import helpers as mm_helpers
from pymongo.errors import DuplicateKeyError, OperationFailure

from . import reads
from .errors import CommandError
from .indexes import IndexedStore, filter_applies, indexed_store, store_key
from .journal import Journal, JournalFailed
from .oplog import Entry, Oplog
from .pipeline import rewrite_stages
from .reads import Readers
from .writes import DocumentWrites
from .writes import WriteResult as WriteResult  # re-exported: commands, retryable
from .writes import engine_error as engine_error  # re-exported: reads, validation
from .writes import refuse_collation as refuse_collation  # re-exported: commands

SYSTEM_DATABASES = frozenset({"admin", "config", "local"})


@dataclass(slots=True)
class CollectionInfo:
    """Catalog entry of one collection."""

    uuid: uuidlib.UUID
    options: dict[str, Any] = field(default_factory=dict)
    # TTL indexes: name -> (field, expireAfterSeconds). Kept here, not in the engine:
    # mongomock would expire documents silently on access, with no oplog entry (no
    # change event, nothing journaled). host/embedded/ttl.py deletes them instead.
    ttl: dict[str, tuple[str, float]] = field(default_factory=dict)

    @property
    def images(self) -> bool:
        """Pre- and post-images are recorded for change streams."""
        opt = self.options.get("changeStreamPreAndPostImages")
        return isinstance(opt, Mapping) and bool(opt.get("enabled"))


class Storage(DocumentWrites):
    """Databases, collections and documents, with every write logged to the oplog."""

    def __init__(self, oplog: Oplog, journal: Journal | None = None) -> None:
        self.oplog = oplog
        self.journal = journal
        self.client: mongomock.MongoClient[dict[str, Any]] = mongomock.MongoClient(tz_aware=False)
        self.catalog: dict[tuple[str, str], CollectionInfo] = {}
        # Writes applied since the last commit (full entries, images included), oldest
        # first. Invariant: empty whenever the loop switches tasks (commit before await).
        self._pending: list[Entry] = []
        # Called with True once the writes since the last commit are durable, with False
        # when they were rolled back (the retryable-write history settles here).
        self._commit_hooks: list[Callable[[bool], None]] = []
        self.readers = Readers()

    # -- durability --------------------------------------------------------------------

    def _log(self, op: str, db: str, coll: str | None, **fields: Any) -> Entry:
        entry = self.oplog.new_entry(op, db, coll, **fields)
        if self.journal is not None:
            record = entry.lean().to_document()
            if entry.op == "update" and "post" not in record and entry.post is not None:
                record["post"] = entry.post  # redo needs the new document
            self.journal.append(record)
        self._pending.append(entry)
        return entry

    def commit(self) -> None:
        """Make the writes since the last commit durable, or undo them and raise.

        Raises:
            CommandError: 14031 OutOfDiskSpace (or 8 for another I/O error) if the
                journal could not be written; the writes were rolled back.
        """
        pending, self._pending = self._pending, []
        if self.journal is not None and pending:
            try:
                self.journal.flush()
            except JournalFailed as exc:
                self._rollback(pending)
                for hook in self._commit_hooks:
                    hook(False)
                raise journal_error(exc, str(self.journal.dir)) from exc
        for hook in self._commit_hooks:
            hook(True)

    def on_commit(self, hook: Callable[[bool], None]) -> None:
        """Call ``hook(durable)`` at every :meth:`commit`: True when the writes since the
        previous commit are journaled (or there is no journal), False when they were
        rolled back."""
        self._commit_hooks.append(hook)

    def _rollback(self, pending: list[Entry]) -> None:
        for entry in reversed(pending):
            db, coll = entry.db, entry.coll
            if coll is None:
                continue
            store = indexed_store(self.client, db, coll)
            if entry.op == "insert" and entry.key is not None:
                key = store_key(entry.key["_id"])
                if key in store._documents:
                    del store[key]
            elif entry.op in ("update", "replace") and entry.pre is not None:
                store[store_key(entry.key["_id"] if entry.key else entry.pre["_id"])] = entry.pre
            elif entry.op == "delete" and entry.pre is not None:
                store[store_key(entry.pre["_id"])] = entry.pre
            elif entry.op == "create":
                self.catalog.pop((db, coll), None)
                self.client[db].drop_collection(coll)
            elif entry.op == "createIndexes":
                for spec in entry.extra.get("indexes", []):
                    with contextlib.suppress(KeyError, OperationFailure):
                        self.raw(db, coll).drop_index(spec["name"])
            # drop, rename, dropIndexes, modify, dropDatabase are journaled before
            # they are applied (:meth:`_ahead`): nothing to undo.
        self.oplog.discard_from(pending[0].ts)
        if self.journal is not None:
            self.journal.discard()

    def _ahead(self, op: str, db: str, coll: str | None, **fields: Any) -> Entry:
        """Log a change that cannot be undone and make it durable before it is applied."""
        entry = self._log(op, db, coll, **fields)
        self.commit()
        return entry

    async def offload(self, work: Callable[[], Any], size: int) -> Any:
        """Run a pure function of a snapshot: inline if small, else in a worker thread.

        Pending writes are committed first: nothing un-journaled is visible across the
        await.
        """
        if size < self.readers.threshold:
            return work()
        self.commit()
        return await self.readers.run(work)

    def close(self) -> None:
        """Stop the reader threads."""
        self.readers.close()

    # -- catalog -----------------------------------------------------------------------

    def info(self, db: str, coll: str) -> CollectionInfo | None:
        """The catalog entry of ``db.coll``, or None if it does not exist."""
        return self.catalog.get((db, coll))

    def raw(self, db: str, coll: str) -> mongomock.Collection[dict[str, Any]]:
        """The engine's collection object (no implicit creation in the catalog)."""
        indexed_store(self.client, db, coll)
        return self.client[db][coll]

    def store(self, db: str, coll: str) -> IndexedStore:
        """The collection's document store (with its index fast paths)."""
        return indexed_store(self.client, db, coll)

    def ensure(self, db: str, coll: str) -> CollectionInfo:
        """Return the collection's catalog entry, creating the collection implicitly."""
        info = self.catalog.get((db, coll))
        if info is None:
            info = self._create(db, coll, {})
        return info

    def _create(self, db: str, coll: str, options: dict[str, Any]) -> CollectionInfo:
        check_namespace(db, coll)
        info = CollectionInfo(uuidlib.uuid4(), dict(options))
        self.catalog[(db, coll)] = info
        if coll not in self.client[db].list_collection_names():
            self.client[db].create_collection(coll)
        self._log("create", db, coll, uuid=info.uuid, extra={"options": dict(options)})
        return info

    def create_collection(self, db: str, coll: str, options: dict[str, Any]) -> None:
        """Create a collection explicitly; error 48 if it exists."""
        if (db, coll) in self.catalog:
            raise CommandError(48, f"Collection {db}.{coll} already exists.")
        self._create(db, coll, options)

    def coll_mod(self, db: str, coll: str, options: dict[str, Any]) -> None:
        """Change collection options (``changeStreamPreAndPostImages``)."""
        info = self.catalog.get((db, coll))
        if info is None:
            raise CommandError(26, f"ns does not exist: {db}.{coll}")
        self._ahead("modify", db, coll, uuid=info.uuid, extra={"options": dict(options)})
        info.options.update(options)

    def collections(self, db: str) -> list[tuple[str, CollectionInfo]]:
        """The collections of ``db``, by name."""
        return sorted((c, info) for (d, c), info in self.catalog.items() if d == db)

    def databases(self) -> list[str]:
        """Names of databases that hold at least one collection."""
        return sorted({d for d, _ in self.catalog})

    def drop_collection(self, db: str, coll: str) -> int | None:
        """Drop a collection; returns its index count, or None if it did not exist."""
        info = self.catalog.get((db, coll))
        if info is None:
            return None
        self._ahead("drop", db, coll, uuid=info.uuid)
        del self.catalog[(db, coll)]
        n_indexes = len(self.raw(db, coll).index_information())
        self.client[db].drop_collection(coll)
        return n_indexes

    def drop_database(self, db: str) -> None:
        """Drop every collection of ``db`` (one drop entry each), then the database."""
        for coll, _ in self.collections(db):
            self.drop_collection(db, coll)
        self._ahead("dropDatabase", db, None)
        self.client.drop_database(db)

    def rename_collection(
        self, src_db: str, src: str, dst_db: str, dst: str, *, drop_target: bool
    ) -> None:
        """Rename ``src_db.src`` to ``dst_db.dst`` (codes 26 and 48 as MongoDB)."""
        info = self.catalog.get((src_db, src))
        if info is None:
            raise CommandError(26, f"Source collection {src_db}.{src} does not exist")
        check_namespace(dst_db, dst)
        dropped = self.catalog.get((dst_db, dst))
        if dropped is not None and not drop_target:
            raise CommandError(48, f"target namespace exists: {dst_db}.{dst}")
        extra: dict[str, Any] = {"to": {"db": dst_db, "coll": dst}}
        if dropped is not None:
            extra["dropTarget"] = Binary.from_uuid(dropped.uuid)
        self._ahead("rename", src_db, src, uuid=info.uuid, extra=extra)
        if dropped is not None:
            # One oplog entry, as MongoDB: the rename carries the dropped target's UUID.
            del self.catalog[(dst_db, dst)]
            self.client[dst_db].drop_collection(dst)
        self._move_collection(src_db, src, dst_db, dst)

    def _move_collection(self, src_db: str, src: str, dst_db: str, dst: str) -> None:
        # Shared by rename and its journal replay. The index specs are read while the
        # source is still in the catalog (index_specs looks it up there), then the
        # documents, catalog entry and indexes move together.
        docs = list(self.raw(src_db, src).find())
        indexes = self.index_specs(src_db, src)
        self.client[src_db].drop_collection(src)
        self.catalog[(dst_db, dst)] = self.catalog.pop((src_db, src))
        self.client[dst_db].drop_collection(dst)
        self.client[dst_db].create_collection(dst)
        if docs:
            self.raw(dst_db, dst).insert_many(docs)
        self._apply_index_specs(dst_db, dst, indexes)

    # -- indexes ---------------------------------------------------------------------

    def index_specs(self, db: str, coll: str) -> list[dict[str, Any]]:
        """Index descriptions as listIndexes returns them."""
        if (db, coll) not in self.catalog:
            raise CommandError(26, f"ns does not exist: {db}.{coll}")
        specs = []
        ttl = self.catalog[(db, coll)].ttl
        for name, raw in self.raw(db, coll).index_information().items():
            spec: dict[str, Any] = {"v": 2, "key": dict(raw["key"]), "name": name}
            for opt in ("unique", "sparse", "partialFilterExpression", "expireAfterSeconds"):
                if opt in raw:
                    spec[opt] = raw[opt]
            if name in ttl:
                seconds = ttl[name][1]
                spec["expireAfterSeconds"] = int(seconds) if seconds == int(seconds) else seconds
            specs.append(spec)
        specs.sort(key=lambda s: (s["name"] != "_id_", s["name"]))
        return specs

    def _apply_index_specs(self, db: str, coll: str, specs: Iterable[Mapping[str, Any]]) -> None:
        target = self.raw(db, coll)
        for spec in specs:
            if spec["name"] == "_id_":
                continue
            kwargs = {
                k: spec[k] for k in ("unique", "sparse", "partialFilterExpression") if k in spec
            }
            target.create_index(list(spec["key"].items()), name=spec["name"], **kwargs)
            info = self.catalog.get((db, coll))
            seconds = spec.get("expireAfterSeconds")
            # MongoDB: a compound index ignores expireAfterSeconds (TTL is single-field).
            if info is not None and seconds is not None and len(spec["key"]) == 1:
                info.ttl[spec["name"]] = (next(iter(spec["key"])), float(seconds))

    def create_indexes(
        self, db: str, coll: str, specs: list[dict[str, Any]]
    ) -> tuple[int, int, bool]:
        """Create indexes; returns (before, after, created collection automatically)."""
        created = (db, coll) not in self.catalog
        info = self.ensure(db, coll)
        before = len(self.raw(db, coll).index_information())
        existing = {s["name"]: s for s in self.index_specs(db, coll)}
        new_specs = []
        for spec in specs:
            key = spec.get("key")
            name = spec.get("name")
            if not isinstance(key, Mapping) or not key:
                raise CommandError(
                    9, "Error in specification: the 'key' field must be a non-empty document"
                )
            if not isinstance(name, str) or not name:
                raise CommandError(9, "Error in specification: the 'name' field is required")
            ttl_seconds = spec.get("expireAfterSeconds")
            if ttl_seconds is not None and (
                isinstance(ttl_seconds, bool)
                or not isinstance(ttl_seconds, int | float)
                or not 0 <= ttl_seconds <= 2**31 - 1
            ):
                raise CommandError(
                    67, f"TTL index 'expireAfterSeconds' option must be within [0, 2^31-1]: {name}"
                )
            if name in existing:
                if dict(existing[name]["key"]) != dict(key):
                    raise CommandError(
                        86,
                        f"An existing index has the same name ({name}) "
                        "but different key specification",
                    )
                if existing[name].get("expireAfterSeconds") != ttl_seconds:
                    raise CommandError(
                        85,
                        f"An equivalent index already exists with the same name but different "
                        f"options. Requested index: {name}, expireAfterSeconds: {ttl_seconds}; "
                        f"existing: {existing[name].get('expireAfterSeconds')}",
                    )
                continue
            clean = {"name": name, "key": dict(key)}
            for opt in ("unique", "sparse", "partialFilterExpression", "expireAfterSeconds"):
                if opt in spec:
                    clean[opt] = spec[opt]
            new_specs.append(clean)
        try:
            self._apply_index_specs(db, coll, new_specs)
        except DuplicateKeyError as exc:
            raise CommandError(
                11000,
                f"Index build failed: E11000 duplicate key error collection: {db}.{coll}: {exc}",
            ) from exc
        after = len(self.raw(db, coll).index_information())
        if new_specs:
            self._log("createIndexes", db, coll, uuid=info.uuid, extra={"indexes": new_specs})
        return before, after, created

    def drop_indexes(self, db: str, coll: str, which: Any) -> int:
        """Drop indexes by name, key pattern, list of names or ``"*"``; returns count before."""
        info = self.catalog.get((db, coll))
        if info is None:
            raise CommandError(26, f"ns not found {db}.{coll}")
        target = self.raw(db, coll)
        current = self.index_specs(db, coll)
        before = len(current)
        if which == "*":
            names = [s["name"] for s in current if s["name"] != "_id_"]
        elif isinstance(which, str):
            names = [which]
        elif isinstance(which, list):
            names = [str(n) for n in which]
        elif isinstance(which, Mapping):
            names = [s["name"] for s in current if s["key"] == dict(which)]
            if not names:
                raise CommandError(27, f"can't find index with key: {dict(which)}")
        else:
            raise CommandError(2, "dropIndexes 'index' must be a string, list or document")
        known = {s["name"] for s in current}
        for name in names:
            if name == "_id_":
                raise CommandError(72, "cannot drop _id index")
            if name not in known:
                raise CommandError(27, f"index not found with name [{name}]")
        if names:
            self._ahead("dropIndexes", db, coll, uuid=info.uuid, extra={"names": names})
        for name in names:
            target.drop_index(name)
            info.ttl.pop(name, None)
        return before

    # -- documents -------------------------------------------------------------------

    def find(
        self,
        db: str,
        coll: str,
        filter_: Mapping[str, Any] | None = None,
        *,
        projection: Mapping[str, Any] | None = None,
        sort: Mapping[str, Any] | None = None,
        skip: int = 0,
        limit: int = 0,
    ) -> list[dict[str, Any]]:
        """Documents matching ``filter_``, sorted, skipped, limited and projected.

        Without a projection these are the stored objects themselves: never mutate them
        (copy first).
        """
        work, _ = self._plan(db, coll, filter_, projection, sort, skip, limit)
        return work()

    async def find_async(
        self, db: str, coll: str, filter_: Mapping[str, Any] | None = None, **options: Any
    ) -> list[dict[str, Any]]:
        """:meth:`find` (same options), in a worker thread when it scans many documents."""
        work, size = self._plan(
            db,
            coll,
            filter_,
            options.get("projection"),
            options.get("sort"),
            options.get("skip", 0),
            options.get("limit", 0),
        )
        result: list[dict[str, Any]] = await self.offload(work, size)
        return result

    def _plan(
        self,
        db: str,
        coll: str,
        filter_: Mapping[str, Any] | None,
        projection: Mapping[str, Any] | None,
        sort: Mapping[str, Any] | None,
        skip: int,
        limit: int,
    ) -> tuple[Callable[[], list[dict[str, Any]]], int]:
        """The work of a find, as a pure function of a snapshot, and how many documents it reads."""
        if (db, coll) not in self.catalog:
            return list, 0
        spec, docs = self._scan(db, coll, filter_)
        work = reads.select(self.raw(db, coll), spec, docs, projection, sort, skip, limit)
        return work, len(docs)

    async def count(
        self, db: str, coll: str, filter_: Mapping[str, Any] | None, *, skip: int, limit: int
    ) -> int:
        """How many documents match (the count command), without copying any."""
        if (db, coll) not in self.catalog:
            return 0
        spec, docs = self._scan(db, coll, filter_)
        work = reads.count(spec, docs, skip, limit)
        result: int = await self.offload(work, len(docs))
        return result

    def _scan(
        self, db: str, coll: str, filter_: Mapping[str, Any] | None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The normalised filter and the documents it must look at (index candidates, or a
        snapshot of the whole collection), taken on the loop."""
        spec = dict(filter_ or {})
        try:
            spec = mm_helpers.patch_datetime_awareness_in_document(spec)  # type: ignore[no-untyped-call]
            store = self.store(db, coll)
            docs = store.candidates(spec)
            if docs is None:
                docs = store.snapshot()
            if not docs:
                filter_applies(spec, {})  # still validate the filter
        except Exception as exc:
            raise engine_error(exc) from exc
        return spec, docs

    def lookup(self, db: str, coll: str, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """A copy of the current document with this key (``fullDocument: updateLookup``)."""
        found = self.find(db, coll, key, limit=1)
        return copy.deepcopy(found[0]) if found else None

    def aggregate(self, db: str, coll: str, pipeline: list[Any]) -> list[dict[str, Any]]:
        """Run an aggregation pipeline over a collection."""
        docs = [copy.deepcopy(d) for d in self.find(db, coll)]
        return run_pipeline(docs, pipeline, self.client[db])

    async def aggregate_async(
        self, db: str, coll: str, pipeline: list[Any]
    ) -> list[dict[str, Any]]:
        """Run a pipeline over a collection; off the loop when it scans many documents.

        A leading ``$match`` selects through the index and without copying; documents
        are copied only when later stages could change them, which a count
        (``$match``/``$skip``/``$limit`` then ``$group`` of ``$sum``s, or ``$count``)
        cannot. Pipelines reading other collections stay on the loop.
        """
        plan = reads.split_match(pipeline)
        if plan is None:
            return self.aggregate(db, coll, pipeline)
        spec, rest = plan
        docs: list[dict[str, Any]] = []
        if (db, coll) in self.catalog:
            spec, docs = self._scan(db, coll, spec)
        work = reads.aggregate(spec, docs, rest, self.client[db])
        result: list[dict[str, Any]] = await self.offload(work, len(docs))
        return result

    # -- replay (journal recovery) ------------------------------------------------------

    def replay(self, entry: Entry) -> None:
        """Re-apply a journaled entry to the engine and the catalog without logging it."""
        db, coll = entry.db, entry.coll
        if entry.op == "create" and coll is not None:
            assert entry.uuid is not None
            self.catalog[(db, coll)] = CollectionInfo(
                entry.uuid, dict(entry.extra.get("options", {}))
            )
            if coll not in self.client[db].list_collection_names():
                self.client[db].create_collection(coll)
        elif entry.op == "modify" and coll is not None:
            self.catalog[(db, coll)].options.update(entry.extra.get("options", {}))
        elif entry.op == "insert" and coll is not None:
            assert entry.post is not None
            self.raw(db, coll).insert_one(entry.post)
        elif entry.op in ("update", "replace") and coll is not None:
            assert entry.post is not None and entry.key is not None
            self.store(db, coll)[store_key(entry.key["_id"])] = entry.post
        elif entry.op == "delete" and coll is not None:
            assert entry.key is not None
            self.raw(db, coll).delete_one(entry.key)
        elif entry.op == "drop" and coll is not None:
            self.catalog.pop((db, coll), None)
            self.client[db].drop_collection(coll)
        elif entry.op == "dropDatabase":
            self.client.drop_database(db)
        elif entry.op == "rename" and coll is not None:
            to = entry.extra["to"]
            self.catalog.pop((to["db"], to["coll"]), None)  # a dropped target
            self._move_collection(db, coll, to["db"], to["coll"])
        elif entry.op == "createIndexes" and coll is not None:
            self._apply_index_specs(db, coll, entry.extra.get("indexes", []))
        elif entry.op == "dropIndexes" and coll is not None:
            for name in entry.extra.get("names", []):
                self.raw(db, coll).drop_index(name)
                self.catalog[(db, coll)].ttl.pop(name, None)

    def dump(
        self,
    ) -> list[tuple[str, str, CollectionInfo, list[dict[str, Any]], list[dict[str, Any]]]]:
        """Every collection with its info, indexes and documents (for snapshots).

        A point-in-time view made of references (documents are immutable): safe to
        encode from another thread while the loop goes on writing.
        """
        return [
            (
                db,
                coll,
                CollectionInfo(info.uuid, copy.deepcopy(info.options)),
                self.index_specs(db, coll),
                self.store(db, coll).snapshot(),
            )
            for (db, coll), info in sorted(self.catalog.items(), key=lambda kv: kv[0])
        ]

    def load(
        self,
        db: str,
        coll: str,
        info: CollectionInfo,
        indexes: list[dict[str, Any]],
        docs: list[dict[str, Any]],
    ) -> None:
        """Restore one collection from a snapshot."""
        self.catalog[(db, coll)] = info
        self.client[db].create_collection(coll)
        if docs:
            self.raw(db, coll).insert_many(docs)
        self._apply_index_specs(db, coll, indexes)


def journal_error(exc: JournalFailed, data_dir: str) -> CommandError:
    """MongoDB's error for a journal write that failed."""
    where = f"the journal in {data_dir} could not be written ({exc.strerror})"
    if exc.out_of_space:
        return CommandError(
            14031, f"Can't take a write lock while out of disk space: {where}; not applied"
        )
    broken = "; writes are refused until a restart" if exc.broken else ""
    return CommandError(8, f"I/O error: {where}; not applied{broken}")


def check_namespace(db: str, coll: str) -> None:
    """Reject invalid database or collection names as MongoDB does (code 73)."""
    if not db or any(c in db for c in '/\\. "$\x00'):
        raise CommandError(73, f"Invalid database name: '{db}'")
    if not coll or "$" in coll or "\x00" in coll or coll.startswith("."):
        raise CommandError(73, f"Invalid collection name: '{coll}'")


def run_pipeline(
    docs: list[dict[str, Any]], pipeline: list[Any], database: Any
) -> list[dict[str, Any]]:
    """Run an aggregation pipeline over in-memory documents with the engine."""
    from mongomock import aggregate as mm_aggregate

    if not isinstance(pipeline, list) or not all(
        isinstance(s, Mapping) and len(s) == 1 for s in pipeline
    ):
        raise CommandError(
            14, "'pipeline' option must be specified as an array of single-key stages"
        )
    # mongomock emits a $group's accumulators before `_id`; MongoDB puts `_id` first.
    # Run the pipeline in segments that end at each $group and restore that order there.
    segments: list[list[dict[str, Any]]] = [[]]
    for stage in rewrite_stages(pipeline):
        segments[-1].append(dict(stage))
        if "$group" in stage:
            segments.append([])
    try:
        for segment in segments:
            if not segment:
                continue
            docs = list(
                mm_aggregate.process_pipeline(  # type: ignore[no-untyped-call]
                    docs, database, segment, None
                )
            )
            if "$group" in segment[-1]:
                docs = [{"_id": d["_id"], **d} if "_id" in d else d for d in docs]
        return docs
    except Exception as exc:
        raise engine_error(exc) from exc


# -- arrayFilters ------------------------------------------------------------------------
