"""Plugin records: validation of raw documents from the functions collection.

A record is untrusted input. ``parse_record`` checks every field it knows, names the
record and the field in every error, and ignores fields it does not know so that newer
tools can add fields without breaking older hosts. A field that is absent or ``null``
takes its default.
"""

from __future__ import annotations

import hashlib
import json
import keyword
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType
from typing import Any, TypeGuard

from .config import DEFAULT_LIMITS
from .errors import RecordError

__all__ = (
    "MAX_NAME_LENGTH",
    "PluginRecord",
    "Rollout",
    "RolloutPolicy",
    "TriggerSpec",
    "describe_id",
    "is_valid_name",
    "parse_record",
    "parse_triggers",
)

MAX_NAME_LENGTH = 128
_NAME_RE = re.compile(rf"[A-Za-z0-9_.\-]{{1,{MAX_NAME_LENGTH}}}")
_EMPTY_META: Mapping[str, Any] = MappingProxyType({})


def is_valid_name(name: object) -> bool:
    """Tell whether ``name`` is usable as a plugin name.

    A name is 1-128 ASCII letters, digits, ``_``, ``.`` or ``-``, and is not made of dots
    only (``.`` and ``..`` would read as paths wherever names become file or URL parts).

    Args:
        name: The candidate, typically a document's ``_id``.

    Returns:
        ``True`` if the name is valid.
    """
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None and name.strip(".") != ""


def describe_id(value: object, limit: int = 80) -> str:
    """Name a document's ``_id`` exactly and briefly, for events and errors.

    A non-string ``_id`` keeps its type, so ``5``, ``"5"``, ``None`` and ``True`` never
    read alike: ``int 5``, ``'5'``, ``NoneType None``, ``bool True``,
    ``ObjectId ObjectId('...')``. Long values are cut to ``limit`` characters.

    Args:
        value: The ``_id``.
        limit: Longest representation kept.

    Returns:
        The description.
    """
    try:
        text = repr(value)
    except Exception as exc:  # a hostile __repr__ (not from BSON, but be safe)
        text = f"<unrepresentable: {type(exc).__name__}>"
    if len(text) > limit:
        text = f"{text[:limit]}...(+{len(text) - limit} chars)"
    return text if isinstance(value, str) else f"{type(value).__name__} {text}"


# json.dumps with options builds an encoder per call; this one is built once (same output).
_CANONICAL = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _content_hash(source: str, entrypoint: str) -> str:
    # Canonical encoding: a JSON array is unambiguous (no separator collisions between
    # source and entrypoint) and stable across Python versions.
    canonical = _CANONICAL([source, entrypoint])
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class PluginRecord:
    """One validated plugin record.

    Attributes:
        name: The plugin name (the document's ``_id``).
        source: Python source text of the plugin module.
        entrypoint: Name of the function called for each call.
        enabled: ``False`` means the plugin should be unloaded.
        revision: Publish counter set by our tools; orders versions.
        created_at: When the record was created, if known.
        updated_at: When the record was last updated, if known.
        timeout: Per-call timeout in seconds, if set.
        max_concurrency: Maximum concurrent calls of one version, if set.
        meta: Free-form metadata (a read-only shallow copy).
        signature: Ed25519 signature over the canonical record, if signed.
        rollout: The candidate running beside this version (issue 16), if any; not
            compared, so a weight change never reloads the stable version.
        rollout_error: Why the record's ``rollout`` was refused (the stable version
            still serves); not compared.
        triggers: Change-stream triggers the version declares (see :class:`TriggerSpec`).
    """

    name: str
    source: str
    entrypoint: str = "main"
    enabled: bool = True
    revision: int | None = None
    created_at: datetime | None = None
    # Not compared: a change to ``updatedAt`` alone is not a new version (no reload).
    updated_at: datetime | None = field(default=None, compare=False)
    timeout: float | None = None
    max_concurrency: int | None = None
    meta: Mapping[str, Any] = field(default_factory=lambda: _EMPTY_META, hash=False)
    signature: str | None = None
    rollout: Rollout | None = field(default=None, compare=False, hash=False, repr=False)
    rollout_error: RecordError | None = field(default=None, compare=False, hash=False, repr=False)
    triggers: tuple[TriggerSpec, ...] = field(default=(), hash=False)
    # Derived once: versions are read in logs, errors and module names.
    _hash: str = field(init=False, repr=False, compare=False, hash=False)
    _version: str = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        digest = _content_hash(self.source, self.entrypoint)
        if self.revision is None:
            version = f"{self.name}:{digest}"
        else:
            version = f"{self.name}@r{self.revision}:{digest}"
        object.__setattr__(self, "_hash", digest)
        object.__setattr__(self, "_version", version)

    @property
    def content_hash(self) -> str:
        """First 8 hex digits of the SHA-256 of (source, entrypoint)."""
        return self._hash

    @property
    def version(self) -> str:
        """Display version: ``greet@r7:3f9a1c2e``, or ``greet:3f9a1c2e`` without revision."""
        return self._version


