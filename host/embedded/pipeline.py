"""What the embedded server adds to the engine's aggregation: pipeline-style updates and
``$project`` of dotted computed fields.

* An update given as an array of stages (MongoDB 4.2+, ``source/crud`` "update with
  aggregation pipeline") computes the new document by running those stages over the
  old one. Only ``$addFields``/``$set``, ``$project``/``$unset`` and
  ``$replaceRoot``/``$replaceWith`` are allowed, as on mongod (code 72 otherwise),
  and the result must keep the ``_id`` (66 ImmutableField).
* ``{$project: {"a.b": <expression>}}`` must create the embedded field ``a.b``; the
  engine would keep a literal key ``"a.b"``. The spec is rewritten as
  ``{a: {b: <expression>}}``, which the engine evaluates as MongoDB does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import CommandError

UPDATE_STAGES = frozenset(
    {"$addFields", "$set", "$project", "$unset", "$replaceRoot", "$replaceWith"}
)


def _is_inclusion(value: Any) -> bool:
    return isinstance(value, bool | int | float)


def nest_dotted_projection(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Rewrite computed dotted keys of a ``$project`` spec into embedded documents."""
    if not any("." in k and not _is_inclusion(v) for k, v in spec.items()):
        return dict(spec)
    out: dict[str, Any] = {}
    for key, value in spec.items():
        if "." not in key or _is_inclusion(value):
            out[key] = value
            continue
        head, rest = key.split(".", 1)
        node = out.setdefault(head, {})
        if not isinstance(node, dict):
            raise CommandError(31250, f"Invalid $project :: caused by :: Path collision at {key}")
        node.update(nest_dotted_projection({rest: value}))
    return out


def rewrite_stages(pipeline: list[Any]) -> list[Any]:
    """The pipeline in the engine's terms: ``$project`` dotted computed keys nested,
    ``$unset`` as an exclusion ``$project``, ``$replaceWith`` as ``$replaceRoot``."""
    out = []
    for stage in pipeline:
        if isinstance(stage, Mapping) and isinstance(stage.get("$project"), Mapping):
            stage = {"$project": nest_dotted_projection(stage["$project"])}
        elif isinstance(stage, Mapping) and "$unset" in stage:
            # {$unset: f | [f...]} is {$project: {f: 0...}} (the engine lacks $unset).
            fields = stage["$unset"]
            names = [fields] if isinstance(fields, str) else fields
            if (
                not isinstance(names, list)
                or not names
                or not all(isinstance(n, str) for n in names)
            ):
                raise CommandError(31002, "$unset specification must be a string or an array")
            stage = {"$project": dict.fromkeys(names, 0)}
        elif isinstance(stage, Mapping) and "$replaceWith" in stage:
            stage = {"$replaceRoot": {"newRoot": stage["$replaceWith"]}}
        out.append(stage)
    return out


def check_update_pipeline(pipeline: list[Any]) -> None:
    """Refuse stages an update pipeline may not use (72 InvalidOptions, as mongod).

    Raises:
        CommandError: A stage is not a one-key document or is not allowed in updates.
    """
    for stage in pipeline:
        if not isinstance(stage, Mapping) or len(stage) != 1:
            raise CommandError(
                40323, "A pipeline stage specification object must contain exactly one field."
            )
        name = next(iter(stage))
        if name not in UPDATE_STAGES:
            raise CommandError(
                72,
                f"{name} is not allowed to be used within an update",
            )


def apply_update_pipeline(
    doc: Mapping[str, Any], pipeline: list[Any], database: Any
) -> dict[str, Any]:
    """The document a pipeline-style update makes of ``doc``.

    Raises:
        CommandError: A stage is not allowed, or the pipeline changed or removed ``_id``.
    """
    from .storage import run_pipeline

    check_update_pipeline(pipeline)
    result = run_pipeline([dict(doc)], pipeline, database)
    if len(result) != 1:
        raise CommandError(2, "an update pipeline must produce exactly one document")
    after = dict(result[0])
    if "_id" in doc and after.get("_id", doc["_id"]) != doc["_id"]:
        raise CommandError(
            66,
            "Performing an update on the path '_id' would modify the immutable field '_id'",
        )
    if "_id" in doc and "_id" not in after:
        after = {"_id": doc["_id"], **after}
    return after


def _bind(value: Any, let: Mapping[str, Any]) -> Any:
    """``value`` with every ``$$name`` (and ``$$name.path``) of ``let`` made a literal."""
    if isinstance(value, str) and value.startswith("$$"):
        name, _, path = value[2:].partition(".")
        if name in let:
            bound = let[name]
            for part in path.split(".") if path else ():
                bound = bound.get(part) if isinstance(bound, Mapping) else None
            return {"$literal": bound}
        return value
    if isinstance(value, Mapping):
        return {k: _bind(v, let) for k, v in value.items()}
    if isinstance(value, list):
        return [_bind(v, let) for v in value]
    return value


