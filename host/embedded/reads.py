"""Heavy reads off the event loop: pure functions of a snapshot, run in worker threads.

Design note: ``Storage`` keeps stored documents immutable (copy-on-write), so a list of
them, taken on the loop, is a consistent point-in-time snapshot. Everything here works
on such a list and touches no live engine state, so it may run in a worker thread while
the loop goes on serving pings, getMores and writes; Python hands the GIL back to the
loop every few milliseconds (``sys.getswitchinterval``). What must stay on the loop
(pipelines reading other collections) is recognised by :func:`split_match`.
"""

from __future__ import annotations

import asyncio
import copy
import functools
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mongomock import filtering

from . import bsonorder  # noqa: F401 - ranks Timestamp, MinKey, MaxKey for every sort
from .errors import CommandError
from .indexes import match

# Below this many documents to look at, a read runs on the loop (a thread hop costs more).
OFFLOAD_MIN_DOCS = 2_000
# Stages that read other collections (live state): such pipelines stay on the loop.
LIVE_STAGES = frozenset({"$lookup", "$graphLookup", "$unionWith", "$facet", "$out", "$merge"})

Docs = list[dict[str, Any]]


class Readers:
    """The worker threads heavy reads run in (started on first use)."""

    def __init__(self, threshold: int = OFFLOAD_MIN_DOCS) -> None:
        self.threshold = threshold
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` in a worker thread and return its result."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="embedded-read")
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    def close(self) -> None:
        """Stop the threads (reads in flight are abandoned)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _engine_error(exc: Exception) -> CommandError:
    from .storage import engine_error

    return engine_error(exc)


def select(
    target: Any,
    spec: dict[str, Any],
    docs: Docs,
    projection: Mapping[str, Any] | None,
    sort: Mapping[str, Any] | None,
    skip: int,
    limit: int,
) -> Callable[[], Docs]:
    """What mongomock's find does (match, sort, skip, limit, project), over ``docs``.

    ``target`` is the engine's collection, used only for its projection helper, which
    reads no state. Without a projection the result holds the stored objects.
    """

    def work() -> Docs:
        try:
            dataset: Iterable[dict[str, Any]] = match(spec, docs)
            for key, direction in reversed(list((sort or {}).items())):
                if key == "$natural":
                    if direction < 0:
                        dataset = list(reversed(list(dataset)))
                    continue
                if key.startswith("$"):
                    raise NotImplementedError(
                        f"Sorting by {key} is not implemented in mongomock yet"
                    )
                dataset = sorted(
                    dataset, key=functools.partial(_sort_key, key), reverse=direction < 0
                )
            out = list(dataset)[skip:] if skip else list(dataset)
            if limit:
                out = out[: abs(limit)]
            if projection:
                out = [target._copy_only_fields(d, dict(projection), dict) for d in out]
            return out
        except Exception as exc:
            raise _engine_error(exc) from exc

    return work


def count(spec: dict[str, Any], docs: Docs, skip: int, limit: int) -> Callable[[], int]:
    """How many of ``docs`` match (the count command), copying none."""

    def work() -> int:
        try:
            n = max(0, sum(1 for _ in match(spec, docs)) - skip)
        except Exception as exc:
            raise _engine_error(exc) from exc
        return min(n, limit) if limit else n

    return work


def split_match(pipeline: Any) -> tuple[dict[str, Any], list[Any]] | None:
    """A pipeline's leading ``$match`` filter and the other stages; None if it must stay
    on the loop (it reads other collections)."""
    if not isinstance(pipeline, list) or any(
        isinstance(s, Mapping) and LIVE_STAGES & set(s) for s in pipeline
    ):
        return None
    rest = list(pipeline)
    if rest and isinstance(rest[0], Mapping) and set(rest[0]) == {"$match"}:
        first = rest[0]["$match"]
        if isinstance(first, Mapping) and not _has_expr(first):
            return dict(first), rest[1:]
    return {}, rest


def aggregate(
    spec: dict[str, Any], docs: Docs, stages: list[Any], database: Any
) -> Callable[[], Docs]:
    """Run ``stages`` over the documents of ``docs`` that ``spec`` matches.

    The engine's stages may change their input in place, so documents are copied,
    except when the stages only count (:func:`counts_only`).
    """
    copies = not counts_only(stages)

    def work() -> Docs:
        from .storage import run_pipeline

        try:
            selected = list(match(spec, docs)) if spec else list(docs)
        except Exception as exc:
            raise _engine_error(exc) from exc
        if copies:
            selected = [copy.deepcopy(d) for d in selected]
        return run_pipeline(selected, stages, database)

    return work


def counts_only(stages: list[Any]) -> bool:
    """The stages only count: they build new documents without embedding stored values.

    ``$skip``/``$limit`` then one ``$count``, or one ``$group`` on a constant key whose
    accumulators are ``$sum`` of constants (what ``count_documents`` sends).
    """
    i = 0
    while (
        i < len(stages)
        and isinstance(stages[i], Mapping)
        and set(stages[i])
        <= {
            "$skip",
            "$limit",
        }
    ):
        i += 1
    tail = stages[i:]
    if len(tail) != 1 or not isinstance(tail[0], Mapping) or len(tail[0]) != 1:
        return False
    ((name, spec),) = tail[0].items()
    if name == "$count":
        return True
    if name != "$group" or not isinstance(spec, Mapping):
        return False
    return not isinstance(spec.get("_id"), Mapping | list | str) and all(
        isinstance(acc, Mapping) and list(acc) == ["$sum"] and isinstance(acc["$sum"], int | float)
        for k, acc in spec.items()
        if k != "_id"
    )


def _sort_key(key: str, doc: Mapping[str, Any]) -> Any:
    return filtering.resolve_sort_key(key, doc)  # type: ignore[no-untyped-call]


def _has_expr(spec: Mapping[str, Any]) -> bool:
    return "$expr" in spec or any(
        isinstance(p, Mapping) and _has_expr(p) for p in spec.get("$and", []) or []
    )
