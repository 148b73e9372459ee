"""``$merge``: write an aggregation's results into a collection, as mongod does.

``{$merge: {into, on, whenMatched, whenNotMatched}}`` (or ``{$merge: "coll"}``):
each result is matched to a target document by the ``on`` fields (``_id`` by
default); ``whenMatched`` is ``merge`` (default: the result's fields over the
existing ones), ``replace``, ``keepExisting`` or ``fail`` (11000); ``whenNotMatched``
is ``insert`` (default), ``discard`` or ``fail`` (13113). A pipeline as
``whenMatched`` is refused by name (238). Writes go through storage, so they are
logged and seen by change streams like any other write.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import CommandError
from .storage import Storage
from .updates import get_path


def merge_into(storage: Storage, db: str, spec: Any, docs: list[dict[str, Any]]) -> None:
    """Apply a ``$merge`` stage's writes for ``docs``.

    Raises:
        CommandError: A malformed spec, or a ``fail`` mode that applies, with mongod's codes.
    """
    if isinstance(spec, str):
        spec = {"into": spec}
    if not isinstance(spec, Mapping):
        raise CommandError(51182, "$merge requires a string or an object argument")
    into = spec.get("into")
    if isinstance(into, str):
        out_db, out_coll = db, into
    elif isinstance(into, Mapping) and isinstance(into.get("coll"), str):
        out_db, out_coll = str(into.get("db", db)), into["coll"]
    else:
        raise CommandError(51178, "$merge 'into' must be a string or an object {db, coll}")
    on = spec.get("on", "_id")
    fields = [on] if isinstance(on, str) else list(on) if isinstance(on, list) else None
    if not fields or not all(isinstance(f, str) for f in fields):
        raise CommandError(51186, "$merge 'on' must be a string or an array of strings")
    matched = spec.get("whenMatched", "merge")
    not_matched = spec.get("whenNotMatched", "insert")
    if isinstance(matched, list):
        raise CommandError(238, "not supported by the embedded server: $merge whenMatched pipeline")
    if matched not in ("merge", "replace", "keepExisting", "fail"):
        raise CommandError(9, f"$merge whenMatched: unknown mode {matched!r}")
    if not_matched not in ("insert", "discard", "fail"):
        raise CommandError(9, f"$merge whenNotMatched: unknown mode {not_matched!r}")
    storage.ensure(out_db, out_coll)
    for doc in docs:
        key = {f: get_path(doc, f) for f in fields}
        existing = storage.find(out_db, out_coll, key, limit=1)
        if existing:
            if matched == "keepExisting":
                continue
            if matched == "fail":
                raise CommandError(
                    11000,
                    f"E11000 duplicate key error collection: {out_db}.{out_coll}",
                    extra={"keyPattern": dict.fromkeys(fields, 1), "keyValue": key},
                )
            target_id = existing[0]["_id"]
            new = dict(doc) if matched == "replace" else {**existing[0], **doc}
            new.pop("_id", None)
            result = storage.update(
                out_db, out_coll, [{"q": {"_id": target_id}, "u": new}], ordered=True
            )
        elif not_matched == "discard":
            continue
        elif not_matched == "fail":
            raise CommandError(13113, "$merge could not find a matching document in the target")
        else:
            result = storage.insert(out_db, out_coll, [doc], ordered=True)
        if result.write_errors:
            error = result.write_errors[0]
            extra: dict[str, Any] = {k: error[k] for k in ("keyPattern", "keyValue") if k in error}
            raise CommandError(int(error["code"]), str(error["errmsg"]), extra=extra)


__all__ = ["merge_into"]