def _bind_filter(flt: Any, let: Mapping[str, Any]) -> Any:
    """A query filter with ``let`` bound inside its ``$expr`` parts (elsewhere ``$$x`` is text)."""
    if isinstance(flt, Mapping):
        return {k: _bind(v, let) if k == "$expr" else _bind_filter(v, let) for k, v in flt.items()}
    if isinstance(flt, list):
        return [_bind_filter(v, let) for v in flt]
    return flt


def apply_let(command: str, body: dict[str, Any]) -> dict[str, Any]:
    """The command with its ``let`` variables bound (the engine has no user variables).

    Each ``$$name`` becomes ``{$literal: value}`` in the command's filters (inside
    ``$expr``), update pipelines and aggregation pipelines.

    Raises:
        CommandError: ``let`` is not a document.
    """
    let = body.get("let")
    if let is None:
        return body
    if not isinstance(let, Mapping):
        raise CommandError(14, "BSON field 'let' is the wrong type, expected an object")
    out = dict(body)
    if command == "find":
        out["filter"] = _bind_filter(body.get("filter"), let)
    elif command == "aggregate":
        out["pipeline"] = _bind(body.get("pipeline"), let)
    elif command in ("findAndModify", "findandmodify"):
        out["query"] = _bind_filter(body.get("query"), let)
        if isinstance(body.get("update"), list):
            out["update"] = _bind(body["update"], let)
    elif command in ("update", "delete"):
        key = "updates" if command == "update" else "deletes"
        stmts = []
        for stmt in body.get(key) or []:
            if isinstance(stmt, Mapping):
                stmt = {**stmt, "q": _bind_filter(stmt.get("q"), let)}
                if isinstance(stmt.get("u"), list):
                    stmt["u"] = _bind(stmt["u"], let)
            stmts.append(stmt)
        out[key] = stmts
    return out


_TOP_LEVEL = frozenset({"$and", "$or", "$nor", "$expr", "$where", "$text", "$comment",
                        "$jsonSchema", "$alwaysTrue", "$alwaysFalse", "$sampleRate"})  # fmt: skip
_FIELD_LEVEL = frozenset(
    {"$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$not", "$exists", "$type",
     "$mod", "$regex", "$options", "$all", "$elemMatch", "$size", "$bitsAllSet",
     "$bitsAnySet", "$bitsAllClear", "$bitsAnyClear", "$geoWithin", "$geoIntersects",
     "$near", "$nearSphere", "$maxDistance", "$minDistance", "$within", "$box", "$center",
     "$centerSphere", "$polygon", "$geometry", "$jsonSchema"}
)  # fmt: skip


def check_filter(flt: Any) -> None:
    """Refuse unknown query operators (2 BadValue, as mongod); the engine ignores them.

    Raises:
        CommandError: An operator no MongoDB query knows.
    """
    if not isinstance(flt, Mapping):
        return
    for key, value in flt.items():
        if key.startswith("$"):
            if key not in _TOP_LEVEL:
                raise CommandError(2, f"unknown top level operator: {key}")
            if key in ("$and", "$or", "$nor") and isinstance(value, list):
                for clause in value:
                    check_filter(clause)
            continue
        _check_field(value)


def _check_field(value: Any) -> None:
    if not isinstance(value, Mapping) or not value or not next(iter(value)).startswith("$"):
        return
    for op, operand in value.items():
        if op not in _FIELD_LEVEL:
            raise CommandError(2, f"unknown operator: {op}")
        if op == "$not":
            _check_field(operand)
        elif op == "$elemMatch" and isinstance(operand, Mapping):
            if (
                operand
                and next(iter(operand)).startswith("$")
                and next(iter(operand)) not in _TOP_LEVEL
            ):
                _check_field(operand)
            else:
                check_filter(operand)


def check_filters(command: str, body: Mapping[str, Any]) -> None:
    """Check the query filter of find, count, distinct and findAndModify (:func:`check_filter`).

    Raises:
        CommandError: A filter uses an unknown operator.
    """
    if command == "find":
        check_filter(body.get("filter"))
    elif command in ("count", "distinct", "findAndModify", "findandmodify"):
        check_filter(body.get("query"))
    # update/delete statements would need per-statement write errors: not checked yet.


__all__ = [
    "UPDATE_STAGES",
    "apply_let",
    "apply_update_pipeline",
    "check_filter",
    "check_filters",
    "check_update_pipeline",
    "nest_dotted_projection",
    "rewrite_stages",
]
