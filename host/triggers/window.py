"""The delivery window of one trigger: ordering per key and the low-watermark checkpoint.

Design note — at least once, with a low-watermark:

* Events are numbered in stream order (the order of the change stream, which is the
  commit order: https://www.mongodb.com/docs/manual/changeStreams/ "change streams ...
  guarantee the total ordering of changes"). Each enters the window when it is read and
  is *done* once its handler succeeded or its dead letter was written.
* INVARIANT (low-watermark): ``checkpoint`` is the resume token of an event E such that
  E and every event before E are done. It only moves forward. An event after a
  not-yet-done one is never covered by it, however early it finished.
* INVARIANT (per key): events with the same key run one at a time, in stream order
  (``per_key``: the ``documentKey``; ``total``: one key for all; ``none``: a key per event).
  Different keys run concurrently, at most ``max_concurrency`` handlers at once.
* Memory is bounded: at most ``capacity`` events are in the window (read but not covered
  by the watermark), the reader's staged ones (read, not yet added) counted; the reader
  waits for room.

What a crash repeats: the events after the last *written* checkpoint — those in the
window at the crash (at most ``capacity``) plus those done since the last write (at most
one batch: ``checkpoint_every`` events or ``checkpoint_interval`` seconds). A clean stop
writes the final watermark together with the tokens of the events done *beyond* it
(``done_ahead``: they finished while an earlier event had not started); the next owner
skips those when it reads them again, so a clean hand-over repeats nothing that finished.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import anyio

__all__ = ("Slot", "Window")

_MARK = object()
"""The key of a stream-start mark (never handled, so in no key's queue)."""


@dataclass(slots=True, eq=False)
class Slot:
    """One event in the window.

    Attributes:
        seq: Its stream position.
        key: Its ordering key.
        event: The change event.
        token: Its resume token (None for a synthetic event, e.g. a rescan's: the
            watermark does not move past it, and then stays below the events after it).
        done: Handled (or dead-lettered).
    """

    seq: int
    key: Any
    event: Mapping[str, Any]
    token: Mapping[str, Any] | None
    done: bool = False


@dataclass(slots=True)
class Window:
    """The events of one trigger between the checkpoint and the stream's read position."""

    capacity: int
    _seq: int = 0
    _slots: deque[Slot] = field(default_factory=deque)
    # key -> its pending events in stream order: the Slot itself while it is the only one
    # (the common case: no deque allocated per event), a deque once a second one waits.
    _by_key: dict[Any, Slot | deque[Slot]] = field(default_factory=dict)
    _room: anyio.Event = field(default_factory=anyio.Event)
    checkpoint: Mapping[str, Any] | None = None
    """Resume token of the low-watermark (None: nothing new since the window started)."""
    checkpoint_time: Any = None
    """Cluster time of the watermark event (``clusterTime``), or None."""
    covered: int = 0
    """Events the watermark moved past since the window started."""
    moved: anyio.Event = field(default_factory=anyio.Event)
    """Set when ``covered`` reaches ``notify_at`` (the checkpoint writer's next batch)."""
    notify_at: float = 0
    """The ``covered`` count at which ``moved`` is set: the writer waits for a whole batch
    with one wake-up, not one per event. Once reached it is put out of reach (infinity)
    until the writer sets the next one, so the events covered while it writes pay no
    ``set``."""
    _room_wanted: bool = False

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def idle(self) -> bool:
        """Nothing in the window: every event read is covered by the watermark."""
        return not self._slots

    async def wait_room(self, limit: int | None = None) -> None:
        """Wait until the window holds fewer than ``limit`` events (default: its capacity).

        Several tasks may wait at once (the stream reader and a rescan): they share one
        event, set whenever the watermark moves, and each looks again.
        """
        bound = self.capacity if limit is None else min(limit, self.capacity)
        while len(self._slots) >= bound:
            if not self._room_wanted:
                self._room = anyio.Event()
                self._room_wanted = True
            await self._room.wait()

    def add(
        self, key: Any, event: Mapping[str, Any], token: Mapping[str, Any] | None
    ) -> Slot | None:
        """Put an event in the window.

        Returns:
            Its slot if its key had nothing pending (the key's head now: the caller hands
            it to a worker); None if the key has earlier events pending (whoever handles
            them reaches this one: :meth:`finish` returns it).
        """
        self._seq = seq = self._seq + 1
        slot = Slot(seq, key, event, token)
        self._slots.append(slot)
        by_key = self._by_key
        queue = by_key.get(key)
        if queue is None:
            by_key[key] = slot
            return slot
        if isinstance(queue, Slot):
            by_key[key] = deque((queue, slot))
        else:
            queue.append(slot)
        return None

    def add_read(
        self,
        events: Iterable[Mapping[str, Any]],
        key_of: Callable[[Mapping[str, Any]], Any],
        heads: deque[Slot],
    ) -> None:
        """Put events read from the stream in the window, in order, each covering its own
        resume token (its ``_id``): :meth:`add` for each, the new heads of keys appended
        to ``heads``."""
        slots = self._slots
        by_key = self._by_key
        for event in events:
            key = key_of(event)  # before the seq moves: ``none`` keys by next_seq
            self._seq = seq = self._seq + 1
            slot = Slot(seq, key, event, event.get("_id"))
            slots.append(slot)
            queue = by_key.get(key)
            if queue is None:
                by_key[key] = slot
                heads.append(slot)
            elif isinstance(queue, Slot):
                by_key[key] = deque((queue, slot))
            else:
                queue.append(slot)

    @property
    def next_seq(self) -> int:
        """The stream position the next event added gets."""
        return self._seq + 1

    def mark(self, token: Mapping[str, Any] | None) -> None:
        """Add a point the watermark may move to once everything before it is done.

        Used for a stream's start token (the checkpoint reaches it at once when the
        window is empty) and for the end of a rescan (the last token read: reached once
        the rescan's documents and the events read during it, all tokenless, are done).
        """
        if token is None:
            return
        self._seq += 1
        self._slots.append(Slot(self._seq, _MARK, {}, token, done=True))
        self._advance()

    def head(self, key: Any) -> Slot | None:
        """The oldest unfinished event of ``key`` (what its worker handles next)."""
        queue = self._by_key.get(key)
        if queue is None or isinstance(queue, Slot):
            return queue
        return queue[0] if queue else None

    def finish(self, slot: Slot) -> Slot | None:
        """Mark ``slot`` done; drop it from its key's queue; advance the watermark.

        Returns:
            The key's next pending event (its new head, for the same worker), or None.
        """
        slot.done = True
        key = slot.key
        by_key = self._by_key
        queue = by_key[key]
        following = None
        if queue is slot:  # the key's lone pending event (the common case)
            del by_key[key]
        else:  # a deque of the key's pending events, ``slot`` at its head
            pending = cast("deque[Slot]", queue)
            pending.popleft()
            if pending:
                following = pending[0]
            else:
                del by_key[key]
        # The oldest slot is never done between two calls (every change of a done flag
        # advances at once), so the watermark can only move if ``slot`` is the oldest.
        slots = self._slots
        if slots[0] is slot:
            if len(slots) > 1 and slots[1].done:
                self._advance()  # events finished ahead of it are passed too
            else:  # _advance for ``slot`` alone (events finishing in order), inline
                slots.popleft()
                if slot.token is not None:
                    self.checkpoint = slot.token
                    self.checkpoint_time = slot.event.get("clusterTime")
                self.covered += 1
                if self._room_wanted or self.covered >= self.notify_at:
                    self._passed()
        return following

    def _advance(self) -> None:
        slots = self._slots
        passed = 0
        last: Slot | None = None  # the newest slot passed that carries a token
        while slots and slots[0].done:
            head = slots.popleft()
            passed += 1
            if head.token is not None:
                last = head
        if passed:
            if last is not None:
                self.checkpoint = last.token
                self.checkpoint_time = last.event.get("clusterTime")
            self.covered += passed
            self._passed()

    def _passed(self) -> None:
        """The watermark moved: wake the reader waiting for room, and the checkpoint
        writer once its batch is covered."""
        if self._room_wanted:
            self._room_wanted = False
            self._room.set()
        if self.covered >= self.notify_at:
            self.notify_at = math.inf
            self.moved.set()

    def done_ahead(self) -> list[Mapping[str, Any]]:
        """Tokens of the events done but not covered (one before them is still pending).

        Written with the final checkpoint, so that the next owner, which re-reads them
        from the checkpoint, skips them: a clean hand-over repeats nothing that finished.
        """
        return [
            s.token for s in self._slots if s.done and s.token is not None and s.key is not _MARK
        ]

    def skip(self, key: Any, event: Mapping[str, Any], token: Mapping[str, Any] | None) -> bool:
        """Put an event in the window as already done (the previous owner finished it).

        Only when its key has nothing pending (the previous owner handled the key's
        earlier events too, per key order); otherwise the caller handles it normally.

        Returns:
            True if it was added as done.
        """
        if key in self._by_key:
            return False
        slot = self.add(key, event, token)
        assert slot is not None  # nothing was pending
        self.finish(slot)
        return True

    def advance_idle(self, token: Mapping[str, Any] | None) -> bool:
        """Move the watermark to the stream's post-batch token when nothing is pending.

        A stream whose events are all filtered out still advances its resume token
        (``postBatchResumeToken``); keeping the checkpoint there keeps it inside the
        oplog window. Returns True if the checkpoint moved.
        """
        if token is None or self._slots or token == self.checkpoint:
            return False
        self.checkpoint = token  # written with the next renewal (no event was covered)
        return True
