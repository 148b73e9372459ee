"""Capped collections and tailable cursors, as mongod defines them.

A capped collection (``create`` with ``capped: true``, ``size`` in bytes and an optional
``max`` document count) keeps insertion order and, when an insert takes it over either
bound, deletes its oldest documents (logged as deletes, so change streams see them).

A tailable cursor (``find`` with ``tailable``, capped collections only) stays open
after its last document: each getMore returns the documents inserted after the last
one it returned (in natural order, matching the find's filter). With ``awaitData`` a
getMore with nothing new waits up to its ``maxTimeMS`` (1 s by default) for a write.
If the last returned document was deleted by the cap, the cursor's position is lost
(136 CappedPositionLost), as on mongod.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import bson

from .errors import CommandError
from .indexes import filter_applies
from .storage import Storage, run_pipeline


def check_capped_options(options: Mapping[str, Any]) -> None:
    """Validate ``size``/``max`` of a capped ``create``.

    Raises:
        CommandError: ``size`` is missing or not a positive number (72, as mongod).
    """
    size = options.get("size")
    if isinstance(size, bool) or not isinstance(size, int | float) or size <= 0:
        raise CommandError(72, "the 'size' field is required when 'capped' is true")


def is_capped(storage: Storage, db: str, coll: str) -> bool:
    """Whether ``db.coll`` is a capped collection."""
    info = storage.info(db, coll)
    return info is not None and bool(info.options.get("capped"))


def enforce_cap(storage: Storage, db: str, coll: str) -> None:
    """Delete the oldest documents while the collection is over ``size`` or ``max``."""
    info = storage.info(db, coll)
    if info is None or not info.options.get("capped"):
        return
    size = int(info.options.get("size", 0))
    max_docs = int(info.options.get("max") or 0)
    docs = storage.find(db, coll)
    sizes = [len(bson.encode(d)) for d in docs]
    total = sum(sizes)
    index = 0
    while index < len(docs) - 1 and (total > size or (max_docs and len(docs) - index > max_docs)):
        storage._delete_document(db, coll, info, docs[index])
        total -= sizes[index]
        index += 1


_START: Any = object()


@dataclass(slots=True)
class Tail:
    """The position of a tailable cursor: the ``_id`` of the last document returned."""

    db: str
    coll: str
    filter: dict[str, Any] = field(default_factory=dict)
    await_data: bool = False
    last_id: Any = _START
    skip: int = 0  # matching documents still to skip (the find's skip)
    remaining: int | None = None  # documents still to return (the find's limit), or None
    projection: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        """The find's limit is reached: the cursor closes."""
        return self.remaining == 0

    def fetch(self, storage: Storage, limit: int | None) -> list[dict[str, Any]]:
        """The next documents after the position (at most ``limit``), moving past them.

        Raises:
            CommandError: 136 when the cap deleted the last document returned.
        """
        docs = storage.find(self.db, self.coll)
        if self.last_id is not _START:
            ids = [d.get("_id") for d in docs]
            if self.last_id not in ids:
                raise CommandError(
                    136,
                    f"CollectionScan died due to position in capped collection "
                    f"{self.db}.{self.coll} being deleted",
                )
            docs = docs[ids.index(self.last_id) + 1 :]
        if self.remaining is not None:
            limit = min(limit, self.remaining) if limit else self.remaining
        out: list[dict[str, Any]] = []
        for doc in docs:
            if limit and len(out) >= limit:
                break
            self.last_id = doc.get("_id")
            if self.filter and not filter_applies(self.filter, doc):
                continue
            if self.skip:
                self.skip -= 1
                continue
            out.append(doc)
        if self.remaining is not None:
            self.remaining -= len(out)
        if self.projection and out:
            out = run_pipeline(out, [{"$project": self.projection}], storage.client[self.db])
        return out


__all__ = ["Tail", "check_capped_options", "enforce_cap", "is_capped"]