ROLLOUT_MODES = ("canary", "shadow")


@dataclass(frozen=True, slots=True)
class RolloutPolicy:
    """When a host aborts a candidate on its own (issue 16).

    Attributes:
        max_error_rate: Abort when the candidate's error rate over the window is above
            this (0..1) and above the stable version's; None: never on errors.
        min_calls: Judge only once the candidate served this many calls in the window.
        max_p99_ms: Abort when the candidate's p99 latency over the window is above
            this many milliseconds; None: never on latency.
        window_s: Length of the sliding window of the statistics, in seconds.
    """

    max_error_rate: float | None = None
    min_calls: int = 20
    max_p99_ms: float | None = None
    window_s: float = 60.0

    def __post_init__(self) -> None:
        for name, value, low, high in (
            ("max_error_rate", self.max_error_rate, 0.0, 1.0),
            ("max_p99_ms", self.max_p99_ms, 0.0, math.inf),
        ):
            if value is None:
                continue
            if not _is_number(value) or not (low <= value <= high) or math.isnan(value):
                raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
        if not _is_int(self.min_calls) or self.min_calls < 1:
            raise ValueError(f"min_calls must be an integer >= 1, got {self.min_calls!r}")
        if not _is_number(self.window_s) or not (1.0 <= self.window_s <= 3600.0):
            raise ValueError(
                f"window_s must be a number of seconds in [1, 3600], got {self.window_s!r}"
            )

    def as_document(self) -> dict[str, Any]:
        """The form stored in ``rollout.policy``."""
        return {
            "max_error_rate": self.max_error_rate,
            "min_calls": self.min_calls,
            "max_p99_ms": self.max_p99_ms,
            "window_s": self.window_s,
        }


@dataclass(frozen=True, slots=True)
class Rollout:
    """A record's ``rollout``: a candidate version and how calls reach it.

    Attributes:
        candidate: The candidate as a record of its own: the stable record's fields with
            the candidate's source, entrypoint, revision and signature.
        mode: ``canary`` (serves ``weight`` percent of calls) or ``shadow`` (serves no
            one; ``weight`` percent of calls are mirrored to it).
        weight: Percent, 0 to 100.
        sticky_key: The args field whose value routes a call (``X-Plugin-Key`` wins).
        policy: When a host aborts the candidate.
        started_at: When the rollout started, if recorded.
    """

    candidate: PluginRecord
    mode: str
    weight: float
    sticky_key: str | None
    policy: RolloutPolicy
    started_at: datetime | None = None

    @property
    def revision(self) -> int:
        """The candidate's revision."""
        assert self.candidate.revision is not None  # parse_rollout requires it
        return self.candidate.revision


def _type_name(value: object) -> str:
    return type(value).__name__


def _is_int(value: object) -> bool:
    # bool is an int subclass in Python but never a sensible count or revision.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, float)


