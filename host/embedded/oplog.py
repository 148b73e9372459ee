"""The oplog: one entry per write, a monotonic cluster clock, and resume tokens.

Every write the server applies appends one :class:`Entry` carrying a strictly
increasing ``Timestamp``. Change streams (``changestream.py``) read the oplog from a
:class:`Position`; getMore waits on :meth:`Oplog.wait` and wakes the moment an entry
is appended (no timer polling). The oplog is bounded: when it is trimmed, positions
before the trimmed point raise ``ChangeStreamHistoryLost`` (286), as MongoDB does
when a resume point has fallen off its capped oplog.

Resume tokens are ``{_data: "<UPPER HEX>"}``. The hex begins with the event's
timestamp (seconds and increment, big-endian), then a kind byte, so tokens sort in
event order; events then append a BSON document holding the operation type and the
document key, so any ``_id`` (compound ones included) round-trips.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import struct
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import bson
from bson.binary import Binary, UuidRepresentation
from bson.timestamp import Timestamp

from .wire import CODEC_OPTIONS

# Kinds order the events that share one timestamp: a drop's event, then the
# invalidate it causes, then a high-water mark that stands after both.
KIND_EVENT = 1
KIND_INVALIDATE = 2
KIND_HIGH_WATER_MARK = 3

_TOKEN_HEAD = struct.Struct(">IIB")


class Position(NamedTuple):
    """A point in the oplog: everything at or before it has been seen."""

    time: int
    inc: int
    kind: int

    @property
    def ts(self) -> Timestamp:
        """The position's timestamp."""
        return Timestamp(self.time, self.inc)


@dataclass(slots=True)
class Entry:
    """One applied write.

    Attributes:
        ts: The cluster time the write was applied at (unique, increasing).
        wall: Wall-clock time of the write.
        op: insert, update, replace, delete, drop, rename, dropDatabase, create,
            createIndexes, dropIndexes or modify.
        db: The database.
        coll: The collection (None for dropDatabase).
        uuid: The collection's UUID, when it has one.
        key: The document key (``{_id: ...}``) for document operations.
        pre: The document before the write (update, replace, delete).
        post: The document after the write (insert, update, replace).
        images: Pre- and post-images were enabled on the collection at write time.
        extra: Operation details: ``to`` for rename, ``indexes`` for index operations,
            ``options`` for create and modify.
        update: For an update, its ``updateDescription`` (with ``disambiguatedPaths``),
            computed once at write time so the images need not be kept.

    What an entry keeps, as mongod's oplog: an insert and a replace keep the new
    document, an update keeps its description, a delete only its key; the pre-image
    (and an update's post-image) only when the collection has
    ``changeStreamPreAndPostImages`` (:meth:`lean`). Entries are never mutated once
    appended: snapshots read them from another thread.
    """

    ts: Timestamp
    wall: datetime
    op: str
    db: str
    coll: str | None
    uuid: uuid.UUID | None = None
    key: dict[str, Any] | None = None
    pre: dict[str, Any] | None = None
    post: dict[str, Any] | None = None
    images: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    update: dict[str, Any] | None = None

    def lean(self) -> Entry:
        """This entry without the images the oplog does not keep (see the class notes)."""
        if self.images or (self.pre is None and (self.op != "update" or self.post is None)):
            return self
        if self.op == "update" and self.update is None:
            assert self.pre is not None and self.post is not None
            self.update = update_description(self.pre, self.post, disambiguate=True)
        post = None if self.op == "update" else self.post
        return dataclasses.replace(self, pre=None, post=post)

    def description(self, *, disambiguate: bool) -> dict[str, Any]:
        """The ``updateDescription`` of an update entry."""
        desc = self.update
        if desc is None:
            assert self.pre is not None and self.post is not None
            desc = update_description(self.pre, self.post, disambiguate=True)
        if disambiguate:
            return dict(desc)
        return {k: v for k, v in desc.items() if k != "disambiguatedPaths"}

    @property
    def position(self) -> Position:
        """The position just after this entry's own event."""
        return Position(self.ts.time, self.ts.inc, KIND_EVENT)

    def to_document(self) -> dict[str, Any]:
        """Encode for the journal and snapshots."""
        doc: dict[str, Any] = {"ts": self.ts, "wall": self.wall, "op": self.op, "db": self.db}
        if self.coll is not None:
            doc["coll"] = self.coll
        if self.uuid is not None:
            doc["uuid"] = Binary.from_uuid(self.uuid)
        for name in ("key", "pre", "post"):
            value = getattr(self, name)
            if value is not None:
                doc[name] = value
        if self.images:
            doc["images"] = True
        if self.extra:
            doc["extra"] = self.extra
        if self.update is not None:
            doc["upd"] = self.update
        return doc

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> Entry:
        """Decode what :meth:`to_document` wrote."""
        raw_uuid = doc.get("uuid")
        return cls(
            ts=doc["ts"],
            wall=doc["wall"],
            op=doc["op"],
            db=doc["db"],
            coll=doc.get("coll"),
            uuid=raw_uuid.as_uuid(UuidRepresentation.STANDARD) if raw_uuid is not None else None,
            key=doc.get("key"),
            pre=doc.get("pre"),
            post=doc.get("post"),
            images=bool(doc.get("images", False)),
            extra=dict(doc.get("extra", {})),
            update=doc.get("upd"),
        )


