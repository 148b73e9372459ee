"""Read-only views: ``create`` with ``viewOn`` and ``pipeline``, as MongoDB defines them.

A view is a catalog entry whose options name its source (``viewOn``, in the same
database, possibly another view) and a pipeline. Reads of a view (find, count,
distinct, aggregate) run the view's pipeline over its source and then the read's own
stages; writes to a view are error 166 CommandNotSupportedOnView, as on mongod.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import CommandError
from .storage import Storage

MAX_VIEW_DEPTH = 20  # mongod's ViewGraph::kMaxViewDepth


def check_view_options(options: Mapping[str, Any]) -> None:
    """Validate ``viewOn``/``pipeline`` of a ``create`` (codes as mongod).

    Raises:
        CommandError: ``viewOn`` is not a string, or ``pipeline`` is not an array.
    """
    if not isinstance(options.get("viewOn"), str) or not options["viewOn"]:
        raise CommandError(2, "'viewOn' option must be a non-empty string")
    pipeline = options.get("pipeline", [])
    if not isinstance(pipeline, list):
        raise CommandError(14, "'pipeline' option must be specified as an array")


def view_of(storage: Storage, db: str, coll: str) -> tuple[str, list[Any]] | None:
    """The collection a view reads and the whole pipeline over it; None for a collection.

    Raises:
        CommandError: The chain of views is deeper than MongoDB allows.
    """
    stages: list[Any] = []
    name = coll
    for _ in range(MAX_VIEW_DEPTH + 1):
        info = storage.info(db, name)
        if info is None or "viewOn" not in info.options:
            return (name, stages) if name != coll else None
        stages = list(info.options.get("pipeline", [])) + stages
        name = str(info.options["viewOn"])
    raise CommandError(
        13466, f"View depth too deep or view cycle detected; maximum depth is {MAX_VIEW_DEPTH}"
    )


def refuse_write(storage: Storage, db: str, coll: str) -> None:
    """Error 166 when ``db.coll`` is a view.

    Raises:
        CommandError: ``db.coll`` is a view.
    """
    info = storage.info(db, coll)
    if info is not None and "viewOn" in info.options:
        raise CommandError(166, f"Namespace {db}.{coll} is a view, not a collection")


def find_stages(
    flt: Mapping[str, Any] | None,
    projection: Mapping[str, Any] | None,
    sort: Mapping[str, Any] | None,
    skip: int,
    limit: int,
) -> list[dict[str, Any]]:
    """A find's filter, sort, skip, limit and projection as aggregation stages."""
    stages: list[dict[str, Any]] = []
    if flt:
        stages.append({"$match": dict(flt)})
    if sort:
        stages.append({"$sort": dict(sort)})
    if skip:
        stages.append({"$skip": skip})
    if limit:
        stages.append({"$limit": abs(limit)})
    if projection:
        stages.append({"$project": dict(projection)})
    return stages


__all__ = ["check_view_options", "find_stages", "refuse_write", "view_of"]
