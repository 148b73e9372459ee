"""Publishing plugins into a functions collection: push, rollback, enable/disable, delete.

These coroutines are what the CLI (``plugin-host push``, ``rollback``...), ``plugin-host
dev``'s folder sync and the tests share, so a file saved in dev mode travels exactly the
path a production publish does: record write → change stream → compile → swap.

Revisions only go up. Each publish writes ``revision = max(current, history) + 1`` with a
compare-and-set on the record's previous revision (no lost update when two publishers
race; the loser retries), then appends ``{name, revision, source, entrypoint,
publishedAt}`` to the history collection (``<collection>_history``). A rollback publishes
an old revision's source as a new, higher revision, so every host converges on it through
the change stream like on any other publish.
"""

from __future__ import annotations

import ast
import contextlib
import keyword
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from pymongo import ASCENDING, DESCENDING
from pymongo.errors import DuplicateKeyError

from .errors import PluginHostError, RecordError
from .records import ROLLOUT_MODES, RolloutPolicy, TriggerSpec, is_valid_name, parse_triggers
from .rollout_record import NoRollout, RolloutRunning, abort_rollout, ended

if TYPE_CHECKING:
    from .fleetview import Convergence, Progress

__all__ = (
    "NoRollout",
    "PublishError",
    "Published",
    "RolloutPolicy",
    "RolloutRunning",
    "Signer",
    "UnknownPlugin",
    "UnknownRevision",
    "abort_rollout",
    "declared_triggers",
    "delete",
    "get_record",
    "history",
    "history_collection_name",
    "list_records",
    "plugin_files",
    "plugin_name",
    "promote",
    "publish",
    "publish_dir",
    "publish_file",
    "read_source",
    "rollback",
    "set_enabled",
    "set_rollout_weight",
    "start_rollout",
    "wait_converged",
)

_MAX_ATTEMPTS = 20

Signer = Callable[..., str]
"""``sign(name, source, entrypoint, revision[, triggers]) -> signature field`` (see
:func:`host.trust.sign_record`, which is one with its key bound).

``triggers`` (the record's parsed :class:`~host.records.TriggerSpec` tuple) is passed only
when the record declares triggers, so a four-argument signer still signs the others.

:func:`publish` calls it for every revision it tries inside its compare-and-set loop, so
the signature always covers the revision actually written. It must not block: an Ed25519
signature takes microseconds; load the key beforehand (in a worker thread).
"""


class PublishError(PluginHostError, ValueError):
    """A plugin cannot be published as given (bad name, empty source, syntax error...)."""


class UnknownPlugin(PluginHostError, LookupError):
    """No record with this name exists in the functions collection.

    Attributes:
        name: The name that was looked up.
    """

    def __init__(self, name: str) -> None:
        super().__init__(f"no plugin named {name!r} in the functions collection")
        self.name = name


class UnknownRevision(PluginHostError, LookupError):
    """The history holds no such revision of the plugin.

    Attributes:
        name: The plugin name.
        revision: The revision asked for (None: "the previous one").
        available: The revisions the history does hold, newest first.
    """

    def __init__(self, name: str, revision: int | None, available: list[int]) -> None:
        what = f"revision {revision}" if revision is not None else "previous revision"
        have = ", ".join(map(str, available)) if available else "none"
        super().__init__(f"plugin {name!r} has no {what} in its history (have: {have})")
        self.name = name
        self.revision = revision
        self.available = available


@dataclass(frozen=True, slots=True)
class Published:
    """The outcome of one publish.

    Attributes:
        name: The plugin name.
        revision: The record's revision after the publish.
        changed: False when the source and entrypoint were already current (nothing written).
        created: True when the record did not exist before.
    """

    name: str
    revision: int
    changed: bool
    created: bool = False


def history_collection_name(collection: str) -> str:
    """The history collection paired with ``collection`` (``functions`` → ``functions_history``)."""
    return f"{collection}_history"