class TokenError(ValueError):
    """A resume token that is not one of ours."""


def encode_token(
    position: Position,
    op: str | None = None,
    key: Mapping[str, Any] | None = None,
    fragment: int | None = None,
) -> dict[str, Any]:
    """Return the resume token ``{_data: hex}`` for a position and its event.

    ``fragment`` numbers the pieces of an event cut by ``$changeStreamSplitLargeEvent``.
    """
    data = _TOKEN_HEAD.pack(position.time, position.inc, position.kind)
    if position.kind != KIND_HIGH_WATER_MARK:
        ident: dict[str, Any] = {"o": op}
        if key is not None:
            ident["k"] = dict(key)
        if fragment is not None:
            ident["f"] = fragment
        data += bson.encode(ident, codec_options=CODEC_OPTIONS)
    return {"_data": data.hex().upper()}


def decode_token(token: Any) -> tuple[Position, dict[str, Any] | None]:
    """Return the position a resume token stands for, and its event identity.

    Raises:
        TokenError: If the token is not a document ``{_data: hex}`` this server issued.
    """
    if not isinstance(token, Mapping) or not isinstance(token.get("_data"), str):
        raise TokenError(f"resume token must be a document with a string _data, got {token!r}")
    try:
        data = bytes.fromhex(token["_data"])
        time_, inc, kind = _TOKEN_HEAD.unpack_from(data, 0)
    except (ValueError, struct.error) as exc:
        raise TokenError(f"malformed resume token {token['_data']!r}") from exc
    if kind not in (KIND_EVENT, KIND_INVALIDATE, KIND_HIGH_WATER_MARK):
        raise TokenError(f"malformed resume token {token['_data']!r}")
    ident = None
    if len(data) > _TOKEN_HEAD.size:
        try:
            ident = bson.decode(data[_TOKEN_HEAD.size :], CODEC_OPTIONS)
        except Exception as exc:
            raise TokenError(f"malformed resume token {token['_data']!r}") from exc
    return Position(time_, inc, kind), ident


class HistoryLost(Exception):
    """The requested position is older than the retained oplog."""


