"""The document write path of the embedded server: insert, update, delete, findAndModify.

:class:`DocumentWrites` is the part of :class:`~.storage.Storage` that turns write
statements into engine writes and oplog entries: one entry per document written (with its
pre- and post-images when the collection records them), upserts with MongoDB's ``_id``
rules, duplicate-key details (``keyPattern``/``keyValue``), ``arrayFilters`` and ``$[]``,
update pipelines, and the copy-on-write apply that keeps stored documents immutable (see
the design notes of :mod:`.storage`). The catalog, indexes, reads and durability stay in
:mod:`.storage`; this module only uses them through the members declared below.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mongomock
from bson import ObjectId
from pymongo.errors import DuplicateKeyError, OperationFailure

from .errors import CommandError
from .indexes import store_key
from .pipeline import apply_update_pipeline, check_update_pipeline
from .updates import expand_array_filters, get_path, preview_update, types_changed
from .validation import check_document

if TYPE_CHECKING:
    from .indexes import IndexedStore
    from .oplog import Entry
    from .storage import CollectionInfo

__all__ = ("UPDATE_OPERATORS", "DocumentWrites", "WriteResult", "engine_error", "refuse_collation")

UPDATE_OPERATORS = frozenset(
    {"$currentDate", "$inc", "$min", "$max", "$mul", "$rename", "$set", "$setOnInsert",
     "$unset", "$addToSet", "$pop", "$pull", "$push", "$pullAll", "$bit"}
)  # fmt: skip


@dataclass(slots=True)
class WriteResult:
    """Outcome of a write command's statements."""

    n: int = 0
    n_modified: int = 0
    upserted: list[dict[str, Any]] = field(default_factory=list)
    write_errors: list[dict[str, Any]] = field(default_factory=list)


def refuse_collation(collation: Any) -> None:
    """Refuse a collation the engine cannot honour, rather than ignore it.

    The engine compares strings by code point, which is exactly the ``simple``
    collation, so that one (or none) is accepted; any other would give a wrong answer.

    Raises:
        CommandError: 238 NotImplemented for any other collation.
    """
    if not collation:
        return
    if isinstance(collation, Mapping) and dict(collation) == {"locale": "simple"}:
        return
    raise CommandError(238, "not supported by the embedded server: collation")


def engine_error(exc: Exception) -> CommandError:
    """Translate an exception raised by mongomock into a MongoDB-shaped error."""
    if isinstance(exc, CommandError):
        return exc
    if isinstance(exc, NotImplementedError):
        return CommandError(238, f"not supported by the embedded server: {exc}")
    if isinstance(exc, OperationFailure):
        return CommandError(exc.code or 2, str(exc))
    return CommandError(2, str(exc) or type(exc).__name__)


class _Missing:
    pass


_MISSING: Any = _Missing()


def _check_field_names(doc: Mapping[str, Any]) -> None:
    for key in doc:
        if not isinstance(key, str) or (key.startswith("$")):
            raise CommandError(2, f"Document can't have $ prefixed field names: {key}")


def _write_error(index: int, error: CommandError) -> dict[str, Any]:
    return {
        "index": index,
        "code": error.code,
        "codeName": error.code_name,
        "errmsg": error.message,
    }