def _check(name: str, source: str, entrypoint: str | None, check_syntax: bool) -> None:
    if not is_valid_name(name):
        raise PublishError(
            f"invalid plugin name {name!r}: use 1-128 letters, digits, '_', '.' or '-'"
        )
    if not source.strip():
        raise PublishError(f"plugin {name!r}: the source is empty")
    if entrypoint is not None and (not entrypoint.isidentifier() or keyword.iskeyword(entrypoint)):
        raise PublishError(f"plugin {name!r}: entrypoint {entrypoint!r} is not a Python identifier")
    if check_syntax:
        try:
            compile(source, f"<plugin {name}>", "exec", dont_inherit=True)
        except SyntaxError as exc:
            raise PublishError(
                f"plugin {name!r}: syntax error on line {exc.lineno}: {exc.msg}"
            ) from None
        except ValueError as exc:  # e.g. NUL bytes in the source
            raise PublishError(f"plugin {name!r}: {exc}") from None


async def _last_history_revision(hist: Any, name: str) -> int:
    last = await hist.find_one({"name": name}, sort=[("revision", DESCENDING)])
    revision = last.get("revision") if last else None
    return revision if isinstance(revision, int) else 0


async def _add_history(
    hist: Any, name: str, revision: int, source: str, entrypoint: str, at: datetime, **extra: Any
) -> None:
    """Append a revision to the history (after the record's compare-and-set won)."""
    # A duplicate only happens after a crash between the two writes: the entry is there.
    with contextlib.suppress(DuplicateKeyError):
        await hist.insert_one(
            {
                "name": name,
                "revision": revision,
                "source": source,
                "entrypoint": entrypoint,
                "publishedAt": at,
                **extra,
            }
        )


def _trigger_list(raw: Any) -> list[dict[str, Any]]:
    """Triggers as the history stores them: a list of plain documents (``[]``: none)."""
    if not isinstance(raw, list | tuple):
        return []
    return [dict(t) for t in raw if isinstance(t, Mapping)]


