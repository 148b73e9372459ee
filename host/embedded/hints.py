"""Index hints for find: ``hint``, ``min`` and ``max``, as mongod applies them.

The engine has no query planner, so the server gives hints their observable meaning:
a hinted index must exist (error 2, as mongod's planner), the results come in that
index's order when the find has no sort, and ``min``/``max`` bound the scan on the
hinted index (inclusive ``min``, exclusive ``max``), which mongod requires to be hinted
(51173) and to match the index's key pattern (51174).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping
from typing import Any

from mongomock import filtering

from .errors import CommandError
from .updates import get_path


def resolve_hint(ns: str, specs: list[dict[str, Any]], hint: Any) -> dict[str, Any] | None:
    """The index spec ``hint`` names (by name or key pattern); None for ``$natural``.

    Raises:
        CommandError: No such index (2, mongod's planner error) or a malformed hint.
    """
    if isinstance(hint, Mapping) and set(hint) == {"$natural"}:
        return None
    for spec in specs:
        if (isinstance(hint, str) and spec["name"] == hint) or (
            isinstance(hint, Mapping) and list(dict(spec["key"]).items()) == list(hint.items())
        ):
            return spec
    if not isinstance(hint, str | Mapping):
        raise CommandError(9, "hint must be a string or a document")
    raise CommandError(
        2,
        f"error processing query: ns={ns} planner returned error :: caused by :: "
        "hint provided does not correspond to an existing index",
    )


def _compare(key: Mapping[str, Any], a: Mapping[str, Any], b: Mapping[str, Any]) -> int:
    """Compare the index keys of ``a`` and ``b`` in the order of index ``key``."""
    for field, direction in key.items():
        x, y = get_path(a, field), get_path(b, field)
        if filtering.bson_compare(operator.lt, x, y):  # type: ignore[no-untyped-call]
            less = -1
        elif filtering.bson_compare(operator.gt, x, y):  # type: ignore[no-untyped-call]
            less = 1
        else:
            continue
        descending = isinstance(direction, int | float) and direction < 0
        return -less if descending else less
    return 0


def apply_bounds(
    docs: list[dict[str, Any]],
    index: dict[str, Any] | None,
    lower: Mapping[str, Any] | None,
    upper: Mapping[str, Any] | None,
) -> list[dict[str, Any]]:
    """Keep the documents within ``min``..``max`` of the hinted index, in index order.

    Raises:
        CommandError: ``min``/``max`` without a hint, or not matching the index.
    """
    if lower is None and upper is None:
        return docs
    if index is None:
        raise CommandError(
            51173, "When using min()/max() a hint of which index to use must be provided"
        )
    key = dict(index["key"])
    for bound in (lower, upper):
        if bound is not None and list(bound) != list(key):
            raise CommandError(51174, "The index chosen is not consistent with min/max")

    def order(a: dict[str, Any], b: dict[str, Any]) -> int:
        return _compare(key, a, b)

    ordered = sorted(docs, key=functools.cmp_to_key(order))
    return [
        d
        for d in ordered
        if (lower is None or _compare(key, d, lower) >= 0)
        and (upper is None or _compare(key, d, upper) < 0)
    ]


__all__ = ["apply_bounds", "resolve_hint"]