def parse_record(
    doc: Mapping[str, Any], *, max_source_bytes: int = DEFAULT_LIMITS.max_source_bytes
) -> PluginRecord:
    """Validate a raw document from the functions collection.

    Documents shaped like the original hot-require blog post, ``{_id, fn, createdAt}``,
    load as they are: ``fn`` is an alias of ``source``.

    Args:
        doc: The raw MongoDB document.
        max_source_bytes: Upper bound on the UTF-8 size of the source.

    Returns:
        The validated record.

    Raises:
        RecordError: If any known field is missing or invalid; the error names the
            record (when its ``_id`` is usable) and the field.
    """
    if not isinstance(doc, Mapping):
        raise RecordError(None, "_id", f"document must be a mapping, got {_type_name(doc)}")

    raw_name = doc.get("_id")
    if raw_name is None:
        raise RecordError(None, "_id", "is required (it is the plugin name)")
    if not isinstance(raw_name, str):
        raise RecordError(
            None, "_id", f"must be a string, got {describe_id(raw_name)} (it is the plugin name)"
        )
    if not is_valid_name(raw_name):
        raise RecordError(
            None,
            "_id",
            f"invalid plugin name {raw_name[: MAX_NAME_LENGTH + 8]!r}: use 1-{MAX_NAME_LENGTH} "
            "letters, digits, '_', '.' or '-', not only dots",
        )
    name = raw_name

    def fail(field_name: str, reason: str) -> RecordError:
        return RecordError(name, field_name, reason)

    source = _parse_source(doc, fail, max_source_bytes)

    entrypoint = _parse_entrypoint(doc.get("entrypoint"), fail)

    enabled = doc.get("enabled")
    if enabled is None:
        enabled = True
    elif not isinstance(enabled, bool):
        raise fail("enabled", f"must be a boolean, got {_type_name(enabled)}")

    revision = doc.get("revision")
    if revision is not None:
        if not _is_int(revision):
            raise fail("revision", f"must be an integer, got {_type_name(revision)}")
        if revision < 0:
            raise fail("revision", f"must be >= 0, got {revision}")

    timeout = doc.get("timeout")
    if timeout is not None:
        if not (_is_int(timeout) or isinstance(timeout, float)):
            raise fail("timeout", f"must be a number of seconds, got {_type_name(timeout)}")
        if not math.isfinite(timeout) or timeout <= 0:
            raise fail("timeout", f"must be a positive finite number, got {timeout!r}")
        timeout = float(timeout)

    max_concurrency = doc.get("max_concurrency")
    if max_concurrency is not None:
        if not _is_int(max_concurrency):
            raise fail("max_concurrency", f"must be an integer, got {_type_name(max_concurrency)}")
        if max_concurrency < 1:
            raise fail("max_concurrency", f"must be >= 1, got {max_concurrency}")

    created_at = doc.get("createdAt")
    if created_at is not None and not isinstance(created_at, datetime):
        raise fail("createdAt", f"must be a date, got {_type_name(created_at)}")
    updated_at = doc.get("updatedAt")
    if updated_at is not None and not isinstance(updated_at, datetime):
        raise fail("updatedAt", f"must be a date, got {_type_name(updated_at)}")

    meta = doc.get("meta")
    if meta is None:
        meta = _EMPTY_META
    elif not isinstance(meta, Mapping):
        raise fail("meta", f"must be a document, got {_type_name(meta)}")
    else:
        meta = MappingProxyType(dict(meta))

    signature = doc.get("signature")
    if signature is not None and not isinstance(signature, str):
        raise fail("signature", f"must be a string, got {_type_name(signature)}")

    triggers = parse_triggers(name, doc.get("triggers"))

    record = PluginRecord(
        name=name,
        source=source,
        entrypoint=entrypoint,
        enabled=enabled,
        revision=revision,
        created_at=created_at,
        updated_at=updated_at,
        timeout=timeout,
        max_concurrency=max_concurrency,
        meta=meta,
        signature=signature,
        triggers=triggers,
    )
    raw_rollout = doc.get("rollout")
    if raw_rollout is None:
        return record
    # An invalid rollout refuses only the candidate: the stable version still serves.
    try:
        rollout = _parse_rollout(record, raw_rollout, max_source_bytes)
    except RecordError as exc:
        return replace(record, rollout_error=exc)
    return replace(record, rollout=rollout)


