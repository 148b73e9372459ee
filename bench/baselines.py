"""The baselines measured next to plugin-host, in the same run, on the same server.

* :class:`SeedHotRequire` — what the original blog post's ``hotRequire`` does: fetch the
  record from MongoDB and compile it on every call.
* :class:`PollingReloader` — what people build without change streams: re-read the whole
  collection every second and recompile the records that changed.
* The direct call — awaiting the plugin's function object — needs no class: it is the
  floor for dispatch overhead and is timed inline by ``bench.throughput``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from .common import Doc

POLL_INTERVAL = 1.0


def _compile_main(name: str, source: str) -> Callable[..., Any]:
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<{name}>", "exec"), namespace)  # the baseline's point: compile per call
    main: Callable[..., Any] = namespace["main"]
    return main


async def _invoke(func: Callable[..., Any], ctx: Any, args: Any) -> Any:
    result = func(ctx, args)
    if inspect.isawaitable(result):
        result = await result
    return result


class SeedHotRequire:
    """Seed-style hot-require: one ``find_one`` and one ``compile`` + ``exec`` per call.

    Args:
        collection: The functions collection.
        ctx: What the plugin gets as ``ctx``.
    """

    def __init__(self, collection: AsyncCollection[Doc], ctx: Any = None) -> None:
        self._coll = collection
        self._ctx = ctx if ctx is not None else SimpleNamespace(db=collection.database)

    async def call(self, name: str, args: Any = None) -> Any:
        """Fetch, compile and run ``name``, as the blog post's ``hotRequire`` does."""
        doc = await self._coll.find_one({"_id": name})
        if doc is None:
            raise LookupError(name)
        return await _invoke(_compile_main(name, doc["source"]), self._ctx, args)


class PollingReloader:
    """Reloads changed records by re-reading the collection every ``interval`` seconds.

    Use as an async context manager; the first poll completes before ``__aenter__``
    returns.

    Args:
        collection: The functions collection.
        interval: Seconds between the starts of two polls.
        ctx: What plugins get as ``ctx``.
    """

    def __init__(
        self,
        collection: AsyncCollection[Doc],
        interval: float = POLL_INTERVAL,
        ctx: Any = None,
    ) -> None:
        self._coll = collection
        self._interval = interval
        self._ctx = ctx if ctx is not None else SimpleNamespace(db=collection.database)
        self._functions: dict[str, tuple[Any, Callable[..., Any]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.polls = 0
        self.reloads = 0

    async def __aenter__(self) -> PollingReloader:
        await self._poll()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        next_at = time.monotonic() + self._interval
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += self._interval
            await self._poll()

    async def _poll(self) -> None:
        self.polls += 1
        seen = set()
        async for doc in self._coll.find({}):
            name = str(doc["_id"])
            seen.add(name)
            key = (doc.get("revision"), doc.get("source"))
            known = self._functions.get(name)
            if known is None or known[0] != key:
                self._functions[name] = (key, _compile_main(name, doc["source"]))
                self.reloads += 1
        for name in set(self._functions) - seen:
            del self._functions[name]

    async def call(self, name: str, args: Any = None) -> Any:
        """Call the version loaded by the latest poll."""
        return await _invoke(self._functions[name][1], self._ctx, args)
