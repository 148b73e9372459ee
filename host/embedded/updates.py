"""Update helpers of the storage: dotted paths, ``arrayFilters`` and update previews.

mongomock applies update operators; these fill its gaps as mongod behaves: the
``$[<identifier>]`` filtered positional operator (expanded to concrete paths against the
document before the engine applies the update), type-aware change detection for
``nModified``, and the would-be document behind a duplicate-key error's ``keyValue``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import mongomock

from .errors import CommandError
from .indexes import filter_applies


def get_path(doc: Mapping[str, Any], path: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def types_changed(before: Any, after: Any) -> bool:
    if type(before) is not type(after):
        return True
    if isinstance(before, dict):
        return list(before) != list(after) or any(
            types_changed(before[k], after[k]) for k in before
        )
    if isinstance(before, list):
        return any(types_changed(a, b) for a, b in zip(before, after, strict=False))
    return False


def preview_update(
    before: Mapping[str, Any], query: Mapping[str, Any], update: Mapping[str, Any]
) -> dict[str, Any]:
    """The document ``update`` would produce from ``before``, computed on a scratch engine.

    Used after a duplicate-key failure, to report the offending keyValue.
    """
    scratch: mongomock.Collection[dict[str, Any]] = mongomock.MongoClient()["preview"]["preview"]
    scratch.insert_one(copy.deepcopy(dict(before)))
    try:
        scratch.update_one({"$and": [{"_id": before["_id"]}, dict(query)]}, dict(update))
    except Exception:
        return dict(before)
    return dict(scratch.find_one({"_id": before["_id"]}) or before)


def expand_array_filters(
    update: Mapping[str, Any], doc: Mapping[str, Any], array_filters: Any
) -> Mapping[str, Any]:
    """Rewrite ``$[]`` and ``$[ident]`` paths into concrete indexes for one document.

    mongomock implements neither, so the server resolves them against the stored
    document (with the engine's own matcher for the filter conditions) and hands the
    engine plain dotted paths.
    """
    if not any(isinstance(v, Mapping) and any("$[" in p for p in v) for v in update.values()):
        if array_filters:
            _parse_array_filters(array_filters)  # still validate them
        return update
    filters = _parse_array_filters(array_filters or [])
    used: set[str] = set()
    out: dict[str, Any] = {}
    for op, fields in update.items():
        if not isinstance(fields, Mapping):
            out[op] = fields
            continue
        rewritten: dict[str, Any] = {}
        for path, value in fields.items():
            if "$[" not in path:
                rewritten[path] = value
                continue
            for concrete in _expand_path(path.split("."), doc, filters, used):
                rewritten[concrete] = value
        out[op] = rewritten
    unused = set(filters) - used
    if unused:
        raise CommandError(
            9, f"The array filter for identifier '{sorted(unused)[0]}' was not used in the update"
        )
    return out


def _parse_array_filters(array_filters: Any) -> dict[str, Mapping[str, Any]]:
    if not isinstance(array_filters, list):
        raise CommandError(9, "arrayFilters must be an array")
    filters: dict[str, Mapping[str, Any]] = {}
    for flt in array_filters:
        if not isinstance(flt, Mapping) or not flt:
            raise CommandError(
                9, "Cannot use an expression without a top-level field name in arrayFilters"
            )
        idents = {k.split(".", 1)[0] for k in flt}
        if len(idents) != 1:
            raise CommandError(9, "Each array filter must use a single top-level field name")
        ident = idents.pop()
        if ident in filters:
            raise CommandError(
                9, f"Found multiple array filters with the same top-level field name {ident}"
            )
        filters[ident] = flt
    return filters


def _expand_path(
    parts: list[str], node: Any, filters: Mapping[str, Mapping[str, Any]], used: set[str]
) -> list[str]:
    if not parts:
        return [""]
    head, rest = parts[0], parts[1:]
    if head.startswith("$[") and head.endswith("]"):
        ident = head[2:-1]
        if ident and ident not in filters:
            raise CommandError(2, f"No array filter found for identifier '{ident}' in path")
        if ident:
            used.add(ident)
        if not isinstance(node, list):
            return []
        out: list[str] = []
        for i, item in enumerate(node):
            if ident and not filter_applies(filters[ident], {ident: item}):
                continue
            out.extend(_join(str(i), tail) for tail in _expand_path(rest, item, filters, used))
        return out
    if isinstance(node, Mapping):
        child = node.get(head)
    elif isinstance(node, list) and head.isdigit() and int(head) < len(node):
        child = node[int(head)]
    else:
        child = None
    if child is None and any(p.startswith("$[") for p in rest):
        return []
    return [_join(head, tail) for tail in _expand_path(rest, child, filters, used)]


def _join(head: str, tail: str) -> str:
    return f"{head}.{tail}" if tail else head
