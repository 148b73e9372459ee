"""Spotting a trigger that feeds itself: a handler writing the document it was called for.

Decision (issue 17 item 7): a trigger on the collection its handler writes is allowed
(an aggregator may well keep a counter in the document it watches, and stop), so it is
not refused at validation; the host cannot see what a handler will write anyway. What
the host does is *warn*: ``trigger.recursion_suspected`` (warning, once per trigger per
run) when the same document's events keep arriving with a ``wallTime`` inside the run of
the handler of the previous event of that document, ``threshold`` times in a row. That
is the signature of ``on_change`` updating its own document: each write happens while
the handler runs, and causes the next event. Atlas warns about the same recursion
(https://mongodb.com/docs/atlas/atlas-ui/triggers).

A handler that *inserts* new documents into its own collection makes a new key per
event, which no timing per key can see. So a handler's ``ctx.db`` is a
:class:`WatchedDatabase`: the same database (an ``AsyncDatabase`` subclass, so
``isinstance`` and every other method hold), whose watched collection notes the keys its
handler writes (``insert_one`` / ``insert_many``: the inserted ids; ``update_one``,
``update_many``, ``replace_one``, ``find_one_and_update`` / ``_replace``: a plain
``_id`` in the filter, the upserted id, the returned document's ``_id``). An event whose
key the handler of an event of chain *n* wrote has chain *n* + 1: that chain is causal,
not a matter of clocks, and reaching ``threshold`` warns the same way.

Limits, stated: the timing test compares the server's ``wallTime`` with this host's clock
(a skew of more than a few milliseconds hides or fakes a chain); a document written by
others faster than the handler runs looks the same (hence a chain of ``threshold``, and
only a warning). Writes the wrapper cannot see are not counted: ``bulk_write``, a
collection reached another way (``ctx.db.client[...]``, ``with_options``), a filter that
names no plain ``_id``, a sync handler's own client. Ordered ``per_key`` (the default) or
``total`` is needed for "the previous event's handler" to be well defined; ``none`` is
not checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from ..shadow import ShadowCaller
from ..types import Caller

if TYPE_CHECKING:
    from ..dispatch import Dispatcher

__all__ = (
    "DELIVERY",
    "Delivery",
    "EchoDetector",
    "WatchedDatabase",
    "watching_caller",
)

_SLACK = 0.005  # seconds: wallTime has millisecond precision
_KEYS = 4096  # documents surely remembered (the oldest forgotten first: see EchoDetector)


def _wall(event: Mapping[str, Any]) -> float | None:
    wall = event.get("wallTime")
    if not isinstance(wall, datetime):
        return None
    return (wall if wall.tzinfo is not None else wall.replace(tzinfo=UTC)).timestamp()


class Delivery:
    """The event a worker is handling now, as its handler's writes see it (``DELIVERY``)."""

    __slots__ = ("chain", "echo")

    def __init__(self, echo: EchoDetector) -> None:
        self.echo = echo
        self.chain = 0


DELIVERY: ContextVar[Delivery | None] = ContextVar("plugin_host_trigger_delivery", default=None)
"""Set once per worker task (so per event it is one attribute store, ``chain``)."""


class EchoDetector:
    """Counts, per document key, events written while the previous one's handler ran,
    and events of keys that the trigger's own handlers wrote.

    Args:
        threshold: Chain length that counts as a suspected recursion.
    """

    def __init__(self, threshold: int = 10) -> None:
        self.threshold = threshold
        # INVARIANT (marks): each map is two generations of plain dicts, the current one
        # and the one before it; a key is looked up in the current one first. A record
        # goes into the current one; once that holds _KEYS keys it becomes the old one
        # and the oldest generation is dropped whole. So the last _KEYS distinct keys
        # recorded are always remembered (with their latest record), at most 2 * _KEYS
        # are, and the oldest are forgotten first, for two dict operations per event.
        # (Popping a plain dict's first key, as before, skipped the dead slots its
        # deletions left at its front: ~3 µs per event once it was full; an
        # OrderedDict's move_to_end and popitem cost ~0.13 µs more per event than two
        # generations.)
        # key -> (handler start, handler end, chain), in this host's wall-clock seconds.
        self._runs: dict[Any, tuple[float, float, int]] = {}
        self._runs_old: dict[Any, tuple[float, float, int]] = {}
        # key -> chain of the event its write causes (popped when the event comes).
        self._written: dict[Any, int] = {}
        self._written_old: dict[Any, int] = {}

    def check(self, key: Any, event: Mapping[str, Any]) -> int:
        """The chain length of ``event`` (0: not written during the previous handler run)."""
        caused = self._caused(key) if self._written or self._written_old else 0
        previous = self._runs.get(key)
        if previous is None:
            previous = self._runs_old.get(key)
            if previous is None:  # the common case: no recent run of this document
                return caused
        wall = _wall(event)
        if wall is None:
            return caused
        start, end, chain = previous
        timed = chain + 1 if start - _SLACK <= wall <= end + _SLACK else 0
        return max(timed, caused)

    def _caused(self, key: Any) -> int:
        old = self._written_old.pop(key, 0)
        return max(self._written.pop(key, 0), old)

    def handled(self, key: Any, start: float, end: float, chain: int) -> None:
        """Record the run of the handler of an event of ``key`` (wall-clock seconds)."""
        runs = self._runs
        runs[key] = (start, end, chain)
        if len(runs) >= _KEYS:
            self._runs_old = runs
            self._runs = {}

    def wrote(self, keys: Iterable[Any], chain: int) -> None:
        """Note that the handler of an event of ``chain`` wrote the documents ``keys``."""
        for key in keys:
            written = self._written
            written[key] = max(written.get(key, 0), self._written_old.pop(key, 0), chain + 1)
            if len(written) >= _KEYS:
                self._written_old = written
                self._written = {}


