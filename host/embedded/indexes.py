"""Index fast paths under mongomock: lookups by ``_id`` and by indexed fields, in O(matches).

mongomock answers every query, update, delete and unique-index check by scanning the
whole collection (``Collection._iter_documents``), which made an update by ``_id``
O(N) and ``delete_many`` O(N²). This module keeps mongomock's semantics and narrows
the scan: :class:`IndexedStore` replaces mongomock's per-collection store and keeps,
for every indexed field, a map from value to document keys; the patched
``_iter_documents`` asks it for *candidates* and still runs mongomock's own matcher
(``filter_applies``) on each, so an index can only make a query faster, never change
what it matches.

Design note: candidates are a superset. For a filter, :func:`candidate_keys` returns
either None (scan everything) or a set of store keys that contains every document the
filter can match. It only looks at equality on ``_id`` or on an indexed field (a
scalar, ``$eq`` or ``$in`` of scalars, possibly inside a top-level ``$and``); numbers
are compared as floats (1, 1.0 and Int64(1) share a key, as they match in MongoDB;
so do True and 1, which mongomock's matcher equates),
values the index cannot key (Decimal128, documents) are kept in a per-field "loose"
set that is always a candidate. Arrays index each element (multikey), as MongoDB.

Invariants (all on the server's event loop):
    * ``_seq`` holds one increasing number per stored key, in store (insertion) order,
      so candidates come back in the order a full scan would yield them;
    * for every indexed field, every stored document whose key is not in ``dirty`` is
      listed under each key of its current values (or in ``loose``);
    * a document handed to mongomock's in-place update is in ``dirty`` (always a
      candidate) until :meth:`IndexedStore.reindex` records its new values.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import mongomock
from bson import Decimal128, ObjectId
from bson.int64 import Int64
from bson.timestamp import Timestamp
from mongomock import filtering, helpers
from mongomock.store import CollectionStore

from .bsonorder import matcher

_LOOSE: Any = object()  # a value the index cannot key: the document is always a candidate
_KEYABLE = (str, ObjectId, datetime.datetime, Timestamp, bytes, uuid.UUID)


def store_key(doc_id: Any) -> Any:
    """The key mongomock files a document under (a hashable dict for document ids)."""
    return helpers.hashdict(doc_id) if isinstance(doc_id, dict) else doc_id


def _value_key(value: Any) -> Any:
    """The index key of one value; None if a query on it takes no fast path."""
    if isinstance(value, int | float | Int64):  # bools too: mongomock matches True with 1
        return ("num", float(value))
    if isinstance(value, _KEYABLE):
        return value
    return None


def _doc_keys(doc: Mapping[str, Any], parts: list[str]) -> set[Any]:
    """Index keys of the values at a dotted path, through arrays (multikey)."""
    out: set[Any] = set()

    def walk(node: Any, i: int) -> None:
        if i == len(parts):
            if isinstance(node, list):
                for item in node:
                    leaf(item)
            leaf(node)
            return
        if isinstance(node, Mapping):
            if parts[i] in node:
                walk(node[parts[i]], i + 1)
        elif isinstance(node, list):
            for item in node:
                walk(item, i)

    def leaf(value: Any) -> None:
        if isinstance(value, Mapping | list) or value is None:
            return  # never equal to a scalar query value
        key = _value_key(value)
        out.add(key if key is not None else _LOOSE)

    walk(doc, 0)
    return out


def _equality_keys(cond: Any) -> list[Any] | None:
    """Index keys an equality condition can match, or None (no fast path)."""
    if isinstance(cond, Mapping):
        ops = list(cond)
        if ops == ["$eq"]:
            cond = cond["$eq"]
        elif ops == ["$in"] and isinstance(cond["$in"], list):
            keys = [_value_key(v) for v in cond["$in"]]
            return None if any(k is None for k in keys) else keys
        else:
            return None
    key = _value_key(cond)
    return None if key is None else [key]


def _id_keys(cond: Any) -> list[Any] | None:
    """Store keys an ``_id`` condition can match, or None."""
    if isinstance(cond, Mapping) and cond and all(k.startswith("$") for k in cond):
        ops = list(cond)
        if ops == ["$eq"]:
            return _id_keys(cond["$eq"])
        if ops == ["$in"] and isinstance(cond["$in"], list):
            keys: list[Any] = []
            for value in cond["$in"]:
                found = _id_keys(value)
                if found is None:
                    return None
                keys.extend(found)
            return keys
        return None
    if isinstance(cond, list | Decimal128) or hasattr(cond, "pattern"):
        return None  # arrays, decimals and regexes: scan
    if isinstance(cond, Mapping):
        return [helpers.hashdict(dict(cond))]
    return [cond]


class IndexedStore(CollectionStore):
    """mongomock's collection store, plus value → key maps for indexed fields."""

    def __init__(self, name: str) -> None:
        super().__init__(name)  # type: ignore[no-untyped-call]
        self._seq: dict[Any, int] = {}
        self._next = 0
        self.fields: dict[str, dict[Any, set[Any]]] = {}
        self._filed: dict[Any, list[tuple[str, Any]]] = {}
        self.dirty: set[Any] = set()

    @classmethod
    def adopt(cls, old: CollectionStore) -> IndexedStore:
        """Build an indexed store holding what ``old`` held."""
        new = cls(old.name)
        new._is_force_created = old._is_force_created
        for key, doc in old._documents.items():
            new[key] = doc
        for name, spec in old.indexes.items():
            new.create_index(name, spec)
        return new

    # -- mongomock's store interface -------------------------------------------------

    def __setitem__(self, key: Any, val: Any) -> None:
        if key in self._documents:
            self._unfile(key)
        else:
            self._seq[key] = self._next
            self._next += 1
        super().__setitem__(key, val)  # type: ignore[no-untyped-call]
        self._file(key, val)

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)  # type: ignore[no-untyped-call]
        self._unfile(key)
        self._seq.pop(key, None)
        self.dirty.discard(key)

    def drop(self) -> None:
        super().drop()  # type: ignore[no-untyped-call]
        self._seq.clear()
        self.fields.clear()
        self._filed.clear()
        self.dirty.clear()

    def create_index(self, index_name: str, index_dict: dict[str, Any]) -> None:
        super().create_index(index_name, index_dict)  # type: ignore[no-untyped-call]
        self._rebuild()

    def drop_index(self, index_name: str) -> None:
        super().drop_index(index_name)  # type: ignore[no-untyped-call]
        self._rebuild()

    # -- the index ---------------------------------------------------------------------

    def _indexed_paths(self) -> set[str]:
        paths = set()
        for spec in self.indexes.values():
            key = spec.get("key") or []
            if not key:
                continue
            path, direction = key[0]
            if path == "_id" or direction in ("text", "2d", "2dsphere", "hashed"):
                continue
            if any(part.isdigit() or not part for part in path.split(".")):
                continue
            paths.add(path)
        return paths

    def _rebuild(self) -> None:
        self.fields = {path: {} for path in self._indexed_paths()}
        self._filed.clear()
        for key, doc in self._documents.items():
            self._file(key, doc)

    def _file(self, key: Any, doc: Mapping[str, Any]) -> None:
        if not self.fields:
            return
        filed: list[tuple[str, Any]] = []
        for path, values in self.fields.items():
            for vkey in _doc_keys(doc, path.split(".")):
                values.setdefault(vkey, set()).add(key)
                filed.append((path, vkey))
        self._filed[key] = filed

    def _unfile(self, key: Any) -> None:
        for path, vkey in self._filed.pop(key, ()):
            bucket = self.fields.get(path, {}).get(vkey)
            if bucket is not None:
                bucket.discard(key)
                if not bucket:
                    del self.fields[path][vkey]

    def reindex(self, key: Any) -> None:
        """Record the current values of a document mongomock updated in place."""
        self.dirty.discard(key)
        self._unfile(key)
        doc = self._documents.get(key)
        if doc is not None:
            self._file(key, doc)

    def replace_object(self, key: Any, doc: dict[str, Any]) -> None:
        """Put a new object under an existing key (copy-on-write), keeping its position."""
        self._documents[key] = doc

    def snapshot(self) -> list[dict[str, Any]]:
        """The stored documents, in order, as a list (a consistent point-in-time view).

        Stored documents are never mutated in place (see ``Storage``), so the list
        stays valid while the loop goes on writing.
        """
        self._remove_expired_documents()  # type: ignore[no-untyped-call]
        return list(self._documents.values())

    # -- candidates --------------------------------------------------------------------

    def candidate_keys(self, spec: Any) -> set[Any] | None:
        """Store keys that include every match of ``spec``; None means scan."""
        if not isinstance(spec, Mapping):
            return None
        best: set[Any] | None = None
        for name, cond in spec.items():
            found: set[Any] | None = None
            if name == "$and" and isinstance(cond, list):
                for part in cond:
                    sub = self.candidate_keys(part)
                    if sub is not None and (found is None or len(sub) < len(found)):
                        found = sub
            elif name == "_id":
                keys = _id_keys(cond)
                if keys is not None:
                    found = {k for k in keys if _hashable(k) and k in self._documents}
            elif name in self.fields:
                vkeys = _equality_keys(cond)
                if vkeys is not None:
                    values = self.fields[name]
                    found = set(values.get(_LOOSE, ()))
                    for vkey in vkeys:
                        found |= values.get(vkey, set())
            if found is not None:
                found |= self.dirty
                if best is None or len(found) < len(best):
                    best = found
        return best

    def candidates(self, spec: Any) -> list[dict[str, Any]] | None:
        """The candidate documents of ``spec`` in store order, or None to scan."""
        keys = self.candidate_keys(spec)
        if keys is None:
            return None
        self._remove_expired_documents()  # type: ignore[no-untyped-call]
        docs = self._documents
        ordered = sorted((k for k in keys if k in docs), key=self._seq.__getitem__)
        return [docs[k] for k in ordered]


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def indexed_store(client: mongomock.MongoClient[Any], db: str, coll: str) -> IndexedStore:
    """The :class:`IndexedStore` of ``db.coll`` (installed on first use)."""
    db_store = client._store[db]
    current: Any = db_store._collections.get(coll)
    if type(current) is IndexedStore:  # type: ignore[unreachable]
        found: IndexedStore = current
        return found
    store = IndexedStore.adopt(current) if current is not None else IndexedStore(coll)
    db_store._collections[coll] = store
    return store