def _parse_rollout(stable: PluginRecord, raw: object, max_source_bytes: int) -> Rollout:
    """Validate ``rollout``; every error names the field (``rollout.weight``...)."""
    name = stable.name

    def fail(field_name: str, reason: str) -> RecordError:
        return RecordError(name, f"rollout.{field_name}" if field_name else "rollout", reason)

    if not isinstance(raw, Mapping):
        raise fail("", f"must be a document, got {_type_name(raw)}")
    revision = raw.get("revision")
    if revision is None:
        raise fail("revision", "is required (the candidate's revision)")
    if not _is_int(revision):
        raise fail("revision", f"must be an integer, got {_type_name(revision)}")
    if stable.revision is not None and revision <= stable.revision:
        raise fail(
            "revision",
            f"must be above the stable revision {stable.revision}, got {revision}",
        )
    if revision < 0:
        raise fail("revision", f"must be >= 0, got {revision}")
    if raw.get("source") is None:
        raise fail("source", "is required (the candidate's source)")
    source = _parse_source(
        {"source": raw.get("source")},
        lambda _f, reason: fail("source", reason),
        max_source_bytes,
    )
    entrypoint = _parse_entrypoint(raw.get("entrypoint"), fail)
    signature = raw.get("signature")
    if signature is not None and not isinstance(signature, str):
        raise fail("signature", f"must be a string, got {_type_name(signature)}")
    mode = raw.get("mode")
    if mode not in ROLLOUT_MODES:
        raise fail("mode", f"must be 'canary' or 'shadow', got {mode!r}")
    weight = raw.get("weight")
    if not _is_number(weight) or not (0.0 <= weight <= 100.0) or math.isnan(weight):
        raise fail("weight", f"must be a percentage from 0 to 100, got {weight!r}")
    sticky_key = raw.get("sticky_key")
    if sticky_key is not None and (not isinstance(sticky_key, str) or not sticky_key):
        raise fail("sticky_key", f"must be a non-empty string, got {sticky_key!r}")
    started_at = raw.get("started_at")
    if started_at is not None and not isinstance(started_at, datetime):
        raise fail("started_at", f"must be a date, got {_type_name(started_at)}")
    policy = _parse_policy(raw.get("policy"), fail)
    candidate = replace(
        stable,
        source=source,
        entrypoint=entrypoint,
        revision=revision,
        signature=signature,
        rollout=None,
        rollout_error=None,
    )
    return Rollout(candidate, mode, float(weight), sticky_key, policy, started_at)


def _parse_policy(raw: object, fail: Callable[[str, str], RecordError]) -> RolloutPolicy:
    if raw is None:
        return RolloutPolicy()
    if not isinstance(raw, Mapping):
        raise fail("policy", f"must be a document, got {_type_name(raw)}")
    values: dict[str, Any] = {}
    for key in ("max_error_rate", "min_calls", "max_p99_ms", "window_s"):
        value = raw.get(key)
        if value is None:
            continue
        if key == "min_calls" and not _is_int(value):
            raise fail(f"policy.{key}", f"must be an integer, got {_type_name(value)}")
        if not _is_number(value):
            raise fail(f"policy.{key}", f"must be a number, got {_type_name(value)}")
        values[key] = value if key == "min_calls" else float(value)
    try:
        return RolloutPolicy(**values)
    except ValueError as exc:
        field_name = str(exc).partition(" ")[0]
        raise fail(f"policy.{field_name}", str(exc).partition(" ")[2]) from None


def _parse_entrypoint(entrypoint: object, fail: Callable[[str, str], RecordError]) -> str:
    if entrypoint is None:
        return "main"
    if not isinstance(entrypoint, str):
        raise fail("entrypoint", f"must be a string, got {_type_name(entrypoint)}")
    if not entrypoint.isidentifier() or keyword.iskeyword(entrypoint):
        raise fail("entrypoint", f"must be a Python identifier, got {entrypoint!r}")
    return entrypoint


