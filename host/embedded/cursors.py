"""Server-side cursors: find/aggregate result batches and change-stream cursors."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.int64 import Int64
from bson.raw_bson import RawBSONDocument

from .changestream import ChangeStream
from .errors import CommandError
from .wire import CODEC_OPTIONS

DEFAULT_FIRST_BATCH = 101
# Leave room for the reply envelope under the 16 MiB maxBsonObjectSize.
MAX_BATCH_BYTES = 16 * 1024 * 1024 - 64 * 1024
IDLE_TIMEOUT_S = 600.0  # MongoDB's cursorTimeoutMillis default


@dataclass(slots=True, eq=False)
class Cursor:
    """An open cursor: either buffered documents or a change stream."""

    id: int
    ns: str
    docs: Iterator[dict[str, Any]] | None = None
    stream: ChangeStream | None = None
    lsid: Any = None
    last_used: float = field(default_factory=time.monotonic)
    exhausted: bool = False
    max_time_ms: int | None = None  # the opening command's, which bounds its getMores too
    tail: Any = None  # a tailable cursor's capped.Tail (its position), else None
    _peeked: dict[str, Any] | None = None

    def take(self, batch_size: int | None) -> list[RawBSONDocument]:
        """Take up to ``batch_size`` buffered documents (all, within 16 MiB, if None/0).

        Each document is encoded once, here, to measure the batch; the reply embeds
        those bytes as they are (RawBSONDocument) instead of encoding it again.
        """
        assert self.docs is not None
        out: list[RawBSONDocument] = []
        size = 0
        limit = batch_size if batch_size and batch_size > 0 else None
        while limit is None or len(out) < limit:
            doc = self._peeked if self._peeked is not None else next(self.docs, None)
            self._peeked = None
            if doc is None:
                self.exhausted = True
                break
            raw = bson.encode(doc, codec_options=CODEC_OPTIONS)
            if out and size + len(raw) > MAX_BATCH_BYTES:
                self._peeked = doc
                break
            size += len(raw)
            out.append(RawBSONDocument(raw))
        if not self.exhausted and self._peeked is None:
            nxt = next(self.docs, None)
            if nxt is None:
                self.exhausted = True
            else:
                self._peeked = nxt
        return out


class CursorManager:
    """Open cursors by id. Ids are random positive Int64s, never 0."""

    def __init__(self) -> None:
        self._cursors: dict[int, Cursor] = {}

    def __len__(self) -> int:
        return len(self._cursors)

    def open(
        self,
        ns: str,
        *,
        docs: Iterator[dict[str, Any]] | None = None,
        stream: ChangeStream | None = None,
        lsid: Any = None,
    ) -> Cursor:
        """Register a new cursor."""
        self._expire()
        cursor_id = 0
        while cursor_id == 0 or cursor_id in self._cursors:
            cursor_id = secrets.randbits(62)
        cursor = Cursor(id=cursor_id, ns=ns, docs=docs, stream=stream, lsid=lsid)
        self._cursors[cursor_id] = cursor
        return cursor

    def get(self, cursor_id: Any, ns: str) -> Cursor:
        """The cursor ``cursor_id`` on ``ns``, or error 43 CursorNotFound."""
        cursor = self._cursors.get(int(cursor_id)) if isinstance(cursor_id, int) else None
        if cursor is None:
            raise CommandError(43, f"cursor id {cursor_id} not found")
        if cursor.ns != ns:
            raise CommandError(
                13,
                f"Requested getMore on namespace '{ns}', but cursor belongs to a different "
                f"namespace {cursor.ns}",
            )
        cursor.last_used = time.monotonic()
        return cursor

    def close(self, cursor_id: int) -> bool:
        """Forget a cursor; returns whether it existed."""
        return self._cursors.pop(cursor_id, None) is not None

    def close_all(self) -> None:
        """Forget every cursor (shutdown)."""
        self._cursors.clear()

    def _expire(self) -> None:
        deadline = time.monotonic() - IDLE_TIMEOUT_S
        for cursor_id in [c.id for c in self._cursors.values() if c.last_used < deadline]:
            del self._cursors[cursor_id]

    def first_batch(
        self,
        ns: str,
        docs: list[dict[str, Any]],
        batch_size: int | None,
        *,
        single_batch: bool = False,
        lsid: Any = None,
        max_time_ms: int | None = None,
    ) -> dict[str, Any]:
        """Reply ``{cursor: {firstBatch, id, ns}}`` for a buffered result."""
        cursor = Cursor(id=0, ns=ns, docs=iter(docs))
        limit = DEFAULT_FIRST_BATCH if batch_size is None else batch_size
        if limit == 0:  # batchSize 0: open the cursor, return nothing yet
            batch: list[RawBSONDocument] = []
            cursor.exhausted = not docs
        else:
            batch = cursor.take(limit)
        cursor_id = 0
        if not cursor.exhausted and not single_batch:
            registered = self.open(ns, docs=cursor.docs, lsid=lsid)
            registered._peeked = cursor._peeked
            registered.max_time_ms = max_time_ms
            cursor_id = registered.id
        return {"cursor": {"firstBatch": batch, "id": Int64(cursor_id), "ns": ns}}