def filter_applies(query: Mapping[str, Any], doc: Mapping[str, Any]) -> bool:
    """Whether ``doc`` matches the query filter ``query``, by the engine's rules."""
    return bool(filtering.filter_applies(query, doc))  # type: ignore[no-untyped-call]


def match(spec: Mapping[str, Any], docs: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The documents of ``docs`` that ``spec`` matches, by mongomock's matcher."""
    applies = matcher(spec)
    return (doc for doc in docs if applies(spec, doc))


_original_iter_documents = mongomock.Collection._iter_documents  # type: ignore[attr-defined]


def _iter_documents(self: Any, filter: Any) -> Iterator[dict[str, Any]]:
    store = self._store
    if isinstance(store, IndexedStore):
        found = store.candidates(filter)
        if found is not None:
            if not found:
                filtering.filter_applies(filter, {})  # type: ignore[no-untyped-call]
            return match(filter, found)
    result: Iterator[dict[str, Any]] = _original_iter_documents(self, filter)
    return result


# Only collections whose store is an IndexedStore (the embedded server's) take the fast
# path; any other mongomock user in the process sees mongomock's own behaviour.
mongomock.Collection._iter_documents = _iter_documents  # type: ignore[attr-defined]

__all__ = ["IndexedStore", "indexed_store", "match", "store_key"]