class Oplog:
    """A bounded, in-order log of applied writes with a monotonic cluster clock.

    Bounded in bytes, as mongod's capped ``local.oplog.rs`` (``--oplogSize`` in MB):
    each entry counts its BSON size; when the total passes ``max_bytes`` the oldest
    entries are dropped, down to 90% of it, so appends stay amortised O(1).
    ``max_entries`` is an optional second bound (tests use it for a tiny window).

    Invariants:
        * entry timestamps strictly increase in append order;
        * ``last_ts`` is never earlier than the newest entry, and never goes backwards;
        * ``trimmed_through`` is the newest timestamp that has been dropped (or None);
          any position before it cannot be resumed from;
        * ``bytes`` is the sum of the retained entries' sizes.
    All methods run on the server's event loop; none blocks.
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, max_entries: int | None = None) -> None:
        if max_bytes < 1 or (max_entries is not None and max_entries < 1):
            raise ValueError("oplog size must be at least 1 byte and 1 entry")
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: list[Entry] = []
        self._keys: list[tuple[int, int]] = []
        self._sizes: list[int] = []
        self.bytes = 0
        self._last = Timestamp(int(time.time()), 0)
        self.trimmed_through: Timestamp | None = None
        self._appended = asyncio.Event()

    @property
    def last_ts(self) -> Timestamp:
        """The latest cluster time handed out."""
        return self._last

    def advance_to(self, ts: Timestamp) -> None:
        """Move the clock forward to at least ``ts`` (restart from a journal)."""
        if (ts.time, ts.inc) > (self._last.time, self._last.inc):
            self._last = ts

    def tick(self) -> Timestamp:
        """Hand out the next cluster time: strictly larger than every earlier one."""
        now = int(time.time())
        last = self._last
        self._last = Timestamp(now, 1) if now > last.time else Timestamp(last.time, last.inc + 1)
        return self._last

    def new_entry(self, op: str, db: str, coll: str | None, **fields: Any) -> Entry:
        """Create and append an entry stamped with the next cluster time.

        The oplog keeps the entry's :meth:`Entry.lean` form; the full entry is returned
        (the journal and a rollback need its images).
        """
        entry = Entry(
            ts=self.tick(),
            wall=datetime.now(UTC).replace(tzinfo=None),
            op=op,
            db=db,
            coll=coll,
            **fields,
        )
        self.append(entry.lean())
        return entry

    def append(self, entry: Entry) -> None:
        """Append an entry (its timestamp must be newer than the last) and wake waiters."""
        key = (entry.ts.time, entry.ts.inc)
        if self._keys and key <= self._keys[-1]:
            raise ValueError(f"oplog entry {entry.ts} is not newer than {self._keys[-1]}")
        self.advance_to(entry.ts)
        size = len(bson.encode(entry.to_document(), codec_options=CODEC_OPTIONS))
        self._entries.append(entry)
        self._keys.append(key)
        self._sizes.append(size)
        self.bytes += size
        self._trim()
        event, self._appended = self._appended, asyncio.Event()
        event.set()

    def _trim(self) -> None:
        over_count = self.max_entries is not None and len(self._entries) > self.max_entries
        if self.bytes <= self.max_bytes and not over_count:
            return
        # Cut in chunks (to 90% of each bound) so appends stay amortised O(1); the
        # newest entry always stays.
        target_bytes = self.max_bytes * 9 // 10
        target_count = None if self.max_entries is None else max(1, self.max_entries * 9 // 10)
        cut, dropped = 0, 0
        last = len(self._entries) - 1
        while cut < last and (
            self.bytes - dropped > target_bytes
            or (target_count is not None and len(self._entries) - cut > target_count)
        ):
            dropped += self._sizes[cut]
            cut += 1
        if cut:
            self.trimmed_through = self._entries[cut - 1].ts
            del self._entries[:cut]
            del self._keys[:cut]
            del self._sizes[:cut]
            self.bytes -= dropped

    def discard_from(self, ts: Timestamp) -> None:
        """Drop the entries at or after ``ts`` (writes rolled back: never journaled).

        Nobody has seen them: a write is rolled back before its command yields.
        """
        i = bisect.bisect_left(self._keys, (ts.time, ts.inc))
        self.bytes -= sum(self._sizes[i:])
        del self._entries[i:]
        del self._keys[i:]
        del self._sizes[i:]

    def clear(self) -> None:
        """Drop every entry (used before loading a snapshot)."""
        self._entries.clear()
        self._keys.clear()
        self._sizes.clear()
        self.bytes = 0
        self.trimmed_through = None

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Entry]:
        """A copy of the retained entries, oldest first."""
        return list(self._entries)

    def check_retained(self, position: Position) -> None:
        """Raise :class:`HistoryLost` if entries after ``position`` were trimmed."""
        trimmed = self.trimmed_through
        if trimmed is not None and (position.time, position.inc) < (trimmed.time, trimmed.inc):
            raise HistoryLost(
                f"resume point {position.ts} is older than the oldest retained oplog entry"
            )

    def find(self, ts: Timestamp) -> Entry | None:
        """The entry stamped exactly ``ts``, if it is retained."""
        key = (ts.time, ts.inc)
        i = bisect.bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            return self._entries[i]
        return None

    def index_from(self, position: Position) -> int:
        """Index of the first entry whose timestamp is at or after ``position``."""
        return bisect.bisect_left(self._keys, (position.time, position.inc))

    def entry_at(self, index: int) -> Entry | None:
        """The entry at ``index`` or None past the end."""
        return self._entries[index] if index < len(self._entries) else None

    async def wait(self, max_wait: float) -> bool:
        """Wait until an entry is appended, at most ``max_wait`` seconds.

        Returns:
            True if an entry was appended, False on timeout.
        """
        event = self._appended
        try:
            await asyncio.wait_for(event.wait(), max_wait)
        except TimeoutError:
            return False
        return True

    def wake_all(self) -> None:
        """Release every waiter (server shutdown)."""
        event, self._appended = self._appended, asyncio.Event()
        event.set()


def update_description(
    before: Mapping[str, Any], after: Mapping[str, Any], *, disambiguate: bool = False
) -> dict[str, Any]:
    """Compute ``updateDescription`` as a minimal diff between two documents.

    Dotted paths name changed fields (``arr.1.b``); an array cut down to a shorter
    length is reported in ``truncatedArrays`` with its new size. With ``disambiguate``
    (``showExpandedEvents``), ``disambiguatedPaths`` maps every path that has a
    numeric field name or a field name containing a dot to its components, array
    indexes as integers, as MongoDB 6.1+ does.
    """
    diff = _Diff()
    _diff_doc(before, after, (), diff)
    description: dict[str, Any] = {
        "updatedFields": diff.updated,
        "removedFields": diff.removed,
        "truncatedArrays": diff.truncated,
    }
    if disambiguate:
        description["disambiguatedPaths"] = diff.ambiguous
    return description


Path = tuple[str | int, ...]


@dataclass(slots=True)
class _Diff:
    updated: dict[str, Any] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    truncated: list[dict[str, Any]] = field(default_factory=list)
    ambiguous: dict[str, list[str | int]] = field(default_factory=dict)

    def name(self, path: Path) -> str:
        dotted = ".".join(str(part) for part in path)
        if any(isinstance(p, str) and (p.isdigit() or "." in p) for p in path):
            self.ambiguous[dotted] = list(path)
        return dotted


def _same(a: Any, b: Any) -> bool:
    # bson equality: 1 == 1.0 == True in Python, but a type change is a change in BSON.
    return type(a) is type(b) and a == b


def _diff_doc(
    before: Mapping[str, Any], after: Mapping[str, Any], prefix: Path, diff: _Diff
) -> None:
    for name in before:
        if name not in after:
            diff.removed.append(diff.name((*prefix, name)))
    for name, new in after.items():
        path = (*prefix, name)
        if name not in before:
            diff.updated[diff.name(path)] = new
            continue
        _diff_value(before[name], new, path, diff)


def _diff_value(old: Any, new: Any, path: Path, diff: _Diff) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        if list(old) != [k for k in new if k in old]:
            diff.updated[diff.name(path)] = new  # field order changed: the whole object
        else:
            _diff_doc(old, new, path, diff)
    elif isinstance(old, list) and isinstance(new, list):
        if len(new) < len(old):
            diff.truncated.append({"field": diff.name(path), "newSize": len(new)})
        for i, item in enumerate(new):
            if i >= len(old):
                diff.updated[diff.name((*path, i))] = item
            else:
                _diff_value(old[i], item, (*path, i), diff)
    elif not _same(old, new):
        diff.updated[diff.name(path)] = new