def _rollout_of(record: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The record's running rollout (a mapping with an int ``revision``), or None."""
    rollout = (record or {}).get("rollout")
    if isinstance(rollout, Mapping) and isinstance(rollout.get("revision"), int):
        return rollout
    return None


def _rollout_filter(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """The compare-and-set clause pinning the record's rollout as read (``None``: absent too)."""
    raw = (record or {}).get("rollout")
    if raw is None:
        return {"rollout": None}
    rollout = _rollout_of(record)
    # A malformed sub-document (hosts refuse its candidate) is pinned by its whole value.
    return {"rollout": raw} if rollout is None else {"rollout.revision": rollout["revision"]}


async def _next_revision(hist: Any, name: str, record: Mapping[str, Any] | None) -> int:
    """One above the record's revision, its candidate's and its history's."""
    revision = (record or {}).get("revision")
    rollout = _rollout_of(record)
    return 1 + max(
        revision if isinstance(revision, int) else 0,
        rollout["revision"] if rollout is not None else 0,
        await _last_history_revision(hist, name),
    )


def _trigger_specs(name: str, raw: Any) -> tuple[TriggerSpec, ...]:
    if not raw:
        return ()
    try:
        return parse_triggers(name, list(raw))
    except RecordError as exc:
        raise PublishError(str(exc)) from None


def _signed(
    sign: Signer,
    name: str,
    source: str,
    entrypoint: str,
    revision: int,
    triggers: tuple[TriggerSpec, ...],
) -> str:
    if triggers:
        return sign(name, source, entrypoint, revision, triggers)
    return sign(name, source, entrypoint, revision)


async def publish(
    db: Any,
    name: str,
    source: str,
    *,
    entrypoint: str | None = None,
    collection: str = "functions",
    force: bool = False,
    check_syntax: bool = True,
    sign: Signer | None = None,
    triggers: Sequence[Mapping[str, Any]] | None = None,
) -> Published:
    """Insert or update plugin ``name`` with a new, higher revision.

    Args:
        db: A PyMongo ``AsyncDatabase`` (or a Motor database).
        name: The plugin name (the record's ``_id``).
        source: The plugin's Python source.
        entrypoint: The entrypoint; None keeps the record's (default ``main``).
        collection: The functions collection.
        force: Publish a new revision even if source and entrypoint are unchanged.
        check_syntax: Refuse source that does not compile (the host would refuse it too,
            and keep the previous version serving).
        sign: Sign the record: called with ``(name, source, entrypoint, revision)``
            (plus the parsed triggers when the record has some) for each revision
            tried; the result is written as ``signature`` in the same write as the
            source and revision. An unchanged record is still republished when it is
            unsigned or signed by another key.
        triggers: The record's change-stream triggers, written in the same write as the
            revision (``[]`` removes them); None keeps the record's.

    Returns:
        What was published.

    Raises:
        PublishError: The name, source, entrypoint or triggers are invalid.
    """
    _check(name, source, entrypoint, check_syntax)
    # Bad triggers are refused here rather than by every host (which keeps the old version).
    given = _trigger_specs(name, triggers)
    coll = db[collection]
    hist = db[history_collection_name(collection)]
    await hist.create_index([("name", ASCENDING), ("revision", DESCENDING)], unique=True)
    for _ in range(_MAX_ATTEMPTS):
        current: Mapping[str, Any] | None = await coll.find_one({"_id": name})
        current_rev = current.get("revision") if current else None
        effective_entry = entrypoint or (current or {}).get("entrypoint") or "main"
        rollout = _rollout_of(current)
        # The signature covers the triggers the record will carry: the new ones, or the
        # record's own when ``triggers`` is None (they are kept).
        specs = (
            given if triggers is not None else _trigger_specs(name, (current or {}).get("triggers"))
        )
        if (
            current is not None
            and not force
            and rollout is None  # with a rollout running, a publish always ends it
            and (current.get("source") or current.get("fn")) == source
            and (current.get("entrypoint") or "main") == effective_entry
            and isinstance(current_rev, int)
            and (triggers is None or list(current.get("triggers") or []) == list(triggers))
            # Ed25519 is deterministic: the same key signs the same content identically,
            # so an unsigned record or one signed by another key is not "unchanged".
            and (
                sign is None
                or current.get("signature")
                == _signed(sign, name, source, effective_entry, current_rev, specs)
            )
        ):
            return Published(name, current_rev, changed=False)
        revision = await _next_revision(hist, name, current)
        now = datetime.now(UTC)
        fields: dict[str, Any] = {"source": source, "revision": revision, "updatedAt": now}
        if rollout is not None:  # the new revision is stable: end the rollout in this write
            reason = f"superseded by r{revision}, published while it ran"
            fields["last_rollout"] = ended(name, rollout, "superseded", reason, "publish", at=now)
        if entrypoint is not None:
            fields["entrypoint"] = entrypoint
        unset: dict[str, Any] = {}
        if triggers:
            fields["triggers"] = [dict(t) for t in triggers]
        elif triggers is not None and current is not None and "triggers" in current:
            unset["triggers"] = ""
        if sign is not None:
            # Pin the signed entrypoint in the same write, so what is stored is what was signed.
            fields["entrypoint"] = effective_entry
            fields["signature"] = _signed(sign, name, source, effective_entry, revision, specs)
        elif current is not None and "signature" in current:
            unset["signature"] = ""  # a stale signature would not match the new content
        if current is None:
            try:
                await coll.insert_one({"_id": name, **fields, "createdAt": now})
            except DuplicateKeyError:
                continue  # someone else created it first: publish on top of theirs
        else:
            update: dict[str, Any] = {"$set": fields}
            if "fn" in current:  # a blog-shaped record: 'source' replaces its 'fn'
                unset["fn"] = ""
            if "rollout" in current:
                unset["rollout"] = ""
            if unset:
                update["$unset"] = unset
            # Pin the rollout read too: a concurrent start, promote or abort makes this retry,
            # so exactly one outcome is recorded for a rollout.
            result = await coll.update_one(
                {"_id": name, "revision": current_rev, **_rollout_filter(current)}, update
            )
            if result.matched_count == 0:
                continue  # a concurrent publish won the compare-and-set: try again on top
        # The history keeps the triggers the revision carries, so a rollback restores them.
        kept = triggers if triggers is not None else (current or {}).get("triggers")
        await _add_history(
            hist, name, revision, source, effective_entry, now, triggers=_trigger_list(kept)
        )
        return Published(name, revision, changed=True, created=current is None)
    raise PublishError(  # pragma: no cover - needs 20 lost races in a row
        f"plugin {name!r}: gave up after {_MAX_ATTEMPTS} concurrent publishes won the race"
    )


def declared_triggers(source: str, name: str = "plugin") -> list[dict[str, Any]]:
    """The triggers a plugin file declares in a top-level ``TRIGGERS = [...]`` literal.

    A file publishes its triggers with its source (``push``, ``push --dir``, dev mode), so
    the file stays the one place a plugin is defined.

    Args:
        source: The plugin source (already known to compile).
        name: The plugin, for the error message.

    Returns:
        The declared triggers (``[]`` when the file declares none).

    Raises:
        PublishError: ``TRIGGERS`` is not a literal list of dicts.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []  # publish reports the syntax error itself
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "TRIGGERS" for t in node.targets
        ):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                value = None
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise PublishError(
                    f"plugin {name!r}: TRIGGERS (line {node.lineno}) must be a literal list of "
                    "dicts, e.g. TRIGGERS = [{'collection': 'orders'}]"
                )
            return value
    return []


def plugin_files(directory: str | Path) -> list[tuple[str, Path]]:
    """The plugin files of a folder: ``name.py`` → plugin ``name``, sorted by name.

    Files whose stem is not a valid plugin name, and ``_private.py`` files, are skipped.
    This lists a directory (blocking): call it from a worker thread in async code.

    Args:
        directory: The folder.

    Returns:
        ``(name, path)`` pairs.
    """
    found = []
    for path in sorted(Path(directory).glob("*.py")):
        if path.is_file() and plugin_name(path) is not None:
            found.append((path.stem, path))
    return found


def plugin_name(path: str | Path) -> str | None:
    """The plugin a file publishes as (``greet.py`` → ``greet``), None if it is not a plugin."""
    p = Path(path)
    if p.suffix != ".py" or p.stem.startswith("_") or not is_valid_name(p.stem):
        return None
    return p.stem


async def read_source(path: str | Path) -> str:
    """A plugin file's text (read without blocking the event loop).

    Raises:
        PublishError: The file does not exist, is not UTF-8 or cannot be read.
    """
    try:
        return await anyio.Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PublishError(f"file {str(path)!r} does not exist") from None
    except UnicodeDecodeError:
        raise PublishError(f"file {str(path)!r} is not UTF-8 text") from None
    except OSError as exc:
        raise PublishError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None


async def publish_file(
    db: Any,
    path: str | Path,
    *,
    name: str | None = None,
    entrypoint: str | None = None,
    collection: str = "functions",
    force: bool = False,
    sign: Signer | None = None,
) -> Published:
    """Publish one ``.py`` file (read without blocking the event loop).

    Args:
        db: The database.
        path: The file.
        name: The plugin name; default: the file's stem.
        entrypoint: As :func:`publish`.
        collection: The functions collection.
        force: As :func:`publish`.
        sign: As :func:`publish`.

    Returns:
        What was published.

    Raises:
        PublishError: The file cannot be read or its content is not a valid plugin.
    """
    name = name or Path(path).stem
    source = await read_source(path)
    triggers = declared_triggers(source, name)
    return await publish(
        db,
        name,
        source,
        entrypoint=entrypoint,
        collection=collection,
        force=force,
        sign=sign,
        # None for a file without triggers: a signed push keeps working as before it.
        triggers=triggers or (None if sign is not None else []),
    )


async def publish_dir(
    db: Any,
    directory: str | Path,
    *,
    collection: str = "functions",
    force: bool = False,
    on_progress: Callable[[str, Published | PublishError], None] | None = None,
    sign: Signer | None = None,
) -> list[Published | PublishError]:
    """Publish every plugin file of a folder (see :func:`plugin_files`).

    One bad file does not stop the others: its :class:`PublishError` is returned in its place.

    Args:
        db: The database.
        directory: The folder.
        collection: The functions collection.
        force: As :func:`publish`.
        on_progress: Called after each file with its plugin name and outcome.
        sign: As :func:`publish`.

    Returns:
        One outcome per file, in name order.

    Raises:
        PublishError: The folder does not exist.
    """
    if not await anyio.Path(directory).is_dir():
        raise PublishError(f"folder {str(directory)!r} does not exist")
    files = await anyio.to_thread.run_sync(plugin_files, directory)
    outcomes: list[Published | PublishError] = []
    for name, path in files:
        outcome: Published | PublishError
        try:
            outcome = await publish_file(
                db, path, name=name, collection=collection, force=force, sign=sign
            )
        except PublishError as exc:
            outcome = exc
        outcomes.append(outcome)
        if on_progress is not None:
            on_progress(name, outcome)
    return outcomes


async def list_records(db: Any, *, collection: str = "functions") -> list[dict[str, Any]]:
    """Every record of the functions collection, sorted by name (without the source).

    Returns:
        Dicts with ``name``, ``revision``, ``enabled``, ``entrypoint``, ``size``,
        ``createdAt``, ``updatedAt``.
    """
    out = []
    async for doc in db[collection].find({}).sort("_id", ASCENDING):
        source = doc.get("source") or doc.get("fn") or ""
        out.append(
            {
                "name": doc["_id"],
                "revision": doc.get("revision"),
                "enabled": doc.get("enabled", True) is not False,
                "entrypoint": doc.get("entrypoint") or "main",
                "size": len(source.encode("utf-8")) if isinstance(source, str) else None,
                "createdAt": doc.get("createdAt"),
                "updatedAt": doc.get("updatedAt"),
            }
        )
    return out


async def get_record(
    db: Any, name: str, *, revision: int | None = None, collection: str = "functions"
) -> dict[str, Any]:
    """The current record of ``name``, or revision ``revision`` from its history.

    Returns:
        The record (``_id``, ``source``...) or the history entry (``name``, ``revision``,
        ``source``, ``entrypoint``, ``publishedAt``).

    Raises:
        UnknownPlugin: There is no such plugin (or, with ``revision``, no history for it).
        UnknownRevision: The history does not hold ``revision``.
    """
    if revision is None:
        doc = await db[collection].find_one({"_id": name})
        if doc is None:
            raise UnknownPlugin(name)
        return dict(doc)
    entry = await db[history_collection_name(collection)].find_one(
        {"name": name, "revision": revision}, {"_id": 0}
    )
    if entry is None:
        available = [h["revision"] for h in await history(db, name, collection=collection)]
        if not available and await db[collection].find_one({"_id": name}, {"_id": 1}) is None:
            raise UnknownPlugin(name)
        raise UnknownRevision(name, revision, available)
    return dict(entry)


async def history(db: Any, name: str, *, collection: str = "functions") -> list[dict[str, Any]]:
    """The published revisions of ``name``, newest first."""
    cursor = db[history_collection_name(collection)].find({"name": name}, {"_id": 0})
    return [dict(doc) async for doc in cursor.sort("revision", DESCENDING)]


async def rollback(
    db: Any,
    name: str,
    *,
    to: int | None = None,
    collection: str = "functions",
    sign: Signer | None = None,
) -> tuple[Published, int]:
    """Publish an earlier revision's source again, as a new (higher) revision.

    The revision's triggers come back with it (a revision without triggers removes the
    record's); a history entry older than the history's ``triggers`` field keeps the
    record's triggers as they are.

    Args:
        db: The database.
        name: The plugin name.
        to: The revision to go back to; None: the one before the current revision.
        collection: The functions collection.
        sign: As :func:`publish`: the old source is signed again for its new revision.

    Returns:
        The new publish and the revision whose source it carries.

    Raises:
        UnknownPlugin: No such plugin (neither a record nor any history).
        UnknownRevision: The history does not hold the revision asked for.
    """
    current = await db[collection].find_one({"_id": name}, {"revision": 1})
    entries = await history(db, name, collection=collection)
    if current is None and not entries:
        raise UnknownPlugin(name)
    available = [e["revision"] for e in entries]
    if to is None:
        current_rev = (current or {}).get("revision")
        ceiling = current_rev if isinstance(current_rev, int) else None
        # A rollout's candidate that was never promoted never was stable: not a way back.
        was_stable = [e for e in entries if not e.get("rollout") or "promotedAt" in e]
        older = [e for e in was_stable if ceiling is None or e["revision"] < ceiling]
        if ceiling is not None and current is not None:
            target = older[0] if older else None
        else:  # deleted record: restore the newest published revision
            target = was_stable[0] if was_stable else None
    else:
        target = next((e for e in entries if e["revision"] == to), None)
    if target is None:
        raise UnknownRevision(name, to, available)
    # The revision's triggers come back with its source ([] removes today's). An entry
    # written before the history kept triggers has none: the record's are kept then.
    kept = target.get("triggers")
    published = await publish(
        db,
        name,
        target["source"],
        entrypoint=target.get("entrypoint") or "main",
        collection=collection,
        force=True,
        check_syntax=False,
        sign=sign,
        triggers=kept if isinstance(kept, list) else None,
    )
    return published, int(target["revision"])


async def set_enabled(db: Any, name: str, enabled: bool, *, collection: str = "functions") -> None:
    """Enable or disable plugin ``name`` (a disabled plugin is unloaded by every host).

    Raises:
        UnknownPlugin: There is no such record.
    """
    result = await db[collection].update_one(
        {"_id": name}, {"$set": {"enabled": enabled, "updatedAt": datetime.now(UTC)}}
    )
    if result.matched_count == 0:
        raise UnknownPlugin(name)


async def delete(db: Any, name: str, *, collection: str = "functions") -> None:
    """Delete plugin ``name``'s record (its history stays, so ``rollback`` can restore it).

    Raises:
        UnknownPlugin: There is no such record.
    """
    result = await db[collection].delete_one({"_id": name})
    if result.deleted_count == 0:
        raise UnknownPlugin(name)


async def wait_converged(
    db: Any,
    published: Published | Sequence[Published],
    *,
    collection: str = "functions",
    timeout: float = 60.0,  # noqa: ASYNC109 - the wait's bound is its contract
    on_progress: Callable[[Progress], None] | None = None,
) -> Convergence:
    """Wait until every live host serves what was published (``push --wait`` for Python).

    ::

        published = await publish(db, "greet", source)
        await wait_converged(db, published, timeout=30)

    Args:
        db: The database.
        published: What :func:`publish` (or :func:`rollback`) returned, one or several.
        collection: The functions collection.
        timeout: Seconds to wait.
        on_progress: Called with each change, e.g. ``7/8 hosts serving greet r12``.

    Returns:
        How long the fleet took and which hosts serve it.

    Raises:
        FleetRefused: A live host refused the revision (it keeps serving its old one).
        FleetTimeout: Not every live host served it within ``timeout``.
    """
    from .fleetview import Target, wait_for_fleet  # the fleet view, only when waiting

    items = [published] if isinstance(published, Published) else list(published)
    return await wait_for_fleet(
        db,
        [Target(p.name, p.revision) for p in items],
        collection=collection,
        timeout=timeout,
        on_progress=on_progress,
    )


# -- rollouts (issue 16): a candidate beside the stable version ------------------------------
# The record layout and the compare-and-set rules: host/rollout_record.py and design.md.


def _check_weight(name: str, weight: float, what: str = "weight") -> float:
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not (math.isfinite(weight) and 0 <= weight <= 100)
    ):
        raise PublishError(
            f"plugin {name!r}: rollout {what} must be a percent 0-100, got {weight!r}"
        )
    return float(weight)


async def start_rollout(
    db: Any,
    name: str,
    source: str,
    *,
    mode: str = "canary",
    weight: float,
    sticky_key: str | None = None,
    policy: RolloutPolicy | None = None,
    entrypoint: str | None = None,
    sign: Signer | None = None,
    collection: str = "functions",
    check_syntax: bool = True,
) -> Published:
    """Start a rollout: ``source`` becomes a candidate beside the stable version.

    The candidate takes the next revision (the counter :func:`publish` uses) and goes into
    the history like any revision (with ``"rollout": mode``). Hosts compile it and route
    ``weight`` percent of calls to it (canary) or mirror that share to it (shadow).

    Args:
        db: The database.
        name: The plugin; it must have a stable version already.
        source: The candidate's source.
        mode: ``"canary"`` or ``"shadow"``.
        weight: Percent of calls (0-100) routed to (canary) or mirrored to (shadow) it.
        sticky_key: The args field whose value keeps a caller on one version.
        policy: When hosts abort it on their own (None: the defaults, no limit set).
        entrypoint: The candidate's entrypoint (None: the stable version's).
        sign: As :func:`publish`, over the candidate's name, source, entrypoint and revision.
        collection: The functions collection.
        check_syntax: As :func:`publish`.

    Returns:
        The candidate (``revision`` is the candidate's revision).

    Raises:
        PublishError: Bad name, source, mode, weight, sticky key or policy, or the
            candidate is identical to the stable version.
        UnknownPlugin: No record: publish a stable version first.
        RolloutRunning: A rollout is running already.
    """
    _check(name, source, entrypoint, check_syntax)
    if mode not in ROLLOUT_MODES:
        raise PublishError(f"plugin {name!r}: rollout mode must be canary or shadow, got {mode!r}")
    share = _check_weight(name, weight)
    if sticky_key is not None and (not isinstance(sticky_key, str) or not sticky_key):
        raise PublishError(f"plugin {name!r}: the sticky key must be a non-empty args field name")
    policy_doc = (policy or RolloutPolicy()).as_document()  # checked when it was made
    coll = db[collection]
    hist = db[history_collection_name(collection)]
    await hist.create_index([("name", ASCENDING), ("revision", DESCENDING)], unique=True)
    for _ in range(_MAX_ATTEMPTS):
        current: Mapping[str, Any] | None = await coll.find_one({"_id": name})
        if current is None:
            raise UnknownPlugin(name)
        stable = current.get("revision")
        running = _rollout_of(current)
        if running is not None:
            raise RolloutRunning(name, running["revision"], stable)
        if not isinstance(stable, int):
            raise PublishError(f"plugin {name!r}: the record has no revision; push it first")
        effective_entry = entrypoint or current.get("entrypoint") or "main"
        if (current.get("source") or current.get("fn")) == source and (
            current.get("entrypoint") or "main"
        ) == effective_entry:
            raise PublishError(
                f"plugin {name!r}: the candidate is identical to the stable r{stable}"
            )
        revision = await _next_revision(hist, name, current)
        now = datetime.now(UTC)
        rollout = {
            "revision": revision,
            "source": source,
            "entrypoint": effective_entry,
            "signature": sign(name, source, effective_entry, revision) if sign else None,
            "mode": mode,
            "weight": share,
            "sticky_key": sticky_key,
            "policy": policy_doc,
            "started_at": now,
            "updated_at": now,
            "steps": None,
        }
        result = await coll.update_one(
            {"_id": name, "revision": stable, **_rollout_filter(current)},
            {"$set": {"rollout": rollout, "updatedAt": now}},
        )
        if result.matched_count == 0:
            continue  # a publish or another rollout won: look again (and maybe refuse)
        await _add_history(
            hist,
            name,
            revision,
            source,
            effective_entry,
            now,
            rollout=mode,
            triggers=_trigger_list(current.get("triggers")),  # a candidate keeps the record's
        )
        return Published(name, revision, changed=True)
    raise PublishError(  # pragma: no cover - needs 20 lost races in a row
        f"plugin {name!r}: gave up after {_MAX_ATTEMPTS} concurrent writes won the race"
    )


async def _running(coll: Any, name: str, revision: int | None) -> Mapping[str, Any]:
    """The record, which has a rollout (of ``revision`` if given), or :class:`NoRollout`."""
    current = await coll.find_one({"_id": name})
    if current is None:
        raise UnknownPlugin(name)
    rollout = _rollout_of(current)
    if rollout is None or (revision is not None and rollout["revision"] != revision):
        raise NoRollout(
            name,
            revision=revision,
            stable=current.get("revision"),
            last=current.get("last_rollout"),
            running=rollout["revision"] if rollout is not None else None,
        )
    return dict(current)


async def _ended_since(coll: Any, name: str, revision: int) -> NoRollout:
    """Why the rollout of ``revision`` is gone (someone ended it between read and write)."""
    current = await coll.find_one({"_id": name}, {"revision": 1, "rollout": 1, "last_rollout": 1})
    rollout = _rollout_of(current)
    return NoRollout(
        name,
        revision=revision,
        stable=(current or {}).get("revision"),
        last=(current or {}).get("last_rollout"),
        running=rollout["revision"] if rollout is not None else None,
    )


async def set_rollout_weight(
    db: Any,
    name: str,
    weight: float,
    *,
    revision: int | None = None,
    steps: Mapping[str, Any] | None = None,
    collection: str = "functions",
) -> None:
    """Change the weight of ``name``'s running rollout (a compare-and-set on its revision).

    Args:
        db: The database.
        name: The plugin.
        weight: The new percent (0-100).
        revision: Only if this candidate revision is the one running (a ``--steps``
            walker must never move a rollout started after its own ended).
        steps: ``{"weights", "interval_s", "next_at"}`` of a walker (informational), or
            None to clear it.
        collection: The functions collection.

    Raises:
        PublishError: The weight is not a percent.
        NoRollout: No rollout (of ``revision``) is running.
    """
    share = _check_weight(name, weight)
    coll = db[collection]
    current = await _running(coll, name, revision)
    candidate = current["rollout"]["revision"]
    now = datetime.now(UTC)
    result = await coll.update_one(
        {"_id": name, "rollout.revision": candidate},
        {
            "$set": {
                "rollout.weight": share,
                "rollout.updated_at": now,
                "rollout.steps": dict(steps) if steps is not None else None,
                "updatedAt": now,
            }
        },
    )
    if result.matched_count == 0:
        raise await _ended_since(coll, name, candidate)


async def promote(
    db: Any,
    name: str,
    *,
    canary: float | None = None,
    revision: int | None = None,
    by: str = "cli",
    stats: Mapping[str, Any] | None = None,
    collection: str = "functions",
) -> Published:
    """Make the candidate the stable version (or, with ``canary``, turn it into a canary).

    The candidate becomes the record's ``source``, ``entrypoint``, ``revision`` and
    ``signature`` (it was signed for that revision when the rollout started) in one
    compare-and-set on its revision, which also unsets ``rollout`` and records
    ``last_rollout`` (outcome ``promoted``).

    Args:
        db: The database.
        name: The plugin.
        canary: Instead of promoting to stable: make the candidate (a shadow, usually) a
            canary serving this percent of calls.
        revision: Only if this candidate revision is the one running.
        by: Who promotes (``last_rollout.by``).
        stats: Both versions' statistics to keep in ``last_rollout`` (see
            :mod:`host.fleetview`), if known.
        collection: The functions collection.

    Returns:
        The candidate's revision, now stable (or now a canary).

    Raises:
        PublishError: ``canary`` is not a percent.
        NoRollout: No rollout (of ``revision``) is running, or it ended meanwhile.
    """
    share = _check_weight(name, canary, "canary weight") if canary is not None else None
    coll = db[collection]
    current = await _running(coll, name, revision)
    rollout = current["rollout"]
    candidate = rollout["revision"]
    now = datetime.now(UTC)
    update: dict[str, Any]
    if share is not None:
        update = {
            "$set": {
                "rollout.mode": "canary",
                "rollout.weight": share,
                "rollout.updated_at": now,
                "updatedAt": now,
            }
        }
    else:
        stable = current.get("revision")
        fields: dict[str, Any] = {
            "source": rollout["source"],
            "entrypoint": rollout.get("entrypoint") or "main",
            "revision": candidate,
            "updatedAt": now,
            "last_rollout": ended(
                name, rollout, "promoted", f"promoted over r{stable}", by, stats, now
            ),
        }
        unset: dict[str, Any] = {"rollout": ""}
        if rollout.get("signature"):
            fields["signature"] = rollout["signature"]
        else:
            unset["signature"] = ""
        if "fn" in current:
            unset["fn"] = ""
        update = {"$set": fields, "$unset": unset}
    result = await coll.update_one({"_id": name, "rollout.revision": candidate}, update)
    if result.matched_count == 0:
        raise await _ended_since(coll, name, candidate)
    if share is None:  # rollback() may go back to it: it was stable once
        await db[history_collection_name(collection)].update_one(
            {"name": name, "revision": candidate}, {"$set": {"promotedAt": now}}
        )
    return Published(name, candidate, changed=True)