def _parse_source(
    doc: Mapping[str, Any],
    fail: Callable[[str, str], RecordError],
    max_source_bytes: int,
) -> str:
    source = doc.get("source")
    alias = doc.get("fn")
    field_name = "source"
    if source is None:
        if alias is None:
            raise fail("source", "is required (or its alias 'fn')")
        source, field_name = alias, "fn"
    elif alias is not None and alias != source:
        raise fail("fn", "conflicts with 'source': give one of them, or the same text in both")

    if isinstance(source, bytes | bytearray | memoryview):  # bson.Binary is a bytes
        raise fail(field_name, "must be text, got binary")
    if not isinstance(source, str):
        raise fail(field_name, f"must be a string, got {_type_name(source)}")
    if not source.strip():
        raise fail(field_name, "must not be empty")
    if "\x00" in source:
        raise fail(field_name, "must not contain NUL characters")
    try:
        size = len(source.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise fail(field_name, f"is not valid Unicode text ({exc.reason})") from None
    if size > max_source_bytes:
        raise fail(
            field_name,
            f"is {size} bytes of UTF-8, larger than the limit of {max_source_bytes} bytes",
        )
    return source


# -- triggers (issue 17) -----------------------------------------------------------------

TRIGGER_OPERATIONS = ("insert", "update", "replace", "delete")
TRIGGER_FULL_DOCUMENT = ("default", "updateLookup", "whenAvailable", "required")
TRIGGER_ORDERINGS = ("per_key", "total", "none")
TRIGGER_HISTORY_POLICIES = ("resume_from_now", "fail", "rescan")
MAX_TRIGGERS = 100
"""Most triggers one record may declare."""
MAX_TRIGGER_CONCURRENCY = 10_000
MAX_TRIGGER_ATTEMPTS = 1_000
# Collections the host itself writes beside the functions collection: a trigger on one of
# them would feed on the host's own bookkeeping (the state write of each batch, say).
_HOST_SUFFIXES = ("_triggers", "_deadletters", "_hosts")
_TRIGGER_FIELDS = frozenset(
    {
        "name",
        "collection",
        "operations",
        "match",
        "project",
        "full_document",
        "entrypoint",
        "ordered",
        "max_concurrency",
        "max_attempts",
        "on_history_lost",
        "start_at",
    }
)


@dataclass(frozen=True, slots=True)
class TriggerSpec:
    """One change-stream trigger declared by a record (``triggers: [...]``).

    Attributes:
        name: Unique within the record (default: the collection); the trigger id is
            ``"<plugin>/<name>"``.
        collection: The watched collection, in the functions collection's database.
        operations: Operation types delivered (a subset of insert/update/replace/delete).
        match: Extra ``$match`` stage on the change events, if any.
        project: ``$project`` stage on the change events, if any.
        full_document: The change stream's ``fullDocument`` option.
        entrypoint: The module-level function called per event (``on_change``).
        ordered: ``per_key`` (one document key at a time, in commit order), ``total``
            (one event at a time) or ``none``.
        max_concurrency: Events handled at once (1 for ``total``).
        max_attempts: Attempts before an event is dead-lettered.
        on_history_lost: ``resume_from_now``, ``fail`` or ``rescan``.
        start_at: Where a trigger without a checkpoint starts (None: from now).
    """

    name: str
    collection: str
    operations: tuple[str, ...] = TRIGGER_OPERATIONS
    match: Mapping[str, Any] | None = field(default=None, hash=False)
    project: Mapping[str, Any] | None = field(default=None, hash=False)
    full_document: str = "default"
    entrypoint: str = "on_change"
    ordered: str = "per_key"
    max_concurrency: int = 64
    max_attempts: int = 5
    on_history_lost: str = "resume_from_now"
    start_at: datetime | None = None

    def as_document(self) -> dict[str, Any]:
        """Every field with its effective value (the form that is signed and stored)."""
        return {
            "name": self.name,
            "collection": self.collection,
            "operations": list(self.operations),
            "match": None if self.match is None else dict(self.match),
            "project": None if self.project is None else dict(self.project),
            "full_document": self.full_document,
            "entrypoint": self.entrypoint,
            "ordered": self.ordered,
            "max_concurrency": self.max_concurrency,
            "max_attempts": self.max_attempts,
            "on_history_lost": self.on_history_lost,
            "start_at": self.start_at,
        }


def _valid_collection(value: str) -> str | None:
    """Why ``value`` is not a usable collection name for a trigger, or None."""
    if not value or len(value) > 255:
        return "must be 1 to 255 characters"
    if "\x00" in value or "$" in value:
        return "must not contain '$' or NUL"
    if value.startswith(".") or value.endswith(".") or value.startswith("system."):
        return "must not start or end with '.' nor start with 'system.'"
    if value.endswith(_HOST_SUFFIXES):
        return (
            f"{value!r} ends with {', '.join(_HOST_SUFFIXES)}: the host writes those "
            "collections itself (a trigger on them would feed on its own bookkeeping)"
        )
    return None


def _choice(
    spec: Mapping[str, Any], key: str, choices: tuple[str, ...], fail: Callable[[str, str], Any]
) -> str:
    value = spec.get(key)
    if value is None:
        return choices[0]
    if not isinstance(value, str) or value not in choices:
        raise fail(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _bounded_int(
    spec: Mapping[str, Any], key: str, default: int, top: int, fail: Callable[[str, str], Any]
) -> int:
    value = spec.get(key)
    if value is None:
        return default
    if not _is_int(value):
        raise fail(key, f"must be an integer, got {_type_name(value)}")
    if not 1 <= value <= top:
        raise fail(key, f"must be 1 to {top}, got {value}")
    return int(value)


def _parse_trigger(name: str, index: int, spec: object) -> TriggerSpec:
    def fail(key: str, reason: str) -> RecordError:
        return RecordError(
            name, f"triggers[{index}].{key}" if key else f"triggers[{index}]", reason
        )

    if not isinstance(spec, Mapping):
        raise fail("", f"must be a document, got {_type_name(spec)}")
    unknown = sorted(str(k) for k in spec if k not in _TRIGGER_FIELDS)
    if unknown:  # unlike record fields: a misspelt option would silently change delivery
        raise fail(
            unknown[0], f"is not a trigger option (known: {', '.join(sorted(_TRIGGER_FIELDS))})"
        )
    collection = spec.get("collection")
    if not isinstance(collection, str):
        raise fail("collection", f"is required and must be a string, got {_type_name(collection)}")
    problem = _valid_collection(collection)
    if problem is not None:
        raise fail("collection", problem)
    trigger_name = spec.get("name")
    if trigger_name is None:
        trigger_name = collection
    elif not isinstance(trigger_name, str) or not is_valid_name(trigger_name):
        raise fail(
            "name",
            f"must be 1-{MAX_NAME_LENGTH} letters, digits, '_', '.' or '-', got {trigger_name!r}",
        )
    if not is_valid_name(trigger_name):
        raise fail("name", f"defaults to the collection {collection!r}, not a valid name: set one")
    operations: tuple[str, ...] = TRIGGER_OPERATIONS
    raw_ops = spec.get("operations")
    if raw_ops is not None:
        if not isinstance(raw_ops, list | tuple) or not raw_ops:
            raise fail("operations", "must be a non-empty list of operation types")
        for op in raw_ops:
            if op not in TRIGGER_OPERATIONS:
                raise fail(
                    "operations", f"unknown operation {op!r} (use {', '.join(TRIGGER_OPERATIONS)})"
                )
        operations = tuple(op for op in TRIGGER_OPERATIONS if op in raw_ops)
    stages: dict[str, Mapping[str, Any] | None] = {}
    for key in ("match", "project"):
        value = spec.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise fail(key, f"must be a document, got {_type_name(value)}")
        stages[key] = None if value is None else MappingProxyType(dict(value))
    entrypoint = spec.get("entrypoint")
    if entrypoint is None:
        entrypoint = "on_change"
    elif (
        not isinstance(entrypoint, str)
        or not entrypoint.isidentifier()
        or keyword.iskeyword(entrypoint)
    ):
        raise fail("entrypoint", f"must be a Python identifier, got {entrypoint!r}")
    ordered = _choice(spec, "ordered", TRIGGER_ORDERINGS, fail)
    start_at = spec.get("start_at")
    if start_at is not None and not isinstance(start_at, datetime):
        raise fail("start_at", f"must be a date, got {_type_name(start_at)}")
    return TriggerSpec(
        name=trigger_name,
        collection=collection,
        operations=operations,
        match=stages["match"],
        project=stages["project"],
        full_document=_choice(spec, "full_document", TRIGGER_FULL_DOCUMENT, fail),
        entrypoint=entrypoint,
        ordered=ordered,
        max_concurrency=_bounded_int(spec, "max_concurrency", 64, MAX_TRIGGER_CONCURRENCY, fail),
        max_attempts=_bounded_int(spec, "max_attempts", 5, MAX_TRIGGER_ATTEMPTS, fail),
        on_history_lost=_choice(spec, "on_history_lost", TRIGGER_HISTORY_POLICIES, fail),
        start_at=start_at,
    )


def parse_triggers(name: str, raw: object) -> tuple[TriggerSpec, ...]:
    """Validate a record's ``triggers`` field.

    Args:
        name: The plugin name (for errors).
        raw: The field's value; ``None`` (absent) means no trigger.

    Returns:
        The triggers, in declaration order.

    Raises:
        RecordError: The field, or one trigger's option (``triggers[i].option``), is invalid.
    """
    if raw is None:
        return ()
    if not isinstance(raw, list | tuple):
        raise RecordError(name, "triggers", f"must be a list of documents, got {_type_name(raw)}")
    if len(raw) > MAX_TRIGGERS:
        raise RecordError(name, "triggers", f"has {len(raw)} triggers, more than {MAX_TRIGGERS}")
    specs = tuple(_parse_trigger(name, i, spec) for i, spec in enumerate(raw))
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        if spec.name in seen:
            raise RecordError(
                name,
                f"triggers[{i}].name",
                f"{spec.name!r} is declared twice (names must be unique)",
            )
        seen.add(spec.name)
    return specs