class DocumentWrites:
    """Write statements applied to the engine, one oplog entry per document written.

    A mixin of :class:`~.storage.Storage`, which provides the members declared here.
    """

    if TYPE_CHECKING:
        client: mongomock.MongoClient[dict[str, Any]]
        catalog: dict[tuple[str, str], CollectionInfo]

        def _log(self, op: str, db: str, coll: str | None, **fields: Any) -> Entry: ...

        def ensure(self, db: str, coll: str) -> CollectionInfo: ...

        def raw(self, db: str, coll: str) -> mongomock.Collection[dict[str, Any]]: ...

        def store(self, db: str, coll: str) -> IndexedStore: ...

        def index_specs(self, db: str, coll: str) -> list[dict[str, Any]]: ...

        def lookup(self, db: str, coll: str, key: Mapping[str, Any]) -> dict[str, Any] | None: ...

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
        ) -> list[dict[str, Any]]: ...

    def _statements(
        self,
        db: str,
        coll: str,
        statements: list[Any],
        ordered: bool,
        apply: Callable[[int, Any, WriteResult], None],
    ) -> WriteResult:
        """Apply each statement; a failure becomes a write error, and stops an ordered batch.

        ``apply`` raises DuplicateKeyError with ``details`` ``{doc, exclude?}`` for 11000s.
        """
        result = WriteResult()
        for index, stmt in enumerate(statements):
            try:
                apply(index, stmt, result)
                continue
            except DuplicateKeyError as exc:
                details = exc.details or {}
                error = self._dup_key_error(
                    index, db, coll, details.get("doc", {}), details.get("exclude")
                )
            except Exception as exc:
                error = _write_error(index, engine_error(exc))
            result.write_errors.append(error)
            if ordered:
                break
        return result

    def insert(self, db: str, coll: str, docs: list[Any], *, ordered: bool) -> WriteResult:
        """Insert documents; duplicate keys become write errors 11000."""
        info = self.ensure(db, coll)
        target = self.raw(db, coll)

        def insert_one(index: int, raw_doc: Any, result: WriteResult) -> None:
            if not isinstance(raw_doc, Mapping):
                raise CommandError(2, "document must be an object")
            doc = dict(raw_doc)
            if "_id" not in doc:
                doc = {"_id": ObjectId(), **doc}
            _check_field_names(doc)
            check_document(info.options, f"{db}.{coll}", doc)
            try:
                target.insert_one(doc)
            except DuplicateKeyError as exc:
                raise DuplicateKeyError(str(exc), 11000, {"doc": doc}) from exc
            result.n += 1
            self._log_document("insert", db, coll, info, doc["_id"], post=doc)

        return self._statements(db, coll, docs, ordered, insert_one)

    def _dup_key_error(
        self, index: int, db: str, coll: str, doc: Mapping[str, Any], exclude: Any = None
    ) -> dict[str, Any]:
        target = self.raw(db, coll)
        for spec in self.index_specs(db, coll):
            if spec["name"] != "_id_" and not spec.get("unique"):
                continue
            key_value = {k: get_path(doc, k) for k in spec["key"]}
            query: dict[str, Any] = dict(key_value)
            if exclude is not None:
                query = {"$and": [query, {"_id": {"$ne": exclude}}]}
            if target.find_one(query) is not None:
                shown = ", ".join(f"{k}: {v!r}" for k, v in key_value.items())
                return {
                    "index": index,
                    "code": 11000,
                    "errmsg": f"E11000 duplicate key error collection: {db}.{coll} "
                    f"index: {spec['name']} dup key: {{ {shown} }}",
                    "keyPattern": dict(spec["key"]),
                    "keyValue": key_value,
                }
        return {
            "index": index,
            "code": 11000,
            "errmsg": f"E11000 duplicate key error collection: {db}.{coll}",
        }

    def update(self, db: str, coll: str, statements: list[Any], *, ordered: bool) -> WriteResult:
        """Apply update statements (operators, replacement, upsert, multi, arrayFilters)."""

        def update_one(index: int, stmt: Any, result: WriteResult) -> None:
            n, modified, upserted_id = self._update_one_statement(db, coll, stmt)
            result.n += n
            result.n_modified += modified
            if upserted_id is not _MISSING:
                result.upserted.append({"index": index, "_id": upserted_id})

        return self._statements(db, coll, statements, ordered, update_one)

    def _update_one_statement(self, db: str, coll: str, stmt: Any) -> tuple[int, int, Any]:
        if not isinstance(stmt, Mapping):
            raise CommandError(9, "update statement must be an object")
        query = stmt.get("q", {})
        update = stmt.get("u")
        if not isinstance(query, Mapping):
            raise CommandError(9, "update 'q' must be an object")
        if isinstance(update, list):
            check_update_pipeline(update)
        elif not isinstance(update, Mapping):
            raise CommandError(9, "update 'u' must be an object")
        refuse_collation(stmt.get("collation"))
        multi = bool(stmt.get("multi", False))
        upsert = bool(stmt.get("upsert", False))
        array_filters = stmt.get("arrayFilters")
        is_replace = not isinstance(update, list) and not any(k.startswith("$") for k in update)
        if is_replace and multi:
            raise CommandError(9, "multi update is not supported for replacement-style update")
        if not is_replace and not update:
            raise CommandError(9, "Update document requires atomic operators")
        if isinstance(update, Mapping):
            unknown = [k for k in update if k.startswith("$") and k not in UPDATE_OPERATORS]
            if unknown:  # mongod parses the update before matching anything
                raise CommandError(
                    9,
                    f"Unknown modifier: {unknown[0]}. Expected a valid update modifier or "
                    "pipeline-style update specified as an array",
                )
        matched = self.find(db, coll, query, limit=0 if multi else 1)
        if not matched:
            if not upsert:
                return 0, 0, _MISSING
            # ``n`` counts upserted documents too (PyMongo: matched = n - len(upserted)).
            return 1, 0, self._upsert(db, coll, query, update, is_replace, array_filters)
        info = self.ensure(db, coll)
        modified = 0
        for before in matched:
            _, changed = self._update_document(
                db, coll, info, before, query, update, is_replace, array_filters
            )
            modified += changed
        return len(matched), modified, _MISSING

    def _log_document(
        self,
        op: str,
        db: str,
        coll: str,
        info: CollectionInfo,
        doc_id: Any,
        *,
        pre: dict[str, Any] | None = None,
        post: dict[str, Any] | None = None,
    ) -> None:
        """Log a document write (insert, update, replace, delete) with its images."""
        self._log(
            op,
            db,
            coll,
            uuid=info.uuid,
            key={"_id": doc_id},
            pre=pre,
            post=post,
            images=info.images,
        )

    def _delete_document(
        self, db: str, coll: str, info: CollectionInfo, before: dict[str, Any]
    ) -> None:
        """Delete one stored document and log it."""
        del self.store(db, coll)[store_key(before["_id"])]
        self._log_document("delete", db, coll, info, before["_id"], pre=before)

    def _update_document(
        self,
        db: str,
        coll: str,
        info: CollectionInfo,
        before: dict[str, Any],
        query: Mapping[str, Any],
        update: Mapping[str, Any] | list[Any],
        is_replace: bool,
        array_filters: Any,
    ) -> tuple[dict[str, Any], bool]:
        """Update one stored document; log it if it changed. Returns (after, changed)."""
        after = self._apply(db, coll, before, query, update, is_replace, array_filters)
        try:
            check_document(info.options, f"{db}.{coll}", after, before)
        except CommandError:  # the validator refused it: not applied
            store = self.store(db, coll)
            key = store_key(before["_id"])
            store[key] = before
            store.reindex(key)
            raise
        changed = after != before or types_changed(before, after)
        if changed:
            op = "replace" if is_replace else "update"
            self._log_document(op, db, coll, info, before["_id"], pre=before, post=after)
        return after, changed

    def _apply(
        self,
        db: str,
        coll: str,
        before: dict[str, Any],
        query: Mapping[str, Any],
        update: Mapping[str, Any] | list[Any],
        is_replace: bool,
        array_filters: Any,
    ) -> dict[str, Any]:
        """Apply one update or replacement to the stored ``before``; return the new document.

        Copy-on-write: mongomock updates in place, so it is handed a copy stored under
        the key; ``before`` (which snapshots and the oplog may hold) is never changed.
        """
        target = self.raw(db, coll)
        store = self.store(db, coll)
        doc_id = before["_id"]
        key = store_key(doc_id)
        store.replace_object(key, copy.deepcopy(before))
        store.dirty.add(key)
        spec: Mapping[str, Any] = {}
        computed: dict[str, Any] = {}
        try:
            if is_replace:
                assert isinstance(update, Mapping)
                replacement = dict(update)
                if "_id" in replacement and replacement["_id"] != doc_id:
                    raise CommandError(
                        66,
                        "After applying the update, the (immutable) field "
                        "'_id' was found to have been altered",
                    )
                _check_field_names(replacement)
                replacement.pop("_id", None)
                target.replace_one({"_id": doc_id}, {"_id": doc_id, **replacement})
            elif isinstance(update, list):
                computed = apply_update_pipeline(before, update, self.client[db])
                target.replace_one({"_id": doc_id}, computed)
            else:
                spec = expand_array_filters(update, before, array_filters)
                if spec is update:
                    # keep the caller's filter so the positional `$` operator resolves
                    target.update_one({"$and": [{"_id": doc_id}, dict(query)]}, dict(spec))
                else:
                    target.update_one({"_id": doc_id}, dict(spec))
        except DuplicateKeyError as exc:
            store[key] = before
            if isinstance(update, list):
                attempted = computed
            elif is_replace:
                attempted = dict(update)
            else:
                attempted = preview_update(before, query, spec)
            raise DuplicateKeyError(str(exc), 11000, {"doc": attempted, "exclude": doc_id}) from exc
        except BaseException:
            store[key] = before
            raise
        finally:
            store.reindex(key)
        after: dict[str, Any] | None = store._documents.get(key)
        if after is None:  # pragma: no cover - the engine keeps the _id
            raise CommandError(8, "document vanished during update")
        return after

    def _upsert(
        self,
        db: str,
        coll: str,
        query: Mapping[str, Any],
        update: Mapping[str, Any] | list[Any],
        is_replace: bool,
        array_filters: Any,
    ) -> Any:
        info = self.ensure(db, coll)
        target = self.raw(db, coll)
        if is_replace:
            doc = dict(update)
            if "_id" not in doc:
                seed_id = query.get("_id") if not isinstance(query.get("_id"), Mapping) else None
                doc = {"_id": seed_id if seed_id is not None else ObjectId(), **doc}
            _check_field_names(doc)
            try:
                target.insert_one(doc)
            except DuplicateKeyError as exc:
                raise DuplicateKeyError(str(exc), 11000, {"doc": doc}) from exc
            new_id = doc["_id"]
        elif isinstance(update, list):
            seed = {k: v for k, v in query.items() if not k.startswith("$")
                    and not isinstance(v, Mapping)}  # fmt: skip
            doc = apply_update_pipeline(
                {"_id": seed.pop("_id", ObjectId()), **seed}, update, self.client[db]
            )
            try:
                target.insert_one(doc)
            except DuplicateKeyError as exc:
                raise DuplicateKeyError(str(exc), 11000, {"doc": doc}) from exc
            new_id = doc["_id"]
        else:
            if array_filters:
                raise CommandError(2, "arrayFilters cannot be used with an upsert that inserts")
            try:
                res = target.update_one(dict(query), dict(update), upsert=True)
            except DuplicateKeyError as exc:
                raise DuplicateKeyError(str(exc), 11000, {"doc": dict(query)}) from exc
            new_id = res.upserted_id
        stored = target.find_one({"_id": new_id})
        assert stored is not None
        self._log_document("insert", db, coll, info, new_id, post=dict(stored))
        return new_id

    def delete(self, db: str, coll: str, statements: list[Any], *, ordered: bool) -> WriteResult:
        """Delete documents; ``limit`` 0 deletes all matches, 1 deletes one."""
        info = self.catalog.get((db, coll))

        def delete_one(index: int, stmt: Any, result: WriteResult) -> None:
            if not isinstance(stmt, Mapping) or not isinstance(stmt.get("q", {}), Mapping):
                raise CommandError(9, "delete statement must be an object with a 'q' object")
            refuse_collation(stmt.get("collation"))
            limit = stmt.get("limit", 0)
            if limit not in (0, 1):
                raise CommandError(
                    9, f"The limit field in delete objects must be 0 or 1. Got {limit}"
                )
            if info is None:
                return
            for before in self.find(db, coll, stmt.get("q", {}), limit=limit):
                self._delete_document(db, coll, info, before)
                result.n += 1

        return self._statements(db, coll, statements, ordered, delete_one)

    def find_and_modify(self, db: str, coll: str, cmd: Mapping[str, Any]) -> dict[str, Any]:
        """The findAndModify command: returns ``{lastErrorObject, value}``."""
        query = cmd.get("query") or {}
        sort = cmd.get("sort") or None
        remove = bool(cmd.get("remove", False))
        update = cmd.get("update")
        new = bool(cmd.get("new", False))
        upsert = bool(cmd.get("upsert", False))
        fields = cmd.get("fields") or None
        if remove == (update is not None):
            raise CommandError(9, "Either an update or remove=true must be specified")
        if remove and (new or upsert):
            raise CommandError(9, "Cannot specify both an update and remove=true")
        if isinstance(update, list):
            check_update_pipeline(update)
        matched = self.find(db, coll, query, sort=sort, limit=1)
        last: dict[str, Any] = {"n": 0}
        value: dict[str, Any] | None = None
        if remove:
            if matched:
                info = self.ensure(db, coll)
                before = matched[0]
                self._delete_document(db, coll, info, before)
                last["n"] = 1
                value = before
        else:
            assert isinstance(update, Mapping | list)
            is_replace = not isinstance(update, list) and not any(k.startswith("$") for k in update)
            array_filters = cmd.get("arrayFilters")
            if matched:
                info = self.ensure(db, coll)
                before = matched[0]
                after, _ = self._update_document(
                    db, coll, info, before, query, update, is_replace, array_filters
                )
                last = {"n": 1, "updatedExisting": True}
                value = after if new else before
            elif upsert:
                new_id = self._upsert(db, coll, query, update, is_replace, array_filters)
                last = {"n": 1, "updatedExisting": False, "upserted": new_id}
                value = self.lookup(db, coll, {"_id": new_id}) if new else None
            else:
                last = {"n": 0, "updatedExisting": False}
        if value is not None and fields:
            value = copy.deepcopy(value)
            from .storage import run_pipeline  # storage imports this module

            projected = run_pipeline([value], [{"$project": dict(fields)}], self.client[db])
            value = projected[0] if projected else None
        return {"lastErrorObject": last, "value": value}
