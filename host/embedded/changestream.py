"""Change streams: turn oplog entries into MongoDB change events for one cursor.

Follows MongoDB's change-events reference and the change-streams spec
(``source/change-streams/change-streams.md``): event shapes, ``fullDocument`` and
``fullDocumentBeforeChange`` modes, resume/startAfter/startAtOperationTime, the
invalidate rules for collection and database streams, and ``postBatchResumeToken``.

A stream remembers one :class:`~.oplog.Position`; each batch scans the oplog from
there, so nothing is held per event and a stream costs nothing while idle.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import bson
from bson.binary import Binary
from bson.timestamp import Timestamp

from .errors import CommandError
from .oplog import (
    KIND_EVENT,
    KIND_HIGH_WATER_MARK,
    KIND_INVALIDATE,
    Entry,
    Oplog,
    Position,
    TokenError,
    decode_token,
    encode_token,
)
from .storage import SYSTEM_DATABASES, Storage, run_pipeline
from .wire import CODEC_OPTIONS

ALLOWED_STAGES = frozenset(
    {
        "$match",
        "$project",
        "$addFields",
        "$set",
        "$replaceRoot",
        "$replaceWith",
        "$redact",
        "$unset",
    }
)
# Aggregation stages MongoDB knows: any other name is 40324 (unrecognized), as on mongod.
KNOWN_STAGES = ALLOWED_STAGES | frozenset(
    {
        "$addFields", "$bucket", "$bucketAuto", "$changeStream", "$changeStreamSplitLargeEvent",
        "$collStats", "$count", "$currentOp", "$densify", "$documents", "$facet", "$fill",
        "$geoNear", "$graphLookup", "$group", "$indexStats", "$limit", "$listLocalSessions",
        "$listSampledQueries", "$listSearchIndexes", "$listSessions", "$lookup", "$merge",
        "$out", "$planCacheStats", "$sample", "$search", "$searchMeta", "$setWindowFields",
        "$skip", "$sort", "$sortByCount", "$unionWith", "$unwind", "$vectorSearch",
    }
)  # fmt: skip
_OPTIONS = frozenset(
    {
        "fullDocument",
        "fullDocumentBeforeChange",
        "resumeAfter",
        "startAfter",
        "startAtOperationTime",
        "showExpandedEvents",
        "allChangesForCluster",
        "allowToRunOnConfigDB",
        "showMigrationEvents",
        "showSystemEvents",
        "showRawUpdateDescription",
    }
)
_NON_RESUMABLE = ["NonResumableChangeStreamError"]
SPLIT_STAGE = "$changeStreamSplitLargeEvent"
SPLIT_BYTES = 16 * 1024 * 1024  # BSONObjMaxUserSize: larger events are split
_FRAGMENT_OVERHEAD = 512  # room for _id (the token) and splitEvent in each fragment
_KIND_START_AT = 0  # before every event stamped with that time: startAtOperationTime is inclusive
_EXPANDED_OPS = frozenset({"create", "createIndexes", "dropIndexes", "modify"})


@dataclass(frozen=True, slots=True)
class Target:
    """What a stream watches: one collection, one database, or the whole deployment."""

    db: str | None
    coll: str | None

    @property
    def ns(self) -> str:
        """The cursor namespace MongoDB reports for this stream."""
        if self.db is None:
            return "admin.$cmd.aggregate"
        if self.coll is None:
            return f"{self.db}.$cmd.aggregate"
        return f"{self.db}.{self.coll}"

    def covers(self, db: str, coll: str | None) -> bool:
        """The stream sees changes to ``db.coll``."""
        if self.coll is not None:
            return db == self.db and coll == self.coll
        if coll is not None and coll.startswith("system."):
            return False
        if self.db is None:
            return db not in SYSTEM_DATABASES
        return db == self.db


def _fatal(message: str) -> CommandError:
    return CommandError(280, message, labels=list(_NON_RESUMABLE))


class ChangeStream:
    """The state of one change-stream cursor.

    Args:
        oplog: The server's oplog.
        storage: Storage, for ``updateLookup``.
        target: What the stream watches.
        spec: The ``$changeStream`` stage's options.
        pipeline: The stages after ``$changeStream``.

    Raises:
        CommandError: For invalid options or resume points, with MongoDB's codes.
    """

    def __init__(
        self,
        oplog: Oplog,
        storage: Storage,
        target: Target,
        spec: Mapping[str, Any],
        pipeline: list[Any],
    ) -> None:
        self.oplog = oplog
        self.storage = storage
        self.target = target
        self.pipeline = pipeline
        self.closed = False
        unknown = set(spec) - _OPTIONS
        if unknown:
            raise CommandError(
                40415, f"BSON field '$changeStream.{sorted(unknown)[0]}' is an unknown field."
            )
        self.full_document = spec.get("fullDocument", "default")
        if self.full_document not in ("default", "updateLookup", "whenAvailable", "required"):
            raise CommandError(2, f"unknown fullDocument mode: {self.full_document!r}")
        self.before_change = spec.get("fullDocumentBeforeChange", "off")
        if self.before_change not in ("off", "whenAvailable", "required"):
            raise CommandError(2, f"unknown fullDocumentBeforeChange mode: {self.before_change!r}")
        self.expanded = bool(spec.get("showExpandedEvents", False))
        # $changeStreamSplitLargeEvent (7.0): cut events over 16 MiB into fragments.
        self.split = False
        self._resume_fragment: tuple[Position, int] | None = None
        if pipeline and isinstance(pipeline[-1], Mapping) and SPLIT_STAGE in pipeline[-1]:
            self.split = True
            self.pipeline = pipeline = pipeline[:-1]
        for stage in pipeline:
            if not isinstance(stage, Mapping) or len(stage) != 1:
                raise CommandError(
                    40323, "A pipeline stage specification object must contain exactly one field."
                )
            name = next(iter(stage))
            if name == "$changeStream":
                raise CommandError(
                    40602, "$changeStream is only valid as the first stage in a pipeline."
                )
            if name == SPLIT_STAGE:
                raise CommandError(7182802, f"{SPLIT_STAGE} must be the last stage in the pipeline")
            if name not in ALLOWED_STAGES:
                if name not in KNOWN_STAGES:
                    raise CommandError(40324, f"Unrecognized pipeline stage name: '{name}'")
                raise CommandError(20, f"{name} is not permitted in a $changeStream pipeline")
        self.position = self._start_position(spec)

    # -- where the stream starts -------------------------------------------------------

    def _start_position(self, spec: Mapping[str, Any]) -> Position:
        resume_after = spec.get("resumeAfter")
        start_after = spec.get("startAfter")
        start_at = spec.get("startAtOperationTime")
        if resume_after is not None and start_after is not None:
            raise CommandError(
                50865, "Only one type of resume option is allowed, but multiple were found."
            )
        token = resume_after if resume_after is not None else start_after
        if token is not None and start_at is not None:
            raise CommandError(
                40674, "Only one type of resume option is allowed, but multiple were found."
            )
        if token is not None:
            try:
                position, ident = decode_token(token)
            except TokenError as exc:
                raise CommandError(2, str(exc)) from exc
            if position.kind == KIND_INVALIDATE and resume_after is not None:
                raise CommandError(
                    260,
                    "Attempting to resume a change stream using 'resumeAfter' is "
                    "not allowed from an invalidate notification.",
                )
            self._check_retained(position)
            if position.kind != KIND_HIGH_WATER_MARK:
                entry = self.oplog.find(position.ts)
                if entry is None or (
                    ident is not None and ident.get("o") not in (entry.op, "invalidate")
                ):
                    raise _fatal(
                        "cannot resume stream; the resume token was not found. "
                        f'{{_data: "{token["_data"]}"}}'
                    )
            if ident is not None and isinstance(ident.get("f"), int):
                # A fragment's token: resume inside that event, after this fragment.
                self._resume_fragment = (position, ident["f"])
                return Position(position.time, position.inc, _KIND_START_AT)
            return position
        if start_at is not None:
            if not isinstance(start_at, Timestamp):
                raise CommandError(14, "startAtOperationTime must be a Timestamp")
            position = Position(start_at.time, start_at.inc, _KIND_START_AT)
            self._check_retained(position)
            return position
        last = self.oplog.last_ts
        return Position(last.time, last.inc, KIND_HIGH_WATER_MARK)

    def _check_retained(self, position: Position) -> None:
        trimmed = self.oplog.trimmed_through
        if trimmed is None:
            return
        here, cut = (position.time, position.inc), (trimmed.time, trimmed.inc)
        if here < cut or (here == cut and position.kind == _KIND_START_AT):
            raise CommandError(
                286,
                "Resume of change stream was not possible, as the resume point may no longer be "
                f"in the oplog (resume point {position.ts}, oldest retained after {trimmed}).",
                labels=list(_NON_RESUMABLE),
            )

    # -- batches ---------------------------------------------------------------------

    def next_batch(self, batch_size: int | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Return the next events (up to ``batch_size``) and the postBatchResumeToken.

        Sets :attr:`closed` after an invalidate event.
        """
        self._check_retained(self.position)
        limit = batch_size if batch_size and batch_size > 0 else 0
        out: list[dict[str, Any]] = []
        index = self.oplog.index_from(self.position)
        while True:
            entry = self.oplog.entry_at(index)
            if entry is None:
                break
            for position, make in self._events(entry):
                if position <= self.position:
                    continue
                event = make()
                self.position = position
                passed = self._apply_pipeline(event)
                if passed is not None and self.split:
                    out += self._fragments(position, passed)
                elif passed is not None:
                    out.append(passed)
                if position.kind == KIND_INVALIDATE:
                    self.closed = True
                    return out, dict(event["_id"])
                if limit and len(out) >= limit:
                    return out, dict(out[-1]["_id"])
            index += 1
        last = self.oplog.last_ts
        high_water = Position(last.time, last.inc, KIND_HIGH_WATER_MARK)
        if high_water > self.position:
            self.position = high_water
        return out, encode_token(self.position)

    def _apply_pipeline(self, event: dict[str, Any]) -> dict[str, Any] | None:
        if not self.pipeline:
            return event
        db = self.storage.client[self.target.db or "admin"]
        # The event embeds stored documents and oplog images (immutable, shared):
        # the engine's stages may change their input in place, so they get a copy.
        result = run_pipeline([copy.deepcopy(event)], self.pipeline, db)
        if not result:
            return None
        if result[0].get("_id") != event["_id"]:
            raise _fatal(
                "Encountered an event whose _id field, which contains the resume token, was "
                "modified by the pipeline. Modifying the _id field of an event makes it "
                "impossible to resume the stream from that point. Only transformations that "
                "retain the unmodified _id field are allowed."
            )
        return result[0]

    def _fragments(self, position: Position, event: dict[str, Any]) -> list[dict[str, Any]]:
        """``event``, or its fragments when it is over 16 MiB (mongod's split algorithm:
        top-level fields in order, as many per fragment as fit, each with ``_id`` and
        ``splitEvent``)."""
        if len(bson.encode(event, codec_options=CODEC_OPTIONS)) <= SPLIT_BYTES:
            return [event]
        fragments: list[dict[str, Any]] = [{}]
        size = _FRAGMENT_OVERHEAD
        for key, value in event.items():
            if key == "_id":
                continue
            field = len(bson.encode({key: value}, codec_options=CODEC_OPTIONS)) - 5
            if size + field > SPLIT_BYTES:
                if not fragments[-1]:
                    raise CommandError(
                        10334,
                        f"BSONObjectTooLarge: the '{key}' field of a change event is "
                        "over 16 MiB alone and cannot be split",
                    )
                fragments.append({})
                size = _FRAGMENT_OVERHEAD
            fragments[-1][key] = value
            size += field
        _, ident = decode_token(event["_id"])
        op = ident.get("o") if ident else None
        key_doc = ident.get("k") if ident else None
        out = [
            {
                "_id": encode_token(position, op, key_doc, fragment=n),
                "splitEvent": {"fragment": n, "of": len(fragments)},
                **fields,
            }
            for n, fields in enumerate(fragments, start=1)
        ]
        if self._resume_fragment is not None and self._resume_fragment[0] == position:
            out = out[self._resume_fragment[1] :]
            self._resume_fragment = None
        return out

    def _events(self, entry: Entry) -> list[tuple[Position, Callable[[], dict[str, Any]]]]:
        op, target = entry.op, self.target
        if op == "dropDatabase":
            if target.coll is not None or (target.db is not None and target.db != entry.db):
                return []
            events = [(entry.position, lambda: self._event(entry, ns={"db": entry.db}))]
            if target.db is not None:
                events.append(self._invalidate(entry))
            return events
        if not target.covers(entry.db, entry.coll) and not (
            op == "rename" and target.covers(entry.extra["to"]["db"], entry.extra["to"]["coll"])
        ):
            return []
        if op in _EXPANDED_OPS and not self.expanded:
            return []
        events = [(entry.position, lambda: self._event(entry))]
        if op in ("drop", "rename") and target.coll is not None:
            events.append(self._invalidate(entry))
        return events

    def _invalidate(self, entry: Entry) -> tuple[Position, Callable[[], dict[str, Any]]]:
        position = Position(entry.ts.time, entry.ts.inc, KIND_INVALIDATE)

        def make() -> dict[str, Any]:
            return {
                "_id": encode_token(position, "invalidate"),
                "operationType": "invalidate",
                "clusterTime": entry.ts,
                "wallTime": entry.wall,
            }

        return position, make

    def _event(self, entry: Entry, ns: dict[str, Any] | None = None) -> dict[str, Any]:
        op = entry.op
        event: dict[str, Any] = {
            "_id": encode_token(entry.position, op, entry.key),
            "operationType": op,
            "clusterTime": entry.ts,
            "wallTime": entry.wall,
        }
        if self.expanded and entry.uuid is not None:
            event["collectionUUID"] = Binary.from_uuid(entry.uuid)
        if op in ("insert", "replace"):
            event["fullDocument"] = entry.post
        elif op == "update" and self.full_document != "default":
            event["fullDocument"] = self._post_image(entry)
        event["ns"] = ns if ns is not None else {"db": entry.db, "coll": entry.coll}
        if entry.key is not None:
            event["documentKey"] = dict(entry.key)
        if op == "update":
            event["updateDescription"] = entry.description(disambiguate=self.expanded)
        elif op == "rename":
            event["to"] = dict(entry.extra["to"])
            if self.expanded:
                description: dict[str, Any] = {"to": dict(entry.extra["to"])}
                if entry.extra.get("dropTarget") is not None:
                    description["dropTarget"] = entry.extra["dropTarget"]
                event["operationDescription"] = description
        elif op in _EXPANDED_OPS:
            event["operationDescription"] = {
                k: v for k, v in entry.extra.items() if k in ("indexes", "options", "names")
            }
        if op in ("update", "replace", "delete") and self.before_change != "off":
            if entry.images and entry.pre is not None:
                event["fullDocumentBeforeChange"] = entry.pre
            elif self.before_change == "required":
                raise _fatal(
                    "Change stream was configured to require a pre-image for all update, delete "
                    "and replace events, but no pre-image is available for "
                    f"{entry.db}.{entry.coll} "
                    "(enable changeStreamPreAndPostImages on the collection)"
                )
            else:
                event["fullDocumentBeforeChange"] = None
        return event

    def _post_image(self, entry: Entry) -> dict[str, Any] | None:
        if self.full_document == "updateLookup":
            assert entry.coll is not None and entry.key is not None
            return self.storage.lookup(entry.db, entry.coll, entry.key)
        if entry.images:
            return entry.post
        if self.full_document == "required":
            raise _fatal(
                f"Change stream was configured to require a post-image for all update events, but "
                f"no post-image is available for {entry.db}.{entry.coll} "
                "(enable changeStreamPreAndPostImages on the collection)"
            )
        return None


__all__ = ["KIND_EVENT", "ChangeStream", "Target"]