def _noted(keys: Iterable[Any]) -> None:
    delivery = DELIVERY.get()
    if delivery is not None:
        delivery.echo.wrote([k for k in keys if k is not None], delivery.chain)


def _filter_id(spec: Any) -> list[Any]:
    value = spec.get("_id") if isinstance(spec, Mapping) else None
    if value is None or (isinstance(value, Mapping) and any(str(k)[:1] == "$" for k in value)):
        return []
    return [value]


class _WatchedCollection(AsyncCollection[Any]):
    """The watched collection: its writes note the keys they touch (see the module doc)."""

    async def insert_one(self, document: Any, *args: Any, **kwargs: Any) -> Any:
        result = await super().insert_one(document, *args, **kwargs)
        _noted([result.inserted_id])
        return result

    async def insert_many(self, documents: Any, *args: Any, **kwargs: Any) -> Any:
        result = await super().insert_many(documents, *args, **kwargs)
        _noted(result.inserted_ids)
        return result

    async def update_one(self, filter: Any, *args: Any, **kwargs: Any) -> Any:
        result = await super().update_one(filter, *args, **kwargs)
        _noted([*_filter_id(filter), result.upserted_id])
        return result

    async def update_many(self, filter: Any, *args: Any, **kwargs: Any) -> Any:
        result = await super().update_many(filter, *args, **kwargs)
        _noted([*_filter_id(filter), result.upserted_id])
        return result

    async def replace_one(self, filter: Any, *args: Any, **kwargs: Any) -> Any:
        result = await super().replace_one(filter, *args, **kwargs)
        _noted([*_filter_id(filter), result.upserted_id])
        return result

    async def find_one_and_update(self, filter: Any, *args: Any, **kwargs: Any) -> Any:
        result = await super().find_one_and_update(filter, *args, **kwargs)
        _noted([*_filter_id(filter), *_filter_id(result)])
        return result

    async def find_one_and_replace(self, filter: Any, *args: Any, **kwargs: Any) -> Any:
        result = await super().find_one_and_replace(filter, *args, **kwargs)
        _noted([*_filter_id(filter), *_filter_id(result)])
        return result


class WatchedDatabase(AsyncDatabase[Any]):
    """``db`` as a trigger's handler sees it: the collection it watches notes its writes.

    Args:
        db: The host's database.
        collection: The trigger's collection.
    """

    def __init__(self, db: AsyncDatabase[Any], collection: str) -> None:
        super().__init__(
            db.client,
            db.name,
            db.codec_options,
            db.read_preference,
            db.write_concern,
            db.read_concern,
        )
        self._watched_name = collection

    def __getitem__(self, name: str) -> AsyncCollection[Any]:
        if name == self._watched_name:
            return _WatchedCollection(self, name)
        return super().__getitem__(name)

    def get_collection(self, name: str, *args: Any, **kwargs: Any) -> AsyncCollection[Any]:
        """As :meth:`AsyncDatabase.get_collection`; the watched one notes its writes."""
        if name == self._watched_name:
            return _WatchedCollection(self, name, False, *args, **kwargs)
        return super().get_collection(name, *args, **kwargs)


def watching_caller(dispatcher: Dispatcher, collection: str) -> Caller:
    """``dispatcher`` with its ``db`` watched for writes to ``collection``; the dispatcher
    itself if its ``db`` is not a PyMongo ``AsyncDatabase`` (then only timing is used)."""
    db = dispatcher.db
    if not isinstance(db, AsyncDatabase):
        return dispatcher
    return ShadowCaller(dispatcher, WatchedDatabase(db, collection))  # a caller with its db
